"""The events that say what the recovery ladder did: each names the rung, why, the LR
it set (per param group, as the user would write it in a config) and what to do."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import TrainingDiverged
from ..events import SPIKE_DATA_REMEDY, UNIT_ERROR_REMEDY, WEIGHTS_REMEDY, Event
from .ladder import OFFSCALE_REASON, SPIKE_REASON, Action
from .lrs import based, config_lrs, group_lrs, of_base
from .probe import GAIN, TRIAL, Probed
from .shift import SHIFT_RATIO
from .tally import ADVISE
from .wreck import FIRST_BATCH

if TYPE_CHECKING:
    from ..guard import Guard
    from .shift import Shift


def backoff_event(a: Action, restore_steps: int, *, no_snapshot: bool = False,
                  level: float | None = None) -> Event:
    """The back-off event; ``level``: the loss level before the trouble (for the run's
    verdict: recovered means back at it)."""
    if no_snapshot:
        message = (f"step {a.step}: {a.reason} again and no snapshot yet; learning rate "
                   f"x{a.factor:g}, restored to x{a.ceiling:g} only")
    else:
        message = (f"step {a.step}: {a.reason}; learning rate x{a.factor:g}, restored over "
                   f"{restore_steps} steps"
                   + (f" to x{a.ceiling:g} only ({_why_lowered(a)})" if a.lowered
                      else (f" to x{a.ceiling:g}" if a.ceiling < 1.0 else "")))
    return Event(
        kind="lr_backoff", step=a.step, severity="warning", value=a.factor, message=message,
        remedy=("Lower the base learning rate or add warm-up." if no_snapshot else
                "If this repeats, lower the base learning rate or add warm-up.")
        + _moving_objective(a),
        data={"factor": a.factor, "reason": a.reason, "ceiling": a.ceiling,
              "relapse": a.relapse, "level_before": level},
    )


def rollback_event(a: Action, snapshot: int, reset: list[str], restore_steps: int,
                   max_rollbacks: int, level: float | None = None, *,
                   weights: bool = False, burst: bool = False) -> Event:
    """The rollback event (``level``: the loss level before the trouble; ``weights``: for
    weights an update made NaN/Inf, :mod:`.ladder_weights`; ``burst``: an LR burst since
    the snapshot, over now, did it)."""
    lr = ("kept: its size did not do it" if weights else
          "kept: the LR burst since the snapshot did it, and is over" if burst else
          "its new ceiling, from here" if a.factor >= a.ceiling else
          f"restored to x{a.ceiling:g} only" if a.ceiling < 1.0
          else f"restored in full over {restore_steps} steps")
    return Event(
        kind="rollback", step=a.step, severity="error", value=float(snapshot),
        message=(f"step {a.step}: {a.reason}; rolled back to "
                 + (f"the snapshot of step {snapshot}" if snapshot >= 0 else
                    "the weights before the first step")
                 + f", learning rate x{a.factor:g} ({lr}), {len(reset)} layer(s) with reset "
                 f"optimizer state, {a.skip_batches} batch(es) to skip (rollback "
                 f"{a.rollbacks}/{max_rollbacks})"),
        remedy=(WEIGHTS_REMEDY if weights else
                "Check the LR schedule or the manual LR change that made the burst." if burst
                else "Lower the learning rate; if the data caused it, skip "
                "guard.batches_to_skip batches." + _moving_objective(a)),
        data={"snapshot_step": snapshot, "reset_layers": reset,
              "batches_to_skip": a.skip_batches, "reason": a.reason, "factor": a.factor,
              "ceiling": a.ceiling, "level_before": level},
    )


def _moving_objective(a: Action) -> str:
    """For a rung the loss level decided (it rose, or did not come back): the loss-level
    tests assume a loss that training lowers; say how to turn them off where it is not
    (a GAN's players, RL returns, a curriculum: benchmarks/gan.py)."""
    if not a.by_level:
        return ""
    return (" If this loss may rise in a healthy run (a GAN's generator or discriminator, RL "
            "returns, a curriculum that makes the data harder), the loss-level tests do not "
            "apply: pass gg.Recovery(loss_rise=False).")


def _why_lowered(a: Action) -> str:
    return ("the trouble came back" if a.relapse
            else "the LR in force is too high for the loss to settle")


def _settled(step: int, factor: float, lrs: list[float | None], message: str, remedy: str,
             **data: Any) -> Event:
    """An ``lr_settled`` event (info): the LR the run goes on at, per param group."""
    return Event(kind="lr_settled", step=step, severity="info",
                 value=next((lr for lr in lrs if lr is not None), factor), message=message,
                 remedy=remedy, data={"factor": factor, "lr": lrs, **data})


def settled_event(guard: Guard, a: Action) -> Event:
    """The ladder found an LR that trains: say which, and advise half of it for the config
    (:data:`.tally.ADVISE`: the highest LR that held, within a halving of one that failed,
    is the edge of what trains, and from scratch it can fail); say how often the clip acted
    there when it did often (:mod:`.tally`). A ceiling set by a jump below the LR that
    failed (``LadderState.failed`` more than a halving above it: a run worse than fresh)
    is no edge: it is advised itself, with the LR that failed (``data["failed_lr"]``)."""
    lrs, shown = group_lrs(guard, a.factor)
    rec = guard.recovery
    failed = rec.state.failed if rec is not None else None
    if failed is not None and failed * rec.config.relapse_backoff > a.factor * (1 + 1e-9):
        # a jump below the factor that failed (a run worse than fresh, .ladder): no halving
        # found the edge, which lies between; the LR that held is the advice itself
        held, held_text, base = config_lrs(guard, a.factor)
        failed_lrs, at, _ = config_lrs(guard, failed)
        where = (f"x{failed:g} of it" if base is not None  # the LR then was not this one's
                 else f"lr {at}")
        return _settled(
            a.step, a.factor, lrs,
            f"step {a.step}: training is stable at lr {shown} (x{a.factor:g} of the schedule); "
            f"it failed at {where}, {failed / a.factor:.3g}x higher",
            f"Set the learning rate to {held_text} (x{a.factor:g}{of_base(base)}) in your config: "
            f"it held, and the edge of what trains lies between it and {at}.", advise=held,
            failed=failed, failed_lr=failed_lrs, **based(base))
    advise, advised, base = config_lrs(guard, a.factor * ADVISE)
    message = (f"step {a.step}: training is stable at lr {shown} (x{a.factor:g} of the "
               "schedule) after the LR failed higher up")
    data: dict[str, Any] = {"advise": advise, **based(base)}
    clips = getattr(guard.recovery, "_clips", None)
    if clips is not None and clips.ceiling == a.ceiling and clips.edge():
        message += (f", with its gradients clipped on {clips.clipped} of the {clips.steps} "
                    "steps since it was set")
        data.update(clipped=clips.clipped, steps=clips.steps)
    return _settled(
        a.step, a.factor, lrs, message,
        f"Set the learning rate to {advised} (x{a.factor * ADVISE:g}{of_base(base)}) in your "
        f"config: half the highest that held ({shown if base is None else f'x{a.factor:g}'}), "
        "which is the edge of what trains and can fail from scratch.", **data)


def raised_event(guard: Guard, a: Action) -> Event:
    """A retry found the LR the trouble lowered trains after all: it is back (:mod:`.probe`).
    Back at the user's LR (x1 or more): keep it. Part of the way back (a retry halfway up):
    that factor of the config's LR is the advice (of the base a schedule scales: the LR now
    under a decay is no config value; "keep this learning rate (0.00333)" was the decayed
    LR of a StepLR, 8x below the 0.027 that trains from scratch)."""
    lrs, shown = group_lrs(guard, a.factor)
    message = (f"step {a.step}: the LR a trouble lowered was tried again: {a.reason}; lr "
               f"{shown} (x{a.factor:.3g} of the schedule) from here")
    if a.reason.startswith(FIRST_BATCH):  # no retry: the cap was the first batch's doing
        return Event(kind="unscaled_input", step=a.step, severity="warning", value=a.ceiling,
                     message=(f"step {a.step}: {a.reason}: the batches are at fault, not the "
                              f"weights. The cap on the LR is lifted: it restores from lr "
                              f"{shown} (x{a.factor:.3g} of the schedule) to x{a.ceiling:g}"),
                     remedy=SPIKE_DATA_REMEDY,
                     data={"factor": a.factor, "ceiling": a.ceiling, "first_batch": True,
                           "cause": "unscaled_input"})
    if a.factor >= 1:
        return _settled(a.step, a.factor, lrs, message,
                        f"Keep your learning rate ({shown}); if the trouble came from a "
                        "stretch of bad batches, check them.", retry=True, raised=True)
    advise, advised, base = config_lrs(guard, a.factor)
    return _settled(
        a.step, a.factor, lrs, message,
        f"Set the learning rate to {advised} (x{a.factor:.3g}{of_base(base)}) in your config: "
        "the retry found it trains.", retry=True, raised=True, advise=advise, **based(base))


def retry_event(guard: Guard, step: int, factor: float, ceiling: float, said: str) -> Event:
    """A retry found the LR the trouble lowered still too high: the ceiling stays, and half
    of it is advised for the config, as for :func:`settled_event`."""
    lrs, shown = group_lrs(guard, factor)
    advise, advised, base = config_lrs(guard, factor * ADVISE)
    return _settled(
        step, factor, lrs,
        f"step {step}: the LR a trouble lowered was tried again: {said}: it is still too "
        f"high; lr {shown} (x{factor:.3g} of the schedule) from the weights before the trial",
        f"Set the learning rate to {advised} (x{factor * ADVISE:.3g}{of_base(base)}) in your "
        f"config: half the highest that held ({shown if base is None else f'x{factor:.3g}'}), "
        "which is the edge of what trains.",
        retry=True, raised=False, tried=ceiling, advise=advise, **based(base))


def probe_event(done: Probed, control: bool, next_step: int) -> Event:
    """The LR probe found the LR in force not too high (see :mod:`.probe`): an ``info``
    event, so that a run whose weights a probe rewound says so."""
    return Event(
        kind="lr_probe", step=done.step, severity="info", value=done.trial,
        threshold=done.control,
        message=(f"step {done.step}: the loss sat at twice its best or more with no spike, so "
                 f"the LR was probed: from the same weights, {TRIAL} steps at half the LR "
                 f"brought the loss to {done.trial:.4g}, against {done.control:.4g} at the LR "
                 + ("in force: the LR is not what holds it up, and stays" if not
                    done.trial < done.control else
                    # found by a stranger: 0.30 against 0.55, "not what holds it up"
                    f"in force, lower but short of the x{GAIN:g} a lower LR must reach to be "
                    "taken: the LR stays")
                 + ". The run goes on from "
                 f"the {'control' if control else 'half-LR'} arm's weights (the other arm's "
                 f"{TRIAL} steps are discarded); no probe before step {next_step}"),
        remedy=("Nothing to do; a loss this noisy by nature (tasks or batches of different "
                "difficulty) can turn the probe off: gg.Recovery(lr_probe=False)."),
        data={"before": done.before, "control": done.control, "trial": done.trial,
              "kept": "control" if control else "trial", "next": next_step})


def lowered_event(guard: Guard, a: Action) -> Event:
    """The LR probe found the LR too high: the ladder lowered it (see :mod:`.probe`)."""
    lrs, shown = group_lrs(guard, a.factor)
    _, cfg, base = config_lrs(guard, a.factor)
    return Event(
        kind="lr_backoff", step=a.step, severity="warning", value=a.factor,
        message=(f"step {a.step}: {a.reason}; learning rate x{a.factor:g} (lr {shown}) "
                 "from here"),
        remedy=f"Lower the base learning rate (to {cfg} or less"
               + (f": x{a.factor:g}{of_base(base)}" if base else "") + ").",
        data={"factor": a.factor, "reason": a.reason, "ceiling": a.ceiling, "relapse": False,
              "level_before": None, "probe": True, "lr": lrs, "cause": "lr_too_high"},
    )


def abort(guard: Guard, a: Action, rollbacks: int, unrestored: int = 0,
          kept: int | None = None, *, weights: bool = False) -> TrainingDiverged:
    """The abort event (added to the guard) and the error to raise. ``unrestored``: how
    many of the ``rollbacks`` found no snapshot to restore (each backed off instead);
    ``kept``: the snapshot restored because the weights held NaN/Inf (-1: the weights
    before the first step); ``weights``: for weights an update made NaN/Inf."""
    run_dir = guard.monitor.run_dir()
    tried = (f"{rollbacks} rollback(s) without recovering" if not unrestored else
             f"{rollbacks} rollback(s) that found no snapshot to restore, each a back-off "
             "instead" if unrestored >= rollbacks else
             f"{rollbacks} rollback(s) without recovering ({unrestored} of them found no "
             "snapshot to restore and backed off instead)")
    what = f"training stopped: {a.reason}" if a.data else f"training diverged: {a.reason}, after {tried}"
    if kept is not None:
        what += ("; the model holds the " + ("weights before the first step" if kept < 0 else
                 f"snapshot of step {kept}") + " (its own were NaN/Inf)")
    msg = f"step {a.step}: {what}" + (f"; events in {run_dir}" if run_dir else "")
    kind = _data_kind(a.reason) if a.data else None
    # no snapshot to go back to (a resume without snapshot_dir): the LR is no culprit (found
    # by a stranger: a checkpoint taken inside an LR burst, resumed, was stopped and told
    # to lower the base LR, at which the run without the restart recovered)
    unsaved = ("No snapshot was left to roll back to: a resumed run keeps none from before its "
               "checkpoint unless Recovery(snapshot_dir=...) kept them on disk, and the "
               "checkpoint may hold weights the trouble had already damaged. Resume from an "
               "earlier checkpoint, and pass Recovery(snapshot_dir=...) to keep snapshots "
               "across restarts.")
    guard.add_event(Event(
        kind="abort", step=a.step, severity="error", message=msg,
        remedy=(WEIGHTS_REMEDY if weights else
                unsaved if unrestored and not a.data else
                UNIT_ERROR_REMEDY if kind == "offscale" else SPIKE_DATA_REMEDY if kind == "spike"
                else "Check the data for NaN/Inf (torch.isfinite on inputs and targets) and the "
                "loss for log(0) or division by zero." if a.data else
                "Run gg.doctor(model, batch, loss_fn) on a failing batch; lower the "
                "learning rate; check the data for NaN/Inf."),
        data={"rollbacks": a.rollbacks, "unrestored": unrestored, "reason": a.reason,
              "restored_snapshot": kept,
              **({"cause": _data_cause(kind)} if kind is not None else {})},
    ))
    return TrainingDiverged(msg, events=guard.events, run_dir=run_dir)




def _data_kind(reason: str) -> str:
    """Which bad batches a data streak's ``reason`` names: ``offscale`` (the batch norm
    statistics), ``spike`` (gradients x50 and more) or ``nonfinite``."""
    return ("offscale" if OFFSCALE_REASON in reason else
            "spike" if reason.startswith(SPIKE_REASON) or f" {SPIKE_REASON} " in reason
            else "nonfinite")


def _data_cause(kind: str) -> str:
    return "nonfinite_input" if kind == "nonfinite" else "unscaled_input"


def _data_event_kind(kind: str) -> str:
    return "grad_spike" if kind == "spike" else _data_cause(kind)


def data_event(guard: Guard, a: Action, snapshot: int, *, undone: bool = False,
               lr_back: bool = True) -> Event:
    """The first step on weights a rollback restored is non-finite (or off-scale): the
    batches are at fault, not the weights (see ``data`` in :mod:`.ladder`); ``undone``: the
    weights the rollback replaced, which no update had touched since their last finite
    step, were put back; ``lr_back``: with the ladder's state from before the streak
    (none kept: the LR stays as the rollback set it, found by a regression hunt, whose
    message said it was back)."""
    lrs, shown = group_lrs(guard, a.ceiling)
    saved = "before the first step" if snapshot < 0 else f"at step {snapshot}"
    kind = _data_kind(a.reason)
    what = {"offscale": "its batch moves the batch norm statistics from another scale on the "
                        f"weights just restored too (saved {saved}, when their batches did not)",
            "spike": f"the gradient norm spikes on the weights just restored too (saved "
                     f"{saved}, when it did not)",
            "nonfinite": f"the gradients are non-finite on the weights just restored (saved "
                         f"{saved}, when their gradients were finite)"}[kind]
    fault = {"offscale": "inputs on another scale",
             "spike": "inputs or targets far off their scale, or a loss scaled up on them",
             "nonfinite": "NaN/Inf in the inputs or targets, or a loss or a backward that is "
                          "non-finite on them: a half-precision layer that overflows, a loss "
                          "scale too high"}[kind]
    return Event(
        kind=_data_event_kind(kind), step=a.step, severity="warning",
        message=(f"step {a.step}: {what}: the batches are at fault, not the weights ({fault})."
                 + (" The rollback is undone: the weights it replaced had taken no update since "
                    "their last finite step, and are back"
                    + (", with the learning rate from before the streak." if lr_back else ".")
                    if undone else "")
                 + " gradguard skips such steps and does nothing else: the learning rate "
                 f"restores to x{a.ceiling:g} (lr {shown}), and it stops the run only if they "
                 "go on"),
        remedy=(UNIT_ERROR_REMEDY if kind == "offscale" else SPIKE_DATA_REMEDY if kind == "spike"
                else f"Check the batches from step {a.step} on for NaN/Inf (torch.isfinite on "
                "inputs and targets) and the loss for log(0) or division by zero."),
        data={"cause": _data_cause(kind), "factor": a.factor, "ceiling": a.ceiling,
              "lr": lrs, "snapshot_step": snapshot, "reason": a.reason,
              "rollback_undone": undone},
    )


def sound_event(guard: Guard, a: Action) -> Event:
    """The first step taken after a back-off for a streak of non-finite (or off-scale)
    steps is clean on the same weights (a skipped step changes none): the batches were at
    fault, and the back-off is undone (see ``sound`` in :mod:`.ladder`)."""
    lrs, shown = group_lrs(guard, a.factor)
    kind = _data_kind(a.reason)
    fault = {"offscale": "inputs on another scale",
             "spike": "inputs or targets far off their scale, or a loss scaled up on them",
             "nonfinite": "NaN/Inf in their inputs or targets, or in the loss or the backward "
                          "on them"}[kind]
    return Event(
        kind=_data_event_kind(kind), step=a.step, severity="warning", value=a.factor,
        message=(f"step {a.step}: {a.reason} (a skipped step changes no weight): the weights "
                 f"are sound, the batches were at fault ({fault}). gradguard undid the "
                 f"back-off: the learning rate is back at x{a.factor:g} (lr {shown}), and such "
                 "steps are skipped"),
        remedy=(UNIT_ERROR_REMEDY if kind == "offscale" else SPIKE_DATA_REMEDY if kind == "spike"
                else "Check the batches just before this step for NaN/Inf (torch.isfinite on "
                "inputs and targets) and the loss and any custom backward for log(0), "
                "division by zero or sqrt(0)."),
        data={"cause": _data_cause(kind), "factor": a.factor, "ceiling": a.ceiling,
              "lr": lrs, "undone": True, "reason": a.reason},
    )


def level_off_event(guard: Guard, a: Action, restore_steps: int) -> Event:
    """The loss did not come back to the level of the weights the ladder restored, time
    after time: it does not answer the weights, and the ladder stops acting on it (see
    ``level_off`` in :mod:`.ladder`)."""
    lrs, shown = group_lrs(guard, a.ceiling)
    return Event(
        kind="loss_level_off", step=a.step, severity="warning", value=a.factor,
        message=(f"step {a.step}: {a.reason}, after {a.rollbacks} rollback(s) to weights "
                 "that had reached it, at a fraction of the LR: this loss does not answer "
                 "the weights (an objective that moves: a GAN's player, RL returns, a "
                 "curriculum; or data that changed). The loss-level tests are off for the "
                 "rest of the run; training goes on from the weights restored last, the "
                 f"learning rate restores over {restore_steps} steps to x{a.ceiling:g} (lr "
                 f"{shown}); NaN, spikes and dead layers are still acted on"),
        remedy=("If this loss may rise in a healthy run, pass gg.Recovery(loss_rise=False) "
                "and the guard will not roll it back; if the data changed (a pipeline bug), "
                "stop the run and check it."),
        data={"factor": a.factor, "ceiling": a.ceiling, "lr": lrs, "reason": a.reason,
              "rollbacks": a.rollbacks},
    )


def shifted_event(guard: Guard, a: Action, shift: Shift, *, undone: bool = False) -> Event:
    """The weights a rollback restored gave the trouble's loss: the batches changed, not
    the weights (see :mod:`.shift`); ``undone``: the weights the rollback replaced, which
    did better on the new batches, are back."""
    lrs, shown = group_lrs(guard, a.ceiling)
    saved = "before the first step" if shift.snapshot < 0 else f"at step {shift.snapshot}"
    if undone:
        than = (f"far above the {shift.before:.4g} of the weights before it: the batches (or "
                "the objective) changed, not the weights, and the weights before it had "
                "begun to learn them: the rollback is undone, those weights are back")
    else:
        than = (f"as the weights before it did ({shift.before:.4g}): the batches (or the "
                "objective) changed, not the weights")
    return Event(
        kind="data_shift", step=a.step, severity="warning", value=shift.after,
        threshold=SHIFT_RATIO * shift.saved,
        message=(f"step {a.step}: the weights saved {saved}, at a loss of {shift.saved:.4g}, "
                 f"give {shift.after:.4g} on the batches since the rollback, {than} "
                 "(a curriculum's next stage, a new task, data read in "
                 "order?). gradguard learns the new level from here: the spike and clip "
                 f"statistics start afresh, the learning rate is back at x{a.ceiling:g} "
                 f"(lr {shown})"),
        remedy=("If the data was meant to change, nothing to do. If not, check the data "
                "pipeline at this step (a shard or stage that ends, shuffling off, a label "
                "mapping); for an objective that moves all the time (a GAN, RL) pass "
                "gg.Recovery(loss_rise=False)."),
        data={"snapshot_step": shift.snapshot, "snapshot_level": shift.saved,
              "level_after": shift.after, "level_before": shift.before,
              "factor": a.factor, "ceiling": a.ceiling, "lr": lrs,
              "rollbacks": a.rollbacks, "undone": undone},
    )
