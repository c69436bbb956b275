"""T3 — an IRNN (Le, Jaitly & Hinton 2015: ReLU recurrence initialised to the identity) on
the adding problem with T = 100. Without clipping the gradient norm explodes (Pascanu,
Mikolov & Bengio 2013); with norm clipping at 1.0 the loss stays finite. The unclipped
configuration is also run under gradguard's default guard.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from ..clipping import NormClip
from ._common import Result, adding_batch, fit, guard_record, guarded_fit, plot_losses

HIDDEN, BATCH, LR = 64, 32, 0.01


class IRNN(nn.Module):
    def __init__(self, hidden: int = HIDDEN, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.rnn = nn.RNN(2, hidden, nonlinearity="relu", batch_first=True)
        for name, p in self.rnn.named_parameters():
            if name.startswith("weight_hh"):
                nn.init.eye_(p)  # the IRNN: identity recurrence
            elif name.startswith("weight_ih"):
                nn.init.normal_(p, 0.0, 0.001)
            else:
                nn.init.zeros_(p)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def run(out: Path, fast: bool = False) -> Result:
    res = Result("T3", "IRNN on the adding problem: explosion and norm clipping", fast)
    length, steps = (50, 40) if fast else (100, 300)
    mse = nn.MSELoss()

    def data(seed: int):  # type: ignore[no-untyped-def]
        g = torch.Generator().manual_seed(seed)
        return lambda step: adding_batch(BATCH, length, g)

    def make() -> tuple[nn.Module, torch.optim.Optimizer]:
        m = IRNN()
        return m, torch.optim.SGD(m.parameters(), lr=LR)

    m, opt = make()
    raw = fit(m, opt, data(0), mse, steps)
    m, opt = make()
    clipped = fit(m, opt, data(0), mse, steps, clip=NormClip(1.0))
    m, opt = make()
    guarded, desc = guarded_fit(m, opt, data(0), mse, steps)
    raw_max = raw.max_grad_norm()
    res.figures = {
        "unclipped_max_grad_norm": raw_max,
        "unclipped_first_nonfinite_step": raw.first_nonfinite(),
        "clipped_final_mse": clipped.final_loss(),
        "clipped_max_grad_norm": clipped.max_grad_norm(),
        "config": {"T": length, "hidden": HIDDEN, "steps": steps, "optimizer": f"SGD lr {LR}"},
    }
    res.claim(
        "unclipped_explodes",
        "without clipping the gradient norm explodes",
        measured=raw_max,
        reference=5.7e9,
        criterion="max grad norm > 1e4 (or non-finite)",
        passed=not (raw_max <= 1e4),
    )
    res.claim(
        "clipped_finite",
        "with norm clipping (1.0) the loss stays finite",
        measured=clipped.final_loss(),
        reference=0.162,
        criterion="finite and final MSE < 0.5",
        passed=clipped.finite and clipped.final_loss() < 0.5,
    )
    res.guard = guard_record(guarded, clipped.final_loss(), desc, in_reach=True)
    plot_losses(
        {"unclipped": raw, "NormClip(1.0)": clipped, "default guard": guarded},
        out,
        "loss.png",
        res,
        title=f"IRNN, adding problem T={length}, SGD lr {LR}",
    )
    from ._common import pyplot, save

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    for name, tr in (("unclipped", raw), ("NormClip(1.0)", clipped), ("default guard", guarded)):
        ax.plot(tr.grad_norm.numpy(), label=name)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("pre-clip grad norm (telemetry)")
    ax.legend(fontsize=7)
    save(fig, out, "grad_norm.png", res)
    return res
