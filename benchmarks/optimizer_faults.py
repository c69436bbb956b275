"""Bad batches under every torch optimizer: what two short bursts of NaN gradients cost a
healthy run under the default guard, with the back-off undone when the next step proves
the weights sound (the default) and with every back-off kept
(``Recovery(undo_backoff=False)``, the ladder before the rule), against the same run
without the faults.

Run:  OMP_NUM_THREADS=1 python benchmarks/optimizer_faults.py [--steps N] [--out F]
Writes benchmarks/results/optimizer_faults.json (about a minute).

The run: a 3-layer tanh MLP (16-64-64-1) regressing sin of a sum of four inputs, batch 32,
300 steps, seeded; the middle layer's gradient is NaN at steps 120-122 and 126-128 (two
bursts of three bad batches, six steps apart). Each optimizer at an LR that trains this
model; Muon takes the 2-D weights only (the biases stay at their init in every arm). The
figure per optimizer and arm: the mean of the last 30 training losses over the clean run's.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import gradguard as gg

OUT = Path(__file__).parent / "results" / "optimizer_faults.json"
BAD = (120, 121, 122, 126, 127, 128)
TAIL = 30
optim = torch.optim

OPTIMIZERS: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
    "sgd_momentum": lambda p: optim.SGD(p, lr=1e-2, momentum=0.9, foreach=False),
    "adam": lambda p: optim.Adam(p, lr=1e-3),
    "adam_fused": lambda p: optim.Adam(p, lr=1e-3, fused=True),
    "adam_tensor_lr": lambda p: optim.Adam(p, lr=torch.tensor(1e-3)),
    "adamw_fused_tensor_lr": lambda p: optim.AdamW(p, lr=torch.tensor(1e-3), fused=True),
    "adamw_amsgrad": lambda p: optim.AdamW(p, lr=1e-3, amsgrad=True),
    "nadam": lambda p: optim.NAdam(p, lr=1e-3),
    "radam": lambda p: optim.RAdam(p, lr=1e-3),
    "adamax": lambda p: optim.Adamax(p, lr=2e-3),
    "asgd": lambda p: optim.ASGD(p, lr=1e-2),
    "rprop": lambda p: optim.Rprop(p, lr=1e-3),
    "adagrad": lambda p: optim.Adagrad(p, lr=1e-2),
    "adadelta": lambda p: optim.Adadelta(p, lr=1.0),
    "adafactor": lambda p: optim.Adafactor(p, lr=1e-2),
    "muon": lambda p: optim.Muon([q for q in p if q.ndim == 2], lr=2e-2),
}


def run(name: str, steps: int, recovery: gg.Recovery | None) -> dict[str, Any]:
    """One run: clean and unguarded when ``recovery`` is None, else with the faults."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                          nn.Linear(64, 1))
    opt = OPTIMIZERS[name](list(model.parameters()))
    guard = None if recovery is None else gg.Guard(model, opt, clip=gg.ZClip(),
                                                   recovery=recovery)
    losses = []
    for s in range(steps):
        x = torch.randn(32, 16, generator=torch.Generator().manual_seed(s))
        loss = (model(x) - torch.sin(x[:, :4].sum(1, keepdim=True))).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        if guard is None:
            opt.step()
        else:
            if s in BAD:
                model[2].weight.grad.fill_(math.nan)
            guard.step(loss)
        losses.append(loss.item())
    out: dict[str, Any] = {"tail": sum(losses[-TAIL:]) / TAIL,
                           "finite": all(bool(torch.isfinite(p).all()) for p in model.parameters())}
    if guard is not None and recovery is not None:
        guard.close()
        out.update(skips=guard.skipped_steps, lr_factor=recovery.lr_factor,
                   lr_ceiling=recovery.lr_ceiling,
                   ladder=[f"{e.kind}@{e.step}" for e in guard.events
                           if e.kind in ("lr_backoff", "rollback", "nonfinite_input")])
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows = []
    for name in OPTIMIZERS:
        clean = run(name, args.steps, None)
        undo = run(name, args.steps, gg.Recovery())
        kept = run(name, args.steps, gg.Recovery(undo_backoff=False))
        row = {"optimizer": name, "clean_tail": clean["tail"], "default": undo,
               "undo_backoff_false": kept,
               "default_over_clean": undo["tail"] / clean["tail"],
               "undo_backoff_false_over_clean": kept["tail"] / clean["tail"]}
        rows.append(row)
        print(f"{name:24s} default {row['default_over_clean']:.2f}x  "
              f"undo_backoff=False {row['undo_backoff_false_over_clean']:.2f}x  "
              f"{undo['ladder']}", flush=True)
    result = {
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "threads": torch.get_num_threads()},
        "steps": args.steps, "bad_steps": list(BAD), "rows": rows,
        "summary": {
            "default_over_clean": [min(r["default_over_clean"] for r in rows),
                                   max(r["default_over_clean"] for r in rows)],
            "undo_backoff_false_over_clean": [min(r["undo_backoff_false_over_clean"] for r in rows),
                                              max(r["undo_backoff_false_over_clean"] for r in rows)],
            "all_finite": all(r["default"]["finite"] and r["undo_backoff_false"]["finite"]
                              for r in rows),
        },
        "seconds": round(time.perf_counter() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
