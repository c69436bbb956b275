"""gradguard for the Hugging Face ``transformers.Trainer``: ``GradGuardCallback``.

Where it acts (``Trainer._inner_training_loop``, transformers 4.4x-5.x): after the last
micro-batch's backward the Trainer clips with ``max_grad_norm`` (``accelerator.
clip_grad_norm_``), then calls ``on_pre_optimizer_step`` (this callback: measure, clip,
skip), then ``optimizer.step()``, ``lr_scheduler.step()`` and ``model.zero_grad()``. So:

* the Trainer's own clip would hide every spike from gradguard: ``max_grad_norm``
  (default 1.0!) is set to 0 for the run and gradguard applies the same clip
  (``NormClip(max_grad_norm)``) after it measures, composed with a ``clip`` of its own
  (``gg.chain``: the smallest coefficient wins); the arguments get their
  ``max_grad_norm`` back when training ends;
* under fp16 with a ``GradScaler``, the callback unscales the gradients first
  (``scaler.unscale_``) unless the Trainer has (it does when it clips, and transformers 5
  does to log the norm: the scaler's stage says), and the scaler's own overflow skip
  still works;
* a skip takes the gradients off the parameters for that one update: the optimizer
  changes no parameter and no state; the LR scheduler still advances.

The loss recorded per step is the mean of the model's ``outputs.loss`` over the step's
micro-batches (a forward hook on the model, training mode only, no host sync).

DDP: the decision is taken on gradients that are already all-reduced, so every rank sees
the same total norm and skips the same step; no extra collective, no desynchronisation.

Checkpoints: at each save (``on_save``) the guard's state (:meth:`gradguard.Guard.
state_dict`: step count, clip policy statistics, detector state) is written to
``<output_dir>/checkpoint-<step>/gradguard_state.pt``, after flushing the telemetry to the
run directory. ``trainer.train(resume_from_checkpoint=...)`` with a checkpoint under
``output_dir`` restores it when the guard is built; a resumed run whose checkpoint has no
such file (or lies elsewhere) starts a fresh guard, with a warning.
"""

from __future__ import annotations

import atexit
import copy
import os
import sys
import warnings
import weakref
from pathlib import Path
from typing import Any

try:
    import transformers
    from transformers import TrainerCallback
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "gradguard.integrations.hf needs transformers and accelerate: pip install 'gradguard[hf]'"
    ) from e

import torch
from torch import nn
from torch.amp.grad_scaler import OptState

from .._lifecycle import left_on
from ..clipping import NormClip, chain
from ..config import GuardConfig
from ..errors import GradGuardWarning, caller_stacklevel
from ..events import Sink
from ..executors._amp import scaler_state
from ..guard import Guard
from ..sinks import JsonlSink
from ._hooked import CallbackOptions, LossTracker, check_version, hooked_guard
from ._rundir import trainer_run_dir
from ._summary import write_report

#: How an ``abort`` event names what stopped a ``train()`` whose exception the callback did
#: not see (the Trainer calls no callback on one).
INTERRUPTED = "an exception (trainer.train() did not finish)"

STATE_FILE = "gradguard_state.pt"
SUPPORTED = ("4.40", "6")
check_version("transformers", transformers.__version__, *SUPPORTED)
if not hasattr(TrainerCallback, "on_pre_optimizer_step"):  # pragma: no cover
    raise ImportError(
        f"gradguard.integrations.hf needs a transformers Trainer that calls "
        f"on_pre_optimizer_step; transformers {transformers.__version__} does not "
        f"(supported: >={SUPPORTED[0]},<{SUPPORTED[1]} with that hook; pip install -U 'gradguard[hf]')"
    )


class GradGuardCallback(CallbackOptions, TrainerCallback):
    """Guard a ``transformers.Trainer``: measure, clip, skip non-finite steps, report.

    Args:
        config: a :class:`gradguard.GuardConfig`, or its options as keywords (``clip=``,
            ``on_nonfinite=``, ``recovery=`` (default without a ``config``: a fresh
            ``gg.Recovery()``; None turns it off), ``every=`` in optimizer steps, ``sinks=``
            added to the built-in JSONL run directory, ...). The Trainer's
            ``max_grad_norm`` is applied by gradguard after it measures (composed with a
            ``clip``: the smallest coefficient wins), and is 0 in the arguments while
            training runs (the Trainer clips before this callback).
        run_dir: where ``events.jsonl``, ``metrics.jsonl`` and ``report.html`` go; default
            ``<args.output_dir>/gradguard``.
        report: write ``report.html`` when training ends.

    Example:
        >>> import gradguard as gg
        >>> from gradguard.integrations.hf import GradGuardCallback
        >>> cb = GradGuardCallback(clip=gg.ZClip(), every=25)
        >>> cb.every
        25
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
        self.guard: Guard | None = None
        self.report_path: str | None = None
        self.resolved_run_dir: Path | None = None
        self._loss = LossTracker(mean=True)
        self._hook: Any = None
        self._is_zero = True
        self._resume_state: dict[str, Any] | None = None
        self._takeover: float | None = None  # the Trainer's max_grad_norm, applied by gradguard
        self._user_mgn: float | None = None  # ... put back in the arguments at the end
        self._earlier = 0  # earlier train() calls with a guard (see _fresh_guard)
        self._sub: str | None = None  # the run directory's part for a later fresh train()
        self._fresh = True  # this train() resumed no checkpoint

    # ---- start ---------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # a policy that replays the Trainer's own clip after measuring (gradguard run) needs
        # max_grad_norm as it is
        replays = getattr(self.clip, "replays_trainer_clip", False)
        taken = getattr(args, TAKEN_OVER, None)
        if not args.max_grad_norm and isinstance(taken, (int, float)):
            # an earlier train() that raised never reached on_train_end, which puts it back
            # (found by strangers: after an interrupted train() the next ran unclipped, with
            # this callback or a new one on the same arguments)
            args.max_grad_norm = float(taken)
        self._takeover = self._user_mgn = None
        if not replays and args.max_grad_norm and args.max_grad_norm > 0:
            # The Trainer clips before on_pre_optimizer_step: gradguard would only ever see
            # clipped norms (spikes invisible). It takes the clip over instead: the same
            # NormClip(max_grad_norm) (torch's clip_grad_norm_, bit for bit), applied after
            # measuring the true norm, composed with a clip of gradguard's own (the smallest
            # coefficient wins, as gradguard run --clip does: a healthy run is the Trainer's
            # bit for bit); max_grad_norm is back in the arguments when training ends
            self._takeover = self._user_mgn = float(args.max_grad_norm)
            args.max_grad_norm = 0.0
            setattr(args, TAKEN_OVER, self._user_mgn)  # for the next train() if this one raises
        self._is_zero = bool(getattr(state, "is_world_process_zero", True))
        self._fresh = not getattr(state, "global_step", 0)  # no checkpoint resumed
        # the Trainer tells its callbacks nothing when training raises: a process that then
        # ends finishes the run directory at exit (found by a stranger: a Trainer stopped by
        # an exception at step 5 left no step record and no report)
        atexit.register(self._at_exit)
        # a train() that raised left its guard open (the Trainer says nothing): this one is
        # the process's training now, so that one is finished (found by a stranger: a new
        # Trainer after an interrupted one raised "written by another open JsonlSink")
        for other in list(_OPEN):
            if other is not self:
                other._at_exit()
        _OPEN.add(self)
        self._fresh_guard(int(getattr(state, "global_step", 0)))
        model = kwargs.get("model")
        if isinstance(model, nn.Module) and self._hook is None:
            self._hook = model.register_forward_hook(self._on_forward, with_kwargs=True)
        self._resume_state = None
        if getattr(state, "global_step", 0) > 0 and self.guard is None:
            self._resume_state = self._find_resume_state(args, int(state.global_step))

    def _fresh_guard(self, step: int) -> None:
        """Each ``trainer.train()`` gets a guard of its own, built at its first step. The
        guard of an earlier call on this Trainer (a notebook cell run again, a second stage,
        or a run resumed in the same process after an interruption, whose guard was never
        closed) is closed, and the next is built afresh: from the checkpoint's guard state
        when the Trainer resumed one (``step`` > 0), in the same run directory (as a resume
        in a new process; later records of a step replace earlier ones), else in
        ``<run_dir>/train<k>``, a run of its own. Before, the second call stepped the
        closed guard and raised, and a resume in the same process kept the old guard's
        step count and ignored the checkpoint's state."""
        self._loss = LossTracker(mean=True)  # what an interrupted call had gathered
        if self.guard is None:
            return
        # a call that was interrupted left it open: it stopped there (an abort event)
        left_on(self.guard, None, INTERRUPTED)
        self.guard.close(failed=True)
        self.guard = None
        self._earlier += 1
        if step == 0:
            self._sub = f"train{self._earlier}"

    def _find_resume_state(self, args: Any, step: int) -> dict[str, Any] | None:
        """The guard state saved with the checkpoint this run resumes from (global_step > 0
        at train begin means the Trainer restored ``checkpoint-<step>``)."""
        path = Path(args.output_dir) / f"checkpoint-{step}" / STATE_FILE
        if not path.is_file():
            warnings.warn(
                f"GradGuardCallback: resuming at step {step}, but {str(path)!r} does not exist; "
                "the guard (clip statistics, step count) starts afresh.",
                GradGuardWarning,
                stacklevel=caller_stacklevel(),
            )
            return None
        state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
        return state

    def _on_forward(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        if not module.training:
            return
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if loss is None and isinstance(output, (tuple, list)) and output and isinstance(
                output[0], torch.Tensor) and output[0].dim() == 0:
            loss = output[0]  # a model returning (loss, logits), as the Trainer reads it
        if isinstance(loss, torch.Tensor):
            # With gradient accumulation the Trainer hands the model the token count of the
            # whole optimizer step (num_items_in_batch): each micro-batch loss is then already
            # a share of the step's loss, which is their sum, not their mean.
            self._loss.mean = kwargs.get("num_items_in_batch") is None
            self._loss.add(loss)

    def _make_guard(
        self, args: Any, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any
    ) -> Guard:
        base = Path(self.run_dir or Path(args.output_dir) / "gradguard")
        run_dir = base / self._sub if self._sub is not None else base
        if self._is_zero:
            run_dir, said = trainer_run_dir(base, self._sub, self._fresh)
            if said is not None:
                warnings.warn(f"GradGuardCallback: {said} (GradGuardCallback(run_dir=...) names "
                              "a directory of its own)", GradGuardWarning,
                              stacklevel=caller_stacklevel())
        sinks: list[Sink] = list(self.sinks)
        if self._is_zero:
            sinks.append(JsonlSink(run_dir))
            self.resolved_run_dir = run_dir
        clip = copy.deepcopy(self.clip)
        if self._takeover is not None:
            clip = (NormClip(self._takeover) if clip is None
                    else chain(clip, NormClip(self._takeover)))
        cfg = self.config.replace(sinks=sinks, clip=clip)
        return hooked_guard(model, optimizer, cfg, scaler=scaler)

    # ---- per optimizer step --------------------------------------------------------
    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        wrapped = kwargs.get("optimizer")
        model = kwargs.get("model")
        if wrapped is None or not isinstance(model, nn.Module):
            return
        inner = getattr(wrapped, "optimizer", wrapped)  # accelerate's AcceleratedOptimizer
        scaler = getattr(wrapped, "scaler", None)
        if self.guard is None:
            self.guard = self._make_guard(args, model, inner, scaler)
            if self._resume_state is not None:
                self.guard.load_state_dict(self._resume_state)
                self._resume_state = None
        if scaler is not None and not _unscaled(scaler, inner):
            # fp16: accelerate unscales when the Trainer clips, or measures the norm it logs
            # (transformers 5 with max_grad_norm 0: found by a stranger, the callback's
            # second unscale_ raised at the first step); else it is done here
            scaler.unscale_(inner)
        loss = self._loss.take()
        if loss is None and self.guard.recovery is not None and not self.guard._no_loss_said:
            self.guard._no_loss_said = True  # said here, in the callback's words
            warnings.warn(
                "GradGuardCallback: the model returned no loss (the Trainer computes it "
                "outside the model: label_smoothing_factor, a compute_loss override or "
                "compute_loss_func), so gradguard's loss tests are off and only its gradient "
                "tests act, and the run's verdict is not judged on its loss.",
                GradGuardWarning, stacklevel=caller_stacklevel())
        self.guard.step(loss)

    # ---- checkpoints -----------------------------------------------------------------
    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Write the guard's state next to the checkpoint the Trainer just saved."""
        if self.guard is None:
            return
        self.guard.flush()  # every rank (a collective under DDP): the run dir is complete
        if not bool(getattr(state, "is_world_process_zero", True)):
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            torch.save(self.guard.state_dict(), folder / STATE_FILE)
            if self._user_mgn is not None and (folder / TRAINING_ARGS).is_file():
                # the arguments saved with the checkpoint as the user made them, not with the
                # max_grad_norm of 0 gradguard set while it applies the clip itself
                saved = copy.copy(args)
                saved.max_grad_norm = self._user_mgn
                if hasattr(saved, TAKEN_OVER):
                    delattr(saved, TAKEN_OVER)
                torch.save(saved, folder / TRAINING_ARGS)

    # ---- the end -------------------------------------------------------------------
    def _at_exit(self) -> None:
        """At interpreter exit after a ``train()`` that raised: close its guard without a
        collective (its pending steps written) and write the report."""
        if self.guard is None or self.guard._closed:
            return
        # found by a stranger: a train() that died at step 30 was "No gradient trouble"
        left_on(self.guard, getattr(sys, "last_value", None), INTERRUPTED)
        self.guard.close(failed=True)
        if self.report and self.resolved_run_dir is not None:
            self.report_path = write_report(self.resolved_run_dir)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        atexit.unregister(self._at_exit)
        _OPEN.discard(self)
        if self._user_mgn is not None:  # the arguments as the user made them
            args.max_grad_norm, self._user_mgn = self._user_mgn, None
            if hasattr(args, TAKEN_OVER):
                delattr(args, TAKEN_OVER)
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.guard is not None:
            self.guard.close()
        if self.report and self.resolved_run_dir is not None:
            self.report_path = write_report(self.resolved_run_dir)


#: The callbacks whose train() is under way, or raised (their guard still open).
_OPEN: weakref.WeakSet[GradGuardCallback] = weakref.WeakSet()

#: The attribute of the Trainer's arguments that holds the ``max_grad_norm`` gradguard took
#: over while a ``train()`` runs (put back by the next one when that one raised).
TAKEN_OVER = "_gradguard_max_grad_norm"

#: The file the Trainer saves its arguments to in a checkpoint.
TRAINING_ARGS = "training_args.bin"


def _unscaled(scaler: Any, optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``scaler`` has unscaled ``optimizer``'s gradients since its last update."""
    return scaler_state(scaler, optimizer)["stage"] is OptState.UNSCALED
