"""Probe: the learning rate. A few optimizer steps on one batch, on deep copies of the
model and the optimizer, at the user's LR and at LR/10: a loss that rises (or blows up) at
LR while it falls at LR/10 means the LR is too high for this model (the local curvature
times the LR is past the stable range, Cohen et al. 2021)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ._report import Finding

LR_PROBE_STEPS = 4
#: the loss after the probe steps above (1 + LR_RISE) x the initial loss counts as rising
LR_RISE = 0.05
#: the loss ending above this multiple of the initial loss is an error
LR_BLOWUP = 10.0
#: LR multipliers tried, in order, once the loss rises at the user's LR
LR_SCALES: tuple[float, ...] = (0.1, 0.01, 0.001)


def _run(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step_loss: Callable[[nn.Module], Tensor],
    scale: float,
    steps: int,
    seed: int,
) -> list[float]:
    m, opt = copy.deepcopy((model, optimizer))
    for group in opt.param_groups:
        lr = group["lr"]
        group["lr"] = lr * scale if not isinstance(lr, Tensor) else lr.mul(scale)
    losses: list[float] = []
    for i in range(steps + 1):
        torch.manual_seed(seed + i)
        opt.zero_grad(set_to_none=True)
        loss = step_loss(m)
        v = float(loss.detach().float())
        losses.append(v)
        if i == steps or not math.isfinite(v) or (i and v > LR_BLOWUP * abs(losses[0]) + 1e-12):
            break  # diverged: more steps cost time and tell nothing new
        loss.backward()
        opt.step()
    return losses


def probe_lr(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step_loss: Callable[[nn.Module], Tensor],
    *,
    steps: int = LR_PROBE_STEPS,
) -> list[Finding]:
    lrs = [g["lr"] for g in optimizer.param_groups]
    lr = float(lrs[0])
    hi = _run(model, optimizer, step_loss, 1.0, steps, seed=0)
    l0 = hi[0]
    if not math.isfinite(l0):
        return []  # the numerics probe reports a non-finite loss
    hi_end = hi[-1]
    blew = not math.isfinite(hi_end) or max(hi[1:], default=l0) > LR_BLOWUP * abs(l0) + 1e-12
    rose = hi_end > l0 * (1 + LR_RISE) + 1e-12
    if not (blew or rose):
        return []  # the loss does not rise: no need for the LR/10 comparison
    # smaller LRs, 10x apart, until one does not make the loss rise: that one is advised
    tried: dict[float, list[float]] = {}
    stable: float | None = None
    for scale in LR_SCALES:
        run = _run(model, optimizer, step_loss, scale, steps, seed=0)
        tried[scale] = run
        if math.isfinite(run[-1]) and run[-1] <= l0 * (1 + LR_RISE) + 1e-12:
            stable = scale
            break
    lo = tried[LR_SCALES[0]]
    lo_end = lo[-1]
    ev: dict[str, Any] = {
        "lr": lr,
        "loss_start": l0,
        "loss_end_at_lr": hi_end,
        "loss_end_at_lr_div_10": lo_end,
        "losses_at_lr": hi,
        "losses_at_lr_div_10": lo,
        "steps": steps,
        "steps_run_at_lr": len(hi) - 1,
        "stable_lr": lr * stable if stable is not None else None,
    }
    lo_ok = math.isfinite(lo_end) and lo_end < hi_end
    if not (blew or (rose and lo_ok)):
        return []
    how = "to NaN/Inf" if not math.isfinite(hi_end) else f"from {l0:.4g} to {max(hi):.4g}"
    n = len(hi) - 1
    if stable is not None:
        advice = (
            f"the loss does not rise at lr={lr * stable:g}: lower the learning rate to "
            f"≤ {lr * stable:g}"
        )
    else:
        advice = (
            f"it still rises at lr={lr * LR_SCALES[-1]:g}: lower the learning rate by more than "
            f"{1 / LR_SCALES[-1]:g}x, and look for a root cause (input scale, init)"
        )
    return [
        Finding(
            "lr_too_high",
            "error" if blew else "warning",
            None,
            ev,
            f"in {n} step{'s' if n != 1 else ''} on one batch the loss rises {how} at lr={lr:g}; "
            f"{advice} (or add warm-up and gradient clipping, gg.NormClip(1.0)).",
            0.9 if (blew and lo_ok) or stable is not None else 0.75 if lo_ok else 0.55,
        )
    ]
