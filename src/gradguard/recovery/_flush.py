"""What the :class:`~gradguard.recovery.Recovery` judges at each flush, from the host values
the flush already has (no device read): the skip flags the device kept (fused optimizers,
a ``GradScaler``), confirmed loss spikes, a loss that rose or a network that died
(:mod:`.rise`), the loss after a back-off, the loss on the weights a rollback restored
(:mod:`.shift`), the LR probe (:mod:`.probe`, driven by :mod:`._probing`), and a snapshot
while the run is healthy.
Every decision becomes a ladder :class:`~.ladder.Trigger`, fed through the one place that
carries actions out (``Recovery._feed``)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..events import Event, listed
from ..executors import STALE
from ..naming import layer_of
from ..units import DYING, RECENT, SAMPLE, SILENT
from . import _steps, actions, growth, wreck
from . import _window_reads as reads
from ._probing import probe_lr
from .defaults import IMPROVED, IMPROVED_SHARE, JUDGE_EVERY, PROGRESS_STEPS, UNHEALTHY
from .ladder import Trigger
from .ladder_types import near
from .rise import Rise

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
    if window.steps[0] == 0 and losses:
        rec._first = losses[0]  # the run's first loss, on the weights before any update
        if rec._first_check is not None and rec._first_check[1] is None:
            rec._first_check = (rec._first_check[0], rec._first, rec._first_check[2])
    rec._clips.update(rec.state.ceiling, window.clip_coef.tolist(), skips)
    if (units := window.units_dying()) is not None:
        rec._dying = units[0]  # the share a snapshot taken now is labelled with (latest)
    # why each step was skipped (host values: the window is the flush's one host copy)
    codes = window.skip_codes.tolist() if window.skip_codes is not None else None
    triggers = _device_skips(rec, window, skips, codes, overflows)
    if (first := wreck.first_batch_at_fault(rec, guard, window.steps, losses, skips)) is not None:
        triggers.append(first)
    recent = [x for x in losses[-PROGRESS_STEPS:] if math.isfinite(x)]
    before_window = rec._progress  # the level of the flush before this one
    rec._progress = statistics.median(recent) if recent else None
    given = window.loss_given.tolist() if window.loss_given is not None else [True] * len(losses)
    taken = [x for x, s, g in zip(losses, skips, given) if g and not s and math.isfinite(x)]
    rec._flushed = (rec._flushed + taken)[-growth.RECENT:]
    # while the batches since a rollback are skipped as bad ones (a data streak), their
    # losses are those batches', not a new level: the shift test waits for its end (a
    # stretch of x100 inputs was taken for a change of data at its fourth step, and the
    # rest of it trained into the weights)
    if rec.state.data_streak is None and (found := rec._shift.update(
            window.steps, losses, codes, skips)) is not None and _lr_jumped_since(guard, found.snapshot):
        # the LR jumped after the snapshot and stays up: the restored weights failed at it,
        # the batches did not change (found by a stranger: an AdamW LR x100 kept from step
        # 150 was "the batches changed", and the LR handed back in full)
        rec._shift.found = None
    elif rec.state.data_streak is None and found is not None:
        # the weights a rollback restored gave the trouble's loss: the batches changed
        # (:mod:`.shift`); this window's spikes and rise are the change, no trouble
        triggers.append(Trigger("shifted", window.steps[-1]))
        for t in sorted(triggers, key=lambda t: t.step):
            rec._feed(guard, t, layers)
        return
    if rec._shift.armed is None:
        rec._undo = None  # the restored weights were judged: the rollback stands
    spike = next((e for e in events if e.kind == "loss_spike"), None)
    # a spike still going on since before the ladder's last rung is the trouble that rung
    # answered (its start, not the flush that confirms it again, is what counts), and one
    # that began within a stretch of batches found at fault is theirs
    since = int((spike.data or {}).get("since", spike.step)) if spike is not None else 0
    st = rec.state
    answered = (st.backoff_step is not None and since <= st.backoff_step) or (
        st.spike_data is not None and 0 <= since - st.spike_data <= rec.config.patience) or (
        # the streak whose back-off the next step undid (the batches were at fault): a spike
        # of its skipped steps' losses that ended with it is that streak (a second x0.1 at
        # the next flush cost a BERT whose targets were x1e6 for 5 steps 1.23-1.58x its
        # loss); one that outlasts it is the weights' (damaged, not bad batches)
        spike is not None and st.undone is not None
        and 0 <= st.undone - since <= rec.config.patience
        and since + int((spike.data or {}).get("run", 1)) <= st.undone) or (
        # every step of it skipped, and the step after it taken clean on the same weights:
        # the batches' (found by a stranger: two x100 batches in a row, each "the weights
        # never saw it", cost a x0.1 back-off for 100 steps and 1.06-1.12x the twin's loss,
        # where three or four, whose streak back-off the next clean step undid, cost none)
        spike is not None and reads.skipped_whole(window, skips, since,
                                             int((spike.data or {}).get("run", 1))))
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
        level_before = rec._level if rec._level is not None else reads.level_before(
            window, losses, since, before_window)
        triggers.append(Trigger("spike", spike.step, f"confirmed loss spike ({spike.message})",
                                level_before, at=window.steps[-1], confirmed=True,
                                by_level=alone))
    start = rec.state.trouble_start
    if rec.state.pre_level is None and start is not None:  # trouble before any healthy flush
        if (value := reads.level_before(window, losses, start, before_window)) is not None:
            triggers.append(Trigger("level", start, value=value))
    risen, dead = False, list[str]()
    judged: list[Trigger] = []  # the window's loss level judged: the weights it ran on
    # a rollback after the window's last step, before this flush (the growth rule's, at the
    # step after which the ladder, busy, flushes): the window's level and units are the
    # replaced weights', and no best for the restored ones (found in the A/B of that rule:
    # units of the grown weights found dead at this flush rolled the restored ones back a
    # second time, at x0.0026; a rise measured from the grown run's best, a third time)
    replaced = rec.ring.restored_step is not None and rec.ring.restored_step > window.steps[-1]
    if level and not replaced:
        risen, trig, dead = _rise_trigger(rec, guard, window, losses, skips, judge, units)
        judged += [trig] if trig is not None else []
    if rec._progress is not None and not replaced:
        judged.append(Trigger("progress", window.steps[-1], value=rec._progress))
    acted, restores = False, rec.restores
    for trig in sorted(triggers + judged,
                       key=lambda t: (t.kind != "level", t.step, t.kind == "progress")):
        if rec.restores != restores and any(trig is t for t in judged):
            # a trigger before it (a confirmed spike) restored other weights: the level
            # of this window is the replaced weights', no evidence about those restored
            continue
        if acted and trig.kind == "spike" and not trig.rollback and any(
                trig is t for t in judged):
            # a rung before it (a confirmed spike's back-off) answered this window's
            # trouble: a rise that keeps the weights is the same incident, not a relapse
            # (two cuts of the ceiling for one spike left a 1-D conv net at chance, x0.02
            # of its LR); one whose weights fell behind the snapshot's still rolls back
            continue
        acted = rec._feed(guard, trig, layers) or acted
    cleared = reads.cleared(window, skips, codes)
    skipped = any(s and step not in overflows and step not in cleared
                  for step, s in zip(window.steps, skips))
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
            e.kind in UNHEALTHY and e.severity != "info" and e.step not in cleared
            for e in events):
        _healthy(rec, guard, window, recent, before_window)


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


def _lr_jumped_since(guard: Guard, step: int) -> bool:
    """Whether the LR jumped (an ``lr_too_high`` report) after ``step`` and has not come
    back under the peak it jumped from: the LR in force is another since."""
    tracker = guard.monitor.lr_tracker
    jump = tracker.last_jump
    return jump is not None and jump > step and not tracker.burst_since(step)


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
        walked = window.reached() if dead and window.reached is not None else None
        if walked is not None:  # a layer the graph does not reach is detached, not dead
            dead = [n for j, n in enumerate(window.layers) if n in dead and j in walked]
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
    died = stalled = False
    if risen is None and dead:
        risen = rec._rise.returned()
        if risen is None and rec._dead.stalled(window.steps[-1], rec._rise.latest, dead,
                                               window.layers):
            assert rec._rise.latest is not None and rec._rise.best is not None
            risen = Rise(rec._rise.latest, rec._rise.latest / rec._rise.best)
            stalled = True
        died = risen is not None
    # a network that died is not waited for: no progress check calls it recovered
    if risen is None or (st.watching is not None and not died):
        return risen is not None, None, dead
    level, ratio = risen
    if stalled:
        at, then = rec._dead.since or (window.steps[-1], level)
        why = (f"{listed(dead)} have had no gradient at all since step {at} at the latest, "
               f"and the loss has not fallen since ({then:.4g} then, {level:.4g} now): the "
               "network died")
    elif died:
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


#: A loss level at most this share of the fresh model's (and under 1e-5, float32's resolution
#: near a fit) is fit to its floor (as the report's ``FIT_LOSS``): no dead-unit verdict there.
FIT = 1e-6
FLOOR = 1e-5


def _dying(rec: Recovery, guard: Guard, step: int, sample: tuple[float, str]) -> Trigger | None:
    """A rollback trigger when ``DYING`` (half) or more of a layer's units died within a
    hundred steps (:mod:`gradguard.units`): to the weights from before they died (the ring
    passes over snapshots taken with a quarter dead), at a lower LR (a rollback is a
    relapse). No NaN, no spike, no rise of the loss tells it: the loss goes on falling
    towards the floor the dead units set, and no LR from the damaged weights brings them
    back. ``sample``: the window's latest share and its parameter (``Window.units_dying``)."""
    if sample[0] < DYING:
        return None
    fresh, latest = rec._rise.fresh, rec._rise.latest
    if fresh is not None and latest is not None and 0 <= latest <= min(FIT * fresh, FLOOR):
        # a loss fit to its floor passes (next to) no gradient back: units silent on the
        # batches it fits are no dead ones (found by a stranger: a blob classifier whose
        # cross-entropy was 1e-8 was rolled back for "53% of the output units died")
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
           "activation's input pushed for good where it passes no gradient: below zero for a "
           "ReLU, far into the flat tails of a tanh or a sigmoid; by updates too large for it, "
           "or by a signal that vanished on its way there)")
    return Trigger("spike", step, why, rec._rise.best, at=step, by_level=False, rollback=True)


def _healthy(rec: Recovery, guard: Guard, window: Window, recent: list[float],
             before: float | None = None) -> None:
    """A healthy flush: learn the loss level, and have the ladder snapshot when due, unless
    the weights are clearly worse than the newest snapshot's (no rise was seen, a spike
    that killed units between two flushes, yet they would replace it; judged on
    ``PROGRESS_STEPS`` losses: the median of a window of two is no level), or than the
    last flush's (``before``, the median of its last ``PROGRESS_STEPS`` losses)."""
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
    now = statistics.median(recent) if len(recent) >= PROGRESS_STEPS else None
    if now is not None and before is not None and not near(now, before, rec.config.stall_factor):
        # the loss rose by half since the last flush: weights on their way up are no
        # state to go back to (found on a digits MLP with inputs x100 on SGD at 30x its
        # LR: the flush of 59, at 1.9x the best, under the 2x of the rule above on one
        # machine and over it on another, took the snapshot a rollback at 79 for dying
        # units went back to: 3.6x its twin, where the weights before the first step gave
        # 1.5x)
        return
    if snap is None or now is None or near(now, snap, rec.config.stall_factor):
        # well below the newest snapshot's level, and further than the loss's own scatter
        # strays by chance (:mod:`.scatter`): a snapshot taken because a noisy loss had a
        # lucky stretch would be labelled with a level the run never holds (a regression
        # on inputs x100 was asked back at such a level and rolled back to x7e-5 its LR)
        # and by a quarter or more of what the run learnt from its fresh level (a classifier
        # whose loss halves from 2e-8 to 1e-8 learnt nothing: its snapshots every 20 steps
        # pushed the older ones out of the ring, and weights an x50 corruption had made
        # overconfident were restored, 33x the held-out loss)
        initial, newest = rec._rise.initial, rec.ring.newest_level(rec._rise.initial)
        improved = (newest is not None and now is not None and initial is not None
                    and 0 < now <= IMPROVED * newest
                    and newest - now >= IMPROVED_SHARE * (initial - now)
                    and (chance := rec._rise.chance()) is not None
                    and now * chance <= newest)  # the resampled scatter last: the costliest
        rec._feed(guard, Trigger("healthy", window.steps[-1], improved=improved), list)
