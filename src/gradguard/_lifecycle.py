"""Around the hot path: what a :class:`~gradguard.Guard` does at a flush, when recovery
gives up, when the optimizer's parameters change, and when it closes.

``Guard.step`` is the per-step path; these run once per flush or once per run. They take
the guard and work on its parts (telemetry, monitor, recovery, executor, watches): the
guard's methods of the same names call them.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any

import torch

from . import distributed, precursors
from ._tensors import planned_lr
from ._unstepped import Unstepped
from .errors import GradGuardWarning, NonFiniteGradientError, TrainingDiverged, caller_stacklevel
from .events import Event, listed
from .executors import maximizing, optimizer_kind
from .monitor import describe_nonfinite
from .naming import named_optimizer_params, optimizer_layout
from .telemetry import StepStats, Telemetry, Window, layer_of

if TYPE_CHECKING:
    from .config import GuardConfig
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


def loss_sign(optimizer: torch.optim.Optimizer) -> float:
    """-1 when the optimizer maximizes (``maximize=True``): the value passed to
    ``guard.step`` is then the objective it ascends, and the guard records and judges its
    negation, a loss like any other (a higher objective is a lower loss). Param groups that
    disagree have no one loss: the value is taken as a loss, and a warning says so."""
    sign = maximizing(optimizer)
    if sign is None:
        warnings.warn(
            "Guard: the optimizer's param groups mix maximize=True and maximize=False; the "
            "value passed to guard.step() is judged as a loss to minimise (its spikes and "
            "rises as trouble): turn the loss tests off (Recovery(loss_rise=False, "
            "lr_probe=False)) if it is an objective to maximise", GradGuardWarning, stacklevel=caller_stacklevel())
    return -1.0 if sign else 1.0


def warn_no_loss() -> None:
    """Say once that ``guard.step()`` came without a loss while a Recovery is on: a loop
    that replaced ``optimizer.step()`` with ``guard.step()`` word for word. The gradient
    tests still act; the loss tests cannot (a digits MLP on Adam 300x its LR: 1.12x and
    0.96x its twin with the loss, 3.93x and 2.60x without; 18.7x and 20.4x unguarded)."""
    warnings.warn(
        "guard.step() got no loss: gradguard's Recovery judges the loss as well as the "
        "gradients (a first update that wrecks the weights, a loss that rises and stays up, "
        "the LR probe, a change of data), and those tests are off without it. Pass this "
        "step's loss: guard.step(loss).", GradGuardWarning, stacklevel=caller_stacklevel())


def weight_dtypes(optimizer: torch.optim.Optimizer) -> frozenset[torch.dtype]:
    """The dtypes of the parameters ``optimizer`` holds."""
    return frozenset(p.dtype for g in optimizer.param_groups for p in g["params"])


def recast(guard: Guard) -> None:
    """At the guard's first step: weights cast after it was built (``model.half()``,
    ``model.to(torch.bfloat16)`` on a model the optimizer already held) were not in the
    dtype :func:`warn_half_weights` judged at construction; judge them now, once (a
    digits MLP cast to float16 after the guard: Adam's eps of 1e-8, 0 in float16, wrote
    NaN into its weights at step 7 with no warning before)."""
    judged, guard._cast = guard._cast, None
    if weight_dtypes(guard.optimizer) != judged:
        for event in warn_half_weights(guard.optimizer, guard.step_count):
            guard.add_event(event)


def closure_config(cfg: GuardConfig, optimizer: torch.optim.Optimizer) -> GuardConfig:
    """``cfg`` for an optimizer whose ``step`` evaluates its closure again (L-BFGS's line
    search and iterations), said when it changes: no clip policy and no skip of a
    gradient or loss spike. Its curvature is built from the differences of those
    gradients, and one of them clipped by a coefficient that changes every step breaks
    them; its steps jump in norm and loss by design, and a skip of three in a row backed
    off its LR (found by a stranger: healthy L-BFGS runs on a digits MLP ended at a loss
    of 1e7 under ZClip and at chance under the recovery, 0.86-0.94 without). Non-finite
    steps are still skipped, and the ladder still acts on the loss."""
    import dataclasses

    rec = cfg.recovery
    off = (["clip"] if cfg.clip is not None else []) + (
        ["skip_spikes"] if rec is not None and rec.skip_spikes else [])
    if not off:
        return cfg
    if rec is not None:
        rec.skip_spikes = False
    warnings.warn(
        f"Guard(optimizer=...): {type(optimizer).__name__}.step evaluates its closure again "
        "within a step and builds its curvature from the differences of those gradients, "
        "whose norms jump by design: clipping the first would break them, and a skipped "
        f"spike backs off a healthy run, so this guard turns off {' and '.join(off)} (it "
        "still measures, skips non-finite steps and recovers from a rising loss). Pass "
        "clip=None and Recovery(skip_spikes=False) to silence this.",
        GradGuardWarning, stacklevel=caller_stacklevel())
    return dataclasses.replace(cfg, clip=None)


def warn_half_weights(optimizer: torch.optim.Optimizer, step: int = 0) -> list[Event]:
    """What half-precision weights cost that no guard can mend, said at construction:
    an ``eps`` that is 0 in float16 (:func:`warn_eps_underflow`) and updates that round
    away (:func:`warn_update_rounding`, also an ``update_ratio`` warning event at ``step``
    for the run's files and report: no later event shows it)."""
    events = []
    if (eps := warn_eps_underflow(optimizer)) is not None:
        # for the run's files and report too: a run whose updates blow up through it shows
        # loss spikes and rollbacks, and its verdict must name the eps (found by a stranger:
        # float16 weights on fused Adam, eps 1e-8, "recovered" at 5-10x its twin, no remedy)
        events.append(Event(
            kind="update_ratio", step=step, severity="warning", value=eps,
            message=f"step {step}: {type(optimizer).__name__}'s eps={eps:g} is 0 in float16, "
                    "the dtype of its parameters: where a gradient's square underflows, the "
                    "update divides by 0",
            remedy=EPS_REMEDY, data={"eps_underflow": eps}))
    said = warn_update_rounding(optimizer)
    if said is None:
        return events
    share, text, remedy = said
    return [*events, Event(kind="update_ratio", step=step, severity="warning", value=share,
                           message=f"step {step}: {text}", remedy=remedy,
                           data={"rounded_share": share})]


#: What to change when an optimizer's eps is 0 in float16 (:func:`warn_eps_underflow`).
EPS_REMEDY = ("Set the optimizer's eps to 1e-4 or more, or keep float32 weights and train "
              "under torch.autocast with a GradScaler.")


#: A share of the half-precision weights this large whose updates round away is warned of.
ROUNDED_SHARE = 0.1


def warn_update_rounding(optimizer: torch.optim.Optimizer) -> tuple[float, str, str] | None:
    """Weights kept in bfloat16 or float16 (not under autocast, whose weights stay float32)
    on an optimizer whose per-element update is at most about its LR (Adam's family and
    Lion: ``betas`` in the param group; RMSprop): a weight ``w`` has neighbours
    ``2**floor(log2|w|) * finfo.eps`` apart, and an update under half that is rounded
    away: an update of ``lr`` is lost on every ``|w|`` at or above the power of two past
    ``2 * lr / eps``. When ``ROUNDED_SHARE`` or more of those weights would lose even an update of the
    full LR (the schedule's peak, ``initial_lr``, when a scheduler recorded one), those
    weights do not train, and no guard can tell a step that changed nothing from a calm
    one: say so. Measured: a digits MLP in pure bfloat16 on Adam at 1e-4 ends at a loss of
    1.42 against 0.52 in float32; at 1e-5 its weights move 0.3% in 400 steps, against 2.5%.
    One device reduction per such parameter and one host read, at construction only.
    Returns the share, the sentence and the remedy when it warned."""
    lost = total = 0
    for group in optimizer.param_groups:
        if "betas" not in group and type(optimizer).__name__ != "RMSprop":
            continue
        lr = planned_lr(group) or group.get("lr")
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0:
            continue
        counts = []
        for p in group["params"]:
            if p.dtype in (torch.bfloat16, torch.float16) and p.numel():
                bound = 2.0 ** (math.floor(math.log2(2 * lr / torch.finfo(p.dtype).eps)) + 1)
                counts.append((p.detach().abs() >= bound).sum())
                total += p.numel()
        if counts:
            lost += int(torch.stack(counts).sum())
    if not total or lost < ROUNDED_SHARE * total:
        return None
    dtype = "bfloat16" if any(p.dtype == torch.bfloat16 for g in optimizer.param_groups
                              for p in g["params"]) else "float16"
    text = (f"{lost / total:.0%} of the {dtype} weights that {type(optimizer).__name__} "
            f"updates are so large that an update of the full LR is under half the spacing "
            f"of {dtype} numbers there and rounds away: those weights stop training, and "
            "nothing in the gradients shows it")
    remedy = (f"Keep float32 weights and train under torch.autocast(dtype=torch.{dtype}) "
              "(the optimizer then updates float32 copies).")
    warnings.warn(f"Guard(optimizer=...): {text}. {remedy}", GradGuardWarning,
                  stacklevel=caller_stacklevel())
    return lost / total, text, remedy


def warn_eps_underflow(optimizer: torch.optim.Optimizer) -> float | None:
    """Say at construction what no skip can stop: an ``eps`` that is 0 in float16 (Adam's
    1e-8, Adagrad's 1e-10) on float16 parameters. Where a gradient is exactly 0 (an input
    feature that is always 0, a dead unit) the update is 0 / (0 + 0) and NaN goes into the
    weights from finite gradients (a digits MLP in pure float16 on Adam: NaN weights after
    its first step, unguarded; guarded, three rollbacks and an abort). Returns the eps when
    it warned."""
    for gi, group in enumerate(optimizer.param_groups):
        eps = group.get("eps")
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps <= 0:
            continue  # Adafactor's (None, 1e-3) and the like
        halves = sum(1 for p in group["params"] if p.dtype == torch.float16)
        if halves and float(torch.tensor(eps, dtype=torch.float16)) == 0.0:
            warnings.warn(
                f"Guard(optimizer=...): {type(optimizer).__name__}'s eps={eps:g} (param group "
                f"{gi}) is 0 in float16, the dtype of {halves} of its parameters: where a "
                "gradient is exactly 0 (an input that is always 0, a dead unit) its update is "
                "0/0 and writes NaN into the weights from finite gradients, which no skip can "
                "stop. Set eps=1e-4 or more, or keep float32 weights and train under "
                "torch.autocast with a GradScaler.", GradGuardWarning, stacklevel=caller_stacklevel())
            return float(eps)
    return None


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
