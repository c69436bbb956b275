"""A paper's LR on a small dataset: a ``transformers`` MobileNetV2 (``depth_multiplier``
0.35, from its config) on the digits upscaled to 32 pixels, SGD momentum at 0.05 (the LR
of the MobileNetV2 paper; 0.005 trains here), 300 steps of 32, under the default guard
(``Guard(model, opt, clip=ZClip(), recovery=Recovery())``), against the same loop
unguarded and its twin at 0.005; then both again with the LR reached through a linear
warm-up of ``WARMUP`` (30) steps (``LambdaLR``), as training recipes do. Held-out loss
(eval mode) on 397 digits no step trained on.

Run:  OMP_NUM_THREADS=1 python benchmarks/paper_lr.py [--seeds N] [--out F]
Writes benchmarks/results/paper_lr.json (about 6 minutes).

The run learns nothing at 0.05: its batch losses sit 2-6x the fresh model's from step 5
and go NaN around step 180; with the warm-up it dips a little below the fresh model's loss,
within its noise, before the LR nears 0.05. docs/recovery.md ("A run that learnt nothing")
has the rule that finds it at its first judgement and the ceiling its rollback sets.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import gradguard as gg

try:  # as a script (benchmarks/ is on sys.path) or as the module benchmarks.paper_lr
    from _loop import train_step
except ImportError:  # pragma: no cover
    from benchmarks._loop import train_step

OUT = Path(__file__).parent / "results" / "paper_lr.json"
LR, TWIN_LR, STEPS, BATCH, WARMUP = 0.05, 0.005, 300, 32, 30


def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16
    img = nn.functional.interpolate(((x - 0.3) / 0.4).view(-1, 1, 8, 8), size=32)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return img, torch.tensor(d.target), perm[:1400], perm[1400:]


def run(lr: float, seed: int, guarded: bool, warmup: int = 0) -> dict[str, Any]:
    import transformers

    transformers.logging.set_verbosity_error()
    img, y, tr, te = data()
    torch.manual_seed(seed)
    cfg = transformers.MobileNetV2Config(num_channels=1, image_size=32, depth_multiplier=0.35,
                                         num_labels=10)
    model = transformers.MobileNetV2ForImageClassification(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup)) if warmup else None
    guard = gg.Guard(model, opt, clip=gg.ZClip(), recovery=gg.Recovery()) if guarded else None
    gen = torch.Generator().manual_seed(seed + 100)
    t0 = time.perf_counter()
    for _ in range(STEPS):
        idx = tr[torch.randint(0, len(tr), (BATCH,), generator=gen)]
        loss = nn.functional.cross_entropy(model(pixel_values=img[idx]).logits, y[idx])
        train_step(loss, opt, guard)
        if sched is not None:
            sched.step()
    out: dict[str, Any] = {"seconds": round(time.perf_counter() - t0, 1)}
    if guard is not None:
        guard.close()
        out["events"] = [f"{e.kind}@{e.step}" for e in guard.events
                         if e.severity != "info" or e.kind in ("rollback", "lr_backoff", "lr_settled")]
        out["lr_ceiling"] = guard.recovery.lr_ceiling
    model.eval()
    with torch.no_grad():
        held = nn.functional.cross_entropy(model(pixel_values=img[te]).logits, y[te]).item()
    out["held_out"] = held if math.isfinite(held) else str(held)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rows = []
    for seed in range(args.seeds):
        twin, bare, guarded = run(TWIN_LR, seed, False), run(LR, seed, False), run(LR, seed, True)
        warm_bare, warm = run(LR, seed, False, WARMUP), run(LR, seed, True, WARMUP)

        def over(r: dict[str, Any], twin: dict[str, Any] = twin) -> float | str:
            h = r["held_out"]
            return round(h / twin["held_out"], 4) if isinstance(h, float) else h

        rows.append({"seed": seed, "twin": twin, "unguarded": bare, "guarded": guarded,
                     "unguarded_over_twin": over(bare), "guarded_over_twin": over(guarded),
                     "warmup_unguarded": warm_bare, "warmup_guarded": warm,
                     "warmup_unguarded_over_twin": over(warm_bare),
                     "warmup_guarded_over_twin": over(warm)})
        print(f"seed {seed}: twin {twin['held_out']:.4f}, unguarded {over(bare)}x, guarded "
              f"{over(guarded)}x {guarded['events']}; with warm-up unguarded {over(warm_bare)}x, "
              f"guarded {over(warm)}x {warm['events']}", flush=True)

    def within(key: str) -> int:
        return sum(isinstance(r[key], float) and r[key] <= 2 for r in rows)

    result = {"setup": {"lr": LR, "twin_lr": TWIN_LR, "steps": STEPS, "batch": BATCH,
                        "warmup": WARMUP},
              "rows": rows,
              "within_2x": within("guarded_over_twin"),
              "warmup_within_2x": within("warmup_guarded_over_twin"),
              "seconds": round(time.perf_counter() - t0, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"guarded within 2x of the twin: {result['within_2x']}/{len(rows)}, with warm-up "
          f"{result['warmup_within_2x']}/{len(rows)}; wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
