"""Batches that changed: the weights a rollback restored give the trouble's loss.

A rollback restores weights whose loss was measured when they were saved (the snapshot's
level). If the loss is a function of the weights and the batches still come from the data
those weights were trained on, the first steps on the restored weights give about that
level again (the LR is backed off: the weights barely move). When instead their loss stays
where the trouble had it, ``SHIFT_RATIO`` times the snapshot's level or more and at least
``TROUBLE_SHARE`` of the level before the rollback, the weights were not to blame: the
batches (or the objective) changed under them. A curriculum's next stage, a new task in
continual learning, a dataset read in order (its next classes), a fine-tuning stage in the
same loop, an opponent that moved on: each throws the loss up at once, with gradients to
match, and the ladder's rungs (skip, back-off, rollback) were answering a change of data
as if it were damage; three rollbacks later the run was stopped (``TrainingDiverged``) at
the first step of its new data.

:class:`ShiftTest` is armed by each rollback and, at the first flush with
``SHIFT_STEPS`` finite losses on the restored weights, judges the lower of their median
and the median of all the flush has (up to ``AFTER``) against the snapshot's level and
against the median of the last ``BEFORE`` losses before the restore. A shift ends the
ladder's episode (``shifted`` in :mod:`.ladder`: the ceiling back to where it was, the
rollbacks no count towards an abort, the LR back at once: no update was at fault) and
everything learnt of the old data's loss and gradient norm starts afresh: the spike
statistics (the per-step verdict's and the detectors'), the clip policy's, the loss-rise
test's best, the LR probe's, and the snapshots' levels (the restored one's is its level on
the new batches; the weights of all are kept: a later explosion may still go back to
them). Training goes on from the restored weights on the new data; what the rollback cost
is the progress between the snapshot and the change.

Host values only, fed by the flush from the window it already has: no device read.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

from ..executors import STALE
from ..precursors import PrecursorState
from .verdict import SpikeVerdict

if TYPE_CHECKING:
    from ..guard import Guard
    from ._recovery import Recovery

#: The first finite losses on the restored weights: the first flush that has this many
#: judges the lower of their median and the median of all it has (up to ``AFTER``). The
#: first losses are computed before any update or after one or two at the backed-off LR
#: (an LR that blows the restored weights up again takes longer); all of them, because a
#: short stretch of bad batches that outlasted the rollback by a step or two and ended is
#: no change of data.
SHIFT_STEPS = 3
AFTER = 10
#: Their median must be at least this many times the level the snapshot was taken at ...
SHIFT_RATIO = 3.0
#: ... and at least this share of the level before the restore (the rollback did not help).
TROUBLE_SHARE = 0.5
#: The last finite losses before the restore whose median is the trouble's level.
BEFORE = 5
#: After a shift, the rollback is undone when the weights it replaced had a loss this many
#: times lower than the restored weights' on the batches since (they had learnt them).
UNDONE = 1.5


class Shift(NamedTuple):
    """What :meth:`ShiftTest.update` found: the batches changed."""

    step: int  # the last step judged
    snapshot: int  # the snapshot the rollback restored
    saved: float  # the loss level it was taken at
    after: float  # the level of the losses on the restored weights (see SHIFT_STEPS)
    before: float  # the median of the last BEFORE losses before the restore


class ShiftTest:
    """The test of each rollback's restored weights (see the module docstring)."""

    def __init__(self) -> None:
        #: the first step on the restored weights, the snapshot's step and its level
        self.armed: tuple[int, int, float] | None = None
        self._recent: list[float] = []  # the last BEFORE finite losses (any time)
        self._before: list[float] = []
        self._after: list[float] = []
        self._last: list[float] = []  # the last AFTER of those losses, and their count
        self._count = 0
        #: the last shift found, for the ladder's action to carry out (not checkpointed)
        self.found: Shift | None = None
        #: the armed rollback was undone (the batches at fault): the skipped steps' losses
        #: are the bad batches', no level of the weights in place
        self.undone = False

    def arm(self, restored_at: int, snapshot: int, saved: float | None) -> None:
        """A rollback restored the snapshot of ``snapshot``, taken at a loss of ``saved``
        (None: unknown, no test), before step ``restored_at``."""
        if saved is None or not math.isfinite(saved) or saved <= 0:
            self.armed = None
            return
        self.armed = (restored_at, snapshot, saved)
        self._before, self._after, self._last, self._count = list(self._recent), [], [], 0
        self.undone = False

    def update(self, steps: Sequence[int], losses: Sequence[float],
               codes: Sequence[float] | None = None,
               skipped: Sequence[bool] | None = None) -> Shift | None:
        """Take a flushed window in (its steps, losses, skip codes: a step whose update
        was voided computed its loss on the weights a restore replaced, and skip flags:
        after an undone rollback a skipped step's loss is a bad batch's); a :class:`Shift`
        once the restored weights' first losses are judged and found at the trouble's
        level, else None."""
        armed = self.armed
        for i, (step, x) in enumerate(zip(steps, losses)):
            if not math.isfinite(x):
                continue
            if armed is not None and step >= armed[0]:
                code = codes[i] if codes is not None else 0.0
                stale = math.isfinite(code) and bool(int(code) & STALE)
                bad = self.undone and skipped is not None and bool(skipped[i])
                if not stale and not bad:
                    if len(self._after) < AFTER:
                        self._after.append(x)
                    self._last = [*self._last, x][-AFTER:]
                    self._count += 1
                continue
            if armed is not None:
                self._before.append(x)
            self._recent.append(x)
        self._recent, self._before = self._recent[-BEFORE:], self._before[-BEFORE:]
        if armed is None or len(self._after) < SHIFT_STEPS:
            return None
        self.armed = None
        before = self._before
        if not before or min(before + self._after) <= 0:  # no ratio scale (a loss <= 0)
            return None
        # the first losses (the weights barely moved yet) and all the flush has (a stretch
        # of bad batches that ended is no change): both at the trouble's level
        after = min(statistics.median(self._after[:SHIFT_STEPS]), statistics.median(self._after))
        if self._count > AFTER:  # and the latest, when the flush has more: a stretch of
            # bad batches the rung clipped, not skipped, fills the first AFTER and is over
            # by the end of a long window (found by a stranger: an HF Trainer's loss x100
            # for 20 steps, back at its level for 34 steps of the flush, was "the batches
            # changed", the run unjudged and told to check its data pipeline)
            after = min(after, statistics.median(self._last))
        trouble = statistics.median(before)
        _, snapshot, saved = armed
        if after >= SHIFT_RATIO * saved and after >= TROUBLE_SHARE * trouble:
            self.found = Shift(steps[-1], snapshot, saved, after, trouble)
            return self.found
        return None

    def state_dict(self) -> dict[str, object]:
        return {"armed": None if self.armed is None else list(self.armed),
                "recent": list(self._recent), "before": list(self._before),
                "after": list(self._after), "undone": self.undone,
                "last": list(self._last), "count": self._count}

    def load_state_dict(self, sd: dict[str, object]) -> None:
        armed = sd.get("armed")
        self.armed = None if armed is None else (
            int(armed[0]), int(armed[1]), float(armed[2]))  # type: ignore[index]
        self._recent = list(sd.get("recent") or [])  # type: ignore[call-overload]
        self._before = list(sd.get("before") or [])  # type: ignore[call-overload]
        self.undone = bool(sd.get("undone", False))
        self._after = list(sd.get("after") or [])  # type: ignore[call-overload]
        self._last = list(sd.get("last") or self._after)  # type: ignore[call-overload]
        self._count = int(sd.get("count", len(self._after)))  # type: ignore[call-overload]


def rebase(rec: Recovery, guard: Guard, shift: Shift) -> None:
    """Forget what was learnt of the old batches' loss and gradient norm (see the module
    docstring): the new level is learnt from here, as at the start of a run."""
    state = guard.monitor.detector_state
    state.restart()
    state.precursors = PrecursorState()
    rec._verdict = SpikeVerdict()
    if guard.clip is not None:
        guard.clip.reset()
    rec._rise.reset()  # its best; the fresh model's level stays that of the weights at -1
    rec._probe.forget(shift.step)
    rec._level = None
    # taken on the old batches: unknown now, but for the weights just restored, whose level
    # on the new batches the test measured
    rec.ring.levels = {k: shift.after if k == shift.snapshot else None for k in rec.ring.levels}
    guard.batches_to_skip = 0  # the batches after the change are the run's data now


def restart(rec: Recovery, guard: Guard, shift: Shift, *, undone: bool) -> None:
    """The weights the run goes on from are its start on the new batches. When the rollback
    was undone (the weights it replaced had begun to learn them), they are kept now as the
    newest snapshot, at the level the test measured for them there, so that a rollback
    goes back to them first, not to weights for the old batches (found by a stranger:
    inputs x50 for good from step 300, on Adam, which learns them unguarded; once the
    change was found, three rollbacks in a row went to the snapshots of steps 249 and 149,
    each spiking on the new batches, and the run was stopped, 4150x its unguarded loss;
    now 0.4-1.2x it). When the rollback stands, the snapshot it restored is that start."""
    if undone and rec.snapshot(guard, shift.step):
        rec.ring.levels[shift.step] = shift.before
