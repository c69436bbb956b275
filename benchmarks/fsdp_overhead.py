"""Sharded step time and collectives: gradguard's Guard vs torch's DTensor clipping.

Run:  OMP_NUM_THREADS=1 python benchmarks/fsdp_overhead.py [--cases fsdp tp_fsdp hsdp]
                                                          [--steps 30] [--width 128]

CPU, gloo, loopback. Each case trains the same sharded model twice, stepped alternately
on the same batches (so drift on a shared machine hits both alike):

* ``fsdp`` (2 ranks): ``fully_shard`` per layer; torch: ``clip_grad_norm_``;
* ``tp_fsdp`` (4 ranks, dp=2 x tp=2, torchtitan's recipe): blocks of LayerNorm + Colwise/
  Rowwise linears, ``parallelize_module`` on "tp" then ``fully_shard`` on "dp"; the norms,
  embedding and head live on the dp sub-mesh only. torch's ``clip_grad_norm_`` refuses
  parameters on two meshes (recorded in the JSON), so the torch variant is what users
  hand-roll: ``get_total_norm`` per mesh, ``full_tensor()``, then ``clip_grads_with_norm_``;
* ``hsdp`` (4 ranks): ``fully_shard`` on a (replicate=2, shard=2) mesh; torch:
  ``clip_grad_norm_``.

The guard variant is ``gg.Guard(model, opt, clip=gg.NormClip(1.0), every=50)``. Both are
checked to give the same total norm. Reported per case: median step time of each
(forward + backward + clip + optimizer step), their ratio, the median of the clip +
optimizer part alone, and the collectives each issues in that part on a non-flush step,
counted with the profiler (c10d and functional collectives; backward's FSDP collectives
are outside the counted part). Writes ``benchmarks/results/fsdp_overhead.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

OUT = Path(__file__).parent / "results" / "fsdp_overhead.json"
COLLECTIVE_MARKERS = ("allreduce", "all_reduce", "broadcast", "allgather", "all_gather",
                      "reduce_scatter")
WORLD = {"fsdp": 2, "tp_fsdp": 4, "hsdp": 4}


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(self.norm(x))))


class Net(nn.Module):
    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.emb = nn.Linear(width, width)
        self.blocks = nn.ModuleList([Block(width) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.emb(x)
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x))


def build(case: str, width: int, depth: int) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    torch.manual_seed(0)
    model = Net(width, depth)
    if case == "tp_fsdp":
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        for b in model.blocks:
            parallelize_module(b, mesh["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
        shard_mesh = mesh["dp"]
    elif case == "hsdp":
        shard_mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    else:
        shard_mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
    for b in model.blocks:
        fully_shard(b, mesh=shard_mesh)
    fully_shard(model, mesh=shard_mesh)
    return model


def data_rank(case: str) -> int:
    """TP ranks of one dp group must see the same rows."""
    return dist.get_rank() // 2 if case == "tp_fsdp" else dist.get_rank()


def per_mesh_clip_(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """What users hand-roll when parameters live on several meshes (torch's DTensor ops
    refuse to mix them): one DTensor norm per mesh made whole with ``full_tensor()``, the
    norms combined, then torch's clipping mesh by mesh."""
    by_mesh: dict[Any, list[nn.Parameter]] = {}
    for p in params:
        if p.grad is not None:
            by_mesh.setdefault(p.grad.device_mesh, []).append(p)  # type: ignore[attr-defined]
    norms = [
        torch.nn.utils.get_total_norm([p.grad for p in ps]).full_tensor()  # type: ignore[attr-defined]
        for ps in by_mesh.values()
    ]
    total = torch.linalg.vector_norm(torch.stack(norms))
    for ps in by_mesh.values():
        torch.nn.utils.clip_grads_with_norm_(ps, max_norm, total)
    return total


def count_collectives(fn: Callable[[], Any]) -> tuple[int, list[str]]:
    """Collective ops the profiler sees while ``fn`` runs, and their names: the
    process-group ops (``c10d::``), which every collective reaches once (a functional
    collective, as DTensor issues them, shows as ``_c10d_functional::`` around it)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = [
        e.name
        for e in prof.events()
        if e.name.lower().startswith("c10d::")
        and any(m in e.name.lower() for m in COLLECTIVE_MARKERS)
    ]
    return len(names), sorted(set(names))


class Variant:
    """One model + optimizer, stepped by torch's clipping or by the Guard."""

    def __init__(self, name: str, case: str, args: argparse.Namespace) -> None:
        import gradguard as gg

        self.name, self.case = name, case
        self.model = build(case, args.width, args.depth)
        self.params = list(self.model.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=1e-3)
        self.guard = (
            gg.Guard(self.model, self.opt, clip=gg.NormClip(1.0), every=50)
            if name == "guard"
            else None
        )
        self.step_times: list[float] = []
        self.clip_times: list[float] = []
        self.norms: list[float] = []
        self.collectives: tuple[int, list[str]] | None = None

    def clip_and_step(self, loss: torch.Tensor) -> torch.Tensor:
        if self.guard is not None:
            return self.guard.step(loss)
        if self.case == "tp_fsdp":
            norm = per_mesh_clip_(self.params, 1.0)
        else:
            norm = torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        return norm

    def step(self, x: torch.Tensor, *, timed: bool, count: bool) -> None:
        dist.barrier()
        t0 = time.perf_counter()
        loss = self.model(x).pow(2).mean()
        loss.backward()
        t1 = time.perf_counter()
        if count:  # a non-flush step, counted once
            box: list[torch.Tensor] = []
            self.collectives = count_collectives(lambda: box.append(self.clip_and_step(loss)))
            norm = box[0]
        else:
            norm = self.clip_and_step(loss)
        full_tensor = getattr(norm, "full_tensor", None)
        norm = full_tensor() if callable(full_tensor) else norm
        t2 = time.perf_counter()
        self.opt.zero_grad()
        if timed:
            self.step_times.append(t2 - t0)
            self.clip_times.append(t2 - t1)
        self.norms.append(float(norm))

    def result(self) -> dict[str, Any]:
        if self.guard is not None:
            self.guard.close()
        assert self.collectives is not None
        return {
            "step_ms": 1e3 * statistics.median(self.step_times),
            "clip_and_optimizer_ms": 1e3 * statistics.median(self.clip_times),
            "collectives_per_step": self.collectives[0],
            "collective_ops": self.collectives[1],
            "first_norms": self.norms[:3],
        }


def torch_refusal(case: str, args: argparse.Namespace) -> str | None:
    """torch's own clip_grad_norm_ on the case's model: None when it works, else its error."""
    model = build(case, args.width, args.depth)
    model(torch.randn(args.batch, args.width)).pow(2).mean().backward()
    try:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    except RuntimeError as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0]}"
    return None


def run_case(case: str, args: argparse.Namespace) -> dict[str, Any]:
    g = torch.Generator().manual_seed(100 + data_rank(case))
    xs = [torch.randn(args.batch, args.width, generator=g) for _ in range(4)]
    variants = [Variant("torch_clip", case, args), Variant("guard", case, args)]
    for i in range(args.warmup + args.steps):
        for v in variants:
            v.step(xs[i % len(xs)], timed=i >= args.warmup, count=i == args.warmup - 1)
    a, b = (v.result() for v in variants)
    same = all(
        abs(x - y) <= 1e-5 * max(1.0, abs(x)) for x, y in zip(a["first_norms"], b["first_norms"])
    )
    return {
        "world_size": dist.get_world_size(),
        "torch_clip_grad_norm_refuses": torch_refusal(case, args),
        "torch_variant": "per-mesh get_total_norm + full_tensor + clip_grads_with_norm_"
        if case == "tp_fsdp"
        else "clip_grad_norm_",
        "torch_clip_grad_norm": a,
        "guard": b,
        "step_time_ratio_guard_over_torch": b["step_ms"] / a["step_ms"],
        "clip_time_ratio_guard_over_torch": b["clip_and_optimizer_ms"] / a["clip_and_optimizer_ms"],
        "same_total_norm": same,
    }


def worker(rank: int, world: int, port: int, case: str, args: argparse.Namespace,
           queue: Any) -> None:
    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=timedelta(seconds=300),
    )
    try:
        res = run_case(case, args)
        if rank == 0:
            queue.put(res)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cases", nargs="+", choices=sorted(WORLD), default=list(WORLD))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    out: dict[str, Any] = {
        "benchmark": "fsdp_overhead",
        "backend": "gloo (CPU)",
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "model": {"width": args.width, "depth": args.depth, "batch": args.batch},
        "steps": args.steps,
        "cases": {},
    }
    for case in args.cases:
        queue = ctx.SimpleQueue()
        mp.start_processes(worker, args=(WORLD[case], free_port(), case, args, queue),
                           nprocs=WORLD[case], join=True, start_method="spawn")
        out["cases"][case] = queue.get()
        print(case, json.dumps(out["cases"][case], indent=2), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
