"""The exceptions and the warning category gradguard raises."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

_PACKAGE = str(Path(__file__).resolve().parent)
#: torch's frames between a caller and a function under ``torch.compiler.disable``
#: (``Guard.step``): its wrapper in ``torch/_dynamo/eval_frame.py``
_DYNAMO = os.path.join("torch", "_dynamo", "")
#: and torch's ``Optimizer.step`` wrapper, which runs the step pre-hook that guards an
#: optimizer stepped by the script itself (``gradguard run``, the trainer integrations)
_OPTIM = os.path.join("torch", "optim", "optimizer.py")


class GradGuardWarning(UserWarning):
    """Warnings gradguard emits about training health."""


def caller_stacklevel() -> int:
    """The ``stacklevel`` of ``warnings.warn``, called by the function that calls this one,
    that names the first frame outside gradguard (and torch's ``torch.compiler.disable``
    wrapper of ``Guard.step``, and ``Optimizer.step``'s wrapper that runs the hook of an
    optimizer guarded in a hook): the user's line, however many of gradguard's calls lie
    between (``Guard.load_state_dict`` or ``Recovery.load_state_dict`` alike, a flush
    inside ``guard.step``, or the script's own ``optimizer.step()`` under ``gradguard run``)."""
    frame: FrameType | None = sys._getframe(2)
    level = 2
    while frame is not None and _internal(frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    return level


def _internal(filename: str) -> bool:
    return (_DYNAMO in filename or filename.endswith(_OPTIM)
            or str(Path(filename).resolve()).startswith(_PACKAGE))


class StateMismatch(ValueError):
    """``Guard.load_state_dict`` was given a state that does not fit the guard (saved over
    other parameters, with another ``every`` or another clip policy); raised before
    anything is loaded. ``what``: what differs; ``fix``: what to do."""

    def __init__(self, what: str, fix: str) -> None:
        super().__init__(f"Guard.load_state_dict: {what}: {fix}")
        self.what, self.fix = what, fix


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
