"""Per step: the skip flag of each step, heard by the ladder as a trigger: read on the
host when the guard read it (non-fused optimizers), else copied from the device without
waiting and heard once the copy is done (:mod:`.late`; fused optimizers, a GradScaler),
or at the flush (:mod:`._flush`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .. import distributed
from ..events import listed
from ..executors import NONFINITE, STALE, Hook
from . import _slip, actions, finite, growth, plateau
from .defaults import SPIKE_GRACE
from .ladder import DATA_REASONS, NONFINITE_REASON, OFFSCALE_REASON, SPIKE_REASON, Trigger
from .late import enabled
from .snapshots import copy_state
from .verdict import GRAD_SPIKE, LOSS_SPIKE, OFFSCALE, RUNNING_NAN

#: The verdict bits a step keeps through the ``SPIKE_GRACE`` when its gradient norm is far
#: off the recent ones (:attr:`.verdict.SpikeVerdict.grad_far`): a bad batch's spike.
GRACE_KEEPS = GRAD_SPIKE

if TYPE_CHECKING:
    from ..guard import Guard
    from ..telemetry import StepStats
    from ._recovery import Recovery


def before_step(rec: Recovery, guard: Guard) -> None:
    """See :meth:`Recovery.before_step <gradguard.Recovery.before_step>`."""
    # (after the first step's verdict: the weights before it go with the verdict's fresh
    # statistics, and the clip policy's that have seen its norm, as they always did)
    if guard.step_count == 0 and not len(rec.store) and rec.ring.keep(
            guard, -1, fresh_verdict=True):
        rec.ring.kept(-1, rec.restores)
    if rec._resumed:
        rec._resumed = False
        if not len(rec.store):  # held in memory only, as a stand-in (load_state_dict)
            rec.ring.keep(guard, guard.step_count - 1, disk=False)
    elif guard.step_count > 0 and not rec.busy and \
            guard.monitor.lr_tracker.jumped(guard.step_count) and \
            newest_kept(rec) != guard.step_count - 1:  # not kept at the flush already
        # the LR jumped far above any the run had or planned (a burst, a schedule's slip):
        # keep the weights from before its first update, as the first step's are kept; a
        # rollback after it then loses no training (it went back to the last cadence
        # snapshot, up to snapshot_every steps before: a ResNet with an LR x300 burst for
        # 5 steps ended 2.3-3.7x its twin, rolled back 57 steps)
        rec.snapshot(guard)
    _slip.observe(rec, guard)  # an LR burst that ended: the ladder's factors rescaled
    if rec._plateaus:  # a rollback at the step before: its plateau schedulers (.plateau)
        plateau.settle(rec._plateaus)
        rec._plateaus = []


def hear_flags(rec: Recovery, guard: Guard) -> None:
    """Under a trainer's hook, before this step's verdict: the skip flags of its earlier
    steps are heard, once their last update is done (the verdict and the clip policy must
    not learn from a step a restore voids)."""
    if isinstance(guard.executor, Hook):
        hear(rec, guard)
        if guard.step_count in (growth.STEP, growth.DECIDE):  # the trainer took them: .growth
            grown(rec, guard)
    rec._feed(guard, Trigger("tick", guard.step_count), list)


def newest_kept(rec: Recovery) -> int | None:
    """The step of the newest snapshot: in memory, else on disk (a resumed run's memory
    holds none until it takes one; found by a stranger: after a resume from step 149 an LR
    jump at 150 kept the weights of 149 again, in memory, with the clip statistics of
    step 150 already in them, and the rollback restored those, not the snapshot on disk)."""
    steps = rec.store.steps()
    if not steps and rec.ring.disk is not None:
        rec.ring.wait()
        steps = rec.ring.disk.steps()
    return steps[-1] if steps else None


def verdict(rec: Recovery, stats: StepStats, loss: Tensor | float | None) -> Tensor:
    """This step's spike verdict (device uint8 bits, no host read; see :mod:`.verdict`):
    zero unless ``skip_spikes`` and the ladder is not in the first ``SPIKE_GRACE`` steps
    after acting, or after the restore of a rollback, once a step was taken since (its
    statistics still learn from every step). Until a step is taken the weights are those
    the rung found (a skipped step changes none), or the restored ones: a spike there is
    the batch's, and is skipped (a stretch of bad batches is skipped whole, not clipped
    into the weights at the lowered LR). With ``skip_spikes``, a step whose batch moved a
    batch norm layer's running variance from another scale is ``OFFSCALE`` (:mod:`gradguard._running`),
    grace or not: that test looks at the step alone, not at statistics the ladder's acts
    moved.

    Under torch.distributed only the gradient norm is judged per step: the total norm is
    the same on every rank (one all-reduce, or identical DDP gradients), the loss and a
    layer's batch statistics are each rank's own, and a skip must be decided alike
    everywhere without a collective of its own. Loss spikes are then judged at the flush,
    over the agreed window."""
    distributed_run = distributed.world_size() > 1
    code = rec._verdict(stats.total_norm, None if distributed_run else loss)
    if not rec.skip_spikes:
        return code.zero_()
    g = rec._guard() if rec._guard is not None else None
    # the grace runs from the ladder's last trigger, or from the restore it carried out
    # later (a trainer's hook restores at the step that hears the trigger): the restored
    # statistics describe the restored weights on the batches they were saved with
    last = max((s for s in (rec.state.last_trigger, rec.ring.restored_step) if s is not None),
               default=None)
    if last is not None and (g.step_count if g is not None else 0) - last <= SPIKE_GRACE and (
            rec._last_taken is not None and rec._last_taken > last):
        # ... except a gradient norm x1000 the recent ones (WARMUP_SPIKE_RATIO): no large
        # gradient left over from the trouble, but a bad batch (found by a stranger: an
        # x1e4-target batch four steps after a rollback was clipped into the restored
        # weights, wrecked them again and the run ended 14x its twin)
        assert rec._verdict.grad_far is not None
        code.mul_(rec._verdict.grad_far.to(torch.uint8)).bitwise_and_(GRACE_KEEPS)
    offscale = None if g is None or distributed_run else g._running.offscale(code.device)
    if offscale is not None and g is not None:  # judged on its own step alone: no grace
        if (lost := g._running.lost) is not None:
            # statistics a forward the guard never saw turned NaN/Inf (a loop that skipped
            # the loss before backward); a step whose own gradients are non-finite is
            # skipped as such, its statistics put back with it (found by a regression hunt:
            # NaN batches that reached backward were "spiking" steps, their back-offs no
            # longer undone, and a rollback capped the LR: 2.5-3.5x the run before)
            lost = lost & stats.finite
            offscale = offscale | lost
            code |= lost.to(torch.uint8) * RUNNING_NAN
        code |= offscale.to(torch.uint8) * OFFSCALE
    return code


def after_step(rec: Recovery, guard: Guard, stats: StepStats, outcome: Any) -> None:
    """Per step: count skips when the guard knows the skip flag (non-fused optimizers);
    a flag that stayed on the device (fused optimizers, a ``GradScaler``) is copied to
    the host without waiting and heard once there (:mod:`.late`), else at the flush."""
    step = guard.step_count - 1
    if guard.step_count in (growth.STEP, growth.DECIDE) and not isinstance(guard.executor, Hook):
        grown(rec, guard)  # after the update (a trainer's: before the next, see before_step)
    if outcome.code is not None or isinstance(outcome.trouble, bool):
        rec._host_steps.add(step)
        routine = outcome.amp_row is not None and bool(outcome.skipped) and not outcome.trouble
        trig = skip_trigger(rec, bool(outcome.trouble), step, outcome.code or 0, routine=routine)
        if trig is not None:
            _feed_skip(rec, guard, trig, outcome.code or 0, stats.param_norms)
        if not isinstance(guard.executor, Hook):
            hear_weights(rec, guard)
        return
    skipped = outcome.skipped
    if not isinstance(skipped, Tensor) or not enabled():
        return
    if outcome.amp_row is None:  # skipped exactly when in trouble: the verdict bits alone
        rec._late.push(step, skipped, (stats.param_norms, False))
    else:  # a GradScaler's routine overflow is skipped and no trouble: both, packed
        flag = skipped.to(torch.uint8) * 2 + outcome.trouble.to(torch.uint8)
        rec._late.push(step, flag, (stats.param_norms, True))
    if not isinstance(guard.executor, Hook):  # the update is done: act after it
        hear(rec, guard)


def grown(rec: Recovery, guard: Guard) -> None:
    """After the run's first ``growth.STEP`` updates, while the ladder has not acted: note
    whether the weights grew far past what training needs (:mod:`.growth`); after
    ``growth.DECIDE``, unless the loss learnt by then or a rollback came first, roll back
    to the weights before the first step and cap the LR."""
    if guard.step_count == growth.DECIDE:
        noted, rec._grew = rec._grew, None
        if noted is not None and not rec.restores and _judged(rec, guard):
            _roll_back_grown(rec, guard, noted)
        return
    if not _judged(rec, guard) or rec.state.last_trigger is not None:
        return
    fresh = growth.fresh_weights(rec)
    if fresh is None:
        return
    ratio = growth.growth(guard, fresh)
    if ratio is not None:  # RMSprop's first updates are larger by its missing bias correction
        ratio = 1.0 + (ratio - 1.0) / growth.early_inflation(guard.optimizer)
    share = growth.level(guard, rec._rise.initial, rec._flushed)
    if ratio is None or not ratio >= growth.GROWTH or (share is not None and
                                                      share <= growth.LEARNT):
        return
    rec._grew = growth.Noted(ratio, share, copy_state(fresh))


def _judged(rec: Recovery, guard: Guard) -> bool:
    """Whether the growth rule judges this run (:mod:`.growth`)."""
    # nor after an LR burst (a jump, the LR back under its peak since): the growth is the
    # burst's, not the LR in force (a burst at step 5 of a warm-up was capped for good from
    # it: held-out 1.80 against 0.83 unguarded)
    # LBFGS (a closure optimizer): each step is several quasi-Newton updates, none scaled
    # as a first-order one by the LR; on separable digits it grew the weights 27x in 20
    # steps, healthily, and the rollback undid the fit (see .growth)
    return not (not rec.early_growth or distributed.world_size() > 1 or rec.restores
                or guard._needs_closure or guard.monitor.lr_tracker.burst_since(-1))


def _percent(x: float) -> str:
    """A share as a percentage, two significant digits under 1%."""
    return f"{x:.0%}" if x >= 0.01 else f"{100 * x:.2g}%"


def _roll_back_grown(rec: Recovery, guard: Guard, noted: growth.Noted) -> None:
    """The decision at ``growth.DECIDE`` on a growth noted at ``growth.STEP``."""
    fresh = noted.fresh if noted.fresh is not None else growth.fresh_weights(rec)
    share = growth.level(guard, rec._rise.initial, rec._flushed)
    if fresh is None or noted.spared(share):
        return
    words = " and ".join(w for w in (
        None if noted.share is None else f"{_percent(noted.share)} of the fresh model's then",
        None if share is None else f"{_percent(share)} at step {growth.DECIDE}") if w)
    reason = (f"the weights grew {noted.ratio:.3g}x in the first {growth.STEP} steps (the "
              f"median weight matrix's norm){', the loss at ' + words if words else ''}: an "
              "LR far too high")
    top = rec.state.ceiling
    # the trouble began at the first step: the level before it is the fresh model's (not
    # the grown run's at step 60, which a restart at the capped LR has 50 steps to reach:
    # found in the A/B, a warm-up + cosine MLP rolled back a second time for missing it)
    rec._feed(guard, Trigger("spike", guard.step_count, reason, rec._rise.initial,
                             rollback=True, cap=growth.cap(noted.ratio), fresh=fresh), list)
    if rec.state.ceiling < top:  # the LR that grew them failed: no retry tries it again, the
        # first goes halfway below it (a retry at SGD's x1 ran into a loss spike at step 293,
        # the run's only warning, that its summary then led with)
        rec._probe.retried.append(top)


def hear(rec: Recovery, guard: Guard) -> None:
    """Feed the ladder the device skip flags whose copy to the host has completed, then
    the checks of the weights (:func:`hear_weights`)."""
    at = guard.step_count - 1
    for step, flag, (norms, packed) in rec._late.heard():
        rec._host_steps.add(step)
        trouble, code = (bool(flag & 1), flag >> 1) if packed else (flag != 0, flag)
        routine = packed and bool(code) and not trouble  # a GradScaler's own overflow
        trig = skip_trigger(rec, trouble, step, code, at=at, routine=routine)
        if trig is not None:
            _feed_skip(rec, guard, trig, code, norms, at)
    hear_weights(rec, guard)


def _feed_skip(rec: Recovery, guard: Guard, trig: Trigger, code: int, norms: Tensor,
               at: int | None = None) -> None:
    """Feed a step's trigger; for the first non-finite step after a taken one, check the
    weights too (:mod:`.ladder_weights`): one device reduction, its flag copied to the
    host without waiting (:mod:`.late`) and heard by :func:`hear_weights`. The rest of a
    streak runs on the weights its first step ran on (a skip changes none), so the
    check is made once per streak; a step on weights a rollback restored needs none."""
    first = (trig.kind == "skip" and bool(code & NONFINITE) and not trig.data
             and not rec.state.consecutive_skips)
    rec._feed(guard, trig, lambda: actions.nonfinite_layers(guard, norms))
    flag = finite.weights_flag(guard) if first else None
    if flag is not None:
        rec._weights.push(trig.step, flag, rec._last_taken)


def hear_weights(rec: Recovery, guard: Guard) -> None:
    """The checks of the weights whose copy has completed: weights that hold NaN/Inf (and
    still do: no rollback restored them since) are a ``weights`` trigger, a rollback at
    once (:mod:`.ladder_weights`); which layers is read on the host then, on that path
    only. The layers go to the flush's ``nonfinite_grad`` event
    (:func:`~gradguard.detectors.detect_nonfinite`)."""
    for step, flag, taken in rec._weights.heard():
        bad = finite.nonfinite_weights(guard) if flag else []
        if not bad:
            continue
        guard.monitor.bad_weights[step] = bad
        after = "" if taken is None else f" of step {taken}"
        why = (f"the weights of {listed(bad)} are NaN/Inf: the update{after}, from finite "
               "gradients, wrote them (the optimizer divided by zero, or its LR was NaN/Inf)")
        rec._feed(guard, Trigger("weights", step, why, at=guard.step_count - 1), list)


def skip_trigger(rec: Recovery, skipped: bool, step: int, code: int, at: int | None = None,
                 *, routine: bool = False) -> Trigger | None:
    """The ladder's trigger for a step and its verdict ``code``. A step skipped for its
    loss (judged per step in a run's first steps only: the update before it wrecked
    the weights, see :mod:`.verdict`) asks for a rollback, not a back-off that would
    keep the wrecked weights. None for a ``routine`` loss-scale overflow: no trouble, and
    no clean step either (no update was taken, the weights were not tested: such a step
    right after a rollback had been heard as the restored weights' clean first step, and
    the x100 batch after it as a new trouble on them, not as the batches' fault)."""
    if routine:
        return None
    voided = bool(code & STALE)
    first = rec.ring.tested(step, skipped=skipped, voided=voided, restores=rec.restores)
    if not skipped:
        if not voided:
            rec._last_taken = step  # its update moved the weights
        return Trigger("clean", step, at=at, voided=voided)
    reason = ("loss-spiking" if code & LOSS_SPIKE else OFFSCALE_REASON
              if (code & ~RUNNING_NAN) == OFFSCALE
              else SPIKE_REASON if code & ~NONFINITE else NONFINITE_REASON)
    return Trigger("skip", step, reason, rec._level, at=at, rollback=bool(code & LOSS_SPIKE),
                   data=first and (bool(code & NONFINITE) or reason in DATA_REASONS))

