"""T7 — batch normalisation (Ioffe & Szegedy 2015): a plain 10-layer ReLU network diverges
to NaN at learning rate 0.3, the same network with BatchNorm after every linear layer
trains to high accuracy. The plain network is also run under the default guard.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from ._common import (
    Result,
    accuracy,
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

LR, MOMENTUM, BATCH, DEPTH, WIDTH = 0.3, 0.9, 64, 10, 128


def run(out: Path, fast: bool = False) -> Result:
    res = Result("T7", "Batch normalisation at a high learning rate", fast)
    steps = 120 if fast else 500
    xtr, ytr, xva, yva = split_digits()
    ce = nn.CrossEntropyLoss()

    def build(bn: bool) -> tuple[nn.Module, torch.optim.Optimizer]:
        m = mlp(DEPTH, WIDTH, init="he", bn=bn)
        return m, torch.optim.SGD(m.parameters(), lr=LR, momentum=MOMENTUM)

    plain, opt = build(False)
    tr_plain = fit(plain, opt, minibatches(xtr, ytr, BATCH, 0), ce, steps)
    bn, opt = build(True)
    bn_twin = copy.deepcopy(bn)  # the same initial weights, for the guarded twin
    tr_bn = fit(bn, opt, minibatches(xtr, ytr, BATCH, 0), ce, steps)
    bn.eval()
    acc_bn = accuracy(bn, xva, yva)
    nan_at = tr_plain.first_nonfinite()
    res.figures = {
        "plain_first_nonfinite_step": nan_at,
        "plain_final_loss": tr_plain.final_loss(),
        "bn_final_loss": tr_bn.final_loss(),
        "bn_val_accuracy": acc_bn,
        "config": {"depth": DEPTH, "width": WIDTH, "lr": LR, "momentum": MOMENTUM, "steps": steps},
    }
    res.claim(
        "plain_diverges",
        "plain deep net at lr 0.3 diverges (NaN)",
        measured=nan_at,
        reference="NaN",
        criterion="loss becomes non-finite",
        passed=nan_at is not None,
    )
    res.claim(
        "bn_trains",
        "with BatchNorm it trains",
        measured=acc_bn,
        reference=0.96,
        criterion="validation accuracy > " + ("0.5" if fast else "0.85"),
        passed=tr_bn.finite and acc_bn > (0.5 if fast else 0.85),
    )
    g_model, opt = build(False)
    g_tr, desc = guarded_fit(g_model, opt, minibatches(xtr, ytr, BATCH, 0), ce, steps)
    g_model.eval()
    res.guard = guard_record(g_tr, tr_bn.final_loss(), desc, in_reach=True)
    res.guard["val_accuracy"] = accuracy(g_model, xva, yva)
    h_opt = torch.optim.SGD(bn_twin.parameters(), lr=LR, momentum=MOMENTUM)
    h_tr, _ = guarded_fit(bn_twin, h_opt, minibatches(xtr, ytr, BATCH, 0), ce, steps)
    res.guard["healthy_guarded"] = healthy_guard_record(h_tr, tr_bn)
    d_model, d_opt = build(False)
    res.guard["doctor"] = doctor_record(d_model, (xtr[:256], ytr[:256]), ce, d_opt)
    plot_losses(
        {"plain": tr_plain, "BatchNorm": tr_bn, "plain + default guard": g_tr},
        out,
        "loss.png",
        res,
        title=f"{DEPTH}x{WIDTH} ReLU, SGD lr {LR} momentum {MOMENTUM}",
    )
    return res
