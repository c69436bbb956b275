"""Guard: telemetry -> clip policy -> step/skip decision -> optimizer -> events.

``guard.step(loss)`` replaces ``optimizer.step()``. Per step it measures the gradients
(device tensors), lets the clip policy scale them, and either steps the optimizer or skips
the step when the total norm is not finite. With a fused optimizer the skip is handed to the
optimizer as ``found_inf`` (as ``torch.amp.GradScaler`` does), so a guarded step costs no
host synchronisation at all; otherwise the skip decision costs exactly one.

With ``guard.step(loss, scaler=scaler)`` (a ``torch.amp.GradScaler``) the guard unscales,
measures and clips the unscaled gradients, and lets the scaler step the optimizer; the
scaler's own found-inf check is the step/skip decision (see docs/guard.md, "Mixed
precision").
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.amp.grad_scaler import GradScaler, OptState

from . import detectors, distributed, precursors
from ._logit_watch import LogitWatch
from ._watch import ActivationWatch
from .clipping import ClipPolicy, _Policy
from .events import Event, Flush, Sink, call_sinks, json_float
from .telemetry import StepStats, Telemetry, Window, layer_of, named_optimizer_params

OnNonfinite = Literal["skip", "raise", "warn", "off"]
ON_NONFINITE: tuple[str, ...] = ("skip", "raise", "warn", "off")

#: Telemetry flush interval (steps): large enough that the one host copy per flush is
#: negligible, small enough that a person sees trouble within seconds.
DEFAULT_EVERY = 50

#: Under a GradScaler, a non-finite step is a routine loss-scale overflow (an ``info``
#: ``skip`` event, no recovery) when its loss is finite and the scale it ran with was
#: above this: only then can the scale explain the overflow. Backed-off down to here
#: (16 consecutive overflows from torch's default 2**16), it no longer amplifies anything,
#: so what still overflows is reported as a real non-finite step.
AMP_OVERFLOW_MIN_SCALE = 1.0


class GradGuardWarning(UserWarning):
    """Warnings gradguard emits about training health."""


class NonFiniteGradientError(FloatingPointError):
    """Raised by ``Guard(on_nonfinite="raise")`` on a non-finite gradient norm."""

    def __init__(self, message: str, step: int, layers: Sequence[str]) -> None:
        super().__init__(message)
        self.step = step
        self.layers = list(layers)


class TrainingDiverged(RuntimeError):
    """Training could not be brought back; carries the events that led here.

    Attributes:
        events: the guard's event history (most recent last).
        run_dir: the run directory (with ``events.jsonl`` and the report), if any.
        report_path: the HTML incident report written when training was given up (None
            without a run directory or without the ``report`` extra).
    """

    def __init__(
        self,
        message: str,
        events: Sequence[Event] = (),
        run_dir: str | None = None,
        report_path: str | None = None,
    ) -> None:
        super().__init__(message)
        self.events = list(events)
        self.run_dir = run_dir
        self.report_path = report_path


def _is_fused(optimizer: torch.optim.Optimizer) -> bool:
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and all(
        g.get("fused", False) for g in optimizer.param_groups
    )


def validate_options(
    owner: str,
    *,
    clip: Any,
    on_nonfinite: Any,
    every: Any,
    sinks: Sequence[Any],
    recovery: Any = None,
) -> None:
    """The option checks of :class:`Guard`, shared with the trainer callbacks so that a
    mistake fails at construction, naming ``owner``, the argument and what is allowed."""
    if clip is not None and not (
        callable(getattr(clip, "clip_", None)) and callable(getattr(clip, "state_dict", None))
    ):
        raise TypeError(
            f"{owner}(clip={clip!r}): expected a clip policy (NormClip, ValueClip, AutoClip, "
            "ZClip, AGC) or None"
        )
    if on_nonfinite not in ON_NONFINITE:
        raise ValueError(f"{owner}(on_nonfinite={on_nonfinite!r}): allowed values are {ON_NONFINITE}")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"{owner}(every={every!r}): must be an int >= 1")
    if recovery is not None and not all(
        callable(getattr(recovery, m, None))
        for m in ("attach", "after_step", "on_flush", "state_dict", "load_state_dict")
    ):
        raise TypeError(f"{owner}(recovery={recovery!r}): expected a gradguard.Recovery or None")
    for s in sinks:
        if not (callable(getattr(s, "write", None)) and callable(getattr(s, "close", None))):
            raise TypeError(f"{owner}(sinks=...): {s!r} has no write()/close(); see gradguard.Sink")


class Guard:
    """Guard an optimizer: measure, clip, skip non-finite steps, report.

    Args:
        model: the module whose parameters the optimizer updates (used for layer names).
        optimizer: a ``torch.optim.Optimizer``.
        clip: a clipping policy (``NormClip``, ``ValueClip``, ``AutoClip``, ``ZClip``,
            ``AGC``, or any object with ``clip_``/``state_dict``/``load_state_dict``), or None.
        on_nonfinite: what to do when the total gradient norm is NaN/Inf: ``"skip"`` the
            optimizer step (parameters and optimizer state stay bit-identical), ``"raise"``
            :class:`NonFiniteGradientError`, ``"warn"`` and skip, or ``"off"`` (step anyway).
        recovery: a :class:`gradguard.Recovery` ladder, or None.
        every: telemetry flush interval in steps (one device-to-host copy each).
        sinks: where flushed metrics and events go (e.g. ``[gg.JsonlSink("runs/exp1")]``).
        sample_updates: measure weight norms and update/weight ratios at flush steps
            (costs one temporary copy of the parameters at those steps only).
        watch_activations: forward hooks flag, on the device, the first module whose
            output is NaN/Inf; read only for a window with a non-finite step, so
            ``nonfinite_grad`` events name where the forward pass broke. At flush steps it
            also samples attention/output logits and half-precision headroom for
            ``divergence_risk`` (see docs/early-warning.md).
        sample_activations: at flush steps, measure dead ReLU-family units and saturated
            sigmoid/tanh outputs (``dead_units`` / ``saturating_activation`` events).
        detector_config: detector thresholds (:class:`gradguard.detectors.DetectorConfig`);
            ``DetectorConfig(precursors=None)`` turns the ``divergence_risk`` warning off.
        sink_rank: under torch.distributed, the rank whose guard writes to the sinks
            (default 0; events of the other ranks are gathered to it at each flush), or
            None for every rank. Every rank must construct a Guard and call ``step`` and
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
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        clip: ClipPolicy | None = None,
        on_nonfinite: OnNonfinite = "skip",
        recovery: Any | None = None,
        every: int = DEFAULT_EVERY,
        sinks: Sequence[Sink] = (),
        sample_updates: bool = True,
        sink_rank: int | None = 0,
        watch_activations: bool = False,
        sample_activations: bool = False,
        detector_config: detectors.DetectorConfig | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"Guard(model=...): expected a torch.nn.Module, got {type(model).__name__}"
            )
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"Guard(optimizer=...): expected a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        validate_options(
            "Guard", clip=clip, on_nonfinite=on_nonfinite, every=every, sinks=sinks,
            recovery=recovery,
        )
        if sink_rank is not None and (
            isinstance(sink_rank, bool) or not isinstance(sink_rank, int) or sink_rank < 0
        ):
            raise ValueError(f"Guard(sink_rank={sink_rank!r}): must be an int >= 0 or None")
        sinks = list(sinks)
        self.model = model
        self.optimizer = optimizer
        self.clip = clip
        self.on_nonfinite: OnNonfinite = on_nonfinite
        self.every = every
        self.sinks: list[Sink] = sinks
        self.sample_updates = sample_updates
        self.dist = distributed.context()
        if self.dist is not None and sink_rank is not None and sink_rank >= self.dist.world_size:
            raise ValueError(
                f"Guard(sink_rank={sink_rank!r}): must be < world size {self.dist.world_size}"
            )
        self.sink_rank = sink_rank
        self._writes_sinks = (
            self.dist is None or sink_rank is None or self.dist.rank == sink_rank
        )
        # layer names of the user's model, not DDP's "module." prefixed ones
        named = named_optimizer_params(distributed.unwrap(model), optimizer)
        self.names = [n for n, _ in named]
        self.telemetry = Telemetry(named, every=every)
        self.fused = _is_fused(optimizer)
        self.step_count = 0
        self.skipped_steps = 0
        self.events: list[Event] = []
        self._pending_events: list[Event] = []
        self._failed_sinks: set[int] = set()
        self._closed = False
        self.last_window: Window | None = None
        self.detector_config = detector_config or detectors.DetectorConfig()
        self.detector_state = detectors.DetectorState(history=self.detector_config.spike_history)
        self.lr_tracker = detectors.LrTracker(self.detector_config.lr_jump_ratio)
        #: Batches a data-loader user should skip after a rollback (set by Recovery).
        self.batches_to_skip = 0
        self.sample_activations = sample_activations
        self._watch: ActivationWatch | None = None
        if watch_activations or sample_activations:
            self._watch = ActivationWatch(
                distributed.unwrap(model), every=every, nonfinite=watch_activations,
                sample=sample_activations, device=self.telemetry.device,
            )
            self._watch.armed = sample_activations and self.telemetry.flush_due
        # divergence precursors: attention/output logits and half-precision headroom
        self._logits = LogitWatch(distributed.unwrap(model)) if watch_activations else None
        if self._logits is not None:
            self._logits.armed = self.telemetry.flush_due
        #: step -> [routine loss-scale overflow (0/1), scale] (device), read at flush.
        self._amp_rows: dict[int, Tensor] = {}
        self.recovery = recovery
        if recovery is not None:
            recovery.attach(self)

    # ---- the hot path --------------------------------------------------------------
    def _check_loss(self, loss: Any) -> Tensor | float | None:
        if loss is None:
            return None
        if isinstance(loss, Tensor):
            if loss.numel() != 1:
                raise ValueError(
                    f"guard.step(loss=...): loss must be a scalar, got a tensor of shape "
                    f"{tuple(loss.shape)} (reduce it, e.g. loss.mean())"
                )
            return loss
        if isinstance(loss, (int, float)) and not isinstance(loss, bool):
            return float(loss)
        raise TypeError(
            f"guard.step(loss=...): expected a scalar Tensor, float or None, got {type(loss).__name__}"
        )

    def _nonfinite_message(self, stats: StepStats) -> tuple[str, list[str]]:
        # off the hot path: only reached once a non-finite step is already known
        norms = stats.param_norms.detach().float().cpu()
        bad = [self.names[i] for i in range(len(self.names)) if not math.isfinite(norms[i].item())]
        layers = list(dict.fromkeys(layer_of(n) for n in bad))
        total = stats.total_norm.float().cpu().item()
        msg = (
            f"step {self.step_count}: non-finite gradient norm ({total}); "
            f"layers with non-finite gradients: {', '.join(layers) or 'none found'}"
        )
        return msg, layers

    def _optimizer_step(self, found_inf: Tensor | None = None) -> None:
        if found_inf is None:
            self.optimizer.step()
            return
        opt: Any = self.optimizer
        opt.grad_scale = None
        opt.found_inf = found_inf
        try:
            self.optimizer.step()
        finally:
            del opt.grad_scale
            del opt.found_inf

    def _skip_optimizer_step(self) -> None:
        # Nothing to undo here: step() simply does not call the optimizer. A guard driven
        # from inside an optimizer step (gradguard.integrations) overrides this to keep the
        # optimizer that is about to run from updating anything.
        return None

    def step(
        self, loss: Tensor | float | None = None, *, scaler: GradScaler | None = None
    ) -> Tensor:
        """Clip, then step the optimizer unless the gradients are non-finite.

        Args:
            loss: this step's loss (recorded; never read by the host per step). With a
                ``scaler``, pass the unscaled loss (the one you called ``scaler.scale`` on).
            scaler: a ``torch.amp.GradScaler`` that scaled this step's backward, or None.
                The guard unscales the gradients (unless ``scaler.unscale_(optimizer)``
                already ran this iteration), measures and clips them, then calls
                ``scaler.step(optimizer)`` instead of ``optimizer.step()``; call
                ``scaler.update()`` afterwards as usual. Loss-scale overflows are routine
                (an ``info`` ``skip`` event); see :data:`AMP_OVERFLOW_MIN_SCALE`. A
                disabled scaler (``enabled=False``) is the same as None.

        Returns:
            The pre-clip total gradient norm (a device tensor, like ``clip_grad_norm_``).

        Example:
            >>> import torch, gradguard as gg
            >>> model = torch.nn.Linear(4, 1)
            >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
            >>> scaler = torch.amp.GradScaler("cpu")
            >>> guard = gg.Guard(model, opt, clip=gg.NormClip(1.0))
            >>> with torch.autocast("cpu", dtype=torch.bfloat16):
            ...     loss = model(torch.randn(8, 4)).float().pow(2).mean()
            >>> scaler.scale(loss).backward()
            >>> _ = guard.step(loss, scaler=scaler)
            >>> scaler.update()
            >>> guard.close()
        """
        with torch.no_grad():  # a context, not a decorator, so doctest sees the example
            return self._step(loss, scaler)

    def _step(self, loss: Tensor | float | None, scaler: GradScaler | None) -> Tensor:
        if self._closed:
            raise RuntimeError("guard.step() called after guard.close()")
        loss_v = self._check_loss(loss)
        amp = self._check_scaler(scaler)
        if amp is not None:
            self._unscale(amp)
        stats = self.telemetry.measure()
        if self.clip is None:
            coef: Tensor | None = None
        elif isinstance(self.clip, _Policy):
            coef = self.clip._apply(stats, self.names)
        else:
            self.clip.clip_(list(zip(self.names, self.telemetry.params)))
            coef = None
        self.lr_tracker.observe(self.step_count, self.optimizer.param_groups)
        sample = self.sample_updates and self.telemetry.flush_due
        if sample:
            self.telemetry.begin_update_sample()
        skipped: Tensor | bool
        recovery_skip: Tensor | bool | None = None
        error: NonFiniteGradientError | None = None
        if amp is not None:
            skipped, recovery_skip = self._amp_step(amp, stats, loss_v)
            if recovery_skip is True:
                error = self._on_nonfinite_host(stats)
        elif self.on_nonfinite == "off":
            self._optimizer_step()
            skipped = False
        elif self.on_nonfinite == "skip" and self.fused:
            # the optimizer skips on device: no host sync at all
            found_inf = (~stats.finite).to(torch.float32)
            self._optimizer_step(found_inf)
            skipped = ~stats.finite
        else:
            finite = bool(stats.finite)  # the one host sync of this step
            if finite:
                self._optimizer_step()
                skipped = False
            else:
                skipped = True
                error = self._on_nonfinite_host(stats)
                if error is None:
                    self._skip_optimizer_step()
        if sample:
            self.telemetry.end_update_sample()
        self.telemetry.record(
            stats, loss=loss_v, clip_coef=coef, skipped=skipped, step=self.step_count
        )
        if self._watch is not None:
            self._watch.end_step(self.telemetry.pending - 1)
        self.step_count += 1
        if error is not None:
            self.flush()
            raise error
        if self.recovery is not None:
            try:
                self.recovery.after_step(
                    self, stats, skipped if recovery_skip is None else recovery_skip
                )
            except TrainingDiverged as e:
                self.flush()  # the abort event reaches the sinks
                e.report_path = _report_on_abort(e.run_dir)
                raise
        if self.telemetry.pending >= self.every:
            self.flush()
        if self._watch is not None and self.sample_activations:
            self._watch.armed = self.telemetry.flush_due  # sample the flush step's forward
        if self._logits is not None:
            self._logits.armed = self.telemetry.flush_due
        return stats.total_norm

    # ---- mixed precision (torch.amp.GradScaler) ---------------------------------------
    def _check_scaler(self, scaler: Any) -> GradScaler | None:
        if scaler is None:
            return None
        if not isinstance(scaler, GradScaler):
            raise TypeError(
                f"guard.step(scaler=...): expected a torch.amp.GradScaler or None, got "
                f"{type(scaler).__name__}"
            )
        return scaler if scaler.is_enabled() else None

    def _scaler_state(self, scaler: GradScaler) -> dict[str, Any]:
        # GradScaler's own per-optimizer bookkeeping (stage, found_inf_per_device)
        return scaler._per_optimizer_states[id(self.optimizer)]

    def _unscale(self, scaler: GradScaler) -> None:
        stage = self._scaler_state(scaler)["stage"]
        if stage is OptState.STEPPED:
            raise RuntimeError(
                "guard.step(scaler=...): scaler.step(optimizer) already ran since the last "
                "scaler.update(); let guard.step step the optimizer and call scaler.update() "
                "once per iteration"
            )
        if stage is OptState.READY:  # not when the user already called scaler.unscale_
            scaler.unscale_(self.optimizer)

    def _amp_step(
        self, scaler: GradScaler, stats: StepStats, loss: Tensor | float | None
    ) -> tuple[Tensor, Tensor | bool]:
        """``scaler.step`` on the unscaled, clipped gradients. Returns the skip flag to
        record (device) and the skip flag the recovery ladder sees: loss-scale overflows
        excluded, a host bool under ``on_nonfinite="raise"|"warn"`` (gradguard's one sync
        then), a device tensor otherwise (no sync besides the scaler's own)."""
        dev = stats.total_norm.device
        found = list(self._scaler_state(scaler)["found_inf_per_device"].values())
        if found and self.on_nonfinite != "off":
            # every element finite but the float32 norm overflows: skip it like a NaN.
            # Kept 0/1: fused optimizers subtract found_inf from their step counts.
            found[0].add_((~stats.finite).to(found[0])).clamp_(max=1.0)
        if found:
            skipped = torch.stack([f.to(dev, non_blocking=True) for f in found]).sum() > 0
        else:  # no gradients: scaler.step raises its own error below
            skipped = torch.zeros((), dtype=torch.bool, device=dev)
        scale_t = scaler._get_scale_async()
        scale = (
            torch.ones((), device=dev)
            if scale_t is None
            else scale_t.detach().to(dev, torch.float32, non_blocking=True).reshape(())
        )
        if isinstance(loss, Tensor):
            loss_ok: Tensor | bool = torch.isfinite(loss.detach()).to(dev).reshape(())
        else:
            loss_ok = loss is None or math.isfinite(loss)
        routine = skipped & (scale > AMP_OVERFLOW_MIN_SCALE) & loss_ok
        self._amp_rows[self.step_count] = torch.stack([routine.float(), scale])
        genuine = skipped & ~routine
        host: Tensor | bool = genuine
        if self.on_nonfinite in ("raise", "warn"):
            host = bool(genuine)  # gradguard's one host sync of this step
        scaler.step(self.optimizer)  # skips on found_inf; a fused optimizer gets it on device
        return skipped, host

    def _amp_overflows(self, window: Window) -> dict[int, float]:
        """Steps of ``window`` that were routine loss-scale overflows -> their scale (one
        host copy per flush, only when a scaler was used)."""
        if not self._amp_rows:
            return {}
        rows = [(s, self._amp_rows.pop(s)) for s in window.steps if s in self._amp_rows]
        for s in [s for s in self._amp_rows if s <= window.steps[-1]]:
            del self._amp_rows[s]  # steps the window no longer holds
        if not rows:
            return {}
        vals = torch.stack([r for _, r in rows]).tolist()
        return {s: v[1] for (s, _), v in zip(rows, vals) if v[0]}

    def _on_nonfinite_host(self, stats: StepStats) -> NonFiniteGradientError | None:
        if self.on_nonfinite == "raise":
            msg, layers = self._nonfinite_message(stats)
            return NonFiniteGradientError(msg + " (on_nonfinite='raise')", self.step_count, layers)
        if self.on_nonfinite == "warn":
            msg, _ = self._nonfinite_message(stats)
            warnings.warn(msg + "; the optimizer step was skipped", GradGuardWarning, stacklevel=4)
        return None

    # ---- flush (one host copy) ---------------------------------------------------
    def add_event(self, event: Event) -> None:
        """Record an event; it reaches the sinks at the next flush."""
        self.events.append(event)
        self._pending_events.append(event)

    def flush(self) -> Window | None:
        """Copy the telemetry window to the host, run detectors, feed the sinks.

        Under torch.distributed every rank must call it at the same step (``step`` and
        ``close`` do): the ranks agree on one window and gather their events first.
        """
        origins: list[list[int]] | None = None
        if self.dist is not None:
            origins = self._agree_across_ranks()
        window = self.telemetry.flush()
        if window is None:
            if self._pending_events:
                self._deliver(Flush(steps=[], layers={}, events=self._pop_events()))
            return None
        self.skipped_steps += int(window.skipped.sum())
        overflows = self._amp_overflows(window)
        for ev in detectors.detect(
            window, **self._detector_inputs(window), amp_overflows=overflows
        ):
            if origins is not None:
                self._name_ranks(ev, window, origins)
            self.add_event(ev)
        abort: TrainingDiverged | None = None
        if self.recovery is not None:
            try:
                rwin = window
                if overflows:  # routine loss-scale overflows are no trouble to recover from
                    mask = torch.tensor([s in overflows for s in window.steps])
                    rwin = dataclasses.replace(window, skipped=window.skipped & ~mask)
                self.recovery.on_flush(self, rwin, list(self._pending_events))
            except TrainingDiverged as e:
                abort = e  # deliver this window (with the abort event) first
        self.last_window = window
        self._deliver(
            Flush(
                steps=step_records(window),
                layers=layer_record(window),
                events=self._pop_events(),
                window=window,
            )
        )
        if abort is not None:
            abort.report_path = _report_on_abort(abort.run_dir)
            raise abort
        return window

    def _detector_inputs(self, window: Window) -> dict[str, Any]:
        """Detector state plus what the activation hooks saw (host copies only when needed)."""
        out: dict[str, Any] = {
            "state": self.detector_state,
            "config": self.detector_config,
            "lr_events": self.lr_tracker.pop_events(),
            "precursor_inputs": precursors.PrecursorInputs(
                magnitudes=None if self._logits is None else self._logits.take(),
                optim=precursors.optimizer_info(self.optimizer), every=self.every),
        }
        if self._watch is not None:
            total = window.total_norm.tolist()
            bad = [i for i, t in enumerate(total) if not math.isfinite(t)]
            out["forward_origins"] = self._watch.origins(window.steps, bad)
            self._watch.reset_window()
            if self.sample_activations:
                out["activations"] = self._watch.take_samples()
        return out

    def _agree_across_ranks(self) -> list[list[int]]:
        assert self.dist is not None
        local = self._pending_events
        origins, merged = distributed.agree_window_(
            self.telemetry.pending_rows(), local, self.dist
        )
        # every rank keeps the same history: its own pending events become the merged ones
        del self.events[len(self.events) - len(local) :]
        self.events.extend(merged)
        self._pending_events = list(merged)
        return origins

    def _name_ranks(self, ev: Event, window: Window, origins: list[list[int]]) -> None:
        """Name the rank(s) a non-finite step came from (from the gathered local data)."""
        if ev.kind not in ("nonfinite_grad", "skip") or ev.step not in window.steps:
            return
        ranks = origins[window.steps.index(ev.step)]
        ev.data["ranks"] = ranks
        assert self.dist is not None
        if len(ranks) < self.dist.world_size:
            ev.rank = ranks[0]
            ev.message += f" (from rank {', '.join(map(str, ranks))})"

    def _pop_events(self) -> list[Event]:
        ev, self._pending_events = self._pending_events, []
        return ev

    def _deliver(self, flush: Flush) -> None:
        if not self._writes_sinks:
            return
        call_sinks(self.sinks, flush, self._failed_sinks)

    def close(self) -> None:
        """Flush what is left and close the sinks (idempotent)."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            if self._watch is not None:
                self._watch.remove()
            if self._logits is not None:
                self._logits.remove()
        for i, s in enumerate(self.sinks):
            try:
                s.close()
            except Exception as e:  # closing one sink must not prevent closing the others
                warnings.warn(
                    f"gradguard: closing sink {type(s).__name__} failed: {e}",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self._failed_sinks.add(i)
        self._closed = True

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- checkpointing -----------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-identically (with the model and optimizer's own)."""
        return {
            "version": 1,
            "step_count": self.step_count,
            "skipped_steps": self.skipped_steps,
            "clip": None if self.clip is None else self.clip.state_dict(),
            "telemetry": self.telemetry.state_dict(),
            "detectors": self.detector_state.state_dict(),
            "recovery": None if self.recovery is None else self.recovery.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("version") != 1:
            raise ValueError(
                f"Guard.load_state_dict: unsupported version {state_dict.get('version')!r}"
            )
        self.step_count = int(state_dict["step_count"])
        self.skipped_steps = int(state_dict["skipped_steps"])
        if self.clip is not None and state_dict.get("clip") is not None:
            self.clip.load_state_dict(state_dict["clip"])
        self.telemetry.load_state_dict(state_dict["telemetry"])
        if state_dict.get("detectors") is not None:
            self.detector_state.load_state_dict(state_dict["detectors"])
        if self.recovery is not None and state_dict.get("recovery") is not None:
            self.recovery.load_state_dict(state_dict["recovery"])


def step_records(window: Window) -> list[dict[str, Any]]:
    """One JSON-ready record per step of the window."""
    out = []
    loss, total, coef, skipped = (
        window.loss.tolist(),
        window.total_norm.tolist(),
        window.clip_coef.tolist(),
        window.skipped.tolist(),
    )
    for i, step in enumerate(window.steps):
        out.append(
            {
                "step": step,
                "loss": json_float(loss[i]),
                "grad_norm": json_float(total[i]),
                "clip_coef": json_float(coef[i]),
                "skipped": bool(skipped[i]),
                "finite": math.isfinite(total[i]),
            }
        )
    return out


def layer_record(window: Window) -> dict[str, Any]:
    """Per-layer gradient norms of a window (mean and max over finite steps), plus weight
    norms and update/weight ratios sampled at the window's last step."""
    ln = window.layer_norms()  # [n, L]
    finite_rows = torch.isfinite(ln).all(dim=1)
    ok = ln[finite_rows] if bool(finite_rows.any()) else ln
    mean = ok.mean(dim=0).tolist()
    mx = ok.max(dim=0).values.tolist()
    rec: dict[str, Any] = {
        "step": window.steps[-1],
        "first_step": window.steps[0],
        "layers": list(window.layers),
        "grad_norm": [json_float(x) for x in mean],
        "grad_norm_max": [json_float(x) for x in mx],
    }
    w, u = window.layer_weight_norms(), window.layer_update_norms()
    if w is not None and u is not None:
        rec["weight_norm"] = [json_float(x) for x in w.tolist()]
        rec["update_ratio"] = [json_float(x) for x in (u / w.clamp_min(1e-12)).tolist()]
    return rec


def _report_on_abort(run_dir: str | None) -> str | None:
    """Render the run's HTML report when the ladder gives up, so the error can point at it.

    The abort must surface whatever happens here: a missing extra or a failing render is
    reported as a warning, never raised."""
    if run_dir is None:
        return None
    try:
        from .report import report as render
    except ImportError as e:
        warnings.warn(f"gradguard: no report written ({e})", GradGuardWarning, stacklevel=3)
        return None
    try:
        return str(render(run_dir))
    except Exception as e:  # the abort is the error to raise, not this one
        warnings.warn(
            f"gradguard: writing the report of {run_dir} failed: {type(e).__name__}: {e}",
            GradGuardWarning,
            stacklevel=3,
        )
        return None
