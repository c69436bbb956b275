"""What a flushed window's host values say about its skipped steps and the level before a
trouble (:mod:`._flush`'s reads; pure functions of the window's values, no device read)."""

from __future__ import annotations

import math
import statistics
from typing import TYPE_CHECKING

from ..executors import NONFINITE
from .defaults import PROGRESS_STEPS

if TYPE_CHECKING:
    from ..telemetry import Window


def cleared(window: Window, skips: list[bool], codes: list[float] | None) -> set[int]:
    """The window's steps skipped as non-finite alone, in a row, whose next step in the
    window was taken: finite gradients on the weights they ran on (a skip changes none),
    so their batches were at fault and the weights are no less healthy for them (found by
    a stranger: a NaN in 28% of a digits MLP's batches left every window unhealthy, no
    snapshot after the first, and a streak's rollback went to the fresh weights, at
    chance at the end)."""
    if codes is None:
        return set()
    out: set[int] = set()
    taken_next = False  # the step after this one was taken, or cleared as these are
    for i in reversed(range(len(skips))):
        c = codes[i]
        if not skips[i]:
            taken_next = True
        elif taken_next and math.isfinite(c) and int(c) == NONFINITE:
            out.add(window.steps[i])
        else:
            taken_next = False
    return out


def skipped_whole(window: Window, skips: list[bool], since: int, run: int) -> bool:
    """Whether the ``run`` steps of a spike from ``since`` were all skipped in ``window``,
    and the step after them is in it and was taken."""
    skipped = {s: k for s, k in zip(window.steps, skips)}
    return all(skipped.get(s) for s in range(since, since + run)) and (
        skipped.get(since + run) is False)


def level_before(window: Window, losses: list[float], start: int,
                  before_window: float | None) -> float | None:
    """The loss level before trouble that began at ``start`` ahead of any healthy flush
    (the loss-level tests judge from step ``JUDGE_EVERY``): the median of this window's
    losses before it, with the level of the flush before it where the window began at or
    before ``start`` and holds fewer than ``PROGRESS_STEPS`` of them (found by a stranger: a
    GRU's LR x1000 for three steps at step 40, confirmed at the flush of step 49 with one
    loss before it in the window, left no level to come back to: no progress check ran
    after the back-off, and the wrecked weights trained on at 4-6x the unguarded loss)."""
    before = [x for s_, x in zip(window.steps, losses) if s_ < start and math.isfinite(x)]
    if len(before) < PROGRESS_STEPS and before_window is not None and window.steps[0] <= start:
        before.append(before_window)
    return statistics.median(before) if before else None
