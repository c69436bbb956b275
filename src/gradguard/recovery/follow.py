"""State that follows the weights and is rolled back with them (``Recovery(also=...)``).

An average of the weights (``torch.optim.swa_utils.AveragedModel``, an EMA, timm's
``ModelEmaV3``, Lightning's ``WeightAveraging``) takes in every update, the damaging ones
too: a rollback that restores the weights of 50 steps ago leaves the average holding the
weights of the steps it undid, and that average is the model evaluated and shipped.
Anything with ``state_dict()`` and ``load_state_dict()`` given here is copied into each
snapshot beside the model and loaded back when that snapshot is restored (a rollback, and
the LR probe's return to the arm it keeps: :mod:`.actions` is the one place for both).
Its values are not judged: NaN in an average is no reason to drop a snapshot of the
weights, which are what a rollback needs.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def _check(obj: Any, where: str) -> Any:
    if not (callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))):
        raise TypeError(
            f"{where}: expected objects with state_dict() and load_state_dict() (an "
            f"AveragedModel, an nn.Module), got {type(obj).__name__}")
    return obj


class Followers:
    """The objects rolled back with the weights, in the order given (a snapshot holds
    their state dicts in that order)."""

    def __init__(self) -> None:
        self.objs: list[Any] = []

    def add(self, objs: Any, where: str) -> None:
        """Add ``objs`` (one object, or a list or tuple of them; None: nothing), each once."""
        if objs is None:
            return
        items: Iterable[Any] = objs if isinstance(objs, (list, tuple)) else (objs,)
        for obj in items:
            if not any(obj is o for o in self.objs):
                self.objs.append(_check(obj, where))

    def state(self) -> list[Any]:
        """Their live state dicts (not copied: the snapshot store copies)."""
        return [o.state_dict() for o in self.objs]

    def load(self, states: list[Any] | None) -> None:
        """Load the state dicts of a snapshot (a copy the caller owns), matched by position;
        a snapshot taken before an object was added holds nothing for it, which keeps its
        live state."""
        for obj, sd in zip(self.objs, states or []):
            obj.load_state_dict(sd)
