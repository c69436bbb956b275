"""Probe: the learning rate, two ways.

1. **Steps** (every optimizer): a few optimizer steps on one batch at the user's LR (on the
   model itself, undone afterwards: :mod:`._steps`), and, once the loss rises, at LR/10,
   LR/100 ... while the time budget lasts: a loss that rises (or blows up) at LR while it
   falls at a smaller LR means the LR is too high. This catches fast blow-ups, and is the
   only test for adaptive optimizers (Adam & co.), whose stability limit depends on a
   preconditioner that does not exist before training (see :func:`probe_lr`).
2. **Curvature** (SGD, with or without momentum; :mod:`.sharpness`): ``η·λ_max`` against
   the stability limit. This catches slow divergence that takes tens of steps to show in
   the loss.

Before the first step a scheduler has already set each param group's LR to where its
schedule starts: a warm-up's first LR, a one-cycle schedule's ``max_lr / 25``. The run's
trouble comes at the peak it plans, so both probes run there (a torch scheduler's
``initial_lr``, a one-cycle's ``max_lr``; the groups' LRs are put back afterwards) and the
finding says so: a digits MLP at 20x its LR behind a 100-step ``LambdaLR`` warm-up was
"healthy" at the warm-up's 0.01, and fails at its peak of 1.0 with or without the warm-up.
With optimizer state (training under way) the LR the optimizer has is the one probed.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable, Iterator
from typing import Any, Concatenate, ParamSpec

import torch
from torch import Tensor, nn

from .._tensors import planned_lr
from ._budget import Budget
from ._capture import is_norm
from ._report import Finding
from ._steps import LR_BLOWUP, MIN_STEPS, FirstStep, StepRunner
from .sharpness import SHARPNESS_MARGIN, SHARPNESS_PASSES, Sharpness, sharpness

P = ParamSpec("P")
LR_PROBE_STEPS = 4
#: The step probe's closing advice (replaced when the LR probed is a schedule's peak)
WARM_UP_TOO = "(or add warm-up and gradient clipping, gg.NormClip(1.0))"
#: the loss after the probe steps above (1 + LR_RISE) x the initial loss counts as rising
LR_RISE = 0.05
#: LR multipliers tried, in order, once the loss rises at the user's LR
LR_SCALES: tuple[float, ...] = (0.1, 0.01, 0.001)
#: Steps more at the user's LR for SGD (with or without momentum) whose loss fell over the
#: first ones: its curvature grows as it trains (progressive sharpening, Cohen et al. 2021)
#: and an LR too high blows the loss up only once it is past ``2/lr``. Found as a stranger:
#: a digits GELU MLP on SGD Nesterov at 20x its LR has lr x lambda_max at 0.3x its stable
#: limit at init, 1.5x after 4 steps and 4.8x after 6; on one batch its loss falls from 2.31
#: to 0.71 in 6 steps and reaches 538 at step 9 (at 10x: 6.3 at step 12; at 5x, which
#: trains, it falls to 1.33). With 4 steps the doctor called it healthy.
SGD_MORE = 8

def _steady(run: list[float], l0: float) -> bool:
    """A smaller LR's run that the advice may name: finite, and no step's loss above the
    start (``LR_RISE``). Its end alone is no test: Adam at a tenth of an LR that blew a
    digits MLP up went 2.30, 9.19, 4.53, 3.54, 2.26 and was advised ("the loss does not
    rise at lr=0.1"); trained there, the MLP reached 55% held-out accuracy against 75% at
    1e-3 (found as a stranger)."""
    return all(math.isfinite(v) for v in run) and max(run) <= l0 * (1 + LR_RISE) + 1e-12


def _step_probe(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step_loss: Callable[[nn.Module], Tensor],
    steps: int,
    budget: Budget | None = None,
    start: FirstStep | None = None,
) -> list[Finding]:
    with StepRunner(model, optimizer) as runner:
        return _step_verdict(runner, optimizer, step_loss, steps, budget, start)


def _step_verdict(
    runner: StepRunner,
    optimizer: torch.optim.Optimizer,
    step_loss: Callable[[nn.Module], Tensor],
    steps: int,
    budget: Budget | None,
    start: FirstStep | None,
) -> list[Finding]:
    lr = float(optimizer.param_groups[0]["lr"])
    afford = budget.allows if budget is not None else None

    def steps_at(scale: float, more: Callable[[list[float]], int] | None = None) -> list[float]:
        out = runner.losses(step_loss, scale, steps, more=more, start=start, afford=afford)
        if runner.stopped_early and budget is not None:
            budget.note(f"lr: {len(out) - 1} of {steps} steps at lr x {scale:g}")
        return out

    t0 = time.perf_counter()

    def catapult(losses: list[float]) -> int:
        # a loss that rose by a little may be the "catapult" of a healthy high LR (it spikes,
        # then falls below where it started; Lewkowycz et al. 2020): look as far again; an
        # SGD loss that fell may blow up once the curvature has grown (SGD_MORE)
        rose_a_little = (1 + LR_RISE) * losses[0] < losses[-1] < LR_BLOWUP * losses[0]
        sgd_fell = isinstance(optimizer, torch.optim.SGD) and losses[-1] < losses[0]
        extra = steps if rose_a_little else SGD_MORE if sgd_fell else 0
        spent = time.perf_counter() - t0
        return extra if extra and (budget is None or budget.allows(spent * extra / steps)) else 0

    hi = steps_at(1.0, catapult)
    run_cost = (time.perf_counter() - t0) * steps / max(1, len(hi) - 1)
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
        # after a mild rise the first smaller LR is what tells a too-high LR from a loss that
        # rises anyway: it runs if the budget has room for its shortest form; after a blow-up
        # the smaller LRs only refine the advice
        need = run_cost * (MIN_STEPS / steps if not (tried or blew) else 1.0)
        if budget is not None and not budget.allows(need):
            budget.note(f"lr: the loss rose at lr; stopped before lr x {scale:g}")
            break
        tried[scale] = steps_at(scale)
        if _steady(tried[scale], l0):
            stable = scale
            break
    lo = tried.get(LR_SCALES[0])
    if lo is None and not blew:
        # a mild rise not compared with a smaller LR is no verdict; when the time budget
        # stopped the comparison, say what was seen (found by a stranger: a ViT at AdamW
        # 100x its LR was "healthy: no finding" under the default budget, word for word as
        # its twin; with budget_s=60 its loss went from 2.33 to 31.5)
        if budget is None or not any("stopped before" in c for c in budget.cut):
            return []
        return [Finding(
            "lr_too_high", "info", None,
            {"lr": lr, "loss_start": l0, "loss_max_at_lr": max(hi), "steps_run_at_lr": len(hi) - 1,
             "compared": False},
            f"in {len(hi) - 1} step(s) on one batch the loss rose from {l0:.4g} to "
            f"{max(hi):.4g} at lr={lr:g}; the time budget ran out before the same at "
            f"lr={lr * LR_SCALES[0]:g} could tell an LR too high from a loss that rises anyway: "
            "rerun with a larger budget (gg.doctor(..., budget_s=60), gradguard doctor "
            "--budget 60) to judge it",
            0.3)]
    lo_end = lo[-1] if lo is not None else math.nan
    ev: dict[str, Any] = {
        "lr": lr,
        "loss_start": l0,
        "loss_end_at_lr": hi_end,
        "loss_end_at_lr_div_10": lo_end,
        "losses_at_lr": hi,
        "losses_at_lr_div_10": lo or [],
        "steps": steps,
        "steps_run_at_lr": len(hi) - 1,
        "stable_lr": lr * stable if stable is not None else None,
    }
    lo_ok = math.isfinite(lo_end) and lo_end < hi_end
    if not (blew or (rose and lo_ok)):
        return []
    if not math.isfinite(hi_end) and stable is None and (zero := _eps_zero(optimizer)):
        return [zero]  # no LR helps: the optimizer's eps is 0 in the weights' dtype
    how = "to NaN/Inf" if not math.isfinite(hi_end) else f"from {l0:.4g} to {max(hi):.4g}"
    n = len(hi) - 1
    if stable is not None:
        advice = (
            f"the loss does not rise at lr={lr * stable:g}: lower the learning rate to "
            f"≤ {lr * stable:g}"
        )
    elif tried:
        low = min(tried)
        advice = (
            f"it still rises at lr={lr * low:g}: lower the learning rate by more than "
            f"{1 / low:g}x, and look for a root cause (input scale, init)"
        )
    else:
        advice = "lower the learning rate 10x at a time until the loss falls"
    return [
        Finding(
            "lr_too_high",
            "error" if blew else "warning",
            None,
            ev,
            f"in {n} step{'s' if n != 1 else ''} on one batch the loss rises {how} at lr={lr:g}; "
            f"{advice} {WARM_UP_TOO}.",
            0.9 if (blew and lo_ok) or stable is not None else 0.75 if lo_ok else 0.55,
        )
    ]


def _eps_zero(optimizer: torch.optim.Optimizer) -> Finding | None:
    """A param group whose ``eps`` rounds to 0 in the dtype of its (half precision)
    parameters: Adam's, RMSprop's, Adagrad's update divides by ``sqrt(v) + eps``, and an
    element whose gradient is 0 (an embedding row the batch does not use, a dead unit) gets
    0/0 = NaN at the first step, whatever the LR (float16's smallest value is 6e-8; Adam's
    default eps is 1e-8). The finding, or None when no group is so."""
    for i, g in enumerate(optimizer.param_groups):
        eps = g.get("eps")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps <= 0:
            continue
        for p in g["params"]:
            if p.dtype in (torch.float16, torch.bfloat16) and float(torch.tensor(eps, dtype=p.dtype)) == 0.0:
                n = sum(q.numel() for q in g["params"] if q.dtype == p.dtype)
                dtype = str(p.dtype).replace("torch.", "")
                return Finding(
                    "half_precision_overflow", "error", None,
                    {"optimizer": type(optimizer).__name__, "param_group": i, "eps": eps,
                     "dtype": dtype, "params": n},
                    f"{type(optimizer).__name__}'s eps={eps:g} (param group {i}) is 0 in "
                    f"{dtype}, the dtype of its weights: an element whose gradient is 0 gets "
                    "0/0 = NaN at the first step, and the loss goes NaN at every LR tried; "
                    "keep float32 weights and train under torch.autocast, or use eps=1e-4",
                    0.9)
    return None


@contextlib.contextmanager
def at_schedule_peak(optimizer: torch.optim.Optimizer) -> Iterator[list[Any] | None]:
    """Before the optimizer's first step (no state), set each param group with a numeric LR
    below its schedule's planned peak (``initial_lr``, ``max_lr``) to that peak, and put the
    LRs back on exit; yields the LRs they had, or None when none was moved (see the module
    docstring)."""
    moved: list[tuple[dict[str, Any], float, float]] = []
    if not any(optimizer.state.values()):
        for g in optimizer.param_groups:
            lr = g.get("lr")
            if isinstance(lr, bool) or not isinstance(lr, (int, float)):
                continue  # a tensor LR (capturable) is left as it is
            peak = planned_lr(g)
            if peak is not None and peak > lr * (1 + 1e-9):
                moved.append((g, float(lr), peak))
    if not moved:
        yield None
        return
    before = [g.get("lr") for g in optimizer.param_groups]
    try:
        for g, _, peak in moved:
            g["lr"] = peak
        yield before
    finally:
        for g, lr, _ in moved:
            g["lr"] = lr


Probe = Callable[Concatenate[nn.Module, torch.optim.Optimizer, P], list[Finding]]


def _at_the_peak(probe: Probe[P]) -> Probe[P]:
    """Run ``probe`` at the LR the schedule plans to reach (:func:`at_schedule_peak`), and
    have its findings say so."""
    @functools.wraps(probe)
    def run(model: nn.Module, optimizer: torch.optim.Optimizer, /, *args: P.args,
            **kwargs: P.kwargs) -> list[Finding]:
        with at_schedule_peak(optimizer) as before:
            found = probe(model, optimizer, *args, **kwargs)
        if before is not None:
            now = ", ".join(f"{lr:g}" for lr in dict.fromkeys(before)
                            if isinstance(lr, (int, float)))
            for f in found:
                f.evidence["lr_now"] = before[0]
                f.evidence["at_schedule_peak"] = True
                remedy = f.remedy.replace(WARM_UP_TOO, "(or add gradient clipping, "
                                          "gg.NormClip(1.0): a warm-up reaches the same peak)")
                f.remedy = (f"Measured at the peak your schedule plans (lr={f.evidence['lr']:g}; "
                            f"its first steps run at {now}): {remedy}")
        return found
    return run


@_at_the_peak
def probe_lr(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step_loss: Callable[[nn.Module], Tensor],
    *,
    steps: int = LR_PROBE_STEPS,
    budget: Budget | None = None,
    curvature_loss: Callable[[nn.Module], Tensor] | None = None,
    start: FirstStep | None = None,
    pass_s: float = 0.0,
) -> list[Finding]:
    """``lr_too_high`` from the step probe, the curvature rule (SGD), or both, at the LR the
    schedule plans to reach (:func:`at_schedule_peak`).

    The step probe's finding, when there is one, carries the curvature evidence too. The
    curvature rule alone gives a warning when ``η·λ_max > SHARPNESS_MARGIN x limit``: the loss
    may still fall for the first steps, but the sharpest direction grows by a factor
    ``|1 - η·λ_max| > 1`` each step (with momentum, faster) until training diverges.

    Adaptive optimizers (Adam, AdamW, RMSprop, ...) get the step probe only: their limit is on
    the *preconditioned* sharpness (38/η for Adam with β1 = 0.9, Cohen et al. 2022), and the
    preconditioner ``sqrt(v)`` is not known before training -- after one step it is ``|g|``,
    which makes the estimate meaningless.

    ``budget`` bounds the optional work (smaller LRs, power iterations); ``curvature_loss``
    (default ``step_loss``) is the loss the curvature is measured on, e.g. on a sub-batch;
    ``start``: the loss and gradients at the current state under seed 0, which spare the
    first run its first forward/backward pass; ``pass_s``: what one
    forward/backward pass costs, so that the curvature (a few passes per product) starts only
    when the budget has room for it.
    """
    found = _step_probe(model, optimizer, step_loss, steps, budget, start)
    sharp: Sharpness | None = None
    if isinstance(optimizer, torch.optim.SGD):
        if budget is not None and not budget.allows(SHARPNESS_PASSES * pass_s):
            budget.note("sharpness: not run")
        else:
            torch.manual_seed(0)
            sharp = sharpness(model, optimizer, curvature_loss or step_loss, budget=budget)
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
        if not over:  # the curvature at the start is within its limit; the steps found the
            # LR too high as the curvature grew (progressive sharpening): its LR bounds are
            # no advice (an SGD MLP at lr 3 whose loss blew up had "recommended_lr" 4.78)
            ev = {k: v for k, v in ev.items() if k not in ("max_stable_lr", "recommended_lr")}
            if f.evidence.get("stable_lr") is not None:
                ev["recommended_lr"] = f.evidence["stable_lr"]
        f.evidence.update(ev)
        if over:
            f.remedy = f"{f.remedy[:-1]}; {advice} (lr ≤ {ev['recommended_lr']:.3g} ≈ limit/(2·λ_max))."
            f.confidence = max(f.confidence, 0.9)
        return found
    rec = ev["recommended_lr"]
    norms = sorted({type(mod).__name__ for mod in model.modules() if is_norm(mod)})
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
