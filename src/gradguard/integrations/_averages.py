"""``gradguard run``: an average of the weights the script keeps is rolled back with them.

A script that keeps an EMA of its model (``torch.optim.swa_utils.AveragedModel``, updated
with ``ema.update_parameters(model)`` after each step) evaluates and saves that average;
a rollback that restored the weights alone left in it the updates it undid. The session
wraps ``AveragedModel.__init__``: an average built from a model whose parameters a guard
with a ladder trains is handed to that ladder (``Recovery.also_restore``), which snapshots
and restores it with the weights; an average built before the guard (the usual order: the
guard is built at the first ``optimizer.step()``) is handed to it when it is built, before
its first snapshot. Nothing runs per step.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from ..guard import Guard
    from ._takeover import Unit


class Averages:
    """The averages the script built (weakly held), each with the parameters it averages."""

    def __init__(self, units: Sequence[Unit]) -> None:
        self.units = units  # the session's, a live list
        self._live: list[tuple[weakref.ref[Any], frozenset[int]]] = []

    def wrap_init(self, orig: Any) -> Callable[..., None]:
        """The wrapper of ``AveragedModel.__init__``."""
        def fn(average: Any, model: nn.Module, *args: Any, **kwargs: Any) -> None:
            orig(average, model, *args, **kwargs)
            ids = frozenset(id(p) for p in model.parameters())
            self._live.append((weakref.ref(average), ids))
            for unit in self.units:
                _hand(unit.guard, average, ids)
        return fn

    def hand(self, guard: Guard) -> None:
        """Hand a guard just built the live averages of its parameters."""
        self._live = [(ref, ids) for ref, ids in self._live if ref() is not None]
        for ref, ids in self._live:
            _hand(guard, ref(), ids)


def _hand(guard: Guard | None, average: Any, ids: frozenset[int]) -> None:
    if guard is None or guard.recovery is None or average is None:
        return
    if any(id(p) in ids for p in guard.telemetry.params):
        guard.recovery.also_restore(average)
