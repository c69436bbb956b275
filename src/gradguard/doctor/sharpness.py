"""Curvature: the top eigenvalue of the loss Hessian against SGD's stability limit.

Gradient descent with learning rate η is unstable along any direction whose curvature λ
exceeds ``2/η`` -- heavy-ball momentum β moves the limit to ``2(1+β)/η``, Nesterov's to
``2(1+β)/((1+2β)η)`` (LeCun et al. 1998; Cohen et al. 2021, "Gradient Descent on Neural
Networks Typically Occurs at the Edge of Stability"). Power iterations of Hessian-vector
products (double backward) estimate λ_max on a sub-batch of at most
:data:`SHARPNESS_BATCH` samples; the iteration stops when it converges, when its lower
bound is already past the bar, or when the time budget runs out (the estimate is then a
lower bound, reported as ``λ_max ≥``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ._budget import Budget

#: at most this many Hessian-vector products in the power iteration for λ_max
SHARPNESS_ITERS = 20
#: samples the Hessian is estimated on (a Hessian-vector product costs ~3 passes)
SHARPNESS_BATCH = 32
#: forward/backward passes the first Hessian-vector product costs, with the double-backward
#: graph it is built on: the curvature starts only when the budget has room for them
SHARPNESS_PASSES = 4
#: the power iteration stops once the estimate changes by less than this fraction
SHARPNESS_TOL = 0.03
#: ``η·λ_max`` is flagged past this multiple of the stability limit. Below the limit a
#: quadratic converges; between 1x and about 2x the limit, networks typically go through a
#: "catapult" (Lewkowycz et al. 2020: the loss spikes, the curvature drops until η·λ is back
#: under the limit, and training goes on), and training self-stabilises at the edge of
#: stability (Cohen et al. 2021). The batch Hessian also differs from the full-data one.
#: Past 2x the limit the catapult no longer catches it and training diverges: the margin
#: keeps healthy high-LR setups (which sit near 1x) from being called sick.
SHARPNESS_MARGIN = 2.0


@dataclass
class Sharpness:
    """The top curvature of the loss, in the optimizer's units."""

    lam: float  # λ_max of the Hessian (of the LR-scaled Hessian over the largest LR with groups)
    lr: float  # the largest effective learning rate
    limit: float  # the stable range of η·λ: 2, 2(1+β), 2(1+β)/(1+2β)
    iters: int  # Hessian-vector products run
    converged: bool

    @property
    def ratio(self) -> float:
        """``η·λ_max`` over the stability limit."""
        return self.lr * self.lam / self.limit

    def evidence(self) -> dict[str, Any]:
        return {
            "sharpness": self.lam,
            "lr_times_sharpness": self.lr * self.lam,
            "stability_limit": self.limit,
            "over_limit": self.ratio,
            "max_stable_lr": self.limit / self.lam if self.lam > 0 else None,
            "recommended_lr": self.limit / (2 * self.lam) if self.lam > 0 else None,
            "power_iterations": self.iters,
            "power_iteration_converged": self.converged,
        }

    def lam_text(self) -> str:
        """``λ_max = 42.7``, or ``λ_max ≥ 33.1`` when the iteration stopped early (the
        Rayleigh quotient of an unconverged power iteration is a lower bound)."""
        return f"λ_max {'=' if self.converged else '≥'} {self.lam:.4g}"


def _sgd_limit(group: dict[str, Any]) -> tuple[float, float] | None:
    """(effective LR, stable range of η·λ) of one SGD param group, or None if not plain SGD."""
    if group.get("maximize", False):
        return None
    beta = float(group.get("momentum", 0.0) or 0.0)
    damp = float(group.get("dampening", 0.0) or 0.0) if beta else 0.0
    lr = float(group["lr"]) * (1.0 - damp)
    if group.get("nesterov", False):
        return lr, 2 * (1 + beta) / (1 + 2 * beta)
    return lr, 2 * (1 + beta)


def _power(
    hvp: Callable[[list[Tensor]], list[Tensor]],
    params: list[Tensor],
    iters: int,
    stop_above: float | None,
    shift: float,
    budget: Budget | None = None,
) -> tuple[float, int, bool]:
    """Power iteration on ``H + shift·I``: (the Rayleigh quotient minus ``shift``, iterations,
    converged). The Rayleigh quotient ``vᵀHv`` never exceeds λ_max, so the iteration stops as
    soon as it passes ``stop_above``, or when the next product would overrun ``budget``."""
    gen = torch.Generator().manual_seed(0)
    v = [torch.randn(p.shape, generator=gen).to(p) for p in params]
    lam, prev = 0.0, math.nan
    cost = 0.0
    for n in range(1, iters + 1):
        if budget is not None and n > 1 and not budget.allows(cost):
            budget.note(f"sharpness: {n - 1} of {iters} power iterations")
            return lam, n - 1, False
        t0 = time.perf_counter()
        norm = float(torch.sqrt(sum((x.double() ** 2).sum() for x in v)))  # type: ignore[arg-type]
        if not norm > 0 or not math.isfinite(norm):
            return lam, n - 1, False  # Hv = 0 (or not finite)
        v = [x / norm for x in v]
        hv = [h + shift * x if shift else h for h, x in zip(hvp(v), v)]
        lam = float(sum((h.double() * x.double()).sum() for h, x in zip(hv, v))) - shift  # type: ignore[arg-type]
        if not math.isfinite(lam):
            return lam, n, False
        v = [h.detach() for h in hv]
        cost = time.perf_counter() - t0
        if stop_above is not None and lam > stop_above:
            return lam, n, False  # certainly past the bar already
        if n > 1 and abs(lam - prev) <= SHARPNESS_TOL * abs(lam + shift):
            return lam, n, True
        prev = lam
    return lam, iters, False


def sharpness(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step_loss: Callable[[nn.Module], Tensor],
    *,
    iters: int = SHARPNESS_ITERS,
    stop_above: float | None = SHARPNESS_MARGIN,
    budget: Budget | None = None,
) -> Sharpness | None:
    """λ_max of the loss Hessian on the batch by power iteration, for an SGD optimizer.

    With several param groups the operator is ``S H S``, ``S = diag(sqrt(η_g/η_max))``, so
    that ``η_max·λ`` is the top curvature each group actually sees; weight decay adds
    ``wd`` to the curvature. Gradients come from ``torch.autograd.grad``: no ``.grad`` is
    touched. Each Rayleigh quotient ``vᵀHv`` is a lower bound on λ_max, so the iteration may
    stop as soon as ``η·vᵀHv`` is ``stop_above`` times past the limit, and stops when the
    ``budget`` has no room for another product. None for optimizers other than
    ``torch.optim.SGD``, when the loss cannot be differentiated twice, or when the budget
    has no room for the first product.
    """
    if not isinstance(optimizer, torch.optim.SGD):
        return None
    groups = []
    for g in optimizer.param_groups:
        lim = _sgd_limit(g)
        if lim is None:
            return None
        ps = [p for p in g["params"] if p.requires_grad]
        if ps and lim[0] > 0:
            groups.append((ps, lim[0], lim[1], float(g.get("weight_decay", 0.0) or 0.0)))
    if not groups:
        return None
    lr_max = max(lr for _, lr, _, _ in groups)
    limit = max(lim for _, _, lim, _ in groups)  # the lenient one when groups differ
    params = [p for ps, *_ in groups for p in ps]
    scale = [math.sqrt(lr / lr_max) for ps, lr, _, _ in groups for _ in ps]
    decay = [wd for ps, _, _, wd in groups for _ in ps]
    try:
        with torch.enable_grad():
            loss = step_loss(model)
            if not bool(torch.isfinite(loss.detach())):
                return None
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            live = [i for i, gr in enumerate(grads) if gr is not None and gr.requires_grad]
            if not live:
                return None
            hvp_params = [params[i] for i in live]
            hvp_grads = [grads[i] for i in live]
            sc = [scale[i] for i in live]
            wd = [decay[i] for i in live]

            def hvp(v: list[Tensor]) -> list[Tensor]:
                sv = [x * c for x, c in zip(v, sc)]
                hv = torch.autograd.grad(
                    hvp_grads, hvp_params, sv, retain_graph=True, allow_unused=True
                )
                return [
                    c * ((h if h is not None else torch.zeros_like(x)) + w * x)
                    for h, x, c, w in zip(hv, sv, sc, wd)
                ]

            bar = None if stop_above is None else stop_above * limit / lr_max
            lam, n, converged = _power(hvp, hvp_params, iters, bar, 0.0, budget)
            if n == 0:
                return None
            if lam < 0 and (bar is None or -lam > bar) and (budget is None or budget.left() > 0):
                # a negative eigenvalue dominates and hides the top positive one: iterate on
                # H + |λ|·I, whose top eigenvalue is λ_max + |λ|
                shift = -lam
                mu, n2, converged = _power(hvp, hvp_params, iters, bar, shift, budget)
                lam, n = mu, n + n2
    except RuntimeError:
        return None  # e.g. an op or custom Function without a double backward
    if not math.isfinite(lam):
        return None
    return Sharpness(lam=lam, lr=lr_max, limit=limit, iters=n, converged=converged)


