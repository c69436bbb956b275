"""gradguard for Lightning: ``GradGuardCallback``.

Where it acts (lightning 2.x, ``Precision._after_closure``): training_step and backward
run inside the optimizer's closure, then ``on_before_optimizer_step`` (this callback:
measure, clip, skip), then Lightning's own ``gradient_clip_val`` clipping, then the
optimizer updates. With ``precision="16-mixed"`` the ``GradScaler`` unscales the gradients
*before* the hook, so gradguard sees true gradients (and the scaler still skips its own
overflow steps). A skip takes the gradients off the parameters for that one update, so
the optimizer changes no parameter and no state; ``global_step`` and LR schedulers still
advance, as they do after a ``GradScaler`` skip.

DDP: the decision is taken after backward, on gradients DDP has already all-reduced, so
the total norm (and its finiteness) is the same on every rank and every rank skips the
same step. No rank leaves the collective schedule (unlike returning ``None`` from
``training_step``, Lightning issue #5243), and no extra collective is needed.

Checkpoints: the callback's ``state_dict`` (saved by Lightning in every checkpoint) holds
each guard's :meth:`gradguard.Guard.state_dict` (step count, clip policy statistics,
detector state); ``Trainer.fit(..., ckpt_path=...)`` restores it, so a resumed run goes on
with the same ZClip/AutoClip statistics. Telemetry is flushed to the run directory when a
checkpoint is taken, so the run directory is complete up to every checkpoint and a resumed
run appends to it without repeating a step.
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path
from typing import Any

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "gradguard.integrations.lightning needs lightning: pip install 'gradguard[lightning]'"
    ) from e

import torch
from torch.nn.parameter import is_lazy

from .._lifecycle import left_on
from ..config import GuardConfig
from ..errors import GradGuardWarning
from ..events import Flush, Sink
from ..executors import needs_closure
from ..guard import Guard
from ..recovery import Recovery
from ..sinks import JsonlSink
from ._hooked import (
    CallbackOptions,
    LossTracker,
    check_version,
    hooked_guard,
    no_gradients,
    recovery_for,
)
from ._rundir import trainer_run_dir
from ._summary import write_report

SUPPORTED = ("2.1", "3")
check_version("lightning", pl.__version__, *SUPPORTED)


class LightningLoggerSink:
    """Sends each flush to the trainer's loggers (``logger.log_metrics``), at the global
    step each record belongs to, under ``gradguard/...``; and, while a hook that allows
    it is running, a few running totals through ``pl_module.log`` (progress bar and
    ``trainer.callback_metrics``)."""

    def __init__(self, trainer: pl.Trainer, prefix: str = "gradguard/", step_offset: int = 0) -> None:
        self.trainer = trainer
        self.prefix = prefix
        self.step_offset = step_offset
        self.can_self_log = False
        self.skipped_total = 0

    def write(self, flush: Flush) -> None:
        p = self.prefix
        for rec in flush.steps:
            metrics = {
                f"{p}grad_norm": rec["grad_norm"],
                f"{p}clip_coef": rec["clip_coef"],
                f"{p}skipped": float(rec["skipped"]),
            }
            clean = {k: float(v) for k, v in metrics.items() if v is not None}
            for logger in self.trainer.loggers:
                logger.log_metrics(clean, step=rec["step"] + self.step_offset)
        layers = flush.layers
        if layers and layers.get("layers"):
            per_layer = {
                f"{p}layer_grad_norm/{name}": float(v)
                for name, v in zip(layers["layers"], layers["grad_norm"])
                if v is not None
            }
            for logger in self.trainer.loggers:
                logger.log_metrics(per_layer, step=layers["step"] + self.step_offset)
        self.skipped_total += sum(1 for r in flush.steps if r["skipped"])
        module = self.trainer.lightning_module
        if self.can_self_log and flush.steps:
            last = flush.steps[-1]
            module.log(f"{p}skipped_steps", float(self.skipped_total), on_step=True, on_epoch=False)
            if last["grad_norm"] is not None:
                module.log(f"{p}grad_norm", float(last["grad_norm"]), on_step=True, on_epoch=False)

    def close(self) -> None:
        for logger in self.trainer.loggers:
            logger.save()


def weight_averages(trainer: pl.Trainer) -> list[Any]:
    """The ``AveragedModel`` of each of the trainer's ``WeightAveraging`` callbacks
    (``EMAWeightAveraging``; lightning 2.5+), built in their ``setup``: an average of the
    weights that took in the updates a rollback undoes, and that becomes the module's
    weights when training ends."""
    kind = getattr(pl.callbacks, "WeightAveraging", None)
    found = (getattr(cb, "_average_model", None) for cb in getattr(trainer, "callbacks", ())
             if kind is not None and isinstance(cb, kind))
    return [m for m in found if m is not None]


class GradGuardCallback(CallbackOptions, Callback):
    """Guard every optimizer of a Lightning ``Trainer``: measure, clip, skip, report.

    Args:
        config: a :class:`gradguard.GuardConfig`, or its options as keywords (``clip=``,
            ``on_nonfinite=``, ``recovery=`` (default without a ``config``: a fresh
            ``gg.Recovery()``; None turns it off), ``every=`` in optimizer steps, ``sinks=``
            added to the trainer's loggers and a JSONL run directory, ...). A ``clip`` is
            refused together with ``Trainer(gradient_clip_val=...)``: both would clip, one
            after the other.
        run_dir: where ``events.jsonl``, ``metrics.jsonl`` and ``report.html`` go; default
            ``<trainer.default_root_dir>/gradguard`` (``.../gradguard/optimizer<k>`` for
            the k-th further optimizer).
        report: write ``report.html`` when training ends (also after an exception).

    Example:
        >>> import gradguard as gg
        >>> from gradguard.integrations.lightning import GradGuardCallback
        >>> cb = GradGuardCallback(clip=gg.ZClip(), every=25)
        >>> cb.on_nonfinite
        'skip'
    """

    def __init__(
        self,
        *,
        config: GuardConfig | None = None,
        run_dir: str | os.PathLike[str] | None = None,
        report: bool = True,
        **options: Any,
    ) -> None:
        self._init_options("GradGuardCallback", config, options, run_dir, report)
        #: a pristine copy, before any guard binds the first: each further optimizer's own
        self._template = copy.deepcopy(self.config.recovery)
        self.guards: dict[int, Guard] = {}
        self.run_dirs: list[Path] = []
        self.reports: list[str] = []
        self._loss = LossTracker()
        self._logger_sinks: list[LightningLoggerSink] = []
        self._loaded: list[dict[str, Any]] | None = None  # from a checkpoint, for on_train_start
        self._base: Path | None = None  # the run directory of this fit's first optimizer
        #: id(optimizer) -> its index, for optimizers over lazy modules not yet run: their
        #: guards are built at their first step
        self._deferred: dict[int, int] = {}
        self._final: list[dict[str, Any]] | None = None  # the guards' state when training ended
        self._done = 0  # fits this callback guarded to their end
        self._final_clips: list[Any] = []  # the clip policy of each of those guards
        self._final_optimizers: list[str] = []  # the class of each of those guards' optimizer
        #: the run directory's part for a later fit that starts afresh (``fit<k>``): a run
        #: of its own, not records of the same steps again (read as a resume's)
        self._sub: str | None = None
        #: optimizers left unguarded (their step needs a closure: LBFGS), said once each
        self._unguarded: set[int] = set()

    # ---- checks ------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        clip_val = trainer.gradient_clip_val
        if self.clip is not None and clip_val is not None and float(clip_val) > 0:
            raise ValueError(
                f"GradGuardCallback(clip={self.clip!r}) and Trainer(gradient_clip_val={clip_val}) "
                "both clip: Lightning clips after gradguard's on_before_optimizer_step, so the "
                "gradients would be clipped twice. Keep one: Trainer(gradient_clip_val=None) "
                "with gradguard clipping, or GradGuardCallback(clip=None) to only measure and skip."
            )

    def _check_amp(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            raise ValueError(
                f"GradGuardCallback: {type(optimizer).__name__} unscales gradients inside its "
                f"own step (fused), so under precision={trainer.precision!r} Lightning calls "
                "on_before_optimizer_step with *scaled* gradients and gradguard cannot measure "
                "or clip them. Use a non-fused optimizer, or precision='bf16-mixed'."
            )

    # ---- guards --------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._deferred = {}
        # a later fit from step 0 (a second stage, a cell run again) is a run of its own; a
        # fit resumed from a checkpoint goes on in the same directory
        self._sub = f"fit{self._done}" if self._done and trainer.global_step == 0 else None
        if (self._done and trainer.global_step > 0 and self._loaded is None
                and self._final is not None and len(self._final) == len(trainer.optimizers)):
            # the same Trainer fits on (max_steps raised): its guards go on from the state
            # they ended the last fit with, their steps numbered on, in the same directory
            self._loaded = list(self._final)
        self._players(trainer, pl_module)
        for k, opt in enumerate(trainer.optimizers):
            self._check_amp(trainer, opt)
            if needs_closure(opt):
                if id(opt) not in self._unguarded:
                    self._unguarded.add(id(opt))
                    warnings.warn(
                        f"GradGuardCallback: {type(opt).__name__} (optimizer {k}) evaluates "
                        "its closure several times per step (its line search), each time with "
                        "a backward whose gradients Lightning hands to the callback: it is not "
                        "guarded (no measurement, clip or skip), and trains as without the "
                        "callback", GradGuardWarning, stacklevel=2)
                continue
            if any(is_lazy(p) for g in opt.param_groups for p in g["params"]):
                # lazy modules (nn.LazyLinear) take their shapes from the first forward,
                # which Lightning runs after this hook: built at the first step instead
                self._deferred[id(opt)] = k
                continue
            self._build(trainer, pl_module, k, opt)
        if not self._deferred:
            self._loaded = None

    def _players(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Manual optimisation of several optimizers (a GAN's players, an actor and a
        critic): each one's loss may rise in a healthy run, so the default recovery does not
        act on the loss level (found by a stranger: a healthy 2-D GAN's discriminator was
        rolled back three times on a GAN's normal movement and its generator's samples
        ended off the ring, 0-4 of 8 modes against 8 unguarded). Said once."""
        rec = self.config.recovery
        if (not self.default_recovery or rec is None or not rec.loss_rise
                or pl_module.automatic_optimization or len(trainer.optimizers) < 2):
            return
        self.config = self.config.replace(recovery=Recovery(loss_rise=False))
        self._template = Recovery(loss_rise=False)
        warnings.warn(
            f"GradGuardCallback: {type(pl_module).__name__} optimizes {len(trainer.optimizers)} "
            "optimizers by hand (a GAN's players, an actor and a critic?): each one's loss may "
            "rise in a healthy run, so the recovery does not act on the loss level "
            "(Recovery(loss_rise=False)); NaN, spikes and dead layers it still handles. Pass "
            "recovery=gg.Recovery() to judge the loss too", GradGuardWarning, stacklevel=2)

    def _recovery_for(self, k: int) -> Recovery | None:
        """The k-th optimizer's own recovery ladder (the first's for k = 0), as under
        ``gradguard run``."""
        if k == 0 or self.config.recovery is None:
            return self.config.recovery
        return recovery_for(self._template, k)

    def _build(self, trainer: pl.Trainer, pl_module: pl.LightningModule, k: int,
               opt: torch.optim.Optimizer) -> Guard:
        root = Path(self.run_dir or Path(trainer.default_root_dir) / "gradguard")
        if k == 0 or self._base is None:
            # a fresh fit into a directory holding an earlier run's records gets one of its
            # own; a resumed one goes on where its own went (see _rundir.trainer_run_dir)
            self._base = root / self._sub if self._sub is not None else root
            if trainer.is_global_zero:
                fresh = self._loaded is None and not trainer.global_step
                self._base, said = trainer_run_dir(root, self._sub, fresh)
                if said is not None:
                    warnings.warn(f"GradGuardCallback: {said} (GradGuardCallback(run_dir=...) "
                                  "names a directory of its own)", GradGuardWarning, stacklevel=2)
        base = self._base
        many = len(trainer.optimizers) > 1
        run_dir = base if k == 0 else base / f"optimizer{k}"
        sinks: list[Sink] = list(self.sinks)
        if trainer.is_global_zero:
            sinks.append(JsonlSink(run_dir))
            self.run_dirs.append(run_dir)
        ls: LightningLoggerSink | None = None
        if trainer.loggers:
            ls = LightningLoggerSink(
                trainer,
                prefix=f"gradguard/optimizer{k}/" if many else "gradguard/",
                step_offset=trainer.global_step,
            )
            self._logger_sinks.append(ls)
            sinks.append(ls)
        cfg = self.config.replace(
            sinks=sinks,
            clip=self.clip if k == 0 else copy.deepcopy(self.clip),
            recovery=self._recovery_for(k),
        )
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        guard = self.guards[id(opt)] = hooked_guard(pl_module, opt, cfg, scaler=scaler)
        if self._loaded is not None and k < len(self._loaded):
            guard.load_state_dict(self._loaded[k])
        if guard.recovery is not None:  # rolled back with the weights (Recovery(also=...))
            guard.recovery.also_restore(*weight_averages(trainer))
        if ls is not None:  # the guard's step numbers go on from the checkpoint's
            ls.step_offset = trainer.global_step - guard.step_count
        return guard

    # ---- checkpoints ---------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The guards' state, one per optimizer, saved in every Lightning checkpoint.

        Pending telemetry is flushed first (on every rank: under DDP a flush is a collective,
        and Lightning builds the checkpoint on every rank), so the checkpoint carries no
        step that the run directory has not seen.
        """
        if self.guards:
            states = []
            for g in self.guards.values():
                g.flush()
                states.append(g.state_dict())
        else:
            states = list(self._final or [])
        return {"version": 1, "guards": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep a checkpoint's guard state; it is loaded when the guards are built."""
        if state_dict.get("version") != 1 or not isinstance(state_dict.get("guards"), list):
            raise ValueError(
                f"GradGuardCallback.load_state_dict: unsupported state (version "
                f"{state_dict.get('version')!r}); expected version 1 with a 'guards' list"
            )
        self._loaded = list(state_dict["guards"])

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        self._loss.add(loss)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        guard = self.guards.get(id(optimizer))
        if guard is None and (k := self._deferred.pop(id(optimizer), None)) is not None:
            guard = self._build(trainer, pl_module, k, optimizer)  # its lazy modules ran
            if not self._deferred:
                self._loaded = None
        if guard is None:
            return  # an optimizer created after fit started: not ours to guess about
        if no_gradients(optimizer):
            # no gradient at all (a training_step that returned None: Lightning's own skip):
            # torch's step does nothing, nor is it a guard step (it was recorded with a
            # gradient norm of 0 and the step before's loss, and the report then found a
            # "gradient spike" when the batches were good again; found by a stranger)
            return
        for s in self._logger_sinks:
            s.can_self_log = True
        try:
            guard.step(self._loss.take())
        finally:
            for s in self._logger_sinks:
                s.can_self_log = False

    # ---- the end -------------------------------------------------------------------
    def _finish(self, *, failed: bool = False) -> None:
        guards, self.guards = list(self.guards.values()), {}
        for g in guards:
            g.close(failed=failed)
        if guards:
            self._final = [g.state_dict() for g in guards]
            self._final_clips = [g.clip for g in guards]  # each optimizer's own (its counts)
            self._final_optimizers = [type(g.optimizer).__name__ for g in guards]
            self._done += 1
        self._logger_sinks = []
        if self.report:
            for d in self.run_dirs:
                path = write_report(d)
                if path is not None:
                    self.reports.append(path)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # found by a stranger: a fit that died of an out-of-memory error at step 30 was
        # "No gradient trouble in 30 steps" (an abort event says it stopped, as in a with
        # block)
        for g in self.guards.values():
            left_on(g, exception)
        # no collective: under DDP the other ranks wait in the backward's all-reduce (found by
        # a stranger: a rank that raised hung the job in the closing flush's all_gather)
        self._finish(failed=True)
