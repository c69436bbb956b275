"""How long the HTML report takes, and how big it gets, for a long run of a deep model.

Writes a synthetic run directory through ``gg.JsonlSink`` (100k steps, 500 layers, a flush
every 50 steps, a few explosions, NaN steps and recovery events, vanishing early layers),
then times ``gg.report`` on it. Acceptance: < 30 s and < 10 MB.

Run:  OMP_NUM_THREADS=1 python benchmarks/report_scale.py [--steps N --layers L --every E]
Writes benchmarks/results/report_scale.json.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

import gradguard as gg
from gradguard.events import Event, Flush
from gradguard.report import load_run


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--layers", type=int, default=500)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "report_scale.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        t0 = time.perf_counter()
        write_run(run, args.steps, args.layers, args.every)
        t_write = time.perf_counter() - t0
        input_mb = sum(p.stat().st_size for p in run.glob("*.jsonl")) / 1e6
        t0 = time.perf_counter()
        load_run(run)
        t_load = time.perf_counter() - t0
        t0 = time.perf_counter()
        path = gg.report(run)
        t_report = time.perf_counter() - t0
        size_mb = path.stat().st_size / 1e6
    result = {
        "steps": args.steps, "layers": args.layers, "every": args.every,
        "input_jsonl_mb": round(input_mb, 2),
        "write_run_s": round(t_write, 2),
        "load_s": round(t_load, 2),
        "report_s": round(t_report, 2),
        "report_mb": round(size_mb, 3),
        "limits": {"report_s": 30, "report_mb": 10},
        "ok": t_report < 30 and size_mb < 10,
        "machine": platform.platform(), "python": platform.python_version(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
