"""T10 — early stopping on the validation loss (Prechelt 1998). A wide MLP trained on 200
digits with 30 % noisy labels fits the noise: the training loss keeps falling while the
validation loss reaches a minimum and rises. Stopping at the validation minimum (patience
rule) keeps a better model than training to the end.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from ._common import Result, fit, minibatches, mlp, pyplot, save, split_digits

LR, BATCH, WIDTH, N_TRAIN, NOISE, PATIENCE_EVALS = 1e-3, 32, 512, 200, 0.3, 5


def run(out: Path, fast: bool = False) -> Result:
    res = Result("T10", "Early stopping on the validation loss", fast)
    steps, every = (300, 10) if fast else (1500, 25)
    xtr, ytr, xva, yva = split_digits()
    xtr, ytr = xtr[:N_TRAIN], ytr[:N_TRAIN].clone()
    g = torch.Generator().manual_seed(7)
    noisy = torch.rand(N_TRAIN, generator=g) < NOISE
    ytr[noisy] = torch.randint(0, 10, (int(noisy.sum()),), generator=g)
    model = mlp(2, WIDTH, init="he")
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    ce = nn.CrossEntropyLoss()
    val: list[tuple[int, float]] = []
    batches = minibatches(xtr, ytr, BATCH, 0)

    def batch_fn(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if step % every == 0:  # a validation pass (off the training hot path)
            with torch.no_grad():
                val.append((step, float(ce(model(xva), yva))))
        return batches(step)

    tr = fit(model, opt, batch_fn, ce, steps)
    best_i = min(range(len(val)), key=lambda i: val[i][1])
    # the patience rule: stop after PATIENCE_EVALS evaluations without improvement
    stop_i, best_so_far, best_at, wait = len(val) - 1, math.inf, 0, 0
    for i, (_, v) in enumerate(val):
        if v < best_so_far:
            best_so_far, best_at, wait = v, i, 0
        else:
            wait += 1
            if wait >= PATIENCE_EVALS:
                stop_i = i
                break
    final_val = val[-1][1]
    train_first, train_final = float(tr.loss[:every].mean()), tr.final_loss()
    res.figures = {
        "best_val_step": val[best_i][0],
        "best_val_loss": val[best_i][1],
        "final_val_loss": final_val,
        "early_stop_step": val[stop_i][0],
        "early_stop_kept_val_loss": val[best_at][1],
        "train_loss_first_final": [train_first, train_final],
        "config": {
            "steps": steps,
            "n_train": N_TRAIN,
            "label_noise": NOISE,
            "patience": PATIENCE_EVALS,
        },
    }
    res.claim(
        "val_u_shape",
        "validation loss has a minimum well before the end",
        measured={"best_step": val[best_i][0], "best": val[best_i][1], "final": final_val},
        reference=None,
        criterion="best step < 60 % of the run and final > 1.2 x best",
        passed=val[best_i][0] < 0.6 * steps and final_val > 1.2 * val[best_i][1],
    )
    res.claim(
        "train_keeps_falling",
        "the training loss keeps falling meanwhile",
        measured=[train_first, train_final],
        reference=None,
        criterion="final train loss < 0.5 x first",
        passed=train_final < 0.5 * train_first,
    )
    res.claim(
        "early_stopping_helps",
        "the patience rule stops early and keeps a better model",
        measured={"stop_step": val[stop_i][0], "kept": val[best_at][1], "end": final_val},
        reference=None,
        criterion="stops before the end and kept val loss < final",
        passed=stop_i < len(val) - 1 and val[best_at][1] < final_val,
    )
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.plot(tr.loss.numpy(), alpha=0.4, label="train (telemetry)")
    ax.plot([s for s, _ in val], [v for _, v in val], marker=".", label="validation")
    ax.axvline(val[stop_i][0], color="k", ls="--", lw=0.8, label="early stop")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=7)
    save(fig, out, "loss.png", res)
    return res
