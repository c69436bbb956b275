"""How large the update that wrecked the weights was: the rollback for a wreck (steps
skipped for their loss in a run's first steps, :mod:`.verdict`) cuts the LR ceiling by it,
not by half (docs/recovery.md, "Act at the step").

The update weighed is the first one taken from the weights the rollback restores,
measured around its step by the guard's update sampler (:mod:`gradguard.updates`: the
run's first update and the first after every restore); without the sampler
(``sample_updates=False``), the mean of the updates since, from the distance to the
wrecked weights. The first, not the mean: an SGD run's later updates, on weights already
damaged, grow with their gradients (a char LSTM at SGD 30: a mean of 35 times the weights'
norm, the first 32%). An update scales with the LR (SGD's first, Adam's sign-like ones), so
an LR 100x too high that wrecked the weights in one update is cut to about the LR that
trains; under a warm-up, the update at the schedule's peak
(:meth:`~gradguard.detectors.LrTracker.fraction`) is what is capped.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from .growth import first_inflation, momentum_gain
from .ladder import OFFSCALE_REASON, SPIKE_REASON, LadderState, Trigger
from .verdict import WARMUP_SPIKE_RATIO

if TYPE_CHECKING:
    from ..guard import Guard


def wrecked(guard: Guard, trig: Trigger, prior: LadderState) -> bool:
    """Whether the rollback ``trig`` decided (from the ladder's state ``prior``) is for a
    wreck: steps skipped for their loss in a run's first steps (``trig.rollback``), or a
    streak of off-scale or spiking steps whose weights the step after its back-off proved at
    fault (it failed too, on the same weights: not the batches, the updates before them).
    Not under ``torch.distributed``: the cap is measured on this rank's shards, and the
    ranks must decide alike (nor is the loss judged per step there)."""
    if trig.kind != "skip":
        return False
    if trig.rollback:
        return True
    return (prior.undo is not None and trig.reason in (OFFSCALE_REASON, SPIKE_REASON)
            and getattr(guard, "dist", None) is None)


def cap(guard: Guard, snap: dict[str, Any], prior: LadderState, step: int,
        restored_step: int | None) -> tuple[float, float] | None:
    """The LR factor under which the update weighed (see the module docstring) would have
    moved the snapshot's weights by ``update_ratio_high`` (10%) of their norm, the
    update/weight ratio the detectors call too large, and the ratio measured; None when it
    was no larger. ``prior``: the ladder's state before this rollback; ``step``: the
    rollback's; ``restored_step``: the first step on the weights the last rollback restored.
    One host read, on this rollback only. None too after a burst since the snapshot (an
    ``lr_too_high`` jump, the LR back under its peak since): the updates were taken at the
    burst's LR, no measure of the one in force (the update of an LR x100 burst, weighed at
    the LR after it, capped an SGD run at x0.0126 for good). A jump that stays is the LR
    in force, and is capped (a resume at an LR 300x too high)."""
    if guard.monitor.lr_tracker.burst_since(int(snap["step"])):
        return None
    sampler = getattr(guard, "_sampler", None)
    first = None
    if sampler is not None and sampler.first is not None and sampler.first_step is not None \
            and sampler.first_step > int(snap["step"]):
        first = sampler.first  # the first update from these weights
    saved, device = snap["model"], guard.telemetry.device
    diff = torch.zeros((), device=device) if first is None else first.to(device)
    base = torch.zeros((), device=device)
    for name, p in guard.model.named_parameters():
        w = saved.get(name)
        if w is None or not p.is_floating_point():
            continue
        w = w.to(p.device, torch.float32)
        # on the telemetry's device: a model split over devices sums in one place
        base += w.square().sum().to(device)
        if first is None:
            diff += (p.detach().float() - w).square().sum().to(device)
    d2, b2 = torch.stack([diff, base]).tolist()
    if not (math.isfinite(d2) and b2 > 0):
        return None
    ratio = math.sqrt(d2 / b2)
    if first is None:  # the mean of the updates taken since
        start = max(int(snap["step"]), -1 if restored_step is None else restored_step - 1)
        ratio /= max(1, step - start - (prior.consecutive_skips + 1))
    elif int(snap["step"]) < 0:  # the run's first update, from a fresh optimizer state
        ratio /= first_inflation(guard.optimizer)
    high = guard.monitor.config.update_ratio_high
    # an update at the schedule's peak is 1 / share times one taken at that share (a
    # warm-up): the share the first update ran at, or, for the mean, the share now
    at = guard.monitor.lr_tracker.fraction()
    if first is not None and sampler is not None:
        at = sampler.first_share
    if ratio / at <= high:
        return None
    return prior.factor * at * high / ratio, ratio


def share(ratio: float) -> str:
    """``5.18`` -> "518% of"; ``310.4`` -> "310 times"."""
    return f"{ratio:.0%} of" if ratio < 10 else f"{ratio:.3g} times"


#: A first step whose loss was this many times that of the same (fresh) weights on the
#: batches after a wreck's rollback to them: its batch wrecked the weights, not the LR (the
#: per-step verdict's loss bar in its warm-up).
FIRST_BATCH_RATIO = WARMUP_SPIKE_RATIO[1]
#: Taken steps on the restored weights the first step's loss is weighed against.
FIRST_BATCH_STEPS = 5
#: How a lift of the cap for a first batch at fault begins its reason (the event's words).
FIRST_BATCH = "the run's first batch"


def first_batch_at_fault(rec: Any, guard: Guard, steps: Sequence[int],
                         losses: Sequence[float], skips: Sequence[bool]) -> Trigger | None:
    """After a wreck's rollback to the weights before the first step, capped: the ``raise``
    trigger that lifts the cap back, when the loss of the run's first step, on those same
    weights, was ``FIRST_BATCH_RATIO`` times or more the median of the first
    ``FIRST_BATCH_STEPS`` taken since (``rec._first_check``: the first step on the restored
    weights, that loss and the factor in force at that step), and the first update from
    the restored weights, scaled to the LR the cap took away, moves them by no more than
    ``update_ratio_high`` (an LR too high as well keeps its cap: found by a regression
    hunt, an x100 first batch on SGD at 30x had its cap lifted and wrecked the weights again,
    6.5x the run with the cap; one host read, once). The update that wrecked the weights was
    that batch's: the
    per-step verdict has no history to judge a first step by, and the cap, sized from the
    update, assumed the LR's (found by a stranger: a regression whose first batch had its
    targets x1e4, the later ones 5% alike, rolled back to the fresh weights at step 5 and
    capped at x0.0093 for good: 27x its loss without that batch first). None until judged;
    the check is dropped once judged."""
    check = rec._first_check
    if check is None or check[1] is None or check[2] is None:
        return None
    after = [x for s, x, sk in zip(steps, losses, skips)
             if s >= check[0] and not sk and math.isfinite(x)]
    rec._first_after = (rec._first_after + after)[:FIRST_BATCH_STEPS]
    if len(rec._first_after) < FIRST_BATCH_STEPS:
        return None
    rec._first_check = None
    level = statistics.median(rec._first_after)
    st = rec.state
    top = st.episode_ceiling
    if top is None or st.ceiling >= top or level <= 0 or check[1] < FIRST_BATCH_RATIO * level:
        return None
    sampler = getattr(guard, "_sampler", None)
    if sampler is None or sampler.first is None or sampler.first_step is None \
            or sampler.first_step < check[0]:
        return None  # the update on a usual batch unmeasured: the cap stands
    device = guard.telemetry.device
    base = torch.zeros((), device=device)
    for p in guard.model.parameters():
        if p.is_floating_point():
            base += p.detach().float().square().sum().to(device)
    d2, b2 = torch.stack([sampler.first.to(device), base]).tolist()
    at = check[2] * sampler.first_share  # the factor that update was taken at
    if not (math.isfinite(d2) and b2 > 0 and at > 0):
        return None
    # the update a usual batch makes once settled at the LR the cap took away: the first
    # from the fresh state, less its inflation (RMSprop), times momentum's gain (SGD: a
    # regression hunt found an x30 first batch on SGD at 0.1 with momentum 0.9, an LR its
    # twin diverges at, lifted on a first update under the bar: 3.7-6.9x the run with the cap)
    opt = guard.optimizer
    full = math.sqrt(d2 / b2) / first_inflation(opt) * momentum_gain(opt) * top / at
    if full > guard.monitor.config.update_ratio_high:
        return None  # at the LR the cap took away a usual batch's update is too large too
    why = (f"{FIRST_BATCH} had a loss of {check[1]:.4g}, {check[1] / level:.3g}x that of the same "
           f"weights on the batches since ({level:.4g}): its batch wrecked them, not the LR")
    return Trigger("raise", int(steps[-1]), why, value=top, data=True)
