"""T9 — L2 regularisation and weight growth (Krogh & Hertz 1992). On separable data the
cross-entropy keeps rewarding larger logits, so without L2 the weights grow for the whole
run; weight decay holds them at an equilibrium. Weight norms are gradguard's telemetry
samples (taken at every flush).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ._common import Result, fit, minibatches, mlp, pyplot, save, split_digits

LR, WD, BATCH, WIDTH = 0.1, 5e-3, 64, 128


def run(out: Path, fast: bool = False) -> Result:
    res = Result("T9", "L2 regularisation and weight growth", fast)
    steps = 200 if fast else 1000
    xtr, ytr, _, _ = split_digits()
    ce = nn.CrossEntropyLoss()
    curves: dict[str, list[tuple[int, float]]] = {}
    for wd in (0.0, WD):
        model = mlp(1, WIDTH)
        w0 = float(torch.stack([p.detach().norm() for p in model.parameters()]).norm())
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=wd)
        tr = fit(model, opt, minibatches(xtr, ytr, BATCH, 0), ce, steps, every=25)
        curves["L2" if wd else "no L2"] = [(0, w0)] + [
            (s + 1, float(w.pow(2).sum().sqrt())) for s, w in tr.weight_norms
        ]
    no, l2 = curves["no L2"], curves["L2"]
    growth_no = no[-1][1] / no[0][1]
    growth_l2 = l2[-1][1] / l2[0][1]
    half = len(no) // 2
    res.figures = {
        "weight_norm_final": {"no_l2": no[-1][1], "l2": l2[-1][1]},
        "weight_norm_growth": {"no_l2": growth_no, "l2": growth_l2},
        "weight_norm_curve": {k: [v for _, v in c] for k, c in curves.items()},
        "config": {"steps": steps, "lr": LR, "weight_decay": WD},
    }
    res.claim(
        "no_l2_keeps_growing",
        "without L2 the weight norm keeps growing",
        measured=growth_no,
        reference=None,
        criterion="final > initial x 1.2 and still rising in the second half",
        passed=growth_no > 1.2 and no[-1][1] > no[half][1],
    )
    res.claim(
        "l2_bounds_weights",
        "with L2 the weights stay smaller",
        measured={"no_l2": no[-1][1], "l2": l2[-1][1]},
        reference=None,
        criterion="no-L2 final norm > 1.2 x L2 final norm",
        passed=no[-1][1] > 1.2 * l2[-1][1],
    )
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for k, c in curves.items():
        ax.plot([s for s, _ in c], [v for _, v in c], marker=".", label=k)
    ax.set_xlabel("step")
    ax.set_ylabel("weight norm (telemetry)")
    ax.legend(fontsize=7)
    save(fig, out, "weight_norm.png", res)
    return res
