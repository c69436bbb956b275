"""T4 — LSTM vs vanilla (tanh) RNN on the adding problem (Hochreiter & Schmidhuber 1997;
Le et al. 2015, Fig. 2). The two marked values sit up to T steps before the answer; the
RNN's gradient to them vanishes and it stays at the trivial MSE ≈ 0.167 (predict 1.0),
the LSTM's additive cell state carries it and the LSTM learns.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from ._common import Result, adding_batch, fit, plot_losses

HIDDEN, BATCH, LR = 64, 64, 1e-2
TRIVIAL_MSE = 1.0 / 6.0


class Seq(nn.Module):
    def __init__(self, cell: str, hidden: int = HIDDEN) -> None:
        super().__init__()
        torch.manual_seed(0)
        rnn_cls = nn.LSTM if cell == "lstm" else nn.RNN
        self.rnn = rnn_cls(2, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def run(out: Path, fast: bool = False) -> Result:
    res = Result("T4", "LSTM vs vanilla RNN on the adding problem", fast)
    length, steps = (20, 400) if fast else (100, 1500)
    mse = nn.MSELoss()
    traces = {}
    for cell in ("lstm", "rnn"):
        g = torch.Generator().manual_seed(0)
        model = Seq(cell)
        opt = torch.optim.Adam(model.parameters(), lr=LR)

        def data(step: int, g: torch.Generator = g) -> tuple[Tensor, Tensor]:
            return adding_batch(BATCH, length, g)

        traces[cell] = fit(model, opt, data, mse, steps)
    lstm, rnn = traces["lstm"].final_loss(50), traces["rnn"].final_loss(50)
    res.figures = {
        "lstm_final_mse": lstm,
        "rnn_final_mse": rnn,
        "trivial_mse": TRIVIAL_MSE,
        "config": {"T": length, "hidden": HIDDEN, "steps": steps, "optimizer": f"Adam lr {LR}"},
    }
    res.claim(
        "lstm_learns",
        "the LSTM learns the adding problem",
        measured=lstm,
        reference=3e-4,
        criterion="final MSE < " + ("0.5 x RNN's" if fast else "0.01"),
        passed=lstm < (0.5 * rnn if fast else 0.01),
    )
    res.claim(
        "rnn_stays_trivial",
        "the vanilla RNN stays near the trivial MSE ≈ 0.167",
        measured=rnn,
        reference=0.16,
        criterion="final MSE > " + ("0.05" if fast else "0.1"),
        passed=rnn > (0.05 if fast else 0.1),
    )
    if fast:
        res.notes.append("fast mode uses T=20 and 400 steps; the reference figures are for T=100")
    plot_losses(
        {"LSTM": traces["lstm"], "tanh RNN": traces["rnn"]},
        out,
        "loss.png",
        res,
        title=f"adding problem T={length}, Adam lr {LR}",
        k=25,
    )
    return res
