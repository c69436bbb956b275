"""A bad shard that spikes: what 30 batches x1e4 in a row (unscaled inputs, finite, no
batch norm) cost a digits MLP's held-out loss under the default guard, against the same
run without those batches.

Run:  OMP_NUM_THREADS=1 python benchmarks/shard.py [--seeds N] [--steps N] [--out F]
Writes benchmarks/results/shard.json (about two minutes).

The run: a digits MLP (64-128-128-10, ReLU) on Adam at 1e-3 or SGD with momentum at 0.05,
batches of 64 from 1,400 digits, 800 steps; batches 200-229 are x1e4. The held-out loss is
taken on the other 397 digits. The guard skips and rolls back through the shard; where its
rollbacks lowered the LR ceiling (the relapse rule cannot tell such batches from an LR too
high), the retry tries the LR before the trouble again once the lowered one has settled
(docs/recovery.md, "Trying the LR again").
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import gradguard as gg

try:  # as a script (benchmarks/ is on sys.path) or as the module benchmarks.shard
    from _loop import train_step
    from curriculum import _digits, arguments, digits_mlp, write
except ImportError:  # pragma: no cover
    from benchmarks._loop import train_step
    from benchmarks.curriculum import _digits, arguments, digits_mlp, write

OUT = Path(__file__).parent / "results" / "shard.json"
OPTIMIZERS = ("adam", "sgd")
SHARD = (200, 230)
RUNGS = ("lr_backoff", "rollback", "data_shift", "lr_settled", "loss_level_off", "abort")


def run(optimizer: str, seed: int, steps: int, *, shard: bool, guarded: bool) -> dict[str, Any]:
    """One run: its held-out loss, and (guarded) the ladder's rungs and final LR factor."""
    x_all, y_all = _digits()
    x_tr, y_tr, x_te, y_te = x_all[:1400], y_all[:1400], x_all[1400:], y_all[1400:]
    model, opt, guard = digits_mlp(optimizer, seed, guarded)
    g = torch.Generator().manual_seed(seed)
    stopped = None
    try:
        for step in range(steps):
            i = torch.randint(0, 1400, (64,), generator=g)
            bad = shard and SHARD[0] <= step < SHARD[1]
            loss = nn.functional.cross_entropy(model(x_tr[i] * (1e4 if bad else 1.0)), y_tr[i])
            train_step(loss, opt, guard)
    except gg.TrainingDiverged:
        stopped = step
    out: dict[str, Any] = {"stopped": stopped}
    if guard is not None:
        guard.close()
        out["rungs"] = [[e.kind, e.step] + (["raised"] if (e.data or {}).get("raised") else [])
                        for e in guard.events if e.kind in RUNGS]
        out["lr_factor"] = guard.recovery.lr_factor
    with torch.no_grad():
        held = nn.functional.cross_entropy(model(x_te), y_te).item()
    out["held_out"] = held if torch.isfinite(torch.tensor(held)) else None
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = arguments(__doc__, argv, seeds=3, steps=800, out=OUT)
    t0 = time.time()
    rows = []
    for optimizer in OPTIMIZERS:
        for seed in range(args.seeds):
            clean = run(optimizer, seed, args.steps, shard=False, guarded=False)["held_out"]
            plain = run(optimizer, seed, args.steps, shard=True, guarded=False)["held_out"]
            guarded = run(optimizer, seed, args.steps, shard=True, guarded=True)
            rungs = guarded["rungs"]
            row = {"optimizer": optimizer, "seed": seed, "clean": clean, "unguarded": plain,
                   "guarded": guarded["held_out"],
                   "guarded_over_clean": (guarded["held_out"] / clean
                                          if guarded["held_out"] is not None else None),
                   "unguarded_over_clean": plain / clean if plain is not None else None,
                   "stopped": guarded["stopped"], "lr_factor": guarded["lr_factor"],
                   "rollbacks": sum(r[0] == "rollback" for r in rungs),
                   "raised": sum(len(r) > 2 for r in rungs), "rungs": rungs}
            rows.append(row)
            ratio = row["guarded_over_clean"]
            print(f"{optimizer} seed {seed}: clean {clean:.4f}, unguarded "
                  f"{plain if plain is None else round(plain, 4)}, guarded "
                  f"{row['guarded']:.4f} ({ratio:.3g}x), {row['rollbacks']} rollback(s), "
                  f"LR x{row['lr_factor']:.3g} at the end"
                  + (", retried and raised" if row["raised"] else ""))
    ratios = [r["guarded_over_clean"] for r in rows if r["guarded_over_clean"] is not None]
    summary = {"runs": len(rows), "stopped": sum(r["stopped"] is not None for r in rows),
               "within_2x": sum(r <= 2 for r in ratios),
               "guarded_over_clean": [min(ratios), max(ratios)],
               "raised": sum(r["raised"] for r in rows),
               "lr_lowered_at_end": sum(r["lr_factor"] < 1 for r in rows)}
    return write(args.out, t0, steps=args.steps, shard=list(SHARD), rows=rows, summary=summary)


if __name__ == "__main__":
    main()
