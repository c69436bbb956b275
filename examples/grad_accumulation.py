"""Gradient accumulation: several backward passes per optimizer step.

    gradguard run --clip autoclip examples/grad_accumulation.py --steps 10 --accum 4

gradguard acts once per optimizer step (10 here), not once per backward (40).
"""

import argparse

import torch
from torch import nn


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10, help="optimizer steps")
    ap.add_argument("--accum", type=int, default=4, help="micro-batches per step")
    args = ap.parse_args()

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    backwards = 0
    for _ in range(args.steps):
        for _ in range(args.accum):
            x = torch.randn(16, 8)
            loss = nn.functional.mse_loss(model(x), x.mean(dim=1, keepdim=True))
            (loss / args.accum).backward()
            backwards += 1
        opt.step()
        opt.zero_grad()
    print(f"grad_accumulation: {args.steps} optimizer steps, {backwards} backward passes")


if __name__ == "__main__":
    main()
