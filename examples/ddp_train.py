"""Guarded DDP training on CPU (gloo).

    torchrun --nproc_per_node=2 examples/ddp_train.py [--steps 60] [--run-dir runs/ddp]

Each rank trains on its half of a synthetic batch. Rank 1 gets a batch with a NaN at step
20: DDP averages the NaN into every rank's gradients, so every rank's guard sees a
non-finite global norm and skips the same step, with no extra collective. Rank 0 writes
``events.jsonl`` / ``metrics.jsonl``; the event names rank 1.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from dist_common import D_IN, batch, finish, start
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import gradguard as gg


def main() -> None:
    args = start("runs/ddp", steps=60)
    rank = dist.get_rank()

    torch.manual_seed(0)  # the same initial weights on every rank
    model = nn.Sequential(nn.Linear(D_IN, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    ddp = DistributedDataParallel(model)
    opt = torch.optim.AdamW(ddp.parameters(), lr=3e-3)
    data = torch.Generator().manual_seed(1234 + rank)  # each rank its own data

    # every rank builds the guard; only rank 0 writes to the sinks (sink_rank=0)
    with gg.Guard(
        ddp, opt, clip=gg.ZClip(), recovery=gg.Recovery(), every=10,
        sinks=[gg.JsonlSink(args.run_dir)],
    ) as guard:
        for step in range(args.steps):
            x, y = batch(data)
            if step == 20 and rank == 1:
                x[0, 0] = math.nan  # a corrupt sample on rank 1 only
            loss = nn.functional.mse_loss(ddp(x), y)
            loss.backward()
            guard.step(loss)
            opt.zero_grad()

    finish(guard, args.run_dir, model)


if __name__ == "__main__":
    main()
