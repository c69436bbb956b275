"""T5 — gradient spikes. A 4 x 256 ReLU MLP fits a smooth synthetic regression with Adam
(lr 1e-3, 600 steps); at steps 150, 300 and 450 the gradient is multiplied by 1000 (a bad
batch, a numerical glitch). Adam's second moment ``v`` grows by ~1e6 on such a step and,
with beta2 = 0.999, takes thousands of steps to decay: the effective step size collapses
and learning stalls. Compared: no protection, a fixed norm clip at 1.0, AutoClip
(Seetharaman et al. 2020), ZClip (Kumar et al. 2025), and skipping the spiking step; plus
how many steps each one intervenes on (how often a fixed clip fires depends on the task's
gradient scale; ZClip adapts its threshold and fires around the spikes).

The task and model are the calibration setup of ``benchmarks/quality.py``
(:func:`gradguard.lab.calibration.calibration_task` / :func:`~gradguard.lab.calibration.calibration_model`),
so the clean / unprotected / guarded figures here match ``quality.json``'s.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..clipping import AutoClip, NormClip, ZClip
from ..telemetry import StepStats
from ..testing import SPIKE_FACTOR, scale_grads_
from ._common import (
    Result,
    Trace,
    fit,
    guard_record,
    guarded_fit,
    healthy_guard_record,
    plot_losses,
)
from .calibration import CALIBRATION_SPIKES, calibration_model, calibration_task

SPIKE_STEPS, SPIKE_SCALE = CALIBRATION_SPIKES, SPIKE_FACTOR
DEPTH, WIDTH, LR = 4, 256, 1e-3
#: Fast mode (the test suite): fewer steps and a narrower MLP, same claims.
FAST_STEPS, FAST_WIDTH, FAST_SPIKES = 400, 64, (100, 200, 300)


class SkipSpikes(ZClip):
    """ZClip's spike detector, but the spiking step is skipped instead of clipped: the
    gradients are made non-finite, so the guard (``on_nonfinite="skip"``) leaves the
    parameters and the optimizer state untouched."""

    def apply_(self, stats: StepStats) -> Tensor:
        coef = super().apply_(stats)
        skip = torch.where(coef < 1.0, torch.full_like(coef, math.nan), torch.ones_like(coef))
        for grp in stats.groups:
            torch._foreach_mul_(grp.grads, skip)
        stats.finite = stats.finite & (coef >= 1.0)
        return coef


def run(out: Path, fast: bool = False) -> Result:
    res = Result("T5", "Gradient spikes: unprotected vs fixed clip, AutoClip, ZClip, skip", fast)
    steps, width = (FAST_STEPS, FAST_WIDTH) if fast else (600, WIDTH)
    spikes = FAST_SPIKES if fast else SPIKE_STEPS
    task = calibration_task(steps=steps)
    mse = nn.MSELoss()
    batches = task.batch

    def spike(step: int, model: nn.Module) -> None:
        if step in spikes:
            scale_grads_(model, SPIKE_SCALE)

    arms: dict[str, dict[str, Any]] = {
        "clean": {"hook": None},
        "unprotected": {"hook": spike},
        "fixed clip 1.0": {"hook": spike, "clip": NormClip(1.0)},
        "AutoClip": {"hook": spike, "clip": AutoClip()},
        "ZClip": {"hook": spike, "clip": ZClip()},
        "skip": {"hook": spike, "clip": SkipSpikes(), "on_nonfinite": "skip"},
    }
    traces: dict[str, Trace] = {}
    full: dict[str, float] = {}  # MSE on the whole data set after the last step
    clean_twin: torch.nn.Module | None = None  # the clean run's initial weights
    for name, arm in arms.items():
        model = calibration_model(width=width, depth=DEPTH)
        if name == "clean":
            clean_twin = copy.deepcopy(model)
        opt = torch.optim.Adam(model.parameters(), lr=LR)
        traces[name] = fit(
            model,
            opt,
            batches,
            mse,
            steps,
            clip=arm.get("clip"),
            on_nonfinite=arm.get("on_nonfinite", "off"),
            grad_hook=arm["hook"],
        )
        full[name] = task.full_loss(model)
    final = {k: t.final_loss() for k, t in traces.items()}
    inter = {k: t.interventions for k, t in traces.items() if k not in ("clean", "unprotected")}
    res.figures = {
        "final_loss": final,
        "full_data_mse": full,
        "interventions": inter,
        "steps": steps,
        "spike_steps": list(spikes),
    }
    clean, bad = final["clean"], final["unprotected"]
    res.claim(
        "spikes_hurt",
        "unprotected: the spikes ruin the run",
        measured={"unprotected": bad, "clean": clean},
        reference={"unprotected": 0.71, "clean": 0.001},
        criterion="unprotected final loss > 3 x clean",
        passed=not (bad <= 3 * clean),
    )
    for name in ("ZClip", "skip"):
        res.claim(
            f"{name.lower()}_protects",
            f"{name} keeps the run close to clean",
            measured=final[name],
            reference=None,
            criterion="finite and < 3 x clean",
            passed=traces[name].finite and final[name] < 3 * clean,
        )
    z_at_spikes = [bool(traces["ZClip"].clip_coef[s] < 1.0) for s in spikes]
    res.figures["zclip_clipped_each_spike"] = z_at_spikes
    res.claim(
        "zclip_intervenes_rarely",
        "ZClip intervenes on a few steps, every spike among them",
        measured={"ZClip": inter["ZClip"], "of": steps, "spikes_clipped": sum(z_at_spikes)},
        reference={"ZClip": 27, "of": 600},
        criterion="ZClip < 10 % of steps and it clips at every spike step",
        passed=inter["ZClip"] < 0.1 * steps and all(z_at_spikes),
    )
    fixed = inter["fixed clip 1.0"]
    # not a claim: on this task it does not reproduce (see the note), and is reported as such
    res.figures["fixed_clip_vs_reference"] = {"measured": fixed, "reference": 464, "of": steps}
    if fixed <= 0.5 * steps:
        res.notes.append(
            f"Not reproduced: a fixed clip at 1.0 intervened on {fixed}/{steps} steps "
            "(reference 464/600). On this task the healthy gradient norm exceeds 1.0 only on "
            "some steps of the fast-descent phase and stays below it once the loss is small, "
            "so a fixed threshold of 1.0 fires there and at the spikes: how often a fixed clip "
            "fires depends on the task's gradient scale (the reason ZClip adapts its threshold)."
        )
    model = calibration_model(width=width, depth=DEPTH)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    g_tr, desc = guarded_fit(model, opt, batches, mse, steps, grad_hook=spike)
    res.guard = guard_record(g_tr, clean, desc, in_reach=True)
    res.figures["full_data_mse"]["guarded"] = task.full_loss(model)
    assert clean_twin is not None
    h_opt = torch.optim.Adam(clean_twin.parameters(), lr=LR)
    h_tr, _ = guarded_fit(clean_twin, h_opt, batches, mse, steps)
    res.guard["healthy_guarded"] = healthy_guard_record(h_tr, traces["clean"])
    plot_losses(
        traces, out, "loss.png", res, title="4-layer MLP + Adam, gradient x1000 at " + str(spikes)
    )
    return res
