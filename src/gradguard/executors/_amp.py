"""Under a ``GradScaler``: the guard's flags merged into the scaler's ``found_inf``, routine
loss-scale overflows told from genuine trouble, and the :class:`Scaler` executor (see
:mod:`gradguard.executors`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.amp.grad_scaler import GradScaler, OptState

from ..decision import Action, Plan, resolve
from ..distributed import world_size
from ._base import NONFINITE, Closure, Direct, Outcome, grad_scale_of

#: Under a GradScaler, a non-finite step is a routine loss-scale overflow (an ``info``
#: ``skip`` event, no recovery) when its loss is finite and the scale it ran with was
#: above this: only then can the scale explain the overflow. Backed-off down to here
#: (16 consecutive overflows from torch's default 2**16), it no longer amplifies anything,
#: so what still overflows is reported as a real non-finite step.
AMP_OVERFLOW_MIN_SCALE = 1.0


def scaler_state(scaler: GradScaler, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """GradScaler's own per-optimizer bookkeeping (``stage``, ``found_inf_per_device``)."""
    return scaler._per_optimizer_states[id(optimizer)]


def merge_into_scaler(
    scaler: GradScaler, optimizer: torch.optim.Optimizer, plan: Plan, code: Tensor,
    loss_ok: Tensor | bool,
) -> tuple[Tensor, Tensor, Tensor, Callable[[], None] | None]:
    """Add the guard's flags to the scaler's ``found_inf`` (when the plan says so), so that
    ``scaler.step`` skips the step on the device, and split what the scaler will skip into
    routine overflows and genuine trouble.

    Returns device tensors ``(skip, genuine, amp_row)`` (``amp_row`` is ``[routine,
    scale]``) and ``unmerge``: call it after the step and before ``scaler.update()``, which
    halves the scale for every skip it sees in ``found_inf``, so that it sees only the
    overflows the loss scale can explain: the scaler's own (non-finite scaled gradients),
    with a finite loss not far off (``loss_ok``). A step skipped for the guard's reasons
    alone (a gradient or loss spike, a batch on another scale: its scaled gradients were
    finite) is no overflow: a stretch of twenty such batches halved a scale of 2**16 down
    to 0.125, where fp16 gradients underflow, for the 38,000 steps (x2 per
    ``growth_interval``) it takes to grow back. Nor is a NaN loss (NaN in the data: a run
    with 5% such batches had its scale at 0.001-0.008 after 500 steps) or a loss far off (a
    batch x1e4, wrecked weights): no scale causes or cures those. Under
    torch.distributed the scaler's own ``found_inf`` stands (each rank's loss is its own;
    the scales must stay equal).
    """
    bad = code != 0
    dev = bad.device
    found = list(scaler_state(scaler, optimizer)["found_inf_per_device"].values())
    ok = loss_ok.to(dev) if isinstance(loss_ok, Tensor) else torch.tensor(loss_ok, device=dev)
    unmerge = None
    if found:
        own, target = found[0].clone(), found[0]
        if world_size() == 1:
            own.mul_(ok.to(own))
        unmerge = lambda: target.copy_(own)  # noqa: E731  (a device copy: no sync)
    if found and plan.found_inf:
        # every element finite but the float32 norm overflows: skip it like a NaN.
        # Kept 0/1: fused optimizers subtract found_inf from their step counts.
        found[0].add_(bad.to(found[0])).clamp_(max=1.0)
    if found:
        skip = torch.stack([f.to(dev, non_blocking=True) for f in found]).sum() > 0
    else:  # no gradients: scaler.step raises its own error
        skip = torch.zeros((), dtype=torch.bool, device=dev)
    scale_t = scaler._get_scale_async()
    scale = (
        torch.ones((), device=dev)
        if scale_t is None
        else scale_t.detach().to(dev, torch.float32, non_blocking=True).reshape(())
    )
    routine = skip & (scale > AMP_OVERFLOW_MIN_SCALE) & ok & (code < 2)  # a spike is no overflow
    genuine = (skip | (bad if plan.found_inf else torch.zeros_like(skip))) & ~routine
    return skip, genuine, torch.stack([routine.float(), scale]), unmerge


def _read_flags(plan: Plan, code: Tensor, genuine: Tensor, skip: Tensor) -> tuple[Action, bool, int]:
    """(action, genuine trouble, verdict code) from one host read of all the flags."""
    both = int(code.to(torch.int32) * 4 + genuine.to(torch.int32) * 2 + skip.to(torch.int32))
    c, bad, overflow = both >> 2, bool(both & 2), bool(both & 1)  # the one host sync
    spike = bool(c & ~NONFINITE)
    action = resolve(plan, bad=bad and not spike, overflow=overflow, spike=spike)
    return action, bad, c


class Scaler(Direct):
    """``guard.step(loss, scaler=...)``: the scaler unscales, skips and steps (on a fused
    optimizer with ``in_step``, the unscale goes into the update, see
    :mod:`gradguard.executors`)."""

    def __init__(self, optimizer: torch.optim.Optimizer, scaler: GradScaler) -> None:
        super().__init__(optimizer)
        self.scaler = scaler
        self._loss_scale: Tensor | None = None

    def prepare(self, *, in_step: bool = False) -> None:
        assert self.scaler is not None
        stage = scaler_state(self.scaler, self.optimizer)["stage"]
        if stage is OptState.STEPPED:
            raise RuntimeError(
                "guard.step(scaler=...): scaler.step(optimizer) already ran since the last "
                "scaler.update(); let guard.step step the optimizer and call scaler.update() "
                "once per iteration"
            )
        self._loss_scale = self.norm_scale = None
        if stage is not OptState.READY:  # the user already called scaler.unscale_
            return
        scale = self.scaler._get_scale_async()
        if in_step and scale is not None:
            # leave the gradients scaled: the fused update divides by the scale
            self._loss_scale = scale.detach().float().reshape(())
            self.norm_scale = self._loss_scale.reciprocal()
        else:
            self.scaler.unscale_(self.optimizer)

    def _deferred_unscale(self, code: Tensor, clip: Tensor | None) -> None:
        """Stand in for ``scaler.unscale_``: its ``found_inf`` is the guard's non-finite
        flag (the norms of the scaled gradients are non-finite exactly when an element is,
        or when their float32 norm overflows), and the optimizer divides by
        ``scale / clip``."""
        assert self.scaler is not None and self._loss_scale is not None
        state = scaler_state(self.scaler, self.optimizer)
        dev = self._loss_scale.device
        nonfinite = (code & NONFINITE).to(dev, torch.float32, non_blocking=True)
        state["found_inf_per_device"] = {dev: nonfinite}
        state["stage"] = OptState.UNSCALED  # scaler.step takes optimizer.grad_scale as is
        scale = self._loss_scale
        if clip is not None:
            scale = scale / clip.detach().float().reshape(())
        self.optimizer.grad_scale = scale  # type: ignore[attr-defined]

    def run(
        self, plan: Plan, code: Tensor, loss_ok: Tensor | bool = True, closure: Closure = None,
        clip: Tensor | None = None,
    ) -> Outcome:
        assert self.scaler is not None
        try:
            if self._loss_scale is not None:
                self._deferred_unscale(code, clip)
            elif clip is not None:
                self.optimizer.grad_scale = grad_scale_of(clip)  # type: ignore[attr-defined]
            skip, genuine, row, unmerge = merge_into_scaler(
                self.scaler, self.optimizer, plan, code, loss_ok
            )
            if not plan.read_host:
                self.scaler.step(self.optimizer)  # skips on found_inf, on the device
                if unmerge is not None:
                    unmerge()  # scaler.update() backs off for overflows only
                return Outcome(skipped=_skip_code(skip, code), trouble=genuine, amp_row=row)
            action, trouble, c = _read_flags(plan, code, genuine, skip)
            if action == "step":
                self.scaler.step(self.optimizer)
            if unmerge is not None:
                unmerge()
            # a host-side skip leaves the scaler's own found_inf in place: scaler.update()
            # backs the scale off for an overflow as usual
            return Outcome(
                skipped=max(c, 1) if action != "step" else 0,
                trouble=action != "step" and trouble, action=action, amp_row=row, code=c,
            )
        finally:
            # scaler.step removes it after stepping; a skip on the host never stepped
            self.optimizer.__dict__.pop("grad_scale", None)
            self._loss_scale = self.norm_scale = None


def _skip_code(skip: Tensor, code: Tensor) -> Tensor:
    """What a scaler-driven step records as skipped: the verdict bits, at least 1."""
    return torch.where(skip, code.clamp_min(1), torch.zeros_like(code))
