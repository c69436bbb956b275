"""Step-time overhead of gradguard vs bare AdamW (and clip_grad_norm_, zclip, autoclip).

Run:  OMP_NUM_THREADS=1 python benchmarks/overhead.py [--quick] [--rounds N] [--only fused]
Writes benchmarks/results/overhead.json (ratios measured in one process).

The variants and workloads are ``gradguard bench``'s (:mod:`gradguard.cli.bench`), run the
same way: every round runs one full step of every variant in a fresh random order, the
figure is the median over rounds. Each step is timed twice: wall clock (what
``gradguard bench`` reports) and the CPU time of this thread (``time.thread_time``). On a
machine shared with other jobs the wall clock also counts the time the scheduler gave to
them, several times the differences measured here; the thread's CPU time does not, so the
ratios are read from it (both are in the JSON).
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

from gradguard.cli.bench import Workload, _variants, mlp_workload, transformer_workload

OUT = Path(__file__).parent / "results" / "overhead.json"


def measure(wl: Workload, rounds: int, warmup: int, only: str | None) -> dict[str, Any]:
    variants = {k: f for k, f in _variants(wl).items() if only is None or only in k}
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    names, rng = list(variants), random.Random(0)
    wall: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    tail: dict[str, list[float]] = {k: [] for k in names}
    for _ in range(rounds):
        rng.shuffle(names)
        for name in names:
            w0, c0 = time.perf_counter(), time.thread_time()
            tail[name].append(variants[name]())
            cpu[name].append(time.thread_time() - c0)
            wall[name].append(time.perf_counter() - w0)
    out: dict[str, Any] = {"workload": wl.name, "params": sum(p.numel() for p in wl.model.parameters()),
                           "rounds": rounds}
    # each guarded variant against the same optimizer, bare and with clip_grad_norm_
    bare = {k: "adamw_fused" if "fused" in k else "adamw" for k in names}
    ref = {k: bare[k] + "+clip_grad_norm_" for k in names
           if ("Guard" in k or "(pkg)" in k) and bare[k] + "+clip_grad_norm_" in variants}
    for clock, times in (("cpu", cpu), ("wall", wall)):
        med = {k: statistics.median(v) for k, v in times.items()}
        out[f"seconds_per_step_{clock}"] = med
        out[f"ratio_to_same_bare_optimizer_{clock}"] = {
            k: v / med[bare[k]] for k, v in med.items() if bare[k] in med}
        out[f"ratio_to_same_optimizer_with_clip_grad_norm_{clock}"] = {
            k: med[k] / med[r] for k, r in ref.items()}
        # paired: the ratio within each round (both steps ran seconds apart, under the same
        # load), then the median over rounds; slow drifts of the machine cancel out
        out[f"paired_ratio_to_same_optimizer_with_clip_grad_norm_{clock}"] = {
            k: statistics.median(a / b for a, b in zip(times[k], times[r])) for k, r in ref.items()}
    # The variants differ only after the backward; their forward and backward run the same
    # code, yet on their own copies of the model they differ by +-0.5% from round to round.
    # The step time implied by the tail: the bare step plus the tail's extra cost.
    t_med = {k: statistics.median(v) for k, v in tail.items()}
    out["seconds_after_backward_cpu"] = t_med
    full = out["seconds_per_step_cpu"]
    out["tail_implied_ratio_to_same_optimizer_with_clip_grad_norm_cpu"] = {
        k: (full[bare[k]] + t_med[k] - t_med[bare[k]]) / (full[bare[k]] + t_med[r] - t_med[bare[k]])
        for k, r in ref.items() if bare[k] in t_med
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=None, help="default 41 (15 with --quick)")
    ap.add_argument("--only", default=None, help="run only the variants whose name contains this")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        workloads = [mlp_workload(width=256, depth=4, batch=64),
                     transformer_workload(d=64, layers=2, batch=4, seq=32)]
    else:
        workloads = [mlp_workload(), transformer_workload()]
    rounds = args.rounds or (15 if args.quick else 41)
    results = [measure(wl, rounds, 3, args.only) for wl in workloads]
    report = {
        "torch": torch.__version__, "python": platform.python_version(), "threads": 1,
        "machine": platform.machine(), "quick": args.quick,
        "method": "median over rounds of the step time (fwd+bwd+clip/guard+step+zero_grad); "
                  "each round runs one step of every variant in random order; clocks: this "
                  "thread's CPU time (cpu) and wall clock (wall); paired_*: the median over "
                  "rounds of the ratio of the two steps within a round; seconds_after_backward: the "
                  "part of the step the variants differ in (clip/guard, optimizer step, "
                  "zero_grad); tail_implied_*: bare full step + the tail's extra cost, as a "
                  "ratio",
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    for r in results:
        print(f"{r['workload']}  ({r['params'] / 1e6:.1f}M params, {r['rounds']} rounds)")
        for k, v in r["seconds_per_step_cpu"].items():
            print(f"  {k:<30} cpu {v * 1e3:8.2f} ms  x{r['ratio_to_same_bare_optimizer_cpu'].get(k, float('nan')):.3f} bare"
                  f"   wall {r['seconds_per_step_wall'][k] * 1e3:8.2f} ms")
        print("  vs clip_grad_norm_ (cpu):", {k: round(v, 4) for k, v in
                                              r["ratio_to_same_optimizer_with_clip_grad_norm_cpu"].items()})
        print("  vs clip_grad_norm_, paired per round (cpu):", {k: round(v, 4) for k, v in
              r["paired_ratio_to_same_optimizer_with_clip_grad_norm_cpu"].items()})
        print("  after the backward (cpu ms):", {k: round(v * 1e3, 3) for k, v in
              r["seconds_after_backward_cpu"].items()})
        print("  vs clip_grad_norm_, implied by the tail (cpu):", {k: round(v, 4) for k, v in
              r["tail_implied_ratio_to_same_optimizer_with_clip_grad_norm_cpu"].items()})


if __name__ == "__main__":
    main()
