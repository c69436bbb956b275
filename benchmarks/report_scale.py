"""How long the HTML report takes, how much memory it needs, and how big it gets, for a
long run of a deep model.

Writes a synthetic run directory through ``gg.JsonlSink`` (500 layers, a flush every 50
steps, a few explosions, NaN steps and recovery events, vanishing early layers) for each
size in ``--steps``, then renders it with ``gg.report`` in a fresh process and reads that
process's peak resident memory (``ru_maxrss``), so the figure is what ``gradguard report``
itself needs, imports included. Acceptance: 100k steps (78 MB of JSONL) in < 30 s into
< 10 MB; 266k steps (a 200 MB ``metrics.jsonl``) with < 600 MB peak RSS.

Run:  OMP_NUM_THREADS=1 python benchmarks/report_scale.py [--steps N [N ...] --layers L --every E]
Writes benchmarks/results/report_scale.json.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import gradguard as gg
from gradguard.events import Event, Flush


def write_run(d: Path, steps: int, layers: int, every: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    names = [f"blocks.{i}.mlp" for i in range(layers)]
    depth_scale = np.geomspace(1e-6, 1.0, layers)  # early layers vanish
    explode = set(rng.choice(steps, size=20, replace=False).tolist())
    nan_steps = set(rng.choice(steps, size=5, replace=False).tolist())
    sink = gg.JsonlSink(d, fsync=False)
    for start in range(0, steps, every):
        st = list(range(start, min(start + every, steps)))
        norm = np.exp(rng.normal(0, 0.3, size=len(st)))
        recs, events = [], []
        for s, n in zip(st, norm.tolist()):
            coef = 1.0
            if s in explode:
                n, coef = n * 1e4, 1e-4
                events.append(Event("grad_spike", s, "warning", f"step {s}: gradient spike",
                                    layer=names[-1], value=n, remedy="Lower the learning rate."))
            finite = s not in nan_steps
            if not finite:
                events += [
                    Event("nonfinite_grad", s, "error", f"step {s}: gradient norm is NaN",
                          layer=names[layers // 2], remedy="Run gg.doctor."),
                    Event("skip", s, "warning", f"step {s}: optimizer step skipped"),
                    Event("lr_backoff", s, "warning", f"step {s}: LR x0.5", data={"factor": 0.5}),
                ]
            recs.append({"step": s, "loss": 2.0 / math.sqrt(1 + s) if finite else None,
                         "grad_norm": n if finite else None, "clip_coef": coef,
                         "skipped": not finite, "finite": finite})
        g = depth_scale * np.exp(rng.normal(0, 0.2, size=layers))
        layer = {"step": st[-1], "first_step": st[0], "layers": names,
                 "grad_norm": g.tolist(), "grad_norm_max": (g * 1.5).tolist()}
        sink.write(Flush(steps=recs, layers=layer, events=events))
    sink.close()


#: Renders a run directory in a fresh process and prints its time and peak memory: the
#: parent's own memory (the synthetic writer) must not count. CPU seconds are reported
#: next to wall seconds because on a shared machine the wall clock measures the neighbours.
CHILD = """
import json, resource, sys, time
import gradguard as gg
from gradguard.report import load_run
rss_import = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
data = load_run(sys.argv[1])
t_load = time.perf_counter() - t0
del data
def cpu():
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime
t0, c0 = time.perf_counter(), cpu()
path = gg.report(sys.argv[1])
t_report, c_report = time.perf_counter() - t0, cpu() - c0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"load_s": t_load, "report_s": t_report, "report_cpu_s": c_report,
                  "path": str(path), "import_rss_kib": rss_import, "peak_rss_kib": peak}))
"""

#: Acceptance (issue 6: time and size at 100k steps; issue 14: memory at 200 MB).
LIMITS = {"report_s": 30, "report_mb": 10, "peak_rss_mib_at_200mb": 600}


def measure(steps: int, layers: int, every: int) -> dict[str, Any]:
    """Write a run of ``steps`` steps, render it in a child process, return the figures."""
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        t0 = time.perf_counter()
        write_run(run, steps, layers, every)
        t_write = time.perf_counter() - t0
        metrics_mb = (run / "metrics.jsonl").stat().st_size / 1e6
        input_mb = sum(p.stat().st_size for p in run.glob("*.jsonl")) / 1e6
        child = subprocess.run([sys.executable, "-c", CHILD, str(run)], check=True,
                               capture_output=True, text=True)
        r = json.loads(child.stdout.strip().splitlines()[-1])
        size_mb = Path(r["path"]).stat().st_size / 1e6
    return {
        "steps": steps, "layers": layers, "every": every,
        "metrics_jsonl_mb": round(metrics_mb, 2),
        "input_jsonl_mb": round(input_mb, 2),
        "write_run_s": round(t_write, 2),
        "load_s": round(r["load_s"], 2),
        "report_s": round(r["report_s"], 2),
        "report_cpu_s": round(r["report_cpu_s"], 2),
        "report_mb": round(size_mb, 3),
        "import_rss_mib": round(r["import_rss_kib"] / 1024, 1),
        "peak_rss_mib": round(r["peak_rss_kib"] / 1024, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, nargs="+", default=[100_000, 266_000])
    ap.add_argument("--layers", type=int, default=500)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "report_scale.json"))
    args = ap.parse_args()
    runs = [measure(n, args.layers, args.every) for n in args.steps]
    for r in runs:
        print(json.dumps(r), flush=True)
    big = [r for r in runs if r["metrics_jsonl_mb"] >= 200]
    result = {
        "runs": runs,
        "limits": LIMITS,
        "ok": all(r["report_s"] < LIMITS["report_s"] and r["report_mb"] < LIMITS["report_mb"]
                  for r in runs if r["steps"] <= 100_000)
        and all(r["peak_rss_mib"] < LIMITS["peak_rss_mib_at_200mb"] for r in big),
        "machine": platform.platform(), "python": platform.python_version(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
