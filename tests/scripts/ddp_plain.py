"""A plain DDP loop (nothing gradguard-specific in it): gloo on CPU, its own clip, a NaN in
rank 1's batch at ``--nan-at``, and ``destroy_process_group`` at the end, as scripts do.

    torchrun --nproc-per-node 2 tests/scripts/ddp_plain.py
    torchrun --nproc-per-node 2 -m gradguard run tests/scripts/ddp_plain.py --nan-at 3
"""

import argparse

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--nan-at", type=int, default=-1)
    ap.add_argument("--raise-at", type=int, default=-1, help="rank 1 raises at this step")
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = DistributedDataParallel(nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1)))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(args.steps):
        x = torch.randn(8, 4) + rank
        if step == args.nan_at and rank == 1:
            x[0, 0] = float("nan")
        if step == args.raise_at and rank == 1:
            raise RuntimeError(f"rank 1 fails at step {step}")
        model(x).pow(2).mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    print(f"ddp_plain: rank {rank}, weights finite: {finite}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
