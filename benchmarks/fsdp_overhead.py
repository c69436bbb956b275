"""FSDP2 step time: gradguard's Guard vs torch's ``clip_grad_norm_`` on DTensor gradients.

Run:  OMP_NUM_THREADS=1 python benchmarks/fsdp_overhead.py [--steps 40] [--width 256]

Two processes, CPU, gloo, loopback. Each variant trains the same ``fully_shard``-ed MLP:

* ``torch_clip``: ``torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)`` (torch
  computes the norm of DTensor gradients with a Partial-norm all-reduce), then
  ``optimizer.step()``;
* ``guard``: ``gg.Guard(model, opt, clip=gg.NormClip(1.0))`` and ``guard.step(loss)``
  (local norms, one all-reduce of the squared norms, per-layer telemetry, flush every 50).

Both are checked to give the same total norm. Reported: median step time of each
(forward + backward + clip + optimizer step), their ratio, the median time of the clip part
alone, and the collectives each issues per non-flush step (counted with the profiler's
``c10d``/``gloo`` ops, backward's FSDP collectives excluded). Writes
``benchmarks/results/fsdp_overhead.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

OUT = Path(__file__).parent / "results" / "fsdp_overhead.json"
COLLECTIVE_MARKERS = ("allreduce", "all_reduce", "broadcast", "allgather", "all_gather")


def build(width: int, depth: int) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, 1))
    model = nn.Sequential(*layers)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def count_collectives(fn: Any) -> int:
    """Collective ops the profiler sees while ``fn`` runs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = [e.name.lower() for e in prof.events()]
    # one c10d op per collective (gloo's own event, if any, would double count)
    return sum(
        1 for n in names if n.startswith("c10d::") and any(m in n for m in COLLECTIVE_MARKERS)
    )


class Variant:
    """One model + optimizer, stepped either by torch's clip_grad_norm_ or by the Guard."""

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        import gradguard as gg

        self.name = name
        self.model = build(args.width, args.depth)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.guard = (
            gg.Guard(self.model, self.opt, clip=gg.NormClip(1.0), every=50)
            if name == "guard"
            else None
        )
        self.step_times: list[float] = []
        self.clip_times: list[float] = []
        self.norms: list[float] = []
        self.collectives: int | None = None

    def clip_and_step(self, loss: torch.Tensor) -> torch.Tensor:
        if self.guard is not None:
            return self.guard.step(loss)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
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
        return {
            "step_ms": 1e3 * statistics.median(self.step_times),
            "clip_and_optimizer_ms": 1e3 * statistics.median(self.clip_times),
            "collectives_per_step": self.collectives,
            "first_norms": self.norms[:3],
        }


def run_all(args: argparse.Namespace, rank: int) -> dict[str, dict[str, Any]]:
    """Both variants, stepped alternately on the same batches (so drift on a shared
    machine hits both alike)."""
    g = torch.Generator().manual_seed(100 + rank)
    xs = [torch.randn(args.batch, args.width, generator=g) for _ in range(4)]
    variants = [Variant("torch_clip", args), Variant("guard", args)]
    for i in range(args.warmup + args.steps):
        for v in variants:
            v.step(xs[i % len(xs)], timed=i >= args.warmup, count=i == args.warmup - 1)
    return {v.name: v.result() for v in variants}


def worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=120),
    )
    try:
        res = run_all(args, rank)
        if rank == 0:
            a, b = res["torch_clip"], res["guard"]
            same = all(
                abs(x - y) <= 1e-5 * max(1.0, abs(x))
                for x, y in zip(a["first_norms"], b["first_norms"])
            )
            out = {
                "benchmark": "fsdp_overhead",
                "world_size": world,
                "backend": "gloo (CPU)",
                "torch": torch.__version__,
                "machine": platform.machine(),
                "model": {"width": args.width, "depth": args.depth, "batch": args.batch},
                "steps": args.steps,
                "torch_clip_grad_norm": a,
                "guard": b,
                "step_time_ratio_guard_over_torch": b["step_ms"] / a["step_ms"],
                "clip_time_ratio_guard_over_torch": b["clip_and_optimizer_ms"]
                / a["clip_and_optimizer_ms"],
                "same_total_norm": same,
            }
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
            print(json.dumps(out, indent=2))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    mp.spawn(worker, args=(2, free_port(), args), nprocs=2, join=True)
