"""Batches on another scale behind a batch norm layer: what 5% of batches in other units
cost a BatchNorm CNN's held-out loss, unguarded and under the default guard, against the
same run on clean batches; and the same batches made NaN instead, for comparison.

Run:  OMP_NUM_THREADS=1 python benchmarks/offscale.py [--seeds N] [--steps N] [--out F]
Writes benchmarks/results/offscale.json (about three minutes).

The run: a digits CNN (two 3x3 convolutions of 16 and 32 channels, each followed by
BatchNorm2d and ReLU, average pooling, a linear head) on AdamW at 3e-3, batches of 64 from
1,400 digits, 400 steps; held-out loss on the other 397 digits in ``eval()`` (the running
statistics). 5% of the batches (seeded) are corrupted: x1e4 (``scale``), or one NaN pixel
(``nan``). Behind the batch norm layer a x1e4 batch trains like a clean one; only the
running variance takes the scale in (docs/recovery.md, "A batch on another scale").
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import gradguard as gg

try:  # as a script (benchmarks/ is on sys.path) or as the module benchmarks.offscale
    from _loop import train_step
except ImportError:  # pragma: no cover
    from benchmarks._loop import train_step

OUT = Path(__file__).parent / "results" / "offscale.json"
FAULTS = ("none", "scale", "nan")


def net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, 10))


def run(fault: str, seed: int, steps: int, *, guarded: bool) -> dict[str, Any]:
    """One run: its held-out loss and, guarded, the steps it skipped and its rungs."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x_all = torch.tensor(digits.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16
    y_all = torch.tensor(digits.target)
    perm = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(0))
    train, held = perm[:1400], perm[1400:]
    torch.manual_seed(seed)
    model = net()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    guard = gg.Guard(model, opt, clip=gg.ZClip(), recovery=gg.Recovery()) if guarded else None
    g = torch.Generator().manual_seed(seed + 7)
    bad = []
    for step in range(steps):
        idx = train[torch.randint(0, len(train), (64,), generator=g)]
        x = x_all[idx].clone()
        if fault != "none" and torch.rand((), generator=g).item() < 0.05:
            bad.append(step)
            if fault == "scale":
                x = x * 1e4
            else:
                x[0, 0, 0, 0] = math.nan
        loss = nn.functional.cross_entropy(model(x), y_all[idx])
        train_step(loss, opt, guard)
    out: dict[str, Any] = {"bad_steps": bad}
    if guard is not None:
        guard.close()
        out["skipped"] = sorted({e.step for e in guard.events if e.kind == "skip"
                                 or e.kind == "nonfinite_grad"})
        out["rungs"] = [[e.kind, e.step] for e in guard.events
                        if e.kind in ("lr_backoff", "rollback", "abort")]
    model.eval()
    with torch.no_grad():
        out["held_out"] = nn.functional.cross_entropy(model(x_all[held]), y_all[held]).item()
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    t0 = time.time()
    rows = []
    for seed in range(args.seeds):
        clean = run("none", seed, args.steps, guarded=False)["held_out"]
        for fault in FAULTS[1:]:
            plain = run(fault, seed, args.steps, guarded=False)
            guarded = run(fault, seed, args.steps, guarded=True)
            row = {"seed": seed, "fault": fault, "clean": clean,
                   "unguarded": plain["held_out"], "guarded": guarded["held_out"],
                   "unguarded_over_clean": plain["held_out"] / clean,
                   "guarded_over_clean": guarded["held_out"] / clean,
                   "bad_steps": guarded["bad_steps"], "skipped": guarded["skipped"],
                   "every_bad_step_skipped": guarded["skipped"] == guarded["bad_steps"],
                   "rungs": guarded["rungs"]}
            rows.append(row)
            print(f"seed {seed} {fault:5s}: clean {clean:.4f}, unguarded "
                  f"{row['unguarded_over_clean']:.3g}x, guarded {row['guarded_over_clean']:.3g}x"
                  f" ({len(row['skipped'])} of {len(row['bad_steps'])} bad steps skipped)")
    out = {"environment": {"torch": torch.__version__, "python": platform.python_version(),
                           "threads": torch.get_num_threads()},
           "steps": args.steps, "rows": rows, "seconds": round(time.time() - t0, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
