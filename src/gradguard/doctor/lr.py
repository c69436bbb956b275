"""Probe: the learning rate, two ways.

1. **Curvature** (SGD, with or without momentum): gradient descent with learning rate η is
   unstable along any direction whose curvature λ exceeds ``2/η`` -- heavy-ball momentum β
   moves the limit to ``2(1+β)/η``, Nesterov's to ``2(1+β)/((1+2β)η)`` (LeCun et al. 1998;
   Cohen et al. 2021, "Gradient Descent on Neural Networks Typically Occurs at the Edge of
   Stability"). A few power iterations of Hessian-vector products (double backward) estimate
   the top eigenvalue λ_max of the loss Hessian on the batch; ``η·λ_max`` past
   :data:`SHARPNESS_MARGIN` times the limit is flagged. This catches slow divergence that
   takes tens of steps to show in the loss.
2. **Steps** (every optimizer): a few optimizer steps on one batch, on deep copies of the
   model and the optimizer, at the user's LR and at LR/10: a loss that rises (or blows up)
   at LR while it falls at LR/10 means the LR is too high. This catches fast blow-ups, and is
   the only test for adaptive optimizers (Adam & co.), whose stability limit depends on a
   preconditioner that does not exist before training (see :func:`probe_lr`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
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

#: at most this many Hessian-vector products in the power iteration for λ_max
SHARPNESS_ITERS = 20
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
#: normalisation layers that make the weights before them scale-invariant
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


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
) -> tuple[float, int, bool]:
    """Power iteration on ``H + shift·I``: (the Rayleigh quotient minus ``shift``, iterations,
    converged). The Rayleigh quotient ``vᵀHv`` never exceeds λ_max, so the iteration stops as
    soon as it passes ``stop_above``."""
    gen = torch.Generator().manual_seed(0)
    v = [torch.randn(p.shape, generator=gen).to(p) for p in params]
    lam, prev = 0.0, math.nan
    for n in range(1, iters + 1):
        norm = float(torch.sqrt(sum((x.double() ** 2).sum() for x in v)))  # type: ignore[arg-type]
        if not norm > 0 or not math.isfinite(norm):
            return lam, n - 1, False  # Hv = 0 (or not finite)
        v = [x / norm for x in v]
        hv = [h + shift * x if shift else h for h, x in zip(hvp(v), v)]
        lam = float(sum((h.double() * x.double()).sum() for h, x in zip(hv, v))) - shift  # type: ignore[arg-type]
        if not math.isfinite(lam):
            return lam, n, False
        v = [h.detach() for h in hv]
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
) -> Sharpness | None:
    """λ_max of the loss Hessian on the batch by power iteration, for an SGD optimizer.

    With several param groups the operator is ``S H S``, ``S = diag(sqrt(η_g/η_max))``, so
    that ``η_max·λ`` is the top curvature each group actually sees; weight decay adds
    ``wd`` to the curvature. Gradients come from ``torch.autograd.grad``: no ``.grad`` is
    touched. Each Rayleigh quotient ``vᵀHv`` is a lower bound on λ_max, so the iteration may
    stop as soon as ``η·vᵀHv`` is ``stop_above`` times past the limit. None for optimizers
    other than ``torch.optim.SGD``, or when the loss cannot be differentiated twice.
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
            lam, n, converged = _power(hvp, hvp_params, iters, bar, 0.0)
            if lam < 0 and (bar is None or -lam > bar):
                # a negative eigenvalue dominates and hides the top positive one: iterate on
                # H + |λ|·I, whose top eigenvalue is λ_max + |λ|
                shift = -lam
                mu, n2, converged = _power(hvp, hvp_params, iters, bar, shift)
                lam, n = mu, n + n2
    except RuntimeError:
        return None  # e.g. an op or custom Function without a double backward
    if not math.isfinite(lam):
        return None
    return Sharpness(lam=lam, lr=lr_max, limit=limit, iters=n, converged=converged)


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


def _step_probe(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step_loss: Callable[[nn.Module], Tensor],
    steps: int,
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


def probe_lr(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step_loss: Callable[[nn.Module], Tensor],
    *,
    steps: int = LR_PROBE_STEPS,
) -> list[Finding]:
    """``lr_too_high`` from the step probe, the curvature rule (SGD), or both.

    The step probe's finding, when there is one, carries the curvature evidence too. The
    curvature rule alone gives a warning when ``η·λ_max > SHARPNESS_MARGIN x limit``: the loss
    may still fall for the first steps, but the sharpest direction grows by a factor
    ``|1 - η·λ_max| > 1`` each step (with momentum, faster) until training diverges.

    Adaptive optimizers (Adam, AdamW, RMSprop, ...) get the step probe only: their limit is on
    the *preconditioned* sharpness (38/η for Adam with β1 = 0.9, Cohen et al. 2022), and the
    preconditioner ``sqrt(v)`` is not known before training -- after one step it is ``|g|``,
    which makes the estimate meaningless.
    """
    found = _step_probe(model, optimizer, step_loss, steps)
    sharp: Sharpness | None = None
    if isinstance(optimizer, torch.optim.SGD):
        m, opt = copy.deepcopy((model, optimizer))
        torch.manual_seed(0)
        sharp = sharpness(m, opt, step_loss)
        del m, opt
    if sharp is None:
        return found
    ev = sharp.evidence()
    lr0 = float(optimizer.param_groups[0]["lr"])
    over = sharp.lam > 0 and sharp.ratio > SHARPNESS_MARGIN
    rel = "=" if sharp.converged else "≥"
    advice = (
        f"lr·λ_max {rel} {sharp.lr:g}·{sharp.lam:.4g} = {sharp.lr * sharp.lam:.3g}, "
        f"{sharp.ratio:.1f}x the stable limit {sharp.limit:.3g}"
    )
    if found:
        f = found[0]
        f.evidence.update(ev)
        if over:
            f.remedy = f"{f.remedy[:-1]}; {advice} (lr ≤ {ev['recommended_lr']:.3g} ≈ limit/(2·λ_max))."
            f.confidence = max(f.confidence, 0.9)
        return found
    rec = ev["recommended_lr"]
    norms = sorted({type(mod).__name__ for mod in model.modules() if isinstance(mod, _NORMS)})
    if over and norms and not found:
        # weights before a normalisation layer are scale-invariant: an unstable step grows
        # their norm, which lowers their curvature (~1/|w|²) until the step is stable again
        # (Arora et al. 2019, "auto rate-tuning" by BatchNorm). The curvature rule would call
        # healthy normalised nets at high LR sick, so it only informs there.
        ev["normalization_layers"] = norms
        return [
            Finding(
                "lr_too_high",
                "info",
                None,
                {"lr": lr0, **ev},
                f"{advice}, but the model has {', '.join(norms)}, which lets training adapt its "
                f"curvature; if the loss spikes, lower the learning rate towards {rec:.3g}.",
                0.3,
            )
        ]
    if not over:
        if sharp.lam > 0 and sharp.ratio > 1:
            return [
                Finding(
                    "lr_too_high",
                    "info",
                    None,
                    {"lr": lr0, **ev},
                    f"at the edge of stability: {advice}; training may go through a loss spike "
                    f"(catapult) and recover, or diverge; lr ≤ {rec:.3g} is safely stable.",
                    0.4,
                )
            ]
        return []
    return [
        Finding(
            "lr_too_high",
            "warning",
            None,
            {"lr": lr0, **ev},
            f"the sharpest direction of the loss has curvature {sharp.lam_text()}: at "
            f"lr={sharp.lr:g} {advice}, so that direction grows every step and training will "
            f"diverge after a few dozen steps even if the loss falls at first; lower the learning "
            f"rate to ≤ {rec:.3g} (limit/(2·λ_max)), or add BatchNorm/LayerNorm or warm-up to "
            f"flatten the loss before the full LR.",
            0.8 if sharp.ratio > 2 * SHARPNESS_MARGIN else 0.7,
        )
    ]
