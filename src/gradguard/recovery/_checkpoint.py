"""A Recovery's checkpoint: the ladder's state, its tests' statistics and the loss levels
(``Recovery.state_dict``), and what a resumed run rolls back to, since the snapshots are
no part of a checkpoint (``Recovery.load_state_dict``)."""

from __future__ import annotations

import dataclasses
import statistics
import warnings
from typing import TYPE_CHECKING, Any

from .. import distributed
from ..errors import GradGuardWarning, caller_stacklevel
from ..executors import Hook
from . import growth
from .defaults import PROGRESS_STEPS
from .ladder import LadderState
from .ladder_types import near

if TYPE_CHECKING:
    from ..guard import Guard
    from ._recovery import Recovery

#: The fewest losses taken since the checkpoint's last flush that say how its weights do
#: (:func:`unjudged_level`): one or two batches are noise, not a level.
UNJUDGED_MIN = 3


def state_dict(rec: Recovery) -> dict[str, Any]:
    """See :meth:`Recovery.state_dict <gradguard.Recovery.state_dict>`."""
    return dataclasses.asdict(rec.state) | {
        "host_steps": sorted(rec._host_steps), "level": rec._level,
        "verdict": rec._verdict.state_dict(), "rise": rec._rise.state_dict(),
        "dead": rec._dead.state_dict(), "probe": rec._probe.state_dict(),
        "shift": rec._shift.state_dict(), "clips": rec._clips.state_dict(),
        "progress": rec._progress, "judged": rec._judged, "dying": rec._dying,
        "last_taken": rec._last_taken, "flushed": list(rec._flushed),
        "grew": rec._grew.state_dict() if rec._grew is not None else None,
        "jumps": [[k, dataclasses.asdict(v)] for k, v in sorted(rec._jumps.items())],
        "snapshot_levels": [[k, v] for k, v in sorted(rec.ring.levels.items())],
        "snapshot_dying": [[k, v] for k, v in sorted(rec.ring.dying.items())],
        **rec.ring.tests_state()}


def load_state_dict(rec: Recovery, sd: dict[str, Any]) -> None:
    """Restore :func:`state_dict`. The snapshots are no part of it: without
    ``snapshot_dir`` (or with none there) a checkpoint taken while the ladder was calm
    holds weights as sound as its last snapshot, and the resumed run keeps them at its
    first step, in memory, as a stand-in for the snapshots left behind (the ladder's
    state, and so this one's, stays the uninterrupted run's; the stand-in's loss level is
    unknown). A checkpoint taken while the ladder was at work, before a flush had judged
    the loss, or with the loss above the last snapshot's level holds weights that may be
    the trouble's: none is kept, and a ``GradGuardWarning`` says why and names the
    snapshots left behind."""
    sd = dict(sd)
    rec._host_steps = set(sd.pop("host_steps", ()))
    rec._level = sd.pop("level", None)
    rec._progress = sd.pop("progress", None)
    rec._judged = int(sd.pop("judged", -1))
    rec._last_taken = sd.pop("last_taken", None)
    rec._flushed = [float(x) for x in sd.pop("flushed", ())]
    grew = sd.pop("grew", None)  # with its copy of the fresh weights (older ones: without)
    rec._grew = None if grew is None else growth.Noted(
        float(grew["ratio"]), grew.get("share"), grew.get("fresh"))
    jumps = {int(k): v for k, v in sd.pop("jumps", ())}
    ceilings = {int(k): float(v) for k, v in sd.pop("slip_ceiling", ())}  # before the jumps were kept
    rec.ring.load_tests_state(sd.pop("restored", None), sd.pop("verify", None),
                               sd.pop("verified", ()))
    rec.ring.levels = {int(k): v for k, v in sd.pop("snapshot_levels", ())}
    rec.ring.dying = {int(k): v for k, v in sd.pop("snapshot_dying", ())}
    rec._dying = sd.pop("dying", None)
    parts: dict[str, Any] = {"rise": rec._rise, "probe": rec._probe, "dead": rec._dead,
                             "verdict": rec._verdict, "shift": rec._shift,
                             "clips": rec._clips}
    for key, part in parts.items():  # each absent from older checkpoints
        if (part_sd := sd.pop(key, None)) is not None:
            part.load_state_dict(part_sd)
    sd.pop("host_skips", None)  # gradguard 0.1
    for legacy in ("base_lr", "set_lr"):  # gradguard 0.1 tracked the LR itself
        sd.pop(legacy, None)
    known = {f.name for f in dataclasses.fields(LadderState)}
    unknown = set(sd) - known
    if unknown:
        raise ValueError(f"Recovery.load_state_dict: unknown keys {sorted(unknown)}")
    rec.state = _ladder_state(sd)
    rec._jumps = {k: _ladder_state(v) for k, v in jumps.items()} | {
        k: dataclasses.replace(rec.state, ceiling=c) for k, c in ceilings.items()
        if k not in jumps}
    rec._resumed = False
    guard = rec._guard() if rec._guard is not None else None
    if rec.ring.disk is not None and guard is not None:  # its snapshots on disk are its own
        rec.ring.disk.resumed(guard.step_count - 1)
    if rec._grew is not None and rec._grew.fresh is not None and not len(rec.store):
        # the weights before the first step, which the run never interrupted holds in its
        # ring too: what a rollback before the growth's decision goes back to (.growth)
        rec.store.save(-1, rec._grew.fresh)
    if len(rec.store) or (rec.ring.disk is not None and rec.ring.disk.steps()) or (
            guard is not None and guard.step_count == 0):  # nothing kept, none needed
        return
    unsound = unsound_resume(rec, guard)
    rec._resumed = unsound is None
    skipped = skipped_growth(rec, guard)
    if unsound is not None and not rec._handed:
        rec.ring.warn_left_behind(unsound, fresh=rec._rise.initial is not None, also=skipped)
    elif skipped is not None:
        warnings.warn(f"gradguard: Recovery.load_state_dict: {skipped}", GradGuardWarning,
                      stacklevel=caller_stacklevel())


def _ladder_state(sd: dict[str, Any]) -> LadderState:
    """A :class:`LadderState` from its ``dataclasses.asdict`` form (its ``undo`` nested as a
    dict)."""
    undo = sd.get("undo")
    if isinstance(undo, dict):
        sd = {**sd, "undo": _ladder_state(undo)}
    return LadderState(**sd)


def skipped_growth(rec: Recovery, guard: Guard | None) -> str | None:
    """Why a run resumed within its first ``growth.STEP`` steps (or before
    ``growth.DECIDE``, with a growth found), with no ``snapshot_dir``, skips the test of
    their growth (:mod:`.growth`): it needs the weights before the first step, kept in
    memory only (found by a stranger: a resume at step 10 of an Adam run at 30x skipped it
    without a word, and ended at another loss than the run never interrupted). None when
    the test is not skipped so."""
    # under a trainer's hook the test runs before step STEP's update (a checkpoint at step
    # 20 is before it: found by a stranger, an HF Trainer resumed at 20 said nothing)
    noted = rec._grew is not None
    if rec._grew is not None and rec._grew.fresh is not None:  # the checkpoint held them
        return None
    last = (growth.DECIDE if noted else growth.STEP) + (
        1 if isinstance(guard.executor, Hook) else 0) if guard is not None else 0
    if guard is None or rec.ring.disk is not None or not 0 < guard.step_count < last or (
            not rec.early_growth or (rec.state.last_trigger is not None and not noted)
            or rec.restores or distributed.world_size() > 1):
        return None
    if rec._grew is not None:
        return (f"resumed at step {guard.step_count}, with the weights grown "
                f"{rec._grew.ratio:.3g}x in the first {growth.STEP} steps (an LR far too "
                f"high unless the loss learnt by step {growth.DECIDE}, see docs/recovery.md), "
                "whose weights before the first step were kept in memory only, so this run "
                "cannot roll back to them. Recovery(snapshot_dir=...) writes them to disk, "
                "where a resumed run finds them.")
    return (f"resumed at step {guard.step_count}, within the first {growth.STEP} steps, whose "
            "growth of the weights the Recovery judges against the weights before the first "
            "step (an LR far too high, see docs/recovery.md): those were kept in memory only, "
            "so this run skips that test. Recovery(snapshot_dir=...) writes them to disk, "
            "where a resumed run finds them.")


def unsound_resume(rec: Recovery, guard: Guard | None = None) -> str | None:
    """Why the weights of the checkpoint just loaded are no stand-in for a snapshot
    (None: they are as sound as the last one, see :func:`load_state_dict`): the ladder
    was at work, or no flush had judged the loss yet, or the last one would have kept
    no snapshot (the loss above the newest snapshot's level, as :func:`._flush._healthy`
    tests), or the steps since it went wrong (:func:`unjudged_level`: a checkpoint taken
    twenty steps after an LR burst wrecked the weights, before the flush that would have
    rolled them back, was kept as the stand-in, and every rollback of the resumed run
    went back to the wrecked weights, each at a lower LR: 8.6 held-out, 0.19 for the
    run never interrupted)."""
    st = rec.state
    if rec.busy or st.consecutive_skips or st.undo is not None or st.untested is not None:
        return "while the recovery was at work on an incident"
    if rec._progress is None:
        return "before a flush had judged its loss"
    if st.level_off:
        return None
    snap = rec.ring.newest_level(rec._rise.initial)
    if rec._rise.noisy() is not None or (
            snap is not None and not near(rec._progress, snap, rec.config.stall_factor)):
        return (f"with its loss at {rec._progress:.4g}, above the level of its last "
                f"snapshot ({'unknown' if snap is None else f'{snap:.4g}'})")
    since = None if guard is None else unjudged_level(guard)
    if since is not None and snap is not None and not near(since[0], snap,
                                                             rec.config.stall_factor):
        return (f"with its loss at {since[0]:.4g} over the {since[1]} steps since its last "
                f"flush, above the level of its last snapshot ({snap:.4g}): no flush had "
                "judged them yet")
    if guard is not None and (jump := guard.monitor.lr_tracker.last_jump) is not None and (
            jump >= guard.step_count - guard.telemetry.pending):
        # the updates at a jumped LR may have wrecked the weights before any loss showed it
        # (found by a stranger: a checkpoint one step after an LR x300 kept as the
        # stand-in, every rollback of the resumed run went back to it, TrainingDiverged)
        return (f"after {guard.step_count - jump} step(s) at an LR that jumped at step "
                f"{jump}, before a flush had judged them")
    return None


def unjudged_level(guard: Guard) -> tuple[float, int] | None:
    """The median of the last ``PROGRESS_STEPS`` (10) losses taken since the checkpoint's
    last flush (its telemetry window, restored before the Recovery), and how many steps
    they are; None with fewer than ``UNJUDGED_MIN``, and under torch.distributed (each
    rank's loss is its own, and the ranks must keep the stand-in alike)."""
    if distributed.world_size() > 1:
        return None
    losses = guard.telemetry.pending_losses()
    if len(losses) < UNJUDGED_MIN:
        # too few for a level: the worst of them stands for it (a loss 110x the snapshot's
        # two steps after an LR burst was taken for noise, and its weights for a stand-in)
        return (max(losses), len(losses)) if losses else None
    return statistics.median(losses[-PROGRESS_STEPS:]), len(losses)
