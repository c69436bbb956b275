"""Acting on the optimizer for the recovery ladder: moment resets, rollbacks and
snapshots (:mod:`.messages` has the events that say what was done).

The LR multiplier is in :mod:`.multiplier`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor

from .._owners import others, restored
from ..events import Event
from ..naming import OPTIMIZER_PREFIX, layer_of
from . import _slip, finite, growth, messages, plateau, remap, wreck
from .ladder import IMPROVED_REASON, Action, Trigger, transition
from .moments import local_optimizer, reset_moments
from .shift import UNDONE, Shift, rebase, restart
from .snapshots import copy_state, state_bytes, wait_copies
from .verdict import SpikeVerdict

if TYPE_CHECKING:
    from ..guard import Guard
    from ._recovery import Recovery


def rollback(
    guard: Guard, a: Action, snap: dict[str, Any], layers: Sequence[str], reset_mode: str,
) -> list[str]:
    """Restore model, optimizer state and clip policy from ``snap`` (a copy owned by the
    caller), and the flush detectors' recent losses and norms: the restored weights' loss
    is judged against the losses that led to them, not against those of the weights they
    replace (a rollback to an older snapshot, whose loss is above the level the run had
    reached, is no loss spike that goes on); then reset the moments of ``layers`` (per
    ``reset_mode``); the layers reset."""
    restore(guard, snap)
    sampler = getattr(guard, "_sampler", None)
    if sampler is not None:  # the first update from the restored weights is measured
        sampler.first_due, sampler.first, sampler.first_step = True, None, None
    if "detectors" in snap and not stale(guard, snap):  # the losses and norms that led
        guard.monitor.detector_state.restart(snap["detectors"])  # to the restored weights
    guard.batches_to_skip = a.skip_batches
    if (rec := guard.recovery) is not None:  # see .plateau
        rec._plateaus = plateau.reset(guard.optimizer, local_optimizer(guard.optimizer))
    if reset_mode == "none":
        return []
    return reset_moments(guard, layers if reset_mode == "exploded" else None)


def feed(rec: Recovery, guard: Guard, trig: Trigger, layers: Callable[[], list[str]]) -> bool:
    """Advance ``rec``'s ladder by ``trig`` and carry its actions out: snapshot, back off,
    roll back (``layers``: the layers whose moments to reset), say so in an event, or
    raise :class:`~gradguard.TrainingDiverged`; True when it acted (beyond a snapshot)."""
    prior = rec.state
    rec.state, todo = transition(rec.config, rec.state, trig)
    acted = False
    for a in todo:
        rec.actions.append(a)
        if a.kind == "snapshot":
            rec.snapshot(guard, a.step, improved=a.reason == IMPROVED_REASON)
            continue
        if a.kind == "settled":
            guard.add_event(messages.settled_event(guard, a))
            continue
        if a.kind in ("lower", "raised"):
            rec._rise.reset(guard.step_count)
            guard.add_event(messages.lowered_event(guard, a) if a.kind == "lower"
                            else messages.raised_event(guard, a))
            continue
        acted = True
        rec._rise.reset(guard.step_count)  # the level is learnt again after the ladder acted
        rec._dead.since = None  # and a stall of dead layers is timed from the weights now
        if a.kind == "data":
            # the weights the rollback replaced had taken no update since their last finite
            # step (a streak of skipped steps): the batches being at fault, they were sound,
            # and go back (found by a stranger: six NaN batches in a row rolled an MLP back
            # 75 steps, its Adam state reset, for 10-40x the loss of the run without them)
            undo = rec._undo if rec._undo_untouched else None
            if undo is not None:
                rec._undo = None
                wait_copies()
                # the weights and the optimizer state only: the gradient statistics taken
                # with them had learnt the streak's own norms (x100 batches went unskipped
                # after them), where those the rollback restored had not
                restore(guard, {k: v for k, v in undo.items() if k not in ("clip", "verdict")})
                rec.restores += 1
                # no rollback stands: no grace after its restore (the x100 batches after it
                # went unskipped through the grace of the rollback undone); the shift test
                # it armed judges the losses of the steps taken from here, not those of the
                # bad batches skipped (found by a stranger: a shard of 14-40 batches whose
                # loss was x1000 ended with "the batches changed" at step 172, the
                # statistics reset, judged on the shard's skipped losses; a change of the
                # targets' units that lasts is a change all the same, found by a regression
                # hunt: with no test after the undo, a progress check rolled it back again)
                rec.ring.restored_step = None
                rec._shift.undone = True
                if (before := rec._undo_ladder) is not None:  # and the LR from before it
                    cur = rec.state
                    rec.state = dataclasses.replace(
                        before, data_streak=cur.data_streak, spike_data=cur.spike_data,
                        undone=a.step, total_rollbacks=cur.total_rollbacks,
                        last_snapshot=cur.last_snapshot, last_regular=cur.last_regular,
                        settled=cur.settled)
                    a = dataclasses.replace(a, factor=rec.state.factor,
                                            ceiling=rec.state.ceiling)
                    rec.actions[-1] = a  # the decision with the LR it left (as its event)
            lr_back = rec._undo_ladder is not None
            rec._undo_ladder = None
            undone = undo is not None
            guard.add_event(messages.data_event(guard, a, rec.ring.restored_from,
                                                undone=undone, lr_back=lr_back))
            continue
        if a.kind == "sound":
            guard.add_event(messages.sound_event(guard, a))
            continue
        if a.kind == "shifted" and (found := rec._shift.found) is not None:
            rec._shift.found = None
            undone = undo_rollback(rec, guard, found)
            rebase(rec, guard, found)
            restart(rec, guard, found, undone=undone)
            guard.add_event(messages.shifted_event(guard, a, found, undone=undone))
            continue
        if a.kind == "level_off":
            rec._probe.cancel(a.step)
            guard.add_event(messages.level_off_event(guard, a, rec.config.restore_steps))
            continue
        level = trig.value if trig.mild else rec.state.pre_level  # before the trouble
        if a.kind == "backoff":
            guard.add_event(messages.backoff_event(a, rec.config.restore_steps, level=level))
        elif a.kind == "rollback":
            # the fresh model's level judges a snapshot only while the loss level is
            # evidence, on the batches it was measured on (no change since, no level_off)
            st = rec.state
            fresh = rec._rise.initial if st.shifted is None and not st.level_off else None
            noted = growth.take(rec, trig)  # weights grown from the first steps (.growth)
            snap = trig.fresh if trig.fresh is not None else noted.fresh if noted else \
                rec.ring.load(rec.ring.back(a.back, fresh))
            if snap is not None and not remap.fits(guard.model, snap):
                snap = None  # the model changed past what it can restore (see .remap)
            if snap is None:  # nothing good to go back to yet: the deeper back-off only
                rec.state = dataclasses.replace(rec.state, unrestored=rec.state.unrestored + 1)
                if prior.undo is not None and rec.state.undo is None:
                    # no weight moved: the next step still runs on the streak's weights,
                    # and a finite one proves them sound (found by a stranger: a backbone
                    # unfrozen by add_param_group, its snapshots dropped, then eight NaN
                    # batches: the LR cut to x0.0118 for good measure, 1.17x its twin)
                    rec.state = dataclasses.replace(rec.state, undo=prior.undo,
                                                    undo_reason=prior.undo_reason)
                guard.add_event(messages.backoff_event(a, rec.config.restore_steps,
                                                       no_snapshot=True, level=level))
            else:
                step = int(snap["step"])
                # a wreck: how large was the update? (see wreck.wrecked); or a cap the
                # trigger measured (.growth)
                cap, why, measured = trig.cap, "", None
                if noted is not None:
                    cap, why = growth.cap(noted.ratio), growth.why(noted)
                before = _slip.before_burst(rec, guard, step)
                if before is not None:
                    # an LR burst came and went since the snapshot: the burst's LR wrecked
                    # the weights, not the LR in force, and back at the weights from before
                    # it the run goes on at the LR the ladder had then; what it did since
                    # (a back-off at the burst's spike) was the burst's doing too (found by
                    # a stranger: a warm-up's LR x1000 for 3 steps, rolled back to before
                    # it with the LR capped at x0.5 for good, ended 1.8-3.8x its twin, and
                    # the summary advised a config LR 4x too low)
                    rec.state = dataclasses.replace(
                        rec.state, factor=before.factor, ceiling=before.ceiling,
                        backoff_level=before.backoff_level, failed=before.failed,
                        settled=before.settled, episode_ceiling=before.episode_ceiling)
                    a = dataclasses.replace(a, factor=rec.state.factor,
                                            ceiling=rec.state.ceiling)
                    rec.actions[-1] = a
                    cap, why = None, ""
                elif cap is None and wreck.wrecked(guard, trig, prior):
                    measured = wreck.cap(guard, snap, prior, trig.step, rec.ring.restored_step)
                    if measured is not None:
                        cap, why = measured[0], (f" (the first update from the weights restored "
                                                 f"moved them by {wreck.share(measured[1])} "
                                                 "their norm)")
                if cap is not None and cap < rec.state.ceiling:
                    rec.state, _ = transition(rec.config, rec.state,
                                              Trigger("capped", a.step, value=cap))
                    if measured is not None and step < 0:
                        # the first batch may have wrecked them: weighed once the restored
                        # weights have losses of their own (wreck.first_batch_at_fault)
                        rec._first_check = (guard.step_count, rec._first,
                                            rec.state.backoff_level)
                        rec._first_after = []
                    a = dataclasses.replace(a, factor=rec.state.factor,
                                            ceiling=rec.state.ceiling, reason=a.reason + why)
                    rec.actions[-1] = a
                    if noted is not None:  # the LR that grew them failed: see _steps.grown
                        rec._probe.retried.append(prior.ceiling)
                keep_undo(rec, guard)
                # no update since the last rung, in a streak of skipped steps: the weights
                # replaced are those of the streak's start (see the "data" action)
                rec._undo_untouched = prior.untested is not None and prior.consecutive_skips > 0
                rec._undo_ladder = prior.undo if rec._undo_untouched else None
                reset = rollback(guard, a, snap, layers(), rec.reset_moments)
                guard.add_event(messages.rollback_event(
                    a, step, reset, rec.config.restore_steps, rec.config.max_rollbacks,
                    level, weights=trig.kind == "weights", burst=before is not None))
                rec.restores += 1
                rec.ring.restored(step, guard.step_count)
                # the progress check asks the loss back near the level of the weights
                # it restarts from, if those were above the level before the trouble
                back_at = rec._rise.initial if step < 0 else rec.ring.levels.get(step)
                rec._shift.arm(guard.step_count, step, back_at)
                rec.state, _ = transition(rec.config, rec.state,
                                           Trigger("restored", a.step, value=back_at))
        else:
            raise messages.abort(guard, a, rec.state.rollbacks, rec.state.unrestored,
                                 kept=_finite_at_abort(rec, guard),
                                 weights=trig.kind == "weights")
    return acted


def keep_undo(rec: Recovery, guard: Guard) -> None:
    """Keep a copy of the training state a rollback is about to replace, until the shift
    test has judged the restored weights (:mod:`.shift`): should the batches prove to have
    changed, and the weights rolled back from prove to have done better on them, the
    rollback is undone (:func:`undo_rollback`). Not kept when a value is NaN/Inf or the
    copy would pass ``snapshot_memory``."""
    rec._undo = None
    state = snapshot_state(guard, guard.step_count - 1)
    if state is None:
        return
    if fits(rec, state_bytes(state)):
        rec._undo = copy_state(state)
        if (units := guard.telemetry.units) is not None:  # the units dead in these weights
            rec._undo["units"] = units.state_dict()


def fits(rec: Recovery, nbytes: int) -> bool:
    """Whether ``nbytes`` more of copied training state fit within ``snapshot_memory``
    beside the snapshots the recovery holds (the user's bound on its host memory)."""
    budget = rec.ring.store.max_bytes
    return budget is None or rec.snapshot_bytes + nbytes <= budget


def undo_rollback(rec: Recovery, guard: Guard, found: Shift) -> bool:
    """The batches changed (``found``): when the weights the rollback replaced did better
    on them than the ones it restored (their loss ``UNDONE`` times lower or more: they had
    learnt the new batches), put them back; True when it did (see :mod:`.shift`)."""
    undo, rec._undo = rec._undo, None
    if undo is None or not found.before * UNDONE <= found.after:
        return False
    wait_copies()
    restore(guard, undo)
    rec.restores += 1
    return True


def _finite_at_abort(rec: Recovery, guard: Guard) -> int | None:
    """An abort leaves no NaN/Inf in the weights: when they hold any (an update wrote them,
    :mod:`.ladder_weights`), the newest snapshot is restored and its step returned (-1: the
    weights before the first step); None when the weights are finite or none is kept."""
    if not finite.nonfinite_weights(guard):
        return None
    snap = rec.ring.load(0)
    if snap is None or not remap.fits(guard.model, snap):
        return None
    restore(guard, snap)
    rec.restores += 1
    return int(snap["step"])


def restore(guard: Guard, snap: dict[str, Any]) -> None:
    """Load model, optimizer state, clip policy and the state rolled back with the weights
    (``Recovery(also=...)``, :mod:`.follow`) from ``snap`` (a copy owned by the
    caller; :func:`snapshot_state` copied), keeping the optimizer's hyperparameters as they
    are now (LR schedules are not rolled back). The units dead in the restored weights died
    before them: the unit watch counts afresh (:mod:`gradguard.units`), unless ``snap``
    holds its counts (the weights an undone rollback puts back, :func:`keep_undo`)."""
    remap.load_model(guard.model, snap, skip=others(guard))
    restored(guard)  # the guards stepped with this one: their loss moves too (._owners)
    guard.telemetry.units_restarted(snap.get("units"))
    running = getattr(guard, "_running", None)
    if running is not None:
        running.refresh()  # the restored batch norm statistics are the step's starting point
    extra = snap.get("extra_params") or {}
    for n, p in zip(guard.names, guard.telemetry.params):
        if n in extra:
            p.detach().copy_(extra[n])
    # ``Optimizer.load_state_dict`` builds new param-group dicts (the saved hyperparameters
    # with the live params): the live dicts are put back, hyperparameters and all, so that
    # whatever holds them stays valid. That includes this guard's LR multiplier when the
    # restore happens inside an optimizer step (a trainer's pre-step hook): it puts each
    # group's unscaled LR back into the dict it scaled, which must be the live one, or
    # the scaled LR would stay for good.
    local = local_optimizer(guard.optimizer)
    groups = list(local.param_groups)
    local.load_state_dict(snap["optimizer"])
    local.param_groups[:] = groups
    stepped = getattr(guard.recovery, "_stepped", None)  # state kept in the groups
    if stepped is not None:
        stepped.restore(groups, snap["optimizer"]["param_groups"])
    followers = getattr(guard.recovery, "also", None)
    if followers is not None:
        followers.load(snap.get("also"))
    if stale(guard, snap):
        return
    if guard.clip is not None and snap.get("clip") is not None:
        guard.clip.load_state_dict(copy_state(snap["clip"], guard.telemetry.device))
    verdict = getattr(guard.recovery, "_verdict", None)
    if verdict is not None and snap.get("verdict") is not None:
        verdict.load_state_dict(copy_state(snap["verdict"], guard.telemetry.device))


def stale(guard: Guard, snap: dict[str, Any]) -> bool:
    """Whether ``snap``'s gradient statistics (the clip policy's, the spike verdict's, the
    flush detectors' norms) describe another set of parameters than the one trained now:
    taken before some got their first gradient (:func:`gradguard._lifecycle.renorm`).
    Its weights and optimizer state are restored, and the statistics learnt since kept."""
    grew = guard.telemetry.grew_at
    return grew is not None and int(snap["step"]) < grew


def snapshot_state(guard: Guard, step: int, *, fresh_verdict: bool = False
                   ) -> dict[str, Any] | None:
    """The live state to snapshot (not copied), or None when any value is NaN/Inf (one
    host read, at flush time). With the weights go the statistics that describe their
    gradients: the clip policy's and the per-step spike verdict's (restored weights are
    judged against the norms they had, not against those of the weights they replace);
    ``fresh_verdict``: the verdict's as before any step (the weights before the first
    step, kept after the first step's verdict has judged it)."""
    model = guard.model.state_dict()
    state: dict[str, Any] = {
        "step": step,
        "model": model,
        "model_ids": remap.tensor_ids(guard.model),  # for a model renamed since (pruning)
        # parameters the optimizer steps that the model does not hold (named by position)
        "extra_params": {n: p.detach() for n, p in zip(guard.names, guard.telemetry.params)
                         if n.startswith(OPTIMIZER_PREFIX)},
        "optimizer": local_optimizer(guard.optimizer).state_dict(),
        "clip": None if guard.clip is None else guard.clip.state_dict(),
    }
    # what training does not write (buffers, frozen parameters) may hold ±Inf by design:
    # a causal mask of -inf registered as a buffer left a transformer with no snapshot at
    # all, not even the weights before its first step; NaN there is still corruption. So
    # may the optimizer's hyperparameters: Prodigy's default growth_rate is inf, and no
    # snapshot of a Prodigy run was ever kept
    masks = finite.untrained_keys(guard.model)
    trained = {k: v for k, v in model.items() if k not in masks}
    opt: dict[str, Any] = state["optimizer"]
    judged = {**state, "model": trained, "optimizer": {k: v for k, v in opt.items()
                                                       if k != "param_groups"}}
    if not finite.all_finite(judged, [[model[k] for k in masks if k in model],
                                      opt.get("param_groups", [])]):
        return None
    verdict = getattr(guard.recovery, "_verdict", None)
    if verdict is not None:  # its ring holds NaN for empty slots: not part of the check
        if fresh_verdict:
            verdict = SpikeVerdict()
        state["verdict"] = verdict.live_state(guard.telemetry.device)
    state["detectors"] = guard.monitor.detector_state.spike_history()  # host floats, finite
    followers = getattr(guard.recovery, "also", None)  # not judged: see .follow
    if followers is not None and followers.objs:
        state["also"] = followers.state()
    return state


def nonfinite_layers(guard: Guard, norms: Tensor) -> list[str]:
    """Layers with a non-finite gradient norm (a host read, on the trigger path only)."""
    values = norms.detach().float().cpu().tolist()
    return list(dict.fromkeys(
        layer_of(n) for n, v in zip(guard.names, values) if not math.isfinite(v)))


def exploded_layers(events: Sequence[Event]) -> list[str]:
    """Layers named by the window's non-finite and spike events."""
    out: list[str] = []
    for e in events:
        if e.kind in ("nonfinite_grad", "grad_spike"):
            for lay in e.data.get("layers", []):
                if lay not in out:
                    out.append(lay)
    return out
