"""Guarded FSDP x tensor parallel training on a 2-D mesh, CPU (gloo): torchtitan's recipe.

    torchrun --nproc_per_node=4 examples/tp_fsdp_train.py [--steps 40] [--run-dir runs/tp_fsdp]

The mesh is (dp=2, tp=2). In each block the two linears are tensor parallel on "tp"
(Colwise, then Rowwise), then every block and the root are ``fully_shard``-ed on "dp":
the linears become 2-D DTensors (``_StridedShard`` on dp), while the norms, embedding and
head live on the dp sub-mesh only, one copy per tp rank. The guard measures every shard
and sums the squares with one all-reduce over all 4 ranks per step, counting each TP
replica once, so the total norm, the clip coefficient and the skip are the same on every
rank. At step 15 a NaN is written into rank 3's own shard of a norm weight: every rank
skips that step (not only rank 3's dp group), and the event names rank 3 and the layer.
The script checks at the end that the TP replicas still hold the same parameters.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from dist_common import D_IN, batch, finish, start
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import gradguard as gg


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(self.norm(x))))


class Net(nn.Module):
    def __init__(self, d: int = 32, depth: int = 2) -> None:
        super().__init__()
        self.emb = nn.Linear(D_IN, d)
        self.blocks = nn.ModuleList([Block(d) for _ in range(depth)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.emb(x)
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x))


def main() -> None:
    args = start("runs/tp_fsdp")
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))

    torch.manual_seed(0)
    model = Net()
    for block in model.blocks:
        parallelize_module(block, mesh["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # the tp ranks of one dp group must see the same batch
    data = torch.Generator().manual_seed(1234 + mesh["dp"].get_local_rank())

    with gg.Guard(model, opt, clip=gg.ZClip(), every=10,
                  sinks=[gg.JsonlSink(args.run_dir)]) as guard:
        for step in range(args.steps):
            x, y = batch(data)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            if step == 15 and dist.get_rank() == 3:
                with torch.no_grad():  # rank 3's own shard of a dp-only norm weight
                    model.blocks[1].norm.weight.grad.to_local()[0] = math.nan
            guard.step(loss)
            opt.zero_grad()

    finish(guard, args.run_dir, model)  # the TP replicas stepped (and skipped) alike


if __name__ == "__main__":
    main()
