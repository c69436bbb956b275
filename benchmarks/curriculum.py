"""Batches that change mid-run: what a curriculum's next stage, a new task or noisier
inputs cost a digits MLP's held-out loss under the default guard, against the same run
unguarded.

Run:  OMP_NUM_THREADS=1 python benchmarks/curriculum.py [--seeds N] [--steps N] [--out F]
Writes benchmarks/results/curriculum.json (about four minutes).

The run: a digits MLP (64-128-128-10, ReLU) on Adam at 1e-3 or SGD with momentum at 0.05,
batches of 64 from 1,400 digits, 900 steps; at step 300 the batches change:

* ``classes``: the digits 0-4 until then, all ten from there (a curriculum's next stage,
  class-incremental learning);
* ``permute``: every label shifted by 3 from there (a new task on the same inputs);
* ``noise``: unit Gaussian noise added to the inputs from there (a harder stage).

The held-out loss is taken on the other 397 digits as the last stage has them. Each of
these throws the loss up at once, with gradients to match; unguarded, the run learns the
new batches. The guard must tell the change from damage (docs/recovery.md, "Batches that
changed"): its first rollback finds the restored weights at the new loss (``data_shift``).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import gradguard as gg

try:  # as a script (benchmarks/ is on sys.path) or as the module benchmarks.curriculum
    from _loop import train_step
except ImportError:  # pragma: no cover
    from benchmarks._loop import train_step

OUT = Path(__file__).parent / "results" / "curriculum.json"
CHANGES = ("classes", "permute", "noise")
OPTIMIZERS = ("adam", "sgd")
CHANGE_AT = 300
RUNGS = ("lr_backoff", "rollback", "data_shift", "loss_level_off", "abort")


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x, dtype=torch.float32) / 16, torch.tensor(y)


def digits_mlp(optimizer: str, seed: int, guarded: bool) -> tuple[nn.Module, Any, Any]:
    """The digits MLP (64-128-128-10, ReLU) seeded ``seed``, on Adam at 1e-3 or SGD with
    momentum at 0.05, and (``guarded``) the default guard on it (else None)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                          nn.Linear(128, 10))
    opt = (torch.optim.Adam(model.parameters(), 1e-3) if optimizer == "adam"
           else torch.optim.SGD(model.parameters(), 0.05, momentum=0.9))
    guard = gg.Guard(model, opt, clip=gg.ZClip(), recovery=gg.Recovery()) if guarded else None
    return model, opt, guard


def arguments(doc: str, argv: list[str] | None, *, seeds: int, steps: int,
              out: Path) -> argparse.Namespace:
    """``--seeds``, ``--steps`` and ``--out``, with these defaults."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=seeds)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--out", type=Path, default=out)
    return ap.parse_args(argv)


def write(path: Path, t0: float, **fields: Any) -> dict[str, Any]:
    """The results JSON (the environment, ``fields``, the seconds since ``t0``) at ``path``;
    prints and returns it."""
    out = {"environment": {"torch": torch.__version__, "python": platform.python_version(),
                           "threads": torch.get_num_threads()},
           **fields, "seconds": round(time.time() - t0, 1)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(out["summary"])
    return out


def run(change: str, optimizer: str, seed: int, steps: int, *, guarded: bool) -> dict[str, Any]:
    """One run: its held-out loss, and (guarded) the ladder's rungs and events."""
    x_all, y_all = _digits()
    x_tr, y_tr, x_te, y_te = x_all[:1400], y_all[:1400], x_all[1400:], y_all[1400:]
    model, opt, guard = digits_mlp(optimizer, seed, guarded)
    g = torch.Generator().manual_seed(seed)
    first = (y_tr < 5).nonzero().squeeze(1) if change == "classes" else torch.arange(len(y_tr))
    every = torch.arange(len(y_tr))
    stopped = None
    try:
        for step in range(steps):
            after = step >= CHANGE_AT
            pool = every if after else first
            i = pool[torch.randint(len(pool), (64,), generator=g)]
            x, y = x_tr[i], y_tr[i]
            if after and change == "permute":
                y = (y + 3) % 10
            if after and change == "noise":
                x = x + torch.randn(x.shape, generator=g)
            loss = nn.functional.cross_entropy(model(x), y)
            train_step(loss, opt, guard)
    except gg.TrainingDiverged:
        stopped = step
    out: dict[str, Any] = {"stopped": stopped}
    if guard is not None:
        guard.close()
        out["rungs"] = [[e.kind, e.step] for e in guard.events if e.kind in RUNGS]
    with torch.no_grad():
        y_eval = (y_te + 3) % 10 if change == "permute" else y_te
        x_eval = x_te + (torch.randn(x_te.shape, generator=torch.Generator().manual_seed(9))
                         if change == "noise" else 0.0)
        out["held_out"] = nn.functional.cross_entropy(model(x_eval), y_eval).item()
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = arguments(__doc__, argv, seeds=2, steps=900, out=OUT)
    t0 = time.time()
    rows = []
    for change in CHANGES:
        for optimizer in OPTIMIZERS:
            for seed in range(args.seeds):
                plain = run(change, optimizer, seed, args.steps, guarded=False)
                guarded = run(change, optimizer, seed, args.steps, guarded=True)
                kinds = [k for k, _ in guarded["rungs"]]
                row = {"change": change, "optimizer": optimizer, "seed": seed,
                       "unguarded": plain["held_out"], "guarded": guarded["held_out"],
                       "guarded_over_unguarded": guarded["held_out"] / plain["held_out"],
                       "stopped": guarded["stopped"], "rollbacks": kinds.count("rollback"),
                       "data_shift": kinds.count("data_shift"),
                       "loss_level_off": kinds.count("loss_level_off"),
                       "rungs": guarded["rungs"]}
                rows.append(row)
                print(f"{change:8s} {optimizer} seed {seed}: unguarded {row['unguarded']:.4f}, "
                      f"guarded {row['guarded']:.4f} ({row['guarded_over_unguarded']:.3g}x), "
                      f"{row['rollbacks']} rollback(s), {row['data_shift']} data_shift"
                      + (f", stopped at step {row['stopped']}" if row["stopped"] is not None
                         else ""))
    ratios = [r["guarded_over_unguarded"] for r in rows]
    summary = {"runs": len(rows), "stopped": sum(r["stopped"] is not None for r in rows),
               "loss_level_off": sum(r["loss_level_off"] > 0 for r in rows),
               "guarded_over_unguarded": [min(ratios), max(ratios)],
               "rollbacks": sum(r["rollbacks"] for r in rows)}
    return write(args.out, t0, steps=args.steps, change_at=CHANGE_AT, rows=rows,
                 summary=summary)


if __name__ == "__main__":
    main()
