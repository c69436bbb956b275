"""``lr_too_high`` from the learning rates the optimizer is about to use."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..events import Event
from .config import LR_JUMP_RATIO


class LrTracker:
    """Watches the learning rates the optimizer will use (host floats, read per step at no
    device cost) and reports a jump of ``ratio`` or more between consecutive steps as an
    ``lr_too_high`` event. Tensor learning rates (capturable optimizers) are not read.

    Example:
        >>> from gradguard.detectors import LrTracker
        >>> tr = LrTracker()
        >>> tr.observe(0, [{"lr": 1e-3}]); tr.observe(1, [{"lr": 0.1}])
        >>> [(e.kind, e.step, e.value) for e in tr.pop_events()]
        [('lr_too_high', 1, 100.0)]
    """

    def __init__(self, ratio: float = LR_JUMP_RATIO) -> None:
        self.ratio = ratio
        self._last: list[float | None] = []
        self._events: list[Event] = []

    def observe(self, step: int, param_groups: Sequence[Mapping[str, Any]]) -> None:
        now = [g["lr"] if isinstance(g.get("lr"), (int, float)) else None for g in param_groups]
        if len(now) == len(self._last):
            for i, (a, b) in enumerate(zip(self._last, now)):
                if a is not None and b is not None and a > 0 and b >= self.ratio * a:
                    self._events.append(Event(
                        kind="lr_too_high", step=step, severity="warning", value=b / a,
                        threshold=self.ratio,
                        message=(f"step {step}: learning rate of param group {i} jumped "
                                 f"{b / a:.3g}x ({a:.3g} -> {b:.3g})"),
                        remedy=("Check the LR schedule / manual LR changes; raise the LR "
                                "gradually (warm-up)."),
                        data={"group": i, "lr": b, "previous_lr": a},
                    ))
        self._last = now

    def pop_events(self) -> list[Event]:
        ev, self._events = self._events, []
        return ev

    def state_dict(self) -> dict[str, Any]:
        return {"last": list(self._last), "events": [e.to_json() for e in self._events]}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        self._last = list(sd["last"])
        self._events = [Event.from_json(e) for e in sd.get("events", [])]
