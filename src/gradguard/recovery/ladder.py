"""The recovery ladder as a pure state machine: ``transition(config, state, trigger) ->
(state, actions)``. No optimizer, no tensors, no I/O: :mod:`.actions` carries the actions
out, and ``tests/test_ladder.py`` checks the transitions as a table.

The rungs, climbed one at a time and only as far as the trouble goes:

1. **skip** a bad step (the Guard does it; the ladder counts consecutive skips);
2. **back off** the LR multiplier by ``backoff`` after ``skip_patience`` consecutive skips or
   a confirmed loss spike, then restore it linearly over ``restore_steps`` up to the
   *ceiling*;
3. **roll back** to the last good snapshot when trouble returns within ``patience`` steps
   of the previous rung, or when ``recovery_window`` steps after a back-off the loss has
   not come back to ``stall_factor`` times its level before the incident (the back-off
   kept a damaged model): back off again from weights that were never damaged; at once,
   with no back-off first, for a trigger marked ``rollback`` (a loss that rose, with
   weights no better than the newest snapshot's: the Recovery weighs them; or
   ``skip_patience`` consecutive steps skipped for their loss, which the per-step verdict
   judges in a run's first steps only: the update before them wrecked the weights);
4. **abort** after ``max_rollbacks`` rollbacks with no healthy snapshot in between; unless
   the loss level alone decided the last of them (it rose, or did not come back: no NaN, no
   spike, no dead network). Weights restored from a snapshot and trained at a fraction of
   the LR keep close to the loss they were saved at, if the loss is a function of the
   weights; one that does not come back to it after ``max_rollbacks`` tries does not
   answer the weights (a GAN's player against an opponent that moved on, RL returns, a
   curriculum, data that changed). The ladder then turns the loss-level tests off for the
   rest of the run (``level_off``, :attr:`LadderState.level_off`), lifts the ceiling back
   to where it was before this trouble lowered it (after a change of the batches, to where
   that change left it: every rung the level decided since was decided on a loss that
   moves, an LR that settled in between included), and training goes on from the weights
   it restored.

A rollback is also a test of the weights: the step right after it computes its gradients
on weights that had finite ones (the Recovery restores the newest snapshot whose weights
had, and marks the trigger). When that step is non-finite too, or off-scale (its batch
moved the batch norm statistics from another scale, on weights whose batches did not) (a
``skip`` marked ``data``), or its gradient spikes on weights whose gradients did not, the
weights are not at fault but the batches are (NaN/Inf or another scale in the inputs or
targets, or a loss that is non-finite on them): the ladder stops climbing for this streak (``data``: its steps are skipped, nothing else), lifts the
ceiling back to where it was before the trouble (an LR is not lowered for good for bad
data), and aborts only when the streak lasts more than ``patience`` steps.

A rollback tests the loss as well: the first steps on the restored weights give about the
level they were saved at, if the batches are still those they were trained on. When their
loss stays at the trouble's level instead (:mod:`.shift`: a ``shifted`` trigger), the
batches or the objective changed under the weights (a curriculum's next stage, a new task,
data read in order): the ladder ends the episode (``shifted``: the ceiling back to where it
was before the trouble, its rollbacks no count towards an abort, no progress check, the
factor back at the ceiling at once: no update was at fault), and the Recovery learns the
new level afresh.

A back-off is a test of the weights too: a skipped step changes nothing, so the step after
a streak of non-finite (or off-scale) steps runs on the weights the streak ran on. When it
is finite (the first ``clean`` step after the back-off the streak set off, before any
other rung changed the weights), those weights are sound and the batches were at fault:
the ladder undoes the back-off (``sound``; the state before the streak returns: the LR is
not lowered, the streak is no trouble a later one could relapse from). Only a back-off is
undone (a rollback changed the weights), only for a streak of :data:`DATA_REASONS`
(non-finite, off-scale or spiking: the per-step verdict grants no grace after a rung until
a step is taken, :func:`._steps.verdict`). A streak off-scale or spiking is undone once per
``patience`` steps: such trouble that keeps coming back is the weights', and the back-off
then stands. A non-finite streak is undone each time the step after it is finite on its
weights: weights that give finite gradients on the next batch are not the NaN's source
(found by a stranger: one input row in a hundred with a NaN, a NaN in 28% of batches, had
its second streak's back-off stand, its third roll back to the fresh weights, and the run
ended at chance or aborted, 12-35x its clean twin, where skipping alone kept it within
1.3x); weights that do go bad give non-finite gradients on every batch, and their streak
goes on to the rollback (``Recovery(undo_backoff=False)`` keeps every back-off).

Beside the rungs, a *lower* trigger (the LR probe found that the loss follows the LR,
:mod:`.probe`) halves the ceiling and the factor in force at once, with no back-off and no
rollback, and puts the lowered ceiling on probation; a *raise* trigger (a retry of the
ceiling before the trouble trained at least as well as the lowered one, :mod:`.probe`)
lifts ceiling and factor back to it at once; trouble within ``relapse_window`` steps of it
drops them straight back.

Snapshots are taken at healthy flushes every ``snapshot_every`` steps once no progress
check is pending: at the full LR, or while it restores after a loss that came back.

A *relapse* (new trouble within ``relapse_window`` steps of the previous trigger, or any
rollback) lowers the ceiling to ``relapse_backoff`` times the factor that failed, for good:
an LR that failed twice is never restored again. Halving it per relapse converges on the
largest stable factor within a factor of two; a lowered ceiling that fails a third time before
it settled drops by ``relapse_backoff`` squared, then cubed (an exponential search from above:
an LR 100x too high is not seven relapses away; a retry probes back up, :mod:`.probe`); once the LR has stayed at a lowered ceiling
for ``restore_steps`` healthy steps, the ladder reports it as settled. A factor fails
only once an update was taken at it: a rung whose factor no update has used (every step
since it was skipped, :attr:`LadderState.untested`) is the same trouble going on, and the
rung after it (the rollback of a streak of non-finite steps) keeps the ceiling. Were the
LR at fault, the trouble comes back as the factor restores, at a factor that was tried,
and the ceiling drops from there; were the batches (a bad shard that ended as the ladder
rolled back), nothing comes back and the run keeps its LR. A rollback the loss level
decided in a run that has learnt nothing (never below its fresh model's level by more than
its noise: ``Trigger.worse_than_fresh``) sets the ceiling at the back-off factor itself: no factor in
force trained the run, and halving from it relapses again and again.
"""

from __future__ import annotations

import dataclasses

from . import ladder_lr as lr
from .ladder_types import (
    DATA_REASONS,
    NONFINITE_REASON,
    OFFSCALE_REASON,
    SPIKE_REASON,
    Action,
    ActionKind,
    LadderConfig,
    LadderState,
    Trigger,
    TriggerKind,
    near,
)
from .ladder_weights import bad_weights

#: Steps between snapshots while the loss keeps falling well below the newest snapshot's
#: level (``Trigger.improved``): a run that learns fast is not left with a snapshot of
#: weights it has long left behind.
IMPROVED_EVERY = 20
#: the ``reason`` of such a snapshot's action: it does not move the regular pace
IMPROVED_REASON = "improved"

__all__ = ["DATA_REASONS", "NONFINITE_REASON", "OFFSCALE_REASON", "SPIKE_REASON", "Action",
           "ActionKind", "LadderConfig", "LadderState", "Trigger", "TriggerKind", "transition"]


def transition(
    cfg: LadderConfig, st: LadderState, trig: Trigger
) -> tuple[LadderState, tuple[Action, ...]]:
    """The ladder's next state and the actions to carry out, for one trigger (pure)."""
    if st.undo is not None and trig.kind == "clean" and not trig.voided:
        return _sound(st, trig)
    new, actions = _transition(cfg, st, trig)
    new = _failures(st, new, trig)
    reason = trig.reason or NONFINITE_REASON
    if (cfg.undo_backoff and trig.kind == "skip" and reason in DATA_REASONS
            and not trig.rollback and [a.kind for a in actions] == ["backoff"]
            and (reason == NONFINITE_REASON or st.undone is None
                 or trig.step - st.undone > cfg.patience)):
        # the next step runs on these weights again: it may prove them sound
        return dataclasses.replace(new, undo_reason=reason, undo=dataclasses.replace(
            st, consecutive_skips=0, undo=None)), actions
    if new.undo is not None and (actions or trig.kind in (
            "spike", "lower", "restored", "snapshot")):
        # the ladder moved (a rollback changed the weights): the next step proves nothing
        # about those of the streak; more skips of the streak run on them still
        new = dataclasses.replace(new, undo=None)
    return new, actions


def _failures(old: LadderState, new: LadderState, trig: Trigger) -> LadderState:
    """Keep :attr:`LadderState.failed`, for every rung in one place: a lowered ceiling says
    the factor in force failed (not a wreck's cap: it comes after the rollback's back-off,
    from the update that wrecked the weights); a ceiling lifted again takes that back."""
    if new.ceiling < old.ceiling and trig.kind != "capped":
        tried = min(old.ceiling, old.factor)
        return dataclasses.replace(new, failed=tried if old.failed is None else min(old.failed, tried))
    if new.ceiling > old.ceiling:
        return dataclasses.replace(new, failed=None)
    return new


def _sound(st: LadderState, trig: Trigger) -> tuple[LadderState, tuple[Action, ...]]:
    """A step taken right after a back-off for a streak of non-finite (or off-scale) steps,
    on the weights the streak ran on, came out clean: they are sound, the batches were at
    fault. The state before the streak returns (the back-off is undone)."""
    assert st.undo is not None
    new = dataclasses.replace(st.undo, undone=trig.step, total_rollbacks=st.total_rollbacks,
                              last_snapshot=st.last_snapshot, last_regular=st.last_regular,
                              settled=st.settled)
    clean = "finite" if st.undo_reason == NONFINITE_REASON else "clean"
    reason = (f"the first step taken on the weights of the {st.consecutive_skips} "
              f"{st.undo_reason} step(s) before it is {clean}")
    return new, (Action("sound", trig.step, reason, new.factor, new.ceiling),)


def _transition(
    cfg: LadderConfig, st: LadderState, trig: Trigger
) -> tuple[LadderState, tuple[Action, ...]]:
    if trig.kind == "tick":
        return lr.settle(cfg, lr.restore(cfg, st, trig.step), trig.step)
    if trig.kind == "progress":
        return _progress(cfg, st, trig)
    if trig.kind == "level":
        return (st if st.pre_level is not None else dataclasses.replace(st, pre_level=trig.value)), ()
    if trig.kind == "clean":  # every taken step: no copy of the state when nothing changes
        tested = (st.untested is not None and not trig.voided and trig.step >= st.untested)
        if not st.consecutive_skips and st.data_streak is None and not tested:
            return st, ()
        return dataclasses.replace(st, consecutive_skips=0, data_streak=None,
                                   untested=None if tested else st.untested), ()
    if trig.kind == "snapshot":
        regular = st.last_regular if trig.improved else trig.step
        return dataclasses.replace(st, last_snapshot=trig.step, last_regular=regular,
                                   rollbacks=0, unrestored=0), ()
    if trig.kind == "healthy":
        # every snapshot_every steps from the last regular one, and while the loss keeps
        # falling (improved) extra ones every IMPROVED_EVERY steps in between
        last = st.last_regular if st.last_regular is not None else st.last_snapshot
        regular = last is None or trig.step - last >= cfg.snapshot_every
        extra = trig.improved and (st.last_snapshot is None
                                   or trig.step - st.last_snapshot >= IMPROVED_EVERY)
        if (st.factor >= st.ceiling or st.watching is None) and (regular or extra):
            return st, (Action("snapshot", trig.step, "" if regular else IMPROVED_REASON),)
        return st, ()
    if trig.kind == "shifted":
        return _shifted(cfg, st, trig)
    if trig.kind == "raise":
        return lr.raised(st, trig)
    if trig.kind == "capped":
        return lr.capped(st, trig)
    if trig.kind == "weights":  # an update wrote NaN/Inf: no skip or lower LR mends them
        return bad_weights(cfg, st, trig)
    if trig.kind == "skip" and (st.data_streak is not None or (
            trig.data and (trig.reason != SPIKE_REASON or _spikes_are_data(cfg, st, trig)))):
        return _data(cfg, st, trig)
    if trig.kind == "skip":
        if st.backoff_step is not None and trig.step < st.backoff_step:
            # replayed at a flush (a fused optimizer's skip flags): skipped before the last
            # rung took effect, under the trouble that rung answers; not a new one
            return st, ()
        st = dataclasses.replace(st, consecutive_skips=st.consecutive_skips + 1)
        if st.consecutive_skips % cfg.skip_patience:
            return st, ()
        reason = f"{st.consecutive_skips} consecutive {trig.reason or NONFINITE_REASON} steps skipped"
        if trig.rollback:
            reason += ": the update before them wrecked the weights"
        # a non-finite streak's first rung is a back-off even when trouble came before it:
        # the next step tests its weights (the back-off is undone when it is finite), and
        # a streak that goes on rolls back at its next rung, as before
        first = (cfg.undo_backoff and not trig.rollback and st.consecutive_skips == cfg.skip_patience
                 and (trig.reason or NONFINITE_REASON) == NONFINITE_REASON)
        return _escalate(cfg, st, trig.step, reason, trig.value, at=trig.at,
                         force_rollback=trig.rollback, tests_weights=first)
    if trig.kind == "spike" and trig.mild:
        return lr.lower(cfg, st, trig)
    if trig.kind == "lower":
        return lr.probed(cfg, st, trig)
    if trig.kind == "restored":
        if trig.value is None or st.pre_level is None or trig.value <= st.pre_level:
            return st, ()
        return dataclasses.replace(st, pre_level=trig.value), ()
    if trig.kind == "spike":
        if trig.confirmed and st.backoff_step is not None and trig.step <= st.backoff_step:
            return st, ()  # answered already by the rung its skipped steps took
        return _escalate(cfg, st, trig.step, trig.reason or "confirmed loss spike", trig.value,
                         by_level=trig.by_level,
                         at=trig.at, force_rollback=trig.rollback, worse_than_fresh=trig.worse_than_fresh)
    raise ValueError(f"Trigger(kind={trig.kind!r}): unknown kind")


def _escalate(
    cfg: LadderConfig, st: LadderState, step: int, reason: str, level: float | None = None,
    *, force_rollback: bool = False, at: int | None = None, by_level: bool = False,
    worse_than_fresh: bool = False, tests_weights: bool = False,
) -> tuple[LadderState, tuple[Action, ...]]:
    """Back off, or escalate when trouble returns within ``patience`` steps (or the loss did
    not come back: ``force_rollback``); ``by_level``: the loss level decided it;
    ``tests_weights``: a back-off in any case (a non-finite streak's first rung, which the
    next step tests: :func:`transition`)."""
    last = st.last_trigger
    within = last is not None and step - last <= cfg.patience
    recent = force_rollback or (within and not tests_weights)
    # the same trouble: within patience of the last trigger, or its progress check pending
    continuing = within or (force_rollback and st.watching is not None)
    raised = st.raised is not None and step - st.raised <= cfg.relapse_window  # retried, failed
    relapse = (last is not None and step - last <= cfg.relapse_window) or raised
    # a new trouble (a rollback forced long after the last) starts here, from its own level
    start = st.trouble_start if continuing and st.trouble_start is not None else step
    pre = st.pre_level if continuing and st.pre_level is not None else level
    now = step if at is None else max(step, at)  # the back-off starts when it is applied
    st = dataclasses.replace(st, last_trigger=step, trouble_start=start, pre_level=pre,
                             watching=now, at_ceiling=None,
                             episode_ceiling=st.episode_ceiling if continuing else None)
    after_shift = st.shifted is not None and step - st.shifted <= cfg.relapse_window
    if recent and by_level and after_shift and st.level_rollbacks:
        # the loss moved by itself once: weights restored again that do not bring it back
        # are no trouble to roll back from a third time
        return _level_off(st, step, f"{reason} (the batches changed by themselves at step "
                                    f"{st.shifted})")
    if recent and st.rollbacks >= cfg.max_rollbacks:
        if by_level:
            return _level_off(st, step, reason)
        return st, (Action("abort", step, reason, st.factor, st.ceiling,
                           rollbacks=st.total_rollbacks),)
    lowered = False
    # the trouble came back: the factor in force failed, for good; unless no update was
    # taken at it since the last rung (a streak of skipped steps goes on: the same trouble,
    # not a relapse, and the factor that rung set has not been tried)
    if (recent or relapse) and st.untested is None:
        new = lr.failed_ceiling(cfg, st)
        if raised and st.raised_from is not None:  # back to the ceiling that had held
            new = min(new, st.raised_from)
        if new < st.ceiling:
            first = st.ceiling if st.episode_ceiling is None else st.episode_ceiling
            st, lowered = dataclasses.replace(st, ceiling=new, episode_ceiling=first,
                                              raised=None, raised_from=None,
                                              lowerings=st.lowerings + 1 if st.probation else 1), True
    factor = min(st.factor * cfg.backoff, st.ceiling)
    if worse_than_fresh and recent and factor < st.ceiling:
        # no factor in force trained the run (.rise): the LR is far too high, not at the edge
        first = st.ceiling if st.episode_ceiling is None else st.episode_ceiling
        st, lowered = dataclasses.replace(st, ceiling=factor, episode_ceiling=first), True
    st = dataclasses.replace(st, factor=factor, backoff_level=factor, backoff_step=now,
                             untested=now)
    if not recent:
        st = dataclasses.replace(st, backoffs=st.backoffs + 1)
        return st, (Action("backoff", step, reason, factor, st.ceiling, relapse, lowered,
                           by_level=by_level),)
    back = min(st.rollbacks, cfg.keep - 1)
    skip = cfg.skip_batches if cfg.skip_batches is not None else step - start + 1
    st = dataclasses.replace(st, consecutive_skips=0, rollbacks=st.rollbacks + 1,
                             total_rollbacks=st.total_rollbacks + 1,
                             level_rollbacks=st.level_rollbacks + (by_level and after_shift))
    return st, (Action("rollback", step, reason, factor, st.ceiling, True, lowered, back, skip,
                       st.rollbacks, by_level=by_level),)


def _level_off(st: LadderState, step: int, reason: str) -> tuple[LadderState, tuple[Action, ...]]:
    """The loss did not come back to the level of weights restored ``max_rollbacks`` times:
    it does not answer the weights. No rung is decided by the level from here; the ceiling
    returns to what it was before this trouble lowered it, the factor restores to it
    from where it is, and the episode ends (its rollbacks are no count towards an abort)."""
    top = max(st.ceiling, st.episode_ceiling if st.episode_ceiling is not None else st.ceiling)
    if st.shifted is not None and st.shift_ceiling is not None:
        # after the batches changed by themselves, every ceiling the level lowered since
        # (an episode that settled in between too) was lowered on a loss that moves
        top = max(top, st.shift_ceiling)
    st = dataclasses.replace(
        st, level_off=True, ceiling=top, episode_ceiling=None, watching=None, rollbacks=0,
        trouble_start=None, pre_level=None, backoff_step=step, backoff_level=st.factor,
        at_ceiling=None)
    return st, (Action("level_off", step, reason, st.factor, top, rollbacks=st.total_rollbacks,
                       by_level=True),)


def _shifted(cfg: LadderConfig, st: LadderState,
             trig: Trigger) -> tuple[LadderState, tuple[Action, ...]]:
    """The weights a rollback restored gave the trouble's loss (see ``shifted`` in the
    module docstring): the trouble was the batches', no rung's. The episode ends: the
    ceiling back to where it was before it, no progress check, its rollbacks no count
    towards an abort and no relapse for the next trouble; the factor is back at the
    ceiling at once (no update was at fault: the weights the rungs kept from the LR were
    never damaged). A second change within ``relapse_window`` steps of the last is a loss
    that moves by itself (a drifting objective): the loss-level tests go off as well
    (``level_off``), as after ``max_rollbacks`` rollbacks the level decided; so do two
    rollbacks in a row the level decides within ``relapse_window`` steps of a change (a
    drift too slow for the shift test: :func:`_escalate`)."""
    prev = st.shifted
    top = max(st.ceiling, st.episode_ceiling if st.episode_ceiling is not None else st.ceiling)
    st = dataclasses.replace(
        st, ceiling=top, factor=top, episode_ceiling=None, watching=None, rollbacks=0,
        trouble_start=None, pre_level=None, last_trigger=None, consecutive_skips=0,
        untested=None, undo=None, at_ceiling=None, backoff_step=None, backoff_level=top,
        shifted=trig.step, shift_ceiling=top, level_rollbacks=0)
    acts = (Action("shifted", trig.step, trig.reason, st.factor, top,
                   rollbacks=st.total_rollbacks),)
    if prev is None or trig.step - prev > cfg.relapse_window or st.level_off:
        return st, acts
    reason = (f"the batches changed again {trig.step - prev} steps after they last did "
              f"(step {prev})")
    return dataclasses.replace(st, level_off=True), (*acts, Action(
        "level_off", trig.step, reason, st.factor, top, rollbacks=st.total_rollbacks,
        by_level=True))


def _spike_stretch(cfg: LadderConfig, st: LadderState, step: int) -> int:
    """The first finding of the stretch of spiking batches ``step`` would belong to: the
    last one, or ``step`` itself when there is none within ``2 * patience`` steps."""
    last = st.spike_data
    return step if last is None or step - last > 2 * cfg.patience else last


def _spikes_are_data(cfg: LadderConfig, st: LadderState, trig: Trigger) -> bool:
    """Whether spikes on weights a rollback restored are the batches' fault: for
    ``patience`` steps from the stretch's first finding (bad batches broken up by harmless
    ones that were taken), not after that (batches that keep spiking are a change no shift
    test saw: each rollback put back the statistics that had begun to learn it, and the
    ladder climbs); a stretch starts afresh ``2 * patience`` steps on."""
    return trig.step - _spike_stretch(cfg, st, trig.step) <= cfg.patience


def _data(cfg: LadderConfig, st: LadderState, trig: Trigger) -> tuple[LadderState, tuple[Action, ...]]:
    """A non-finite step the batches are at fault for (see ``data`` in the module
    docstring): the first one ends the episode (the ceiling back to where it was before
    it, no progress check, the rollbacks it made no count towards an abort) and says so;
    the streak's later steps are skipped with nothing else, until it has lasted more than
    ``patience`` steps."""
    if st.data_streak is None:
        top = max(st.ceiling, st.episode_ceiling if st.episode_ceiling is not None else st.ceiling)
        st = dataclasses.replace(
            st, data_streak=trig.step, consecutive_skips=0, ceiling=top, watching=None,
            rollbacks=0, trouble_start=None, pre_level=None, episode_ceiling=None,
            at_ceiling=None, spike_data=_spike_stretch(cfg, st, trig.step)
            if trig.reason == SPIKE_REASON else st.spike_data)
        return st, (Action("data", trig.step, trig.reason, st.factor, top),)
    if trig.step - st.data_streak < cfg.patience:
        return st, ()
    what = trig.reason or NONFINITE_REASON
    # non-finite: the backward through them too (found by a stranger: a float16 layer whose
    # loss scale doubled every 50 steps overflowed in its backward, inputs and loss finite,
    # and was told the batches stay non-finite)
    through = ", or the backward through them" if what == NONFINITE_REASON else ""
    reason = (f"{trig.step - st.data_streak + 1} steps in a row {what} on weights that "
              f"had finite gradients: the batches (their inputs or targets, or the loss on "
              f"them{through}) stay {what}")
    return st, (Action("abort", trig.step, reason, st.factor, st.ceiling,
                       rollbacks=st.total_rollbacks, data=True),)


def _progress(cfg: LadderConfig, st: LadderState, trig: Trigger) -> tuple[LadderState, tuple[Action, ...]]:
    """``recovery_window`` steps after a back-off or rollback: has the loss come back?"""
    if st.watching is None or trig.step - st.watching < cfg.recovery_window:
        return st, ()
    if (st.level_off or st.pre_level is None or trig.value is None
            or near(trig.value, st.pre_level, cfg.stall_factor)):
        # it has (or the level is no evidence in this run): keep restoring the LR
        return dataclasses.replace(st, watching=None), ()
    reason = (f"the loss ({trig.value:.4g}) did not come back to its level before the trouble "
              f"({st.pre_level:.4g}) within {cfg.recovery_window} steps")
    return _escalate(cfg, st, trig.step, reason, force_rollback=True, by_level=True)
