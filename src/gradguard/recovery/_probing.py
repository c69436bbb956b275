"""The LR probe (:mod:`.probe`) driven from the flush: its cue judged, the training state
copied at its start and restored at its fork and end, the ladder told what it found; and the
*retry* of a ceiling a trouble lowered, with its end when its trial runs into trouble.
Decisions from the host values the flush already has (no device read)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..errors import GradGuardWarning, caller_stacklevel
from ..events import Event
from . import actions, messages
from .ladder import Trigger
from .probe import RETRY_FLOOR, RETRY_GAIN, RETRY_TROUBLE, STUCK, STUCK_TIE, TRIAL
from .snapshots import copy_state, state_bytes, wait_copies

if TYPE_CHECKING:
    from ..guard import Guard
    from ._recovery import Recovery


def probe_lr(rec: Recovery, guard: Guard, step: int, losses: Sequence[float],
             skips: Sequence[bool], trouble: bool, judge: bool = True) -> bool:
    """The LR probe (:mod:`.probe`): start one when the loss is noisy and the ladder idle
    (copying the training state), fork its trial from that copy when the control arm is
    over, and have the ladder lower the LR when it found the LR too high.
    ``trouble``: the ladder acted in this window, or a step was skipped, or the loss rose:
    a probe under way is void; ``judge``: the cue may be judged (see ``JUDGE_EVERY``).
    True when the ladder acted."""
    probe, st = rec._probe, rec.state
    probe.update(losses, skips)
    if trouble:
        probe.cancel(step)
        return False
    if probe.active:
        fork, retry_to = probe.fork, probe.retry_to
        done = probe.advance(step)
        if done == "fork":  # the trial starts from the weights the control started from
            if fork is None:  # nothing to fork from (cannot happen: a probe starts with it)
                probe.cancel(step)
                return False
            state = actions.snapshot_state(guard, step)  # the control's, kept for the end
            probe.fork = None if state is None else copy_state(state)
            _restore(rec, guard, fork)
            return False
        if done is None:
            return False
        if retry_to is not None:
            return _retried(rec, guard, done, fork, retry_to)
        if not done.too_high:  # the run goes on from the arm whose loss is lower
            back = fork if done.control < done.trial else None
            if back is not None:
                _restore(rec, guard, back)
            guard.add_event(messages.probe_event(done, back is not None, probe.next))
            return False
        why = (f"from the same weights, {TRIAL} steps at half the LR brought the loss to "
               f"{done.trial:.4g}, against {done.control:.4g} at the LR in force: the LR is "
               "too high")
        return rec._feed(guard, Trigger("lower", step, why), list)
    if not judge:
        return False
    idle = st.watching is None and st.factor >= st.ceiling and not st.probation
    noisy = rec._rise.noisy(cue=True) if idle else None
    cue = probe.cue(step, noisy is not None)
    if cue == "probe" or (cue is None and noisy is None and idle and _retry(rec, step)):
        state = actions.snapshot_state(guard, step)
        if state is None:  # a NaN/Inf in the state: nothing to fork from
            probe.cancel(step)
        elif not _probe_fits(rec, state):
            probe.off(step)
        else:
            probe.fork = copy_state(state)
        return False
    if cue != "recurred" or noisy is None or probe.fell is None:
        return False
    at, before, trial = probe.fell
    probe.fell = None
    why = (f"the loss is up at {noisy.level:.4g} again, {noisy.ratio:.2g}x its best "
           f"({rec._rise.best:.4g}), {step - at} steps after it fell from {before:.4g} "
           f"to {trial:.4g} at half the LR: the LR is too high")
    return rec._feed(guard, Trigger("lower", step, why), list)


def _retry(rec: Recovery, step: int) -> bool:
    """Start a retry (:mod:`.probe`) of the ceiling before the trouble that lowered the one
    in force (then halfway towards it), once the LR has settled there and held
    ``restore_steps`` steps more (and as long after the last retry), unless the loss is
    down to ``RETRY_FLOOR`` of the fresh model's: True when one started."""
    st, rise = rec.state, rec._rise
    top = st.episode_ceiling
    if (top is None or st.ceiling >= top or st.settled != st.ceiling or st.at_ceiling is None
            or step - st.at_ceiling < 2 * rec.config.restore_steps):
        return False
    if rise.latest is not None and rise.fresh is not None and (
            rise.latest <= RETRY_FLOOR * rise.fresh):
        return False  # nothing left the LR in force could cost
    if st.raised is not None and step - st.raised > rec.config.relapse_window:
        rec._probe.retried.clear()  # the last lift held: this trouble is a new one
    target = rec._probe.retry_target(st.ceiling, top)
    return target is not None and rec._probe.start_retry(step, st.factor, target)


def _retried(rec: Recovery, guard: Guard, done: Any, fork: dict[str, Any] | None,
             ceiling: float) -> bool:
    """A retry's two arms are over: the ladder lifts its ceiling back to ``ceiling`` when the
    trial trained at least as well as the control (the run goes on from the trial's
    weights), else the run goes on from the control's at the LR in force. True when the
    ladder acted."""
    factor = rec.state.factor
    said = (f"from the same weights, {TRIAL} steps at x{ceiling:.3g} of the schedule's LR "
            f"brought the loss to {done.trial:.4g}, against {done.control:.4g} at "
            f"x{factor:.3g}")
    rec._probe.retry_next = done.step + rec.config.restore_steps
    fresh = rec._rise.fresh
    stuck = fresh is not None and fresh > 0 and done.control >= STUCK * fresh
    if done.trial <= RETRY_GAIN * done.control or (stuck and done.trial <= STUCK_TIE * done.control):
        top = rec.state.episode_ceiling
        if done.trial > RETRY_GAIN * done.control:
            said += (f": the LR in force has learnt nothing (the fresh model's loss was "
                     f"{fresh:.4g}), and the trial did no worse within noise")
        else:
            said += (": it trains, the trouble was not the LR's"
                     if top is None or ceiling >= top or math.isclose(ceiling, top)
                     else ": it trains (the LR before the trouble did not)")
        return rec._feed(guard, Trigger("raise", done.step, said, value=ceiling), list)
    _to_control(rec, guard, fork)
    guard.add_event(messages.retry_event(guard, done.step, factor, ceiling, said))
    return False


def retry_failed(rec: Recovery, guard: Guard, trig: Trigger) -> bool:
    """Trouble in a retry's trial (a skipped step, a spike, a loss that rose): the trial is
    over and discarded, the run goes on from the control's state at the LR in force (and
    the flush detectors' history with it); trouble about the trial's steps heard later is
    void. What the ladder would have done about it is not done: the trial is not the run.
    Always True (the weights were restored)."""
    probe = rec._probe
    fork = probe.fork
    ceiling = probe.retry_to if probe.retry_to is not None else rec.state.ceiling
    probe.fail_retry(trig.step)
    probe.retry_next = trig.step + rec.config.restore_steps
    _to_control(rec, guard, fork)
    said = (f"at x{ceiling:.3g} of the schedule's LR the trial ran into trouble at step "
            f"{trig.step} ({trig.reason or trig.kind})")
    guard.add_event(messages.retry_event(guard, trig.step, rec.state.factor, ceiling, said))
    return True


def _to_control(rec: Recovery, guard: Guard, fork: dict[str, Any] | None) -> None:
    """A retry's trial is discarded: back to the control's training state, with the flush
    detectors' history it had; the loss level is learnt again."""
    if fork is not None:
        _restore(rec, guard, fork)
        if "detectors" in fork and not actions.stale(guard, fork):
            guard.monitor.detector_state.restart(fork["detectors"])
    rec._rise.reset()


def _probe_fits(rec: Recovery, state: dict[str, Any]) -> bool:
    """Whether the probe's copies of the training state (two at the fork) fit within
    ``snapshot_memory`` beside what the recovery holds; when not, it warns once and the run
    has no LR probe (the budget is the user's bound on the host memory the recovery holds)."""
    need = 2 * state_bytes(state)
    if actions.fits(rec, need):
        return True
    budget = rec.ring.store.max_bytes or 0  # not None: it did not fit
    warnings.warn(
        f"Recovery: the LR probe is off for this run: its two copies of the training state "
        f"({need / 2**20:.1f} MiB) beside the snapshots held "
        f"({rec.snapshot_bytes / 2**20:.1f} MiB) would pass snapshot_memory="
        f"{budget} ({budget / 2**20:.1f} MiB); raise snapshot_memory to let it run",
        GradGuardWarning, stacklevel=caller_stacklevel())
    return False


def feed(rec: Recovery, guard: Guard, trig: Trigger, layers: Any) -> bool:
    """See ``Recovery._feed``: the ladder hears ``trig`` (:func:`.actions.feed`), unless a
    retry's trial runs, which trouble ends instead."""
    probe = rec._probe
    if trig.kind in RETRY_TROUBLE:
        if probe.retrying:
            return retry_failed(rec, guard, trig)
        gone = probe.discarded
        if gone is not None and gone[0] <= trig.step <= gone[1]:
            return False
    if trig.kind == "healthy" and probe.retrying:
        return False
    return actions.feed(rec, guard, trig, layers)


def abandon(rec: Recovery, guard: Guard, *, undo: bool = True) -> None:
    """The run ends (``guard.close``) while a trial arm runs: its weights are from up to
    ``TRIAL`` steps at another LR than the one in force (a retry's: the LR that failed),
    judged by nothing yet. The run ends on the control's state instead, the LR in force,
    as when a trial is discarded; an ``info`` event says so. ``undo=False``: the script
    ended already (``gradguard run``) and saved the trial's weights; the event says that."""
    probe = rec._probe
    if probe.phase != "trial" or probe.fork is None:
        return
    step = guard.step_count - 1
    what = "retry of a higher LR" if probe.up is not None else "probe of half the LR"
    ended = f"step {step}: the run ended during the trial arm of an LR {what}"
    if undo:
        _restore(rec, guard, probe.fork)
        said = (f"{ended}; its steps are discarded and the weights are the control arm's, "
                "trained at the LR in force")
    else:
        since = probe.trial_from if probe.trial_from is not None else step
        said = (f"{ended}: the script's last weights, and what it saved, are the trial "
                f"arm's, trained from step {since} at x{probe.factor:g} the LR in force")
    guard.add_event(Event(kind="lr_probe", step=step, severity="info", message=said))
    probe.cancel(step)


def _restore(rec: Recovery, guard: Guard, snap: dict[str, Any]) -> None:
    """Load one of the probe's copies of the training state. Counted with the rollbacks'
    restores: a trainer's hook-driven step whose flush restored the weights after its
    backward must not apply that backward's gradients (the guard voids its update)."""
    wait_copies()
    actions.restore(guard, snap)
    rec.restores += 1
