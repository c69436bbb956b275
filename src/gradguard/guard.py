"""Guard: telemetry -> clip policy -> decision -> executor -> events.

``guard.step(loss)`` replaces ``optimizer.step()``. Per step: the gradients are measured
(device tensors, :mod:`~gradguard.telemetry`), the policy scales them
(:mod:`~gradguard.clipping`), :func:`~gradguard.decision.decide` plans the step, and an
executor carries the plan out (:mod:`~gradguard.executors`: the guard steps the optimizer
itself, through a ``GradScaler``, or from a trainer's hook). With a fused optimizer the
skip costs no host synchronisation at all; otherwise it costs exactly one. Every
``every`` steps the window goes to the host once and the :class:`~gradguard.monitor.
Monitor` runs detectors, recovery acts, and the sinks are fed.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.amp.grad_scaler import GradScaler

from . import _construction as construction
from . import _lifecycle as lifecycle
from . import _owners as owners
from . import checkpoint, distributed
from ._logit_watch import LogitWatch
from ._outside import OutsideSteps, stepping
from ._running import RunningStats
from ._unstepped import Unstepped
from ._watch import ActivationWatch
from ._wrapped import accelerate_inner, accumulating, inner_optimizer
from .clipping import apply_policy, deferrable, policy_coefficient
from .config import DEFAULT_EVERY, GuardConfig, resolve_config
from .decision import ON_NONFINITE, OnNonfinite, decide
from .detectors import DetectorConfig
from .errors import GradGuardWarning, NonFiniteGradientError, TrainingDiverged
from .events import Event
from .executors import (
    NONFINITE,
    Direct,
    FreshState,
    Hook,
    Outcome,
    check_loss,
    evaluate_closure,
    executor_for,
    loss_finite,
    needs_closure,
    optimizer_kind,
)
from .monitor import Monitor
from .naming import named_optimizer_params, optimizer_layout
from .telemetry import StepStats, Telemetry, Window
from .updates import UpdateSampler

__all__ = [
    "DEFAULT_EVERY", "ON_NONFINITE", "GradGuardWarning", "Guard", "NonFiniteGradientError",
    "OnNonfinite", "TrainingDiverged",
]


class Guard:
    """Guard an optimizer: measure, clip, skip non-finite steps, recover, report.

    Args:
        model: the module whose parameters the optimizer updates (used for layer names).
        optimizer: a ``torch.optim.Optimizer``.
        config: a :class:`~gradguard.GuardConfig`; or pass its options as keywords
            (``clip=``, ``on_nonfinite=``, ``recovery=``, ``every=``, ``sinks=``,
            ``sample_updates=``, ``sink_rank=``, ``watch_activations=``,
            ``sample_activations=``, ``detector_config=``), which override the config's.
        executor: how the optimizer is stepped; leave it None (the guard steps it). The
            integrations pass a :class:`~gradguard.executors.Hook`.

    Every rank of a torch.distributed run must construct a Guard and call ``step`` and
    ``close``: flushes agree on one window across ranks (see docs/distributed.md).

    Example:
        >>> import torch, gradguard as gg
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with gg.Guard(model, opt, clip=gg.NormClip(1.0), every=10) as guard:
        ...     for _ in range(3):
        ...         loss = model(torch.randn(8, 4)).pow(2).mean()
        ...         loss.backward()
        ...         _ = guard.step(loss)
        ...         opt.zero_grad()
        >>> guard.step_count
        3
    """

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, *,
        config: GuardConfig | None = None, executor: Direct | Hook | None = None,
        **options: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Guard(model=...): expected a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"Guard(optimizer=...): expected a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        cfg = self.config = resolve_config("Guard", config, options)
        for sink in cfg.sinks:  # a sink that writes one guard's records says so (JsonlSink)
            if callable(attach := getattr(sink, "attach", None)):
                attach(self)
        #: accelerate's AcceleratedOptimizer when given one (:mod:`._wrapped`): the guard
        #: guards and steps the optimizer inside it
        self.wrapper: Any = None
        self._inner_steps = 0  # the wrapper's scaler skip flag is read from it
        if (inner := accelerate_inner(optimizer)) is not None:
            self.wrapper, optimizer = optimizer, inner

            def stepped(*_: Any) -> None:
                self._inner_steps += 1

            inner.register_step_post_hook(stepped)
        elif not hasattr(optimizer, "_optimizer_step_pre_hooks"):
            raise TypeError(
                f"Guard(optimizer=...): {type(optimizer).__name__} never ran "
                "torch.optim.Optimizer.__init__ (a wrapper?), so it has no step hooks to "
                "guard; pass the optimizer it steps"
                + (" (its .optimizer), and step it as the wrapper would"
                   if inner_optimizer(optimizer) is not None else ""))
        self.model, self.optimizer = model, optimizer
        self.dist = distributed.context()
        if self.dist is not None and cfg.sink_rank is not None and cfg.sink_rank >= self.dist.world_size:
            raise ValueError(f"Guard(sink_rank={cfg.sink_rank!r}): must be < world size {self.dist.world_size}")
        self._layout = optimizer_layout(optimizer)
        self.telemetry = Telemetry(named_optimizer_params(model, optimizer), every=cfg.every,
                                   pipeline_group=cfg.pipeline_group,
                                   model=distributed.unwrap(model), graph_order=self.dist is None)
        #: the model's parameters the optimizer does not hold, watched for gradients no
        #: optimizer steps (:mod:`._unstepped`: an unfrozen backbone never added)
        self._unstepped = Unstepped(model, {id(p) for p in self.telemetry.params})
        self.kind = optimizer_kind(optimizer)
        self._needs_closure = needs_closure(optimizer)
        if self._needs_closure:  # what such a step cannot take, said at construction
            cfg = self.config = construction.closure_config(cfg, optimizer)
        self._sign = construction.loss_sign(optimizer)  # -1: maximize=True, judge -objective
        said = construction.warn_half_weights(optimizer)
        #: the weights' dtypes the warnings above judged; None once the first step looked
        self._cast: frozenset[torch.dtype] | None = construction.weight_dtypes(optimizer)
        self._fresh = FreshState(optimizer)
        # a skipped step's forward already moved the batch norm running statistics
        self._running = RunningStats(distributed.unwrap(model))
        self.executor = executor if executor is not None else Direct(optimizer)
        #: the script's own optimizer.step() besides guard.step() (:mod:`._outside`); a
        #: trainer's step is what runs a hook-driven guard
        self._outside = None if isinstance(self.executor, Hook) else OutsideSteps(self)
        writes = self.dist is None or cfg.sink_rank is None or self.dist.rank == cfg.sink_rank
        self.monitor = Monitor(cfg.sinks, cfg.detector_config or DetectorConfig(), self.dist, writes)
        for event in said:
            self.monitor.add_event(event)
        self.step_count = 0
        #: Batches a data-loader user should skip after a rollback (set by Recovery).
        self.batches_to_skip = 0
        self._sampler = UpdateSampler(self.telemetry, optimizer) if cfg.sample_updates else None
        self._watch = ActivationWatch.for_config(distributed.unwrap(model), cfg, self.telemetry)
        # divergence precursors: attention/output logits and half-precision headroom
        self._logits = LogitWatch(distributed.unwrap(model)) if cfg.watch_activations else None
        if self._logits is not None:
            self._logits.armed = self.telemetry.flush_due
        self._closed = self._aborted = False
        self._no_loss_said = False  # the warning that guard.step() had no loss, once
        self._scaler_exec: Direct | Hook | None = None
        if callable(getattr(cfg.clip, "bind", None)):
            cfg.clip.bind(self)
        # host clock: born, stepped, and the step before that; the last loss with a graph
        # (a weak reference: gradguard._owners)
        self._born, self._ticked, self._ticked_before = 0, cast("int | None", None), cast(
            "int | None", None)
        self._loss_ref: weakref.ref[Tensor] | None = None
        self._linked = -1  # the newest guard's birth when its loss last looked for partners
        owners.claim(self)  # a rollback leaves another guard's parameters alone
        if cfg.recovery is not None:
            cfg.recovery.attach(self)

    def __repr__(self) -> str:
        # found by a stranger: print(guard) gave <gradguard.guard.Guard object at 0x...>
        return (f"Guard({type(self.optimizer).__name__}, clip={self.clip!r}, "
                f"recovery={self.recovery!r}, on_nonfinite={self.on_nonfinite!r}, "
                f"every={self.every}, step_count={self.step_count}, "
                f"skipped_steps={self.skipped_steps}{', closed' if self._closed else ''})")

    # ---- options and state, by name -----------------------------------------------------
    clip = property(lambda self: self.config.clip)
    recovery = property(lambda self: self.config.recovery)
    on_nonfinite = property(lambda self: self.config.on_nonfinite)
    every = property(lambda self: self.config.every)
    sinks = property(lambda self: self.monitor.sinks)
    events = property(lambda self: self.monitor.events, doc="Every event so far, oldest first.")
    last_window = property(lambda self: self.monitor.last_window)
    detector_config = property(lambda self: self.monitor.config)
    detector_state = property(lambda self: self.monitor.detector_state)
    fused = property(lambda self: self.kind == "fused")
    names = property(lambda self: self.telemetry.names, doc="Guarded parameters' names, in module order.")
    skipped_steps = property(lambda self: self.monitor.skipped_steps, doc="Steps the guard "
                             "skipped so far (counted at each flush; an update voided by a "
                             "restore after its backward is not counted).")

    def add_event(self, event: Event) -> None:
        """Record an event; it reaches the sinks at the next flush."""
        if not isinstance(event, Event):  # found by a stranger: a string broke every flush
            raise TypeError(f"Guard.add_event(event={event!r}): expected a gradguard.Event, "
                            f"got {type(event).__name__}")
        self.monitor.add_event(event)

    # ---- the hot path ----------------------------------------------------------------------
    # Runs eagerly inside a torch.compile'd training step (a graph break): tracing it would
    # guard on Python-side lengths that change every step and recompile until dynamo gives up.
    @torch.compiler.disable
    def step(
        self, loss: Tensor | float | None = None, *, scaler: GradScaler | None = None,
        closure: Callable[[], Any] | None = None,
    ) -> Tensor:
        """Clip, then step the optimizer unless the gradients are non-finite.

        Args:
            loss: this step's loss (recorded; never read by the host per step). With a
                ``scaler``, pass the unscaled loss (the one you called ``scaler.scale`` on).
            scaler: a ``torch.amp.GradScaler`` that scaled this step's backward, or None.
                The guard unscales the gradients (unless ``scaler.unscale_(optimizer)``
                already ran this iteration), measures and clips them, then calls
                ``scaler.step(optimizer)``; call ``scaler.update()`` afterwards as usual.
                Loss-scale overflows are routine (an ``info`` ``skip`` event). A disabled
                scaler (``enabled=False``) is the same as None.
            closure: for optimizers whose ``step`` needs one (``LBFGS``): the guard calls it
                once (with grad enabled) to get the loss and gradients it measures, clips and
                judges; the optimizer's later evaluations (line search) call it again. Passed
                first, as to ``optimizer.step(closure)``, a callable is taken as the closure.

        Returns:
            The pre-clip total gradient norm (a device tensor, like ``clip_grad_norm_``).
            A GradScaler loop is in docs/guard.md ("Mixed precision"). With accelerate's
            prepared optimizer, on a micro-batch of ``accelerator.accumulate`` nothing is
            measured or stepped (as the optimizer's own ``step()`` does nothing) and the
            norm is NaN; the wrapper's fp16 ``GradScaler`` is used (and updated) when
            ``scaler`` is None.
        """
        if self._closed:
            raise RuntimeError("guard.step() called after guard.close()")
        if closure is None and callable(loss) and not isinstance(loss, Tensor):
            loss, closure = None, loss  # guard.step(closure), as optimizer.step(closure)
        if closure is not None and not callable(closure):  # found by a stranger: a bare
            raise TypeError(f"guard.step(closure={closure!r}): expected a callable that "  # TypeError
                            "recomputes the loss (as optimizer.step(closure)) or None")
        update = None
        if self.wrapper is not None:
            if accumulating(self.wrapper):
                return torch.full((), float("nan"))
            if scaler is None and getattr(self.wrapper, "scaler", None) is not None:
                scaler = update = self.wrapper.scaler
        if closure is None and not self._needs_closure and self._outside is not None and \
                self._outside.again():  # the same batch again: no second update
            self._outside.twice(self)
            return torch.full((), float("nan"))
        before = self._inner_steps
        stepping(self.optimizer, True)
        try:
            norm = self._step(loss, scaler, closure)
        finally:
            stepping(self.optimizer, False)
            if self._outside is not None:
                self._outside.handled(self.telemetry.params)
        if update is not None:  # as the wrapper's own step does: update the scale, and
            update.update()  # say the step was skipped (its scheduler wrapper reads it)
            self.wrapper._is_overflow = self._inner_steps == before
        return norm

    def _step(self, loss: Tensor | float | None, scaler: GradScaler | None,
              closure: Callable[[], Any] | None) -> Tensor:
        if closure is not None or self._needs_closure:
            loss, closure = evaluate_closure(self.optimizer, loss, closure)
        loss = check_loss(loss)
        if loss is None and self.recovery is not None and not self._no_loss_said:
            self._no_loss_said = True
            construction.warn_no_loss()
        if self._sign < 0 and loss is not None:
            loss = -loss  # the objective a maximize=True optimizer ascends, as a loss
        executor = self._scaler_exec = executor_for(self.executor, scaler, self._scaler_exec)
        with torch.no_grad():
            if optimizer_layout(self.optimizer) != self._layout:
                self._relayout()  # add_param_group: guard the new parameters too
            if self._cast is not None:
                construction.recast(self)  # model.half() after the guard was built
            restores = getattr(self.recovery, "restores", 0)  # weights restored so far
            if self._flush_due():
                self.flush()  # a hook-driven step: the previous (flush) step has now run
            # rolled back (or forked by the LR probe) in this hook (the flush, a heard skip
            # flag), after this step's backward: its gradients are the replaced weights',
            # and its update is voided; the statistics restored with the weights (the clip
            # policy's, the spike verdict's) must not learn from them
            stale = lambda: isinstance(executor, Hook) and (  # noqa: E731
                getattr(self.recovery, "restores", 0) != restores)
            policy = None if stale() else self.clip
            if self._sampler is not None:
                self._sampler.armed = False  # a sampled step that never ran
            # a fused optimizer takes a total-norm clip inside its update (grad_scale)
            in_step = self.kind == "fused" and executor.takes_grad_scale and deferrable(self.clip)
            executor.prepare(in_step=in_step)
            stats = self.telemetry.measure(scale=executor.norm_scale)
            if self.dist is None:  # ranks' losses differ: a clip must be decided alike
                stats.loss = loss
            # a back-off or a rollback's lowered LR: the clip is holding trouble back
            stats.calm = self.recovery is None or self.recovery.lr_factor >= 1.0
            if (new := self.telemetry.grew(stats, self.step_count)) and self.dist is None:
                lifecycle.renorm(self, new, self.step_count)  # before this step's clip
            units = self.telemetry.sample_units(self.step_count)  # every SAMPLE steps
            self.monitor.lr_tracker.observe(self.step_count, self.optimizer.param_groups)
            plan = decide(
                on_nonfinite=self.on_nonfinite, kind=self.kind,
                scaler=executor.scaler is not None,
                fresh=self.kind == "fused" and self._fresh(self.telemetry.params),
            )
            if self._sampler is not None:
                self._sampler.armed = self.telemetry.flush_due
                self._sampler.at_step(self.step_count, self.monitor.lr_tracker.fraction())
            if self.recovery is not None:
                self.recovery.hear_flags(self)  # a trainer's: its earlier steps' skip flags
            spikes = None
            if self.recovery is not None and plan.on_bad != "step" and not stale():
                spikes = self.recovery.verdict(stats, loss)  # skipped at the step
                # the clip policy hears of a step skipped for a spike: the weights never see
                # it (found by a stranger: one x1e4 batch skipped right after ZClip's
                # warm-up closed its "gradual" chain, and the norm's healthy rise after it
                # was clipped for 100 steps, 3.0x the run without the batch)
                stats.skipped = spikes != 0
            policy = None if stale() else self.clip  # (a restore on hearing them: void)
            if policy is None and callable(void := getattr(self.clip, "void", None)):
                void(stats)  # what it was asked to clip is this voided step's (gradguard run)
            coef = policy_coefficient(policy, stats) if in_step else apply_policy(policy, stats)
            if self.recovery is not None:
                self.recovery.before_step(self)  # this step's LR factor; the first snapshot
            code = (~stats.finite).to(torch.uint8)  # NONFINITE (a policy may have set it)
            loss_ok = loss_finite(loss)  # an overflow with it may be a routine one
            if spikes is not None and self.recovery is not None:
                code = code | spikes
                if executor.scaler is not None:  # not with a loss far off
                    loss_ok = self.recovery.loss_ok(loss_ok)
            out = executor.run(plan, code, loss_ok, closure, clip=coef if in_step else None)
            if isinstance(executor, Hook) and stale():
                out = executor.void(out)
            self._running.settle(out.trouble)
            # taken, or skipped in its place: an LR scheduler stepped after guard.step() is in
            # the right order (after a skipped first step torch would warn it is not)
            self.optimizer._opt_called = True  # type: ignore[attr-defined]
            self._record(stats, loss, coef, out, units)
            if out.trouble is True and (out.code or 0) & NONFINITE and (
                    plan.warn or plan.on_bad == "raise"):
                self._report_bad(stats, raise_=plan.on_bad == "raise")
            if self.recovery is not None:
                try:
                    self.recovery.after_step(self, stats, out)
                except TrainingDiverged as e:
                    self._abort(e)
            if not isinstance(executor, Hook) and self._flush_due():
                self.flush()
            if self._watch is not None and self.config.sample_activations:
                self._watch.armed = self.telemetry.flush_due  # sample the flush step's forward
            if self._logits is not None:
                self._logits.armed = self.telemetry.flush_due
        return stats.total_norm

    def _flush_due(self) -> bool:
        """A flush every ``every`` steps; more often while a recovery is at work (it says
        how often: :meth:`gradguard.Recovery.flush_every`)."""
        every = self.every if self.recovery is None else self.recovery.flush_every(self.every)
        return self.telemetry.pending >= every

    def _relayout(self) -> None:
        lifecycle.relayout(self)

    def _report_bad(self, stats: StepStats, *, raise_: bool) -> None:
        lifecycle.report_nonfinite(self, stats, raise_=raise_)

    def _record(self, stats: StepStats, loss: Tensor | float | None, coef: Tensor | None,
                out: Outcome, units: Tensor | None = None) -> None:
        self.telemetry.record(stats, loss=loss, clip_coef=coef, skipped=out.skipped,
                              step=self.step_count, units=units)
        self.monitor.amp.record(self.step_count, out.amp_row)
        if self._watch is not None:
            self._watch.end_step(self.telemetry.pending - 1)
        self.step_count += 1
        owners.stepped(self, loss)

    # ---- flush (one host copy) ------------------------------------------------------------
    def flush(self) -> Window | None:
        """Copy the telemetry window to the host, run detectors, recover, feed the sinks.

        Under torch.distributed every rank must call it at the same step (``step`` and
        ``close`` do): the ranks agree on one window and gather their events first.
        """
        return self._flush(collective=True)

    def _flush(self, *, collective: bool) -> Window | None:
        return lifecycle.flush(self, collective=collective)

    def _abort(self, error: TrainingDiverged, *, delivered: bool = False) -> None:
        lifecycle.abort(self, error, delivered=delivered)

    def close(self, *, failed: bool = False) -> None:
        """Flush what is left and close every sink (idempotent; the sinks are closed even
        when the last flush raises).

        Args:
            failed: this rank is leaving on an exception: flush without entering any
                collective (``__exit__`` passes it when an exception is propagating).
        """
        lifecycle.close(self, failed=failed)

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            lifecycle.left_on(self, exc)
        self.close(failed=exc_type is not None)

    # ---- checkpointing ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a later decision depends on (:mod:`gradguard.checkpoint`), to resume
        exactly, together with the model's and the optimizer's own state dicts."""
        return checkpoint.state_dict(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; tensors go to the device of the live parameters."""
        checkpoint.load_state_dict(self, state_dict)
