"""Whether a clipped gradient norm settled at a new level: the host-only test behind
:meth:`gradguard.ZClip.observe` (gradguard's addition to ZClip), on the last flushed steps.

The last ``SHIFT_STEPS`` flushed steps (at least ``SHIFT_MIN_STEPS``, every norm and loss
finite, none skipped), at least ``SHIFT_CLIPPED`` of them clipped, whose norm held level
(the medians of their two halves within ``SHIFT_LEVEL`` of each other: not growing as an
explosion grows) while the loss did not rise (the median of the second half not above the
first's), are a norm that settled at a new level. ZClip then decides whether that level is
within reach of the one it learnt, and re-anchors its statistics on the second half.
"""

from __future__ import annotations

import math
import statistics
from typing import NamedTuple

SHIFT_MIN_STEPS = 20
SHIFT_STEPS = 50
SHIFT_CLIPPED = 0.5
SHIFT_LEVEL = 2.0

#: A flushed step: (step, total norm, loss, clip coefficient, skipped).
Row = tuple[int, float, float, float, bool]


class Settled(NamedTuple):
    """A level the norm settled at: the second half's median norm and its norms, the step
    of the last row, and how many of the ``steps`` rows were clipped."""

    level: float
    norms: list[float]
    step: int
    clipped: int
    steps: int


def settled(rows: list[Row], floor: float = 0.0) -> Settled | None:
    """The level ``rows`` (oldest first) settled at, or None (see the module docstring).
    ``floor``: a norm at or below it (no log) counts as not finite."""
    if len(rows) < SHIFT_MIN_STEPS:
        return None
    steps, norm, loss, coef, skipped = zip(*rows)
    n, half = len(rows), len(rows) // 2
    clipped = sum(c < 1.0 for c in coef)
    if (any(skipped) or clipped < SHIFT_CLIPPED * n
            or not all(math.isfinite(v) and v > floor for v in norm)
            or not all(math.isfinite(v) for v in loss)):
        return None
    first, second = statistics.median(norm[:half]), statistics.median(norm[half:])
    if not (1 / SHIFT_LEVEL <= second / first <= SHIFT_LEVEL):
        return None  # growing (or falling) as an explosion does, not level
    if statistics.median(loss[half:]) > statistics.median(loss[:half]):
        return None
    return Settled(second, list(norm[half:]), steps[-1], clipped, n)
