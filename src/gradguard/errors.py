"""The exceptions and the warning category gradguard raises."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class GradGuardWarning(UserWarning):
    """Warnings gradguard emits about training health."""


class NonFiniteGradientError(FloatingPointError):
    """Raised by ``Guard(on_nonfinite="raise")`` on a non-finite gradient norm."""

    def __init__(self, message: str, step: int, layers: Sequence[str]) -> None:
        super().__init__(message)
        self.step = step
        self.layers = list(layers)


class TrainingDiverged(RuntimeError):
    """Training could not be brought back; carries the events that led here.

    Attributes:
        events: the guard's event history (most recent last).
        run_dir: the run directory (with ``events.jsonl`` and the report), if any.
        report_path: the HTML incident report written when training was given up (None
            without a run directory or without the ``report`` extra).
    """

    def __init__(
        self,
        message: str,
        events: Sequence[Any] = (),
        run_dir: str | None = None,
        report_path: str | None = None,
    ) -> None:
        super().__init__(message)
        self.events = list(events)
        self.run_dir = run_dir
        self.report_path = report_path
