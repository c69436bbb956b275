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

import argparse
import math
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

import gradguard as gg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--run-dir", default="runs/fsdp")
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
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
            x = torch.randn(32, 16, generator=data)
            y = x[:, :4].sum(dim=1, keepdim=True).sin()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            if step == 20 and rank == 1:
                with torch.no_grad():
                    model[0].weight.grad.to_local()[0, 0] = math.nan  # rank 1's shard only
            guard.step(loss)
            opt.zero_grad()

    # every rank skipped the same steps: the full parameters agree bit for bit
    full = torch.cat([p.full_tensor().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(full) for _ in range(world)]
    dist.all_gather(gathered, full)
    same = all(torch.equal(gathered[0], g) for g in gathered)
    if rank == 0:
        print(f"world={world} steps={guard.step_count} skipped={guard.skipped_steps} "
              f"ranks identical={same}")
        for e in guard.events:
            print(f"  [{e.severity}] {e.message} (rank={e.rank})")
        print(f"events and metrics in {os.path.abspath(args.run_dir)}")
    dist.destroy_process_group()
    if not same:
        raise SystemExit("parameters differ across ranks")


if __name__ == "__main__":
    main()
