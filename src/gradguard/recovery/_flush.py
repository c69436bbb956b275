"""What the :class:`~gradguard.recovery.Recovery` judges at each flush, from the host values
the flush already has (no device read): the skip flags the device kept (fused optimizers,
a ``GradScaler``), confirmed loss spikes, a loss that rose or a network that died
(:mod:`.rise`), the loss after a back-off, the loss on the weights a rollback restored
(:mod:`.shift`), the LR probe (:mod:`.probe`), and a snapshot while the run is healthy.
Every decision becomes a ladder :class:`~.ladder.Trigger`, fed through the one place that
carries actions out (``Recovery._feed``)."""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..errors import GradGuardWarning, caller_stacklevel
from ..events import Event, listed
from ..executors import STALE
from ..naming import layer_of
from ..units import DYING, RECENT, SAMPLE, SILENT
from . import _steps, actions, messages
from .defaults import JUDGE_EVERY, PROGRESS_STEPS, UNHEALTHY
from .ladder import Trigger
from .ladder_types import near
from .probe import RETRY_FLOOR, RETRY_GAIN, TRIAL
from .snapshots import copy_state, state_bytes, wait_copies

if TYPE_CHECKING:
    from ..guard import Guard
    from ..telemetry import Window
    from ._recovery import Recovery


def on_flush(rec: Recovery, guard: Guard, window: Window, events: Sequence[Event],
             overflows: Any) -> None:
    """See :meth:`gradguard.recovery.Recovery.on_flush`."""
    layers = lambda: actions.exploded_layers(events)  # noqa: E731
    rec._late.clear()  # what was not heard yet is in this window
    # the loss-level tests judge every JUDGE_EVERY steps while idle (or as often as the
    # snapshots are due, when that is more often: a snapshot is a healthy verdict, taken
    # only on judged weights), at every flush while the ladder is at work (what it was
    # while this window was collected: its length)
    pace = min(JUDGE_EVERY, rec.config.snapshot_every)
    judge = rec.busy or window.steps[-1] - rec._judged >= pace
    if judge:
        rec._judged = window.steps[-1]
    losses, skips = window.loss.tolist(), window.skipped.tolist()
    rec._clips.update(rec.state.ceiling, window.clip_coef.tolist(), skips)
    if (units := window.units_dying()) is not None:
        rec._dying = units[0]  # the share a snapshot taken now is labelled with (latest)
    # why each step was skipped (host values: the window is the flush's one host copy)
    codes = window.skip_codes.tolist() if window.skip_codes is not None else None
    triggers = _device_skips(rec, window, skips, codes, overflows)
    recent = [x for x in losses[-PROGRESS_STEPS:] if math.isfinite(x)]
    rec._progress = statistics.median(recent) if recent else None
    # while the batches since a rollback are skipped as bad ones (a data streak), their
    # losses are those batches', not a new level: the shift test waits for its end (a
    # stretch of x100 inputs was taken for a change of data at its fourth step, and the
    # rest of it trained into the weights)
    if rec.state.data_streak is None and rec._shift.update(window.steps, losses, codes) is not None:
        # the weights a rollback restored gave the trouble's loss: the batches changed
        # (:mod:`.shift`); this window's spikes and rise are the change, no trouble
        triggers.append(Trigger("shifted", window.steps[-1]))
        for t in sorted(triggers, key=lambda t: t.step):
            rec._feed(guard, t, layers)
        return
    spike = next((e for e in events if e.kind == "loss_spike"), None)
    # a spike still going on since before the ladder's last rung is the trouble that rung
    # answered (its start, not the flush that confirms it again, is what counts), and one
    # that began within a stretch of batches found at fault is theirs
    since = int((spike.data or {}).get("since", spike.step)) if spike is not None else 0
    st = rec.state
    answered = (st.backoff_step is not None and since <= st.backoff_step) or (
        st.spike_data is not None and 0 <= since - st.spike_data <= rec.config.patience)
    # the loss level is evidence (not switched off by the user, nor by a loss that did not
    # answer the weights restored: ``loss_level_off``)
    level = rec.loss_rise and not st.level_off
    # a loss spike whose gradients did not spike is the loss's alone: the loss level
    # decides it (an RL value loss grows with the returns of a policy that got better)
    alone = not any(e.kind == "grad_spike" for e in events)
    if spike is not None and st.data_streak is None and not answered and \
            (level or not alone) and rec._rise.gives_back(spike.value or math.inf):
        # reported only once confirmed (DetectorConfig); acted on when it gives back part
        # of what the run learnt; not in a data streak (the skipped batches' own loss)
        triggers.append(Trigger("spike", spike.step, f"confirmed loss spike ({spike.message})",
                                rec._level, at=window.steps[-1], confirmed=True, by_level=alone))
    start = rec.state.trouble_start
    if rec.state.pre_level is None and start is not None:  # trouble before any healthy flush
        before = [x for s_, x in zip(window.steps, losses) if s_ < start and math.isfinite(x)]
        if before:
            triggers.append(Trigger("level", start, value=statistics.median(before)))
    risen, dead = False, list[str]()
    if level:
        risen, trig, dead = _rise_trigger(rec, guard, window, losses, skips, judge, units)
        if trig is not None:
            triggers.append(trig)
    if rec._progress is not None:
        triggers.append(Trigger("progress", window.steps[-1], value=rec._progress))
    acted = False
    for trig in sorted(triggers, key=lambda t: (t.kind != "level", t.step, t.kind == "progress")):
        acted = rec._feed(guard, trig, layers) or acted
    skipped = any(s and step not in overflows for step, s in zip(window.steps, skips))
    if rec.lr_probe and level:
        # an update voided because the probe restored the weights after its backward (a
        # trainer's hook) is the probe's own doing, no trouble
        own = {step for step, c in zip(window.steps, codes or ()) if c == STALE}
        trouble = acted or risen or any(s and step not in overflows and step not in own
                                        for step, s in zip(window.steps, skips))
        acted = probe_lr(rec, guard, window.steps[-1], losses, skips, trouble, judge) or acted
    # a network with dead layers is no state to go back to (see .rise), nor are weights
    # the loss-level tests have not judged yet (a snapshot is a healthy verdict)
    if judge and not acted and not skipped and not risen and not dead and not any(
            e.kind in UNHEALTHY and e.severity != "info" for e in events):
        _healthy(rec, guard, window, recent)


def _device_skips(rec: Recovery, window: Window, skips: list[bool],
                  codes: list[float] | None, overflows: Any) -> list[Trigger]:
    """The ladder's triggers for the window's steps whose skip flag stayed on the device and
    was not heard before (routine loss-scale overflows are no trouble); ``codes``: why each
    step was skipped (the verdict bits)."""
    triggers: list[Trigger] = []
    for i, (step, sk) in enumerate(zip(window.steps, skips)):
        if step not in rec._host_steps:
            c = int(codes[i]) if codes is not None and math.isfinite(codes[i]) else 0
            trig = _steps.skip_trigger(rec, sk and step not in overflows, step, c,
                                       at=window.steps[-1], routine=sk and step in overflows)
            if trig is not None:
                triggers.append(trig)
    rec._host_steps.difference_update(window.steps)
    return triggers


def _rise_trigger(rec: Recovery, guard: Guard, window: Window, losses: list[float],
                  skips: list[bool], judge: bool, units: tuple[float, str] | None = None,
                  ) -> tuple[bool, Trigger | None, list[str]]:
    """Whether the loss rose well above its best (stricter while a lowered ceiling is on
    probation) or is back at the fresh model's level with dead layers (the network died);
    the ``spike`` trigger that says so, unless a progress check already waits on the
    loss (a dead network is never waited for: a rollback); and the dead layers. Before
    the loss, half a layer's units dying (``units``: the window's latest share of dead
    units and its parameter, :func:`_dying`). Between judgements (``judge`` False) the
    window is only taken in."""
    rec._rise.update(window.steps, losses, skips)
    dead: list[str] = []
    # under pipelining each stage's layer columns are its own: no agreed verdict
    if guard.config.pipeline_group is None:
        dead = rec._dead.update(window.layers, window.layer_norms().tolist(), skips,
                                window.layers_absent())
    if not judge:
        return False, None, dead
    # under pipelining the share is the first stage's and its parameter position names
    # another stage's parameter: no verdict (as for dead layers)
    dying = (_dying(rec, guard, window.steps[-1], units)
             if guard.config.pipeline_group is None and units is not None else None)
    if dying is not None:
        rec._rise.judged()
        return True, dying, dead
    st = rec.state
    risen = rec._rise.risen(rec.config.stall_factor)
    mild = False
    if risen is None and st.probation:
        risen = rec._rise.risen(rec.config.stall_factor, strict=True)
        mild = risen is not None
    rec._rise.judged()
    died = False
    if risen is None and dead:
        risen = rec._rise.returned()
        died = risen is not None
    # a network that died is not waited for: no progress check calls it recovered
    if risen is None or (st.watching is not None and not died):
        return risen is not None, None, dead
    level, ratio = risen
    if died:
        why = (f"the loss is back at the fresh model's level ({level:.4g}; it started at "
               f"{rec._rise.fresh:.4g}, its best since was {rec._rise.best:.4g}), "
               f"and {listed(dead)} get no gradient at all: the network died")
    else:
        why = f"the loss rose to {level:.4g}, {ratio:.2g}x its best ({rec._rise.best:.4g})"
    snap = rec.ring.level(rec._rise.initial)
    now = rec._rise.latest
    f = rec.config.stall_factor
    # keep the weights only if they hold clear progress over the snapshot's (a rise that
    # kept most of the progress, ``mild``: unless the snapshot is clearly better); a dead
    # network's weights are never kept: no back-off revives a dead unit
    behind = snap is not None and now is not None and (
        died or (now > snap * f if mild else now * f > snap))
    if behind:
        why += f"; the last snapshot was taken at a loss of {snap:.4g}"
    return True, Trigger("spike", window.steps[-1], why, rec._rise.best, at=window.steps[-1],
                         by_level=not died,
                         mild=mild and not behind, rollback=behind,
                         worse_than_fresh=rec._rise.worse_than_fresh()), dead


def _dying(rec: Recovery, guard: Guard, step: int, sample: tuple[float, str]) -> Trigger | None:
    """A rollback trigger when ``DYING`` (half) or more of a layer's units died within a
    hundred steps (:mod:`gradguard.units`): to the weights from before they died (the ring
    passes over snapshots taken with a quarter dead), at a lower LR (a rollback is a
    relapse). No NaN, no spike, no rise of the loss tells it: the loss goes on falling
    towards the floor the dead units set, and no LR from the damaged weights brings them
    back. ``sample``: the window's latest share and its parameter (``Window.units_dying``)."""
    if sample[0] < DYING:
        return None
    shifted = rec.state.shifted
    if shifted is not None and (step - shifted <= (RECENT + SILENT) * SAMPLE or all(
            s < shifted for s in rec.ring.store.steps())):
        # the batches changed (:mod:`.shift`): units dying as the network learns them are
        # the change's doing, and weights from before it are no state to go back to
        return None
    share, name = sample
    units, at = guard.telemetry.units, guard.names.index(name)
    # the count of this rank's units (rank 0's share decides: under sharding they differ)
    count = ""
    if units is not None and at in units.index:
        n = units.units[units.index.index(at)]
        count = f" ({round(share * n)} of {n})"
    why = (f"{share:.0%} of the output units of {listed([layer_of(name)])}{count} have had no "
           f"gradient on {SILENT} samples in a row, {SAMPLE} steps apart: they died (their "
           "activation's input pushed for good where it passes no gradient, a ReLU's below "
           "zero: by updates too large for it, or by a signal that vanished on its way there)")
    return Trigger("spike", step, why, rec._rise.best, at=step, by_level=False, rollback=True)


def _healthy(rec: Recovery, guard: Guard, window: Window, recent: list[float]) -> None:
    """A healthy flush: learn the loss level, and have the ladder snapshot when due, unless
    the weights are clearly worse than the newest snapshot's (no rise was seen, a spike
    that killed units between two flushes, yet they would replace it; judged on
    ``PROGRESS_STEPS`` losses: the median of a window of two is no level)."""
    history = list(guard.monitor.detector_state.loss)
    if history and rec.state.factor >= rec.state.ceiling:
        rec._level = statistics.median(history)  # the loss level of a healthy run
    if rec.state.level_off:  # the level is no evidence in this run: nor is it for a snapshot
        rec._feed(guard, Trigger("healthy", window.steps[-1]), list)
        return
    # nor is a loss at twice its best, having given back some of what the run learnt,
    # healthy: the loss-rise test waits for half of it, and for a rise that lasts two
    # blocks (see .rise); a snapshot must not, and the last ten losses alone say no
    if rec._rise.noisy() is not None or (
            recent and rec._rise.noisy(statistics.median(recent)) is not None):
        return
    snap = rec.ring.level(rec._rise.initial)
    if snap is None or len(recent) < PROGRESS_STEPS or (
            near(statistics.median(recent), snap, rec.config.stall_factor)):
        rec._feed(guard, Trigger("healthy", window.steps[-1]), list)


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
    noisy = rec._rise.noisy() if idle else None
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
    if done.trial <= RETRY_GAIN * done.control:
        top = rec.state.episode_ceiling
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
    budget = rec.ring.store.max_bytes
    need = 2 * state_bytes(state)
    if budget is None or rec.snapshot_bytes + need <= budget:
        return True
    warnings.warn(
        f"Recovery: the LR probe is off for this run: its two copies of the training state "
        f"({need / 2**20:.1f} MiB) beside the snapshots held "
        f"({rec.snapshot_bytes / 2**20:.1f} MiB) would pass snapshot_memory="
        f"{budget} ({budget / 2**20:.1f} MiB); raise snapshot_memory to let it run",
        GradGuardWarning, stacklevel=caller_stacklevel())
    return False


def _restore(rec: Recovery, guard: Guard, snap: dict[str, Any]) -> None:
    """Load one of the probe's copies of the training state. Counted with the rollbacks'
    restores: a trainer's hook-driven step whose flush restored the weights after its
    backward must not apply that backward's gradients (the guard voids its update)."""
    wait_copies()
    actions.restore(guard, snap)
    rec.restores += 1
