"""Two optimizers on one model (SGD for the body, Adam for the head), one backward.

    gradguard run --clip norm:1.0 examples/two_optimizers.py --steps 40
"""

import argparse

import torch
from torch import nn


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh())
        self.head = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--nan-at", type=int, default=-1)
    args = ap.parse_args()

    torch.manual_seed(0)
    net = Net()
    opt_body = torch.optim.SGD(net.body.parameters(), lr=0.05, momentum=0.9)
    opt_head = torch.optim.Adam(net.head.parameters(), lr=1e-2)
    for step in range(args.steps):
        x = torch.randn(32, 8)
        y = (x[:, :1] * x[:, 1:2]).tanh()
        if step == args.nan_at:
            x[0, 0] = float("inf")
        loss = nn.functional.mse_loss(net(x), y)
        loss.backward()
        opt_body.step()
        opt_head.step()
        opt_body.zero_grad()
        opt_head.zero_grad()
    print(f"two_optimizers: {args.steps} steps, last loss {loss.item():.4f}")


if __name__ == "__main__":
    main()
