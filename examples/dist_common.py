"""What the torchrun examples share: arguments and process group, a synthetic batch, and
the end of a run (rank 0's summary, a check that the ranks still agree)."""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn

import gradguard as gg

D_IN = 16


def start(run_dir: str | None, steps: int = 40) -> argparse.Namespace:
    """Parse ``--steps`` (and ``--run-dir`` unless None) and join the gloo process group
    torchrun set up."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=steps)
    if run_dir is not None:
        ap.add_argument("--run-dir", default=run_dir)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    return args


def batch(gen: torch.Generator, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and a smooth target of them."""
    x = torch.randn(size, D_IN, generator=gen)
    return x, x[:, :4].sum(dim=1, keepdim=True).sin()


def ranks_identical(model: nn.Module) -> bool:
    """Whether every rank holds the same full parameters (DTensors gathered whole)."""
    whole = [getattr(p, "full_tensor", lambda p=p: p)() for p in model.parameters()]
    flat = torch.cat([t.detach().reshape(-1) for t in whole])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(gathered[0], g) for g in gathered)


def finish(guard: gg.Guard, run_dir: str | None, model: nn.Module | None = None) -> None:
    """Print rank 0's summary, leave the process group; exit non-zero when the ranks
    disagree on the parameters (checked when ``model`` is given)."""
    same = ranks_identical(model) if model is not None else None
    if dist.get_rank() == 0:
        print(f"world={dist.get_world_size()} steps={guard.step_count} "
              f"skipped={guard.skipped_steps} ranks identical={same}")
        for e in guard.events:
            print(f"  [{e.severity}] {e.message} (rank={e.rank})")
        if run_dir:
            print(f"events and metrics in {os.path.abspath(run_dir)}")
    dist.destroy_process_group()
    if same is False:
        raise SystemExit("parameters differ across ranks")
