"""What the dying-units watch (:mod:`gradguard.units`) costs, against a bare AdamW step.

Run:  OMP_NUM_THREADS=1 python benchmarks/units_overhead.py [--rounds N] [--out F]
Writes benchmarks/results/units_overhead.json (ratios measured in one process).

The watch runs on one step in ``SAMPLE`` (10): one read of the watched gradients (the
largest magnitude of each output unit's row) and a few small ops on its counters. A
step-time benchmark's median over rounds never sees a one-in-ten cost, so it is timed on
its own: each round times one full AdamW step (forward, backward, step, zero_grad) and one
``UnitWatch.sample()`` on the gradients of that step, in a random order; the figure is the
median of each over the rounds (this thread's CPU time), and the amortized overhead is
``sample / step / SAMPLE``. Workloads: ``gradguard bench``'s MLP (6x1024, batch 256) and
transformer (4x256, batch 16 x 64 tokens).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from gradguard.cli.bench import Workload, mlp_workload, transformer_workload
from gradguard.units import SAMPLE, UnitWatch, watched

OUT = Path(__file__).parent / "results" / "units_overhead.json"


def measure(wl: Workload, rounds: int) -> dict[str, Any]:
    model = wl.model
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    index = watched(model, params)
    watch = UnitWatch(params, index, params[0].device)
    x, y = wl.batch

    def step() -> None:
        opt.zero_grad(set_to_none=False)
        wl.loss_fn(model(x), y).backward()
        opt.step()

    for _ in range(3):
        step()
        watch.sample()
    times: dict[str, list[float]] = {"step": [], "sample": []}
    rng = random.Random(0)
    for _ in range(rounds):
        order = ["step", "sample"]
        rng.shuffle(order)
        for name in order:
            t0 = time.thread_time()
            step() if name == "step" else watch.sample()
            times[name].append(time.thread_time() - t0)
    s, w = statistics.median(times["step"]), statistics.median(times["sample"])
    return {"workload": wl.name, "params": sum(p.numel() for p in params),
            "watched_weights": len(index), "watched_units": sum(watch.units), "rounds": rounds,
            "seconds_adamw_step_cpu": s, "seconds_sample_cpu": w,
            "sample_over_step": w / s, "amortized_overhead": w / s / SAMPLE}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=41)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    torch.manual_seed(0)
    results = [measure(wl, args.rounds) for wl in (mlp_workload(), transformer_workload())]
    out = {"torch": torch.__version__, "threads": torch.get_num_threads(),
           "machine": platform.machine(), "sample_every": SAMPLE, "results": results}
    for r in results:
        print(f"{r['workload']}: sample {r['seconds_sample_cpu'] * 1e3:.2f} ms, AdamW step "
              f"{r['seconds_adamw_step_cpu'] * 1e3:.1f} ms: {r['sample_over_step']:.4f} of a "
              f"step, {r['amortized_overhead']:.5f} amortized over {SAMPLE} steps")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
