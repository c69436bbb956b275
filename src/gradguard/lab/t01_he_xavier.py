"""T1 — He vs Xavier initialisation for a deep ReLU network (He et al. 2015, "Delving
Deep into Rectifiers", Sec. 2.2 and Fig. 3).

Xavier keeps ``n * Var(W) = 1``, but a ReLU halves the second moment at every layer, so in
30 layers the signal (and the gradient at layer 1) shrinks by ~2**15: the loss stays at
chance, ln(10) ≈ 2.30. He init (``n * Var(W) = 2``) compensates and the network learns.
A guard cannot fix an init problem: the guarded Xavier run is still stuck, and
``gg.doctor`` is asked to name the cause instead.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
from torch import nn

from ._common import (
    Result,
    doctor_record,
    fit,
    guard_record,
    guarded_fit,
    healthy_guard_record,
    minibatches,
    mlp,
    plot_losses,
    split_digits,
)

LR, MOMENTUM, BATCH = 0.01, 0.9, 64


def run(out: Path, fast: bool = False) -> Result:
    res = Result("T1", "He vs Xavier initialisation for a deep ReLU network", fast)
    depth, width, steps = (30, 32, 150) if fast else (30, 256, 600)
    xtr, ytr, _, _ = split_digits()
    ce = nn.CrossEntropyLoss()

    def setup(init: str) -> tuple[nn.Module, torch.optim.Optimizer]:
        model = mlp(depth, width, init=init)
        return model, torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)

    xav = fit(*setup("xavier"), minibatches(xtr, ytr, BATCH, seed=0), ce, steps)
    he_model, he_opt = setup("he")
    he_twin = copy.deepcopy(he_model)  # the same initial weights, for the guarded twin
    he = fit(he_model, he_opt, minibatches(xtr, ytr, BATCH, seed=0), ce, steps)
    x_first, x_final = float(xav.loss[:10].mean()), xav.final_loss()
    h_final = he.final_loss()
    g_x = float(xav.layer_norms[:20, 0].mean())
    g_h = float(he.layer_norms[:20, 0].mean())
    res.figures = {
        "xavier_loss_first10": x_first,
        "xavier_final_loss": x_final,
        "he_final_loss": h_final,
        "layer1_grad_norm_xavier": g_x,
        "layer1_grad_norm_he": g_h,
        "ln10": math.log(10),
        "config": {"depth": depth, "width": width, "steps": steps, "lr": LR, "momentum": MOMENTUM},
    }
    res.claim(
        "xavier_stalls",
        "Xavier: loss stays near ln(10) ≈ 2.30",
        measured=x_final,
        reference=2.279,
        criterion="final loss > 2.1",
        passed=x_final > 2.1,
    )
    res.claim(
        "he_learns",
        "He: the same network learns",
        measured=h_final,
        reference=1.06,
        criterion="final loss < Xavier's - 0.25" + ("" if fast else " and < 2.0"),
        passed=h_final < x_final - 0.25 and (fast or h_final < 2.0),
    )
    res.claim(
        "xavier_layer1_grad_vanishes",
        "Xavier: gradient at layer 1 is orders of magnitude below He's",
        measured=g_x / g_h,
        reference=None,
        criterion="ratio < 1e-2",
        passed=g_x / g_h < 1e-2,
    )
    g_tr, desc = guarded_fit(*setup("xavier"), minibatches(xtr, ytr, BATCH, seed=0), ce, steps)
    res.guard = guard_record(g_tr, h_final, desc, in_reach=False)
    h_opt = torch.optim.SGD(he_twin.parameters(), lr=LR, momentum=MOMENTUM)
    h_tr, _ = guarded_fit(he_twin, h_opt, minibatches(xtr, ytr, BATCH, seed=0), ce, steps)
    res.guard["healthy_guarded"] = healthy_guard_record(h_tr, he)
    res.guard["doctor"] = doctor_record(
        mlp(depth, width, init="xavier"), (xtr[:256], ytr[:256]), ce
    )
    res.notes.append(
        "Not in reach of a guard: clipping and skipping cannot create signal that the init "
        "removed. The remedy is He init (gg.doctor should name init_too_small)."
    )
    plot_losses(
        {"Xavier": xav, "He": he, "Xavier + default guard": g_tr},
        out,
        "loss.png",
        res,
        title=f"{depth}x{width} ReLU on digits, SGD lr {LR}",
    )
    return res
