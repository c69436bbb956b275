"""A plain PyTorch training loop (nothing gradguard-specific in it).

    python examples/plain_loop.py --steps 60
    gradguard run --clip zclip examples/plain_loop.py --steps 60 --nan-at 20

``--nan-at STEP`` corrupts one input batch with a NaN (a fault to see gradguard skip).
"""

import argparse

import torch
from torch import nn


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--nan-at", type=int, default=-1, help="corrupt the batch of this step")
    args = ap.parse_args()

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    for step in range(args.steps):
        x = torch.randn(32, 8)
        y = x.sum(dim=1, keepdim=True).sin()
        if step == args.nan_at:
            x[0, 0] = float("nan")
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    print(f"plain_loop: {args.steps} steps, parameters finite: {finite}")


if __name__ == "__main__":
    main()
