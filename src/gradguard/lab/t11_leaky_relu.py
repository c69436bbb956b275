"""T11 — Leaky ReLU vs ReLU dead units (Maas et al. 2013; Lu et al. 2019, "Dying ReLU").
A short phase at a very high learning rate pushes many ReLU units to a negative
pre-activation for every input; a dead ReLU gets zero gradient and never comes back. A
Leaky ReLU unit (slope 0.1) still gets ``0.1 x`` its gradient and recovers in the normal-LR phase
that follows. "Dead" = pre-activation < 0 on every example of the data set.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ._common import Result, fit, minibatches, mlp, pyplot, save, split_digits

WIDTH, DEPTH, HIGH_LR, LOW_LR, BATCH, SLOPE = 256, 2, 1.0, 0.1, 64, 0.1


def dead_fraction(model: nn.Sequential, x: torch.Tensor) -> float:
    """Fraction of hidden units whose pre-activation is negative on every row of ``x``."""
    dead = total = 0
    h = x
    with torch.no_grad():
        for layer in model:
            h_new = layer(h)
            if isinstance(layer, nn.Linear) and layer is not model[-1]:
                dead += int((h_new < 0).all(dim=0).sum())
                total += h_new.shape[1]
            h = h_new
    return dead / total


def run(out: Path, fast: bool = False) -> Result:
    res = Result("T11", "Leaky ReLU vs ReLU: dead units after a high-LR phase", fast)
    high, low = (20, 150) if fast else (40, 400)
    xtr, ytr, _, _ = split_digits()
    ce = nn.CrossEntropyLoss()
    dead: dict[str, dict[str, float]] = {}
    def leaky() -> nn.Module:
        return nn.LeakyReLU(SLOPE)

    for name, act in (("relu", nn.ReLU), ("leaky_relu", leaky)):
        model = mlp(DEPTH, WIDTH, init="he", act=act)
        opt = torch.optim.SGD(model.parameters(), lr=HIGH_LR)
        fit(model, opt, minibatches(xtr, ytr, BATCH, 0), ce, high, stop_on_nan=False)
        after_high = dead_fraction(model, xtr)
        for grp in opt.param_groups:
            grp["lr"] = LOW_LR
        fit(model, opt, minibatches(xtr, ytr, BATCH, 1), ce, low, stop_on_nan=False)
        dead[name] = {"after_high_lr": after_high, "after_recovery": dead_fraction(model, xtr)}
    res.figures = {
        "dead_fraction": dead,
        "config": {"high_lr": HIGH_LR, "high_steps": high, "low_lr": LOW_LR, "low_steps": low},
    }
    r, lk = dead["relu"]["after_recovery"], dead["leaky_relu"]["after_recovery"]
    res.claim(
        "relu_units_die",
        "a high-LR phase leaves many ReLU units dead for good",
        measured=r,
        reference=None,
        criterion="dead fraction after recovery > 0.1",
        passed=r > 0.1,
    )
    res.claim(
        "leaky_recovers",
        "Leaky ReLU units recover",
        measured={"relu": r, "leaky_relu": lk},
        reference=None,
        criterion="leaky dead fraction < 0.5 x ReLU's",
        passed=lk < 0.5 * r,
    )
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 3))
    xs = range(2)
    ax.bar(
        [i - 0.2 for i in xs],
        [dead["relu"][k] for k in ("after_high_lr", "after_recovery")],
        0.4,
        label="ReLU",
    )
    ax.bar(
        [i + 0.2 for i in xs],
        [dead["leaky_relu"][k] for k in ("after_high_lr", "after_recovery")],
        0.4,
        label="Leaky ReLU",
    )
    ax.set_xticks(list(xs), ["after high-LR phase", "after normal-LR phase"])
    ax.set_ylabel("fraction of dead units")
    ax.legend(fontsize=7)
    save(fig, out, "dead_units.png", res)
    return res
