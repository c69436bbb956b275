"""T8 — residual connections (He et al. 2016, "Deep Residual Learning"): a 50-layer plain
MLP with PyTorch's default init (``n * Var(W) = 1/3``) passes almost no gradient to its
first layer and barely trains; the same layers as residual blocks ``x + relu(W x)`` keep the
gradient at layer 1 and train (each branch scaled by ``1/sqrt(depth)``, as SkipInit and
Fixup do, so that 50 summed branches do not blow up the residual stream).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from ._common import Result, fit, minibatches, plot_losses, split_digits

DEPTH, WIDTH, LR, BATCH = 50, 64, 1e-3, 64


class Net(nn.Module):
    """``inp -> DEPTH x (Linear, ReLU) [as residual blocks] -> head``."""

    def __init__(self, residual: bool, depth: int = DEPTH, width: int = WIDTH) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.residual = residual
        self.scale = depth**-0.5
        self.inp = nn.Linear(64, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.head = nn.Linear(width, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        for lin in self.blocks:
            # the branch is scaled by 1/sqrt(depth) so the sum of 50 branches keeps its
            # variance (as SkipInit/Fixup do); without it the residual stream explodes
            h = h + self.scale * torch.relu(lin(h)) if self.residual else torch.relu(lin(h))
        return self.head(h)


def run(out: Path, fast: bool = False) -> Result:
    res = Result("T8", "Residual connections in a 50-layer MLP", fast)
    steps = 100 if fast else 400
    xtr, ytr, _, _ = split_digits()
    ce = nn.CrossEntropyLoss()
    traces = {}
    for residual in (False, True):
        model = Net(residual)
        opt = torch.optim.Adam(model.parameters(), lr=LR)
        traces["residual" if residual else "plain"] = fit(
            model, opt, minibatches(xtr, ytr, BATCH, 0), ce, steps
        )
    plain, resid = traces["plain"], traces["residual"]
    # layer 1 = the first of the 50 blocks (column 1; column 0 is the input projection)
    g_plain = float(plain.layer_norms[:10, 1].mean())
    g_res = float(resid.layer_norms[:10, 1].mean())
    res.figures = {
        "layer1_grad_norm_plain": g_plain,
        "layer1_grad_norm_residual": g_res,
        "final_loss_plain": plain.final_loss(),
        "final_loss_residual": resid.final_loss(),
        "config": {"depth": DEPTH, "width": WIDTH, "steps": steps, "optimizer": f"Adam lr {LR}"},
    }
    res.claim(
        "residual_keeps_gradient",
        "gradient at layer 1: residual >> plain",
        measured={"plain": g_plain, "residual": g_res},
        reference=None,
        criterion="residual / plain > 100",
        passed=g_res > 100 * g_plain,
    )
    res.claim(
        "residual_trains",
        f"loss after {steps} steps: residual << plain",
        measured={"plain": plain.final_loss(), "residual": resid.final_loss()},
        reference=None,
        criterion="residual < 0.5 x plain",
        passed=resid.final_loss() < 0.5 * plain.final_loss(),
    )
    plot_losses(traces, out, "loss.png", res, title=f"{DEPTH}-layer MLP, Adam lr {LR}")
    from ._common import pyplot, save

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    for name, tr in traces.items():
        ax.plot(range(len(tr.layers)), tr.layer_norms[:10].mean(0).numpy(), label=name)
    ax.set_yscale("log")
    ax.set_xlabel("layer (0 = input projection)")
    ax.set_ylabel("grad norm, first 10 steps")
    ax.legend(fontsize=7)
    save(fig, out, "grad_by_layer.png", res)
    return res
