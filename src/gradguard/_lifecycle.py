"""Around the hot path: what a :class:`~gradguard.Guard` does at a flush, when recovery
gives up, when the optimizer's parameters change, and when it closes.

``Guard.step`` is the per-step path; these run once per flush or once per run. They take
the guard and work on its parts (telemetry, monitor, recovery, executor, watches): the
guard's methods of the same names call them.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

from . import distributed, precursors
from ._construction import loss_sign, warn_half_weights
from ._unstepped import Unstepped
from .errors import GradGuardWarning, NonFiniteGradientError, TrainingDiverged, caller_stacklevel
from .events import Event, listed
from .executors import optimizer_kind
from .monitor import describe_nonfinite
from .naming import named_optimizer_params, optimizer_layout
from .telemetry import StepStats, Telemetry, Window, layer_of

if TYPE_CHECKING:
    from .guard import Guard


def flush(guard: Guard, *, collective: bool, after_script: bool = False) -> Window | None:
    """Copy the window to the host, run the detectors, let recovery act, feed the sinks.
    ``collective=False``: a failing rank or an abort, no collective is entered;
    ``after_script``: the last flush of a guard ``gradguard run`` closes once the script
    has ended (:func:`close`)."""
    inputs = precursors.PrecursorInputs(
        magnitudes=None if guard._logits is None else guard._logits.take(),
        optim=precursors.optimizer_info(guard.optimizer), every=guard.every)
    window, overflows = guard.monitor.collect(
        guard.telemetry, guard._watch, guard.config.sample_activations, collective=collective,
        precursor_inputs=inputs)
    if window is not None and (unstepped := guard._unstepped.check(guard.step_count)):
        warnings.warn(f"gradguard: {unstepped.message}. {unstepped.remedy}", GradGuardWarning,
                      stacklevel=caller_stacklevel())
        guard.monitor.add_event(unstepped)
    observe = getattr(guard.clip, "observe", None)
    if window is not None and callable(observe) and not guard._aborted:
        event = observe(window)  # a clip policy that learns from the window (ZClip's level)
        if event is not None:
            guard.monitor.add_event(event)
    error: TrainingDiverged | None = None
    if window is not None and guard.recovery is not None and not guard._aborted:
        kept = _before_late_flush(guard) if after_script else None
        try:
            guard.recovery.on_flush(guard, window, list(guard.monitor.pending), overflows)
        except TrainingDiverged as e:
            error = e  # deliver this window (with the abort event) first
        if kept is not None:
            _not_applied(guard, *kept)
    guard.monitor.deliver(window, next_step=guard.step_count)
    if error is not None:
        abort(guard, error, delivered=True)
    return window


#: What a recovery decision taken after the script ended says (:func:`close`).
AFTER_SCRIPT = ("decided at the flush after the script ended (gradguard run closes its "
                "guards then): not applied; the weights the script saved are from before it")
#: The event kinds of the recovery's decisions.
_DECIDED = ("lr_backoff", "rollback", "lr_probe", "loss_level_off", "data_shift", "abort")


def _before_late_flush(guard: Guard) -> tuple[int, int, dict[str, Any] | None]:
    """Before the recovery judges a window after the script ended: the events so far, the
    restores so far and a copy of the training state, to put back should it restore one."""
    from .recovery.actions import snapshot_state
    from .recovery.snapshots import copy_state

    assert guard.recovery is not None
    # not under torch.distributed: its NaN test is a collective, which a rank that raised
    # must not enter (the ranks' in-memory weights may then be a rollback's; the script's
    # files are its own all the same)
    state = snapshot_state(guard, guard.step_count - 1) if guard.dist is None else None
    return (len(guard.monitor.pending), guard.recovery.restores,
            None if state is None else copy_state(state))


def _not_applied(guard: Guard, pending: int, restores: int, state: dict[str, Any] | None) -> None:
    """What the recovery decided about a window judged after the script ended reached no
    step and no file of the script's: its weights are put back (so an ``atexit`` handler
    saves the script's own), and its events say so (``data["applied"]`` false)."""
    from .recovery.actions import restore
    from .recovery.snapshots import wait_copies

    assert guard.recovery is not None
    if guard.recovery.restores != restores and state is not None:
        wait_copies()
        restore(guard, state)
    for e in guard.monitor.pending[pending:]:
        if e.kind in _DECIDED:
            e.message = f"{e.message} ({AFTER_SCRIPT})"
            e.data = {**(e.data or {}), "applied": False}


def abort(guard: Guard, error: TrainingDiverged, *, delivered: bool = False) -> None:
    """Recovery gave up: deliver what is left, let the sinks react (a JSONL sink renders
    the incident report), raise ``error``."""
    guard._aborted = True
    if not delivered:
        guard._flush(collective=False)
    error.report_path = error.report_path or guard.monitor.abort_sinks(error)
    raise error


def retire(guard: Guard) -> list[Any]:
    """Hand the guard's run on to a successor built over another optimizer of the same
    parameters (``gradguard run``: a script that builds a new optimizer each epoch), which
    loads :meth:`~gradguard.Guard.state_dict` taken just before: no flush (the pending
    window and events go on in the successor), and the sinks are returned open, for the
    successor to write, instead of closed. What acts on the old optimizer and the model
    (the LR multiplier, the executor's and the watches' hooks) is removed, as by
    :func:`close`."""
    guard._closed = True
    _detach(guard)
    sinks, guard.monitor.sinks = guard.monitor.sinks, []
    return sinks


def _detach(guard: Guard) -> None:
    for part in (guard._watch, guard._sampler, guard.executor, guard.recovery, guard._outside):
        if part is not None:
            part.detach()
    if guard._logits is not None:
        guard._logits.remove()
    if callable(getattr(guard.clip, "release", None)):
        guard.clip.release(guard)


def close(guard: Guard, *, failed: bool = False, after_script: bool = False) -> None:
    """Flush what is left and close every sink (idempotent; the sinks are closed even when
    the last flush raises). ``failed``: this rank is leaving on an exception;
    ``after_script``: ``gradguard run`` closes the guard after the script has ended, which
    saved and evaluated its weights before: what the recovery decides about the last
    window is recorded, not applied (its events say so), and a probe's trial arm under way
    is not discarded, it is what the script ended with."""
    if guard._closed:
        return
    guard._closed = True
    try:
        if guard.recovery is not None and not (failed or guard._aborted):
            if after_script:
                guard.recovery.ended_in_trial(guard)
            else:
                guard.recovery.finish(guard)  # a probe's trial under way is discarded
        collective = not (failed or guard._aborted)
        if after_script:
            flush(guard, collective=collective, after_script=True)
        else:
            guard._flush(collective=collective)
    finally:
        _detach(guard)
        guard.monitor.close_sinks()


#: What leaves a guard's ``with`` block without stopping the run (:func:`left_on`): the
#: guard's own errors carry their own events; the others end a loop as ``break`` does.
ENDS = (TrainingDiverged, NonFiniteGradientError, GeneratorExit, StopIteration,
        StopAsyncIteration)


def left_on(guard: Guard, exc: BaseException | None, what: str | None = None) -> None:
    """The loop left the guard's ``with`` block on an exception the guard did not raise (an
    out-of-memory error, Ctrl-C): an ``abort`` event says so, so that the report tells a
    crash from a run that ended (found by a stranger: a run killed by an out-of-memory
    error was "No gradient trouble in 38 steps"). A ``SystemExit`` with code 0 is an end,
    and so are a generator's close (a training loop written as a generator, closed by its
    caller: ``GeneratorExit``) and an iterator run out (``StopIteration``). The trainer
    callbacks and ``gradguard run`` call it too; ``what``: how to name an exception they do
    not see (``exc`` None)."""
    if guard._aborted or guard._closed or isinstance(exc, ENDS) or (
            isinstance(exc, SystemExit) and exc.code in (0, None)):
        return
    if exc is None:
        what = what or "an exception"
    else:
        name = type(exc).__name__
        text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        what = f"{name} ({text})" if text else name
    step = max(guard.step_count - 1, 0)
    # under torch.distributed, the rank that raised it: rank 0's records tell only its own
    # (found by a stranger: rank 1's error, told nowhere, shown as rank 0's "Connection
    # closed by peer" for every rank)
    rank = distributed.rank() if distributed.world_size() > 1 else None
    where = "" if rank is None else (f" on rank {rank} (another rank may have raised first: "
                                     "see each rank's traceback)")
    guard.add_event(Event(
        kind="abort", step=step, severity="error", rank=rank,
        message=f"step {step}: the training loop raised {what}{where} and left the guard",
        remedy="See the traceback the loop raised; the run's records end here.",
        data={"exception": what}))


def relayout(guard: Guard) -> None:
    """The optimizer's parameters changed (``add_param_group``): flush the window of the
    old layout, then measure the new set; snapshots of the old layout stay when groups
    were added after its own, else they cannot be restored into the new one and are
    dropped (:meth:`gradguard.Recovery.relayout`); the clip policy (``reset``, where the
    policy has one: a user's policy may not) and the detectors forget the old set's norm."""
    # the parameters just added are no longer unstepped (found by a stranger: the flush
    # of the old layout warned that a head "no optimizer steps" at the very step its
    # add_param_group made the optimizer hold it, naming add_param_group as the remedy)
    guard._unstepped.release({id(p) for g in guard.optimizer.param_groups for p in g["params"]})
    guard.flush()
    old = guard._layout
    guard._layout = optimizer_layout(guard.optimizer)
    guard.telemetry = Telemetry(named_optimizer_params(guard.model, guard.optimizer),
                                every=guard.every, pipeline_group=guard.config.pipeline_group,
                                model=distributed.unwrap(guard.model),
                                graph_order=guard.dist is None)
    guard._unstepped = Unstepped(guard.model, {id(p) for p in guard.telemetry.params},
                                 said=guard._unstepped.said)
    guard.kind = optimizer_kind(guard.optimizer)
    guard._sign = loss_sign(guard.optimizer)
    for event in warn_half_weights(guard.optimizer, guard.step_count):
        guard.add_event(event)
    guard._fresh.reset()  # the new parameters have no optimizer state yet
    forget_norms(guard)
    if guard._sampler is not None:
        guard._sampler.telemetry = guard.telemetry
    if guard.recovery is not None:
        guard.recovery.relayout(guard, old)


def forget_norms(guard: Guard) -> None:
    """The clip policy (``reset``, where the policy has one: a user's policy may not) and
    the flush detectors forget the gradient norm of the parameters trained so far."""
    reset = getattr(guard.clip, "reset", None)
    if callable(reset):
        reset()
    state = guard.monitor.detector_state
    state.grad.clear()
    state.precursors = precursors.PrecursorState()


def renorm(guard: Guard, new: list[int], step: int) -> None:
    """Parameters got their first gradient at ``step`` (``new``: their positions; an
    unfrozen backbone, :meth:`Telemetry.grew <gradguard.telemetry.Telemetry.grew>`): the
    total norm is now of a larger set and its scale changed for good, as after
    ``add_param_group`` (:func:`relayout`), so the clip policy (``reset``), the per-step
    spike verdict and the flush detectors learn it anew; statistics of the old set would
    clip it (ZClip at x0.3 for 40 steps) and call it a spike. The snapshots stay (the
    weights and optimizer state are of the same parameters); a restore of one taken
    before ``step`` keeps the statistics learnt since (:func:`stale
    <gradguard.recovery.actions.stale>`). One process only: under torch.distributed the
    ranks of a pipeline or tensor-parallel mesh hold different parameters, and must clip
    alike."""
    forget_norms(guard)
    if guard.recovery is not None:
        guard.recovery.renorm()
    layers = list(dict.fromkeys(layer_of(guard.names[i]) for i in new))
    guard.add_event(Event(
        kind="new_gradients", step=step, severity="info", value=float(len(new)),
        message=(f"step {step}: {len(new)} parameter(s) got a gradient for the first time "
                 f"({listed(layers)}): the gradient norm is of a larger set from here; the clip "
                 "policy and the spike tests learn its scale anew"),
        data={"layers": layers, "params": [guard.names[i] for i in new]},
    ))


def report_nonfinite(guard: Guard, stats: StepStats, *, raise_: bool) -> None:
    """``on_nonfinite="raise"``: flush, then raise; ``"warn"``: warn (the step was
    skipped)."""
    msg, layers = describe_nonfinite(guard.step_count - 1, guard.names, stats)
    if raise_:
        # the run stops as asked: an abort, not a run that "did not recover" (a report of
        # the run directory said DIVERGED for it; found by a stranger)
        step = guard.step_count - 1
        guard.add_event(Event(
            kind="abort", step=step, severity="error",
            message=f"{msg}; the guard raised NonFiniteGradientError, as on_nonfinite='raise' asks",
            remedy="on_nonfinite='skip' (the default) skips such a step and trains on",
            data={"on_nonfinite": "raise", "layers": list(layers)}))
        guard.flush()
        raise NonFiniteGradientError(msg + " (on_nonfinite='raise')", step, layers)
    warnings.warn(msg + "; the optimizer step was skipped", GradGuardWarning, stacklevel=caller_stacklevel())
