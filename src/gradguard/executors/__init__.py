"""Executors: carry out a :class:`~gradguard.decision.Plan` on the optimizer.

* :class:`Direct` — the plain loop: ``guard.step()`` calls ``optimizer.step()`` itself, or
  hands the bad flag to a fused optimizer as ``found_inf`` (no host sync).
* :class:`Scaler` — ``guard.step(loss, scaler=GradScaler)``: unscales once, merges the
  guard's flag into the scaler's ``found_inf``, keeps the routine-overflow accounting, and
  lets ``scaler.step`` step the optimizer.

On a fused optimizer (Adam, AdamW, SGD, Adagrad with ``fused=True``) both take the clip
coefficient of a total-norm policy *into* the update: fused optimizers divide each
gradient by ``optimizer.grad_scale`` inside their kernel (``GradScaler``'s contract), so
``grad_scale = 1 / coef`` clips with no pass over the gradients of its own. Under a
``GradScaler`` the gradients are not even unscaled first: the guard measures the scaled
gradients (norms times ``1 / scale``: exact, the scale is a power of two), hands the
scaler its own ``found_inf`` from those norms, and the optimizer divides by
``scale / coef`` — one pass over the gradients (the measurement) besides the update,
where torch's recipe (``unscale_``, ``clip_grad_norm_``, ``step``) makes three. Fused
optimizers also write the unscaled, clipped gradient back to ``.grad``.
* :class:`Hook` — driven from just before (or inside) an optimizer step that someone else
  calls: a trainer's ``on_before_optimizer_step`` or a global step pre-hook. It never
  steps; a skip takes the gradients off the parameters for that one update (torch
  optimizers leave parameters without a gradient alone) and a step post-hook puts them
  back. When the step never runs (a ``GradScaler`` skipped it), the stash is *discarded*
  at the next step: by then the trainer has zeroed the gradients and backward has
  produced new ones, which must not be overwritten by the stale, bad ones. When the
  recovery ladder rolls the weights back inside the hook (at a flush, or on hearing an
  earlier step's skip flag), the gradients on the parameters were computed on the weights
  it replaced: :meth:`Hook.void` takes them off too, and the step is recorded as skipped
  (``STALE``), so no update from the wrecked weights reaches the restored ones.

Every executor reports an :class:`Outcome`; none of them decides anything.
"""

from ._amp import AMP_OVERFLOW_MIN_SCALE, Scaler, merge_into_scaler, scaler_state
from ._base import (
    NONFINITE,
    STALE,
    Closure,
    Direct,
    FreshState,
    Outcome,
    check_loss,
    evaluate_closure,
    first_then,
    fused_step,
    grad_scale_of,
    loss_finite,
    maximizing,
    needs_closure,
    optimizer_kind,
)
from ._hook import Hook, executor_for

__all__ = [
    "AMP_OVERFLOW_MIN_SCALE", "NONFINITE", "STALE", "Closure", "Direct", "FreshState", "Hook", "Outcome",
    "Scaler", "check_loss", "evaluate_closure", "executor_for", "first_then", "fused_step",
    "grad_scale_of", "loss_finite", "maximizing", "merge_into_scaler", "needs_closure", "optimizer_kind", "scaler_state",
]
