"""``gradguard demo``: the same unstable training run, unguarded and guarded."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .clipping import ZClip
from .events import JsonlSink
from .guard import Guard

#: A corrupted batch (inputs scaled by this factor) arrives at these steps.
SPIKE_SCALE = 1e4


@dataclass
class RunSummary:
    name: str
    final_loss: float
    first_nan_step: int | None
    skips: int
    clipped_steps: int
    events: list[str] = field(default_factory=list)

    @property
    def broke(self) -> bool:
        return self.first_nan_step is not None or not math.isfinite(self.final_loss)


def make_data(seed: int, n: int = 2048, d: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, 1, generator=g) / math.sqrt(d)
    y = torch.tanh(x @ w) + 0.05 * torch.randn(n, 1, generator=g)
    return x, y


def make_model(seed: int, d: int = 32, width: int = 128, depth: int = 6) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    dim = d
    for _ in range(depth):
        layers += [nn.Linear(dim, width), nn.ReLU()]
        dim = width
    layers.append(nn.Linear(dim, 1))
    return nn.Sequential(*layers)


def train(
    *, guarded: bool, steps: int, seed: int, out: Path | None, spikes: tuple[int, ...]
) -> RunSummary:
    x, y = make_data(seed)
    model = make_model(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    guard = None
    if guarded:
        sinks: list[Any] = [JsonlSink(out)] if out is not None else []
        guard = Guard(model, opt, clip=ZClip(), every=25, sinks=sinks)
    g = torch.Generator().manual_seed(seed + 1)
    first_nan = None
    loss_v = math.nan
    for step in range(steps):
        idx = torch.randint(0, x.shape[0], (64,), generator=g)
        xb, yb = x[idx], y[idx]
        if step in spikes:
            xb = xb * SPIKE_SCALE  # a corrupted batch
        loss = nn.functional.mse_loss(model(xb), yb)
        loss.backward()
        if guard is not None:
            guard.step(loss)
        else:
            opt.step()
        opt.zero_grad()
        loss_v = loss.item()
        if first_nan is None and not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            first_nan = step
    # the final loss is measured on the whole clean data set
    with torch.no_grad():
        final = nn.functional.mse_loss(model(x), y).item()
    del loss_v
    if guard is not None:
        guard.close()
        clipped = 0
        skips = guard.skipped_steps
        if out is not None:
            from .events import read_jsonl

            clipped = sum(
                1
                for r in read_jsonl(out / "metrics.jsonl")
                if r["type"] == "step" and r["clip_coef"] is not None and r["clip_coef"] < 1.0
            )
        return RunSummary(
            "guarded", final, first_nan, skips, clipped, [e.message for e in guard.events]
        )
    return RunSummary("unguarded", final, first_nan, 0, 0)


def run_demo(
    *, out: str | Path = "runs/demo", steps: int = 400, seed: int = 0
) -> tuple[RunSummary, RunSummary]:
    """Train the same model twice on data with corrupted batches; return both summaries."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for f in ("events.jsonl", "metrics.jsonl"):
        (out / f).unlink(missing_ok=True)
    spikes = tuple(s for s in (steps // 4, steps // 2, 3 * steps // 4) if s > 30)
    a = train(guarded=False, steps=steps, seed=seed, out=None, spikes=spikes)
    b = train(guarded=True, steps=steps, seed=seed, out=out, spikes=spikes)
    return a, b


def format_summary(a: RunSummary, b: RunSummary, out: str | Path) -> str:
    def fmt(x: float) -> str:
        return f"{x:.4g}" if math.isfinite(x) else str(x)

    rows = [
        ("", "unguarded", "guarded (ZClip)"),
        ("final loss", fmt(a.final_loss), fmt(b.final_loss)),
        ("first NaN step", str(a.first_nan_step), str(b.first_nan_step)),
        ("skipped steps", "-", str(b.skips)),
        ("clipped steps", "-", str(b.clipped_steps)),
    ]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [f"{r[0]:<{w0}}  {r[1]:<{w1}}  {r[2]}" for r in rows]
    lines.append(f"run directory: {Path(out).resolve()}")
    return "\n".join(lines)
