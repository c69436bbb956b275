"""Guarded DDP training on CPU (gloo).

    torchrun --nproc_per_node=2 examples/ddp_train.py [--steps 60] [--run-dir runs/ddp]

Each rank trains on its half of a synthetic batch. Rank 1 gets a batch with a NaN at step
20: DDP averages the NaN into every rank's gradients, so every rank's guard sees a
non-finite global norm and skips the same step, with no extra collective. Rank 0 writes
``events.jsonl`` / ``metrics.jsonl``; the event names rank 1.
"""

from __future__ import annotations

import argparse
import math
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import gradguard as gg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--run-dir", default="runs/ddp")
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(0)  # the same initial weights on every rank
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    ddp = DistributedDataParallel(model)
    opt = torch.optim.AdamW(ddp.parameters(), lr=3e-3)
    data = torch.Generator().manual_seed(1234 + rank)  # each rank its own data

    # every rank builds the guard; only rank 0 writes to the sinks (sink_rank=0)
    with gg.Guard(
        ddp, opt, clip=gg.ZClip(), recovery=gg.Recovery(), every=10,
        sinks=[gg.JsonlSink(args.run_dir)],
    ) as guard:
        for step in range(args.steps):
            x = torch.randn(32, 16, generator=data)
            y = x[:, :4].sum(dim=1, keepdim=True).sin()
            if step == 20 and rank == 1:
                x[0, 0] = math.nan  # a corrupt sample on rank 1 only
            loss = nn.functional.mse_loss(ddp(x), y)
            loss.backward()
            guard.step(loss)
            opt.zero_grad()

    if rank == 0:
        print(f"world={world} steps={guard.step_count} skipped={guard.skipped_steps}")
        for e in guard.events:
            print(f"  [{e.severity}] {e.message} (rank={e.rank})")
        print(f"events and metrics in {os.path.abspath(args.run_dir)}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
