"""What gradguard costs at ~100M parameters (issue 18): peak memory and step time of a
guarded AdamW run against the bare one, with and without ``Recovery()``; and AutoClip's
per-step cost with a 1M-entry history.

Run:  OMP_NUM_THREADS=1 python benchmarks/scale.py [--quick] [--only memory|time|autoclip]
Writes benchmarks/results/scale.json (sections it did not run are kept from the file).

* memory: each variant trains in its own process (peak RSS, ``ru_maxrss``, is per
  process): bare AdamW; ``Guard`` with default options; the same plus ``Recovery()``.
  Flushes (the update sample) and snapshots must happen inside the few steps, so ``every``
  and ``snapshot_every`` are set to a third of the run; everything else is default. The
  figure is the guarded peak minus the bare peak, in units of the parameter bytes.
* time: the three variants on their own copies of the model in one process, default
  options (every=50, snapshot_every=100), one step of each per round in a random order;
  the figure is the mean step time (flush and snapshot steps included), as a ratio.
* autoclip: ``AutoClip()`` (whole-run history) holding 1M norms: mean time of one
  ``coefficient`` call. Run it with ``PYTHONPATH`` on an older checkout and
  ``--label before`` to record the cost of that version beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import gradguard as gg
from gradguard.telemetry import measure_grads  # (also where older versions keep it)

OUT = Path(__file__).parent / "results" / "scale.json"
VARIANTS = ("bare", "guard", "guard+recovery")


def model_of(width: int, depth: int, seed: int = 0) -> nn.Sequential:
    """``depth`` square Linear layers with ReLU: ``depth * (width**2 + width)`` parameters
    (6 x 4096: 100.7M, the largest single parameter 16.7% of them)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class Run:
    """One variant: its own model, AdamW, and (optionally) a guard."""

    def __init__(self, variant: str, width: int, depth: int, batch: int, every: int | None,
                 snapshot_every: int | None) -> None:
        self.model = model_of(width, depth)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(batch, width, generator=g)
        self.y = torch.randn(batch, width, generator=g)
        self.guard = None
        if variant != "bare":
            kw: dict[str, Any] = {} if every is None else {"every": every}
            if variant == "guard+recovery":
                rkw = {} if snapshot_every is None else {"snapshot_every": snapshot_every}
                kw["recovery"] = gg.Recovery(**rkw)
            self.guard = gg.Guard(self.model, self.opt, **kw)

    def step(self) -> None:
        loss = nn.functional.mse_loss(self.model(self.x), self.y)
        loss.backward()
        if self.guard is None:
            self.opt.step()
        else:
            self.guard.step(loss)
        self.opt.zero_grad(set_to_none=True)

    def close(self) -> None:
        if self.guard is not None:
            self.guard.close()


def param_bytes(width: int, depth: int) -> int:
    return depth * (width * width + width) * 4


# ---- memory: one process per variant ----------------------------------------------------
def child(variant: str, width: int, depth: int, batch: int, steps: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    third = max(1, steps // 3)
    run = Run(variant, width, depth, batch, every=third, snapshot_every=third)
    run.step()
    setup_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(steps - 1):
        run.step()
    run.close()
    stored = 0
    if run.guard is not None and run.guard.recovery is not None:
        store = run.guard.recovery.store
        stored = len(store.steps())
    return {"variant": variant, "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            "peak_rss_kb_after_first_step": setup_kb, "snapshots_kept": stored}


def memory(width: int, depth: int, batch: int, steps: int) -> dict[str, Any]:
    rows = {}
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--child", variant, "--width", str(width),
               "--depth", str(depth), "--batch", str(batch), "--steps", str(steps)]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        rows[variant] = json.loads(out.strip().splitlines()[-1])
        print(f"memory: {variant}: peak RSS {rows[variant]['peak_rss_kb'] / 1024:.0f} MiB",
              file=sys.stderr, flush=True)
    pbytes = param_bytes(width, depth)
    bare = rows["bare"]["peak_rss_kb"] * 1024
    return {
        "param_bytes": pbytes,
        "steps": steps,
        "options": f"Guard defaults except every={max(1, steps // 3)}; Recovery defaults "
                   f"except snapshot_every={max(1, steps // 3)} (keep=2)",
        "peak_rss_bytes": {k: r["peak_rss_kb"] * 1024 for k, r in rows.items()},
        "snapshots_kept": rows["guard+recovery"]["snapshots_kept"],
        "extra_over_bare_in_param_bytes": {
            k: (r["peak_rss_kb"] * 1024 - bare) / pbytes for k, r in rows.items() if k != "bare"
        },
    }


# ---- time: interleaved in one process ---------------------------------------------------
def timing(width: int, depth: int, batch: int, steps: int, warmup: int = 2) -> dict[str, Any]:
    runs = {v: Run(v, width, depth, batch, every=None, snapshot_every=None) for v in VARIANTS}
    for run in runs.values():
        for _ in range(warmup):
            run.step()
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    order, rng = list(VARIANTS), random.Random(0)
    for r in range(steps):
        rng.shuffle(order)
        for v in order:
            t0 = time.perf_counter()
            runs[v].step()
            times[v].append(time.perf_counter() - t0)
        if r % 20 == 19:
            print(f"time: round {r + 1}/{steps}", file=sys.stderr, flush=True)
    for run in runs.values():
        run.close()
    mean = {v: sum(t) / len(t) for v, t in times.items()}
    return {
        "steps": steps,
        "options": "Guard and Recovery defaults (every=50, snapshot_every=100)",
        "mean_seconds_per_step": mean,
        "max_seconds_per_step": {v: max(t) for v, t in times.items()},
        "ratio_to_bare": {v: mean[v] / mean["bare"] for v in VARIANTS},
        "recovery_over_guard": mean["guard+recovery"] / mean["guard"],
    }


# ---- AutoClip with a long history --------------------------------------------------------
def autoclip_cost(history: int, calls: int = 50) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    norms = torch.rand(history, generator=g) * 10 + 0.1
    policy = gg.AutoClip()
    # the checkpoint format every version reads: the history itself
    policy.load_state_dict({"percentile": 10.0, "history_size": None, "calls": history,
                            "history": norms, "count": torch.tensor(history)})
    w = nn.Parameter(torch.zeros(4))
    w.grad = torch.ones(4)
    stats = measure_grads([w])
    policy.coefficient(stats)
    t0 = time.perf_counter()
    for _ in range(calls):
        policy.coefficient(stats)
    return {"history": history, "seconds_per_step": (time.perf_counter() - t0) / calls}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a 6.3M-parameter model, few steps")
    ap.add_argument("--only", choices=("memory", "time", "autoclip"), action="append")
    ap.add_argument("--label", default="after", help="autoclip: key of this measurement")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        args.width, args.depth = 1024, 6
    if args.child:
        print(json.dumps(child(args.child, args.width, args.depth, args.batch, args.steps or 9)))
        return
    out = Path(args.out)
    report: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    report.update({"torch": torch.__version__, "python": platform.python_version(),
                   "machine": platform.machine(), "threads": 1, "quick": args.quick,
                   "model": f"MLP {args.depth}x{args.width}, batch {args.batch}, AdamW (foreach)",
                   "params": param_bytes(args.width, args.depth) // 4})
    only = args.only or ["memory", "time", "autoclip"]
    if "memory" in only:
        report["memory"] = memory(args.width, args.depth, args.batch, args.steps or 9)
    if "time" in only:
        report["time"] = timing(args.width, args.depth, args.batch, args.steps or (24 if args.quick else 110))
    if "autoclip" in only:
        report.setdefault("autoclip", {})[args.label] = autoclip_cost(10**6)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in only if k in report}, indent=2))


if __name__ == "__main__":
    main()
