"""A ``ReduceLROnPlateau`` over the optimizer a rollback restores starts again with it.

The scheduler keeps the best metric it has seen and halves the LR after ``patience``
calls without a better one. After a rollback that best is the replaced weights': the
restored ones (older, or the fresh model's) sit above it for as long as they take to get
back there, and the scheduler cuts the LR on each ``patience``, on top of what the
Recovery did. Found by strangers: a digits MLP on AdamW at 0.03 with the scheduler
stepped on the batch loss, rolled back to its fresh weights at step 60 (the weights'
growth), had its LR halved every 21 steps down to 1.5e-5 by step 299 against 1.2e-4
unguarded, 2.4-4.1x its unguarded held-out loss; a BatchNorm CNN stepped on the
validation loss per epoch, 3.3-4x. At a rollback the scheduler's best metric and counts
are reset, as at its construction: it judges the restored weights' progress from there
(and again at the next step if the loop stepped it in between on the loss of the step the
rollback came at, which the replaced weights gave).

The schedulers are found among the optimizer's referrers (:func:`gc.get_referrers`, at a
rollback only: a scan of the objects the collector tracks, milliseconds in a small
program); torch's scheduler holds the optimizer, not the other way round.
"""

from __future__ import annotations

import gc
from typing import Any, TypeVar

from torch.optim.lr_scheduler import ReduceLROnPlateau

_S = TypeVar("_S")


def schedulers(kind: type[_S], *optimizers: Any) -> list[_S]:
    """The schedulers of type ``kind`` over one of ``optimizers``, found among their
    referrers (a scan of the collector's objects: call it at a rare event only)."""
    found: dict[int, _S] = {}
    for opt in {id(o): o for o in optimizers if o is not None}.values():
        for ref in gc.get_referrers(opt):
            if isinstance(ref, dict):  # an instance's __dict__ (an interpreter without
                ref = next((o for o in gc.get_referrers(ref)  # inline attribute values)
                            if getattr(o, "__dict__", None) is ref), None)
            if isinstance(ref, kind) and getattr(ref, "optimizer", None) is opt:
                found[id(ref)] = ref
    return list(found.values())


def reset(*optimizers: Any) -> list[tuple[ReduceLROnPlateau, int]]:
    """Reset every ``ReduceLROnPlateau`` over one of ``optimizers`` to its state at
    construction (best metric, bad-epoch and cooldown counts; the LRs stay); those reset,
    each with its count of calls (``last_epoch``) now, for :func:`settle`."""
    found = schedulers(ReduceLROnPlateau, *optimizers)
    for sched in found:
        _restart(sched)
    return [(sched, sched.last_epoch) for sched in found]


def settle(reset_at: list[tuple[ReduceLROnPlateau, int]]) -> None:
    """At the step after the rollback: a scheduler stepped exactly once since was given
    the metric of the step the rollback came at, the replaced weights' loss (a loop that
    steps it on the batch loss, after ``guard.step``), and starts again from here; one
    not stepped yet, or stepped more, had a metric of the restored weights."""
    for sched, calls in reset_at:
        if sched.last_epoch == calls + 1:
            _restart(sched)


def _restart(sched: ReduceLROnPlateau) -> None:
    sched.best = sched.mode_worse
    sched.num_bad_epochs = 0
    sched.cooldown_counter = 0
