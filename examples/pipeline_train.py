"""Guarded pipeline-parallel training: 2 stages with torch.distributed.pipelining, CPU (gloo).

    torchrun --nproc_per_node=2 examples/pipeline_train.py [--steps 40]

Each rank holds one stage of the model (torchtitan's split: the stage keeps its layers'
names) and runs a GPipe schedule with 4 micro-batches. Every rank builds its Guard with
``pipeline_group=mesh["pp"]``: the stages put their squared norms side by side in one
all-reduce per step, so the total norm, the clip coefficient and the skip are the whole
model's on both stages, while per-layer telemetry stays each stage's own. The last stage
passes the loss, the first passes None. At step 15 a NaN is written into stage 0's
gradient: stage 1, whose own gradients are finite, skips the same step.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from dist_common import D_IN, batch, start
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

import gradguard as gg

STAGES = (("0", "1"), ("2", "3"))  # layer names held by each stage


class Net(nn.Module):
    """Layers in a ModuleDict, so that a stage keeps its layers' names."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleDict({"0": nn.Linear(D_IN, 64), "1": nn.Linear(64, 64),
                                     "2": nn.Linear(64, 64), "3": nn.Linear(64, 1)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name, layer in self.layers.items():
            x = layer(x) if name == "3" else torch.relu(layer(x))
        return x


def main() -> None:
    args = start(None)
    rank = dist.get_rank()
    pp = init_device_mesh("cpu", (2,), mesh_dim_names=("pp",))

    net = Net()
    for name in [n for n in net.layers if n not in STAGES[rank]]:
        del net.layers[name]  # keep this stage's layers, under their names
    stage = PipelineStage(net, rank, 2, torch.device("cpu"), group=pp.get_group())
    schedule = ScheduleGPipe(stage, n_microbatches=4, loss_fn=nn.functional.mse_loss)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    data = torch.Generator().manual_seed(1234)  # both stages draw the same batches

    with gg.Guard(net, opt, clip=gg.ZClip(), every=10, pipeline_group=pp) as guard:
        for step in range(args.steps):
            x, y = batch(data)
            losses: list[torch.Tensor] = []
            if rank == 1:
                schedule.step(target=y, losses=losses)
            else:
                schedule.step(x)
            if step == 15 and rank == 0:
                with torch.no_grad():
                    net.layers["0"].weight.grad[0, 0] = math.nan
            guard.step(torch.stack(losses).mean() if losses else None)
            opt.zero_grad()

    print(f"stage {rank}: layers={guard.telemetry.layers} steps={guard.step_count} "
          f"skipped={guard.skipped_steps} last total norm={guard.last_window.total_norm[-1]:.4f}")
    dist.destroy_process_group()
    if guard.skipped_steps != 1:
        raise SystemExit(f"stage {rank}: expected one skipped step, got {guard.skipped_steps}")


if __name__ == "__main__":
    main()
