"""Guarded HSDP training (replicate x shard), CPU (gloo).

    torchrun --nproc_per_node=4 examples/hsdp_train.py [--steps 40] [--run-dir runs/hsdp]

``fully_shard`` on a 2-D (replicate=2, shard=2) mesh: each parameter is sharded over
"shard" and replicated over "replicate", its gradients placed ``(Replicate(), Shard(0))``.
The guard sums each rank's squared shard norms with one all-reduce over the 4 ranks,
weighting every shard by 1/2 because two ranks hold it. At step 15 a NaN is written into
rank 3's own gradient shard: its replica (rank 1) holds a finite copy, yet every rank
skips the step, because the NaN travels in the all-reduce. The event names rank 3.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from dist_common import D_IN, batch, finish, start
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import gradguard as gg


def main() -> None:
    args = start("runs/hsdp")
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 1))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.Generator().manual_seed(1234 + dist.get_rank())  # HSDP: all 4 are data-parallel

    with gg.Guard(model, opt, clip=gg.ZClip(), recovery=gg.Recovery(), every=10,
                  sinks=[gg.JsonlSink(args.run_dir)]) as guard:
        for step in range(args.steps):
            x, y = batch(data)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            if step == 15 and dist.get_rank() == 3:
                with torch.no_grad():
                    model[2].weight.grad.to_local()[0, 0] = math.nan  # rank 3's shard only
            guard.step(loss)
            opt.zero_grad()

    skipped = guard.skipped_steps
    finish(guard, args.run_dir, model)
    if skipped != 1:
        raise SystemExit(f"expected one skipped step on every rank, got {skipped}")


if __name__ == "__main__":
    main()
