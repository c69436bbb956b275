"""Guarded FSDP2 (``fully_shard``) training on CPU (gloo).

    torchrun --nproc_per_node=2 examples/fsdp_train.py [--steps 60] [--run-dir runs/fsdp]

Parameters and gradients are DTensor shards. The guard measures each rank's shards and
sums the squared norms with one all-reduce per step, so the clip coefficient is computed
from the global norm and is identical on every rank. At step 20 a NaN is written into rank
1's own gradient shard of the first layer: the all-reduced norm is NaN on every rank, every
rank skips that step, and the event names rank 1 and layer ``0``. The script checks at the
end that both ranks hold the same parameters.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from dist_common import D_IN, batch, finish, start
from torch import nn
from torch.distributed.fsdp import fully_shard

import gradguard as gg


def main() -> None:
    args = start("runs/fsdp", steps=60)
    rank = dist.get_rank()

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)  # one FSDP unit per layer
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.Generator().manual_seed(1234 + rank)

    with gg.Guard(
        model, opt, clip=gg.ZClip(), recovery=gg.Recovery(), every=10,
        sinks=[gg.JsonlSink(args.run_dir)],
    ) as guard:
        for step in range(args.steps):
            x, y = batch(data)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            if step == 20 and rank == 1:
                with torch.no_grad():
                    model[0].weight.grad.to_local()[0, 0] = math.nan  # rank 1's shard only
            guard.step(loss)
            opt.zero_grad()

    # every rank skipped the same steps: the full parameters agree bit for bit
    finish(guard, args.run_dir, model)


if __name__ == "__main__":
    main()
