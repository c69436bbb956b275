"""Detection and recovery quality: the calibration outcome, false positives, fault matrix.

Run:  OMP_NUM_THREADS=1 python benchmarks/quality.py [--quick]
Writes benchmarks/results/quality.json.

1. Calibration: a 4x256 ReLU MLP, Adam lr 1e-3, 600 steps, x1000 gradient spikes at steps
   150/300/450: final full-data loss clean, unprotected, and under
   ``Guard(clip=ZClip(), recovery=Recovery())`` (target: guarded <= 2x clean).
2. False positives: healthy runs (4 setups + the calibration MLP) x 1000 steps x 4 seeds
   under the same guard; spike / non-finite events per step (target < 0.1 %), warnings of
   any kind, and the final loss against the same run unguarded: per setup, the mean over
   the seeds at most 2% higher (one seed cannot resolve 2%: a clip moves a run's path,
   and where two paths of one healthy run end differs by up to +-10% on the MLP; the
   per-seed ratios are in the JSON).
3. Fault matrix: every fault x every setup, detected at its step with the right origin,
   no NaN/Inf in parameters or optimizer state, run completed.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import gradguard as gg
from gradguard.lab.calibration import calibration_run
from gradguard.testing import (
    SETUPS,
    Fault,
    make_setup,
    run_with_faults,
)

ALARMS = ("loss_spike", "grad_spike", "nonfinite_grad", "skip")


def calibration(steps: int) -> dict[str, Any]:
    scale = steps / 600
    spikes = tuple(int(s * scale) for s in (150, 300, 450))
    out: dict[str, Any] = {"steps": steps, "spikes": list(spikes)}
    for mode in ("clean", "unprotected", "guarded"):
        r = calibration_run(mode, steps=steps, spikes=spikes)
        out[mode] = {
            "final_loss": r.final_loss,
            "events": sorted({e.kind for e in r.events}),
            "seconds": round(r.seconds, 2),
        }
    out["guarded_over_clean"] = out["guarded"]["final_loss"] / out["clean"]["final_loss"]
    out["unprotected_over_clean"] = out["unprotected"]["final_loss"] / out["clean"]["final_loss"]
    out["pass"] = out["guarded_over_clean"] <= 2.0
    return out


#: The final loss of a healthy run: the mean training loss of its last steps.
TAIL = 50
#: A healthy setup's guarded final loss (mean over the seeds) may be at most this many times
#: the unguarded one's.
HEALTHY_WITHIN = 1.02
#: Healthy seeds per setup.
SEEDS = 4


def false_positives(steps: int, seeds: int) -> dict[str, Any]:
    """Healthy runs under the default guard: alarms, warnings, and the final loss against
    the same run unguarded (a bare ``Guard()``: no clip, no recovery, the same steps as
    no guard; the calibration MLP's full-data loss against its ``clean`` run)."""
    runs = []
    for seed in range(seeds):
        for name in SETUPS:
            r = run_with_faults(make_setup(name, seed=seed), [], steps=steps, check_state=False,
                                guard_kwargs={"clip": gg.ZClip(), "recovery": gg.Recovery()})
            bare = run_with_faults(make_setup(name, seed=seed), [], steps=steps,
                                   check_state=False, guard_kwargs={})
            runs.append({
                "setup": name, "seed": seed, "steps": steps,
                "alarms": sum(e.kind in ALARMS for e in r.events),
                "warnings": [f"{e.kind}@{e.step}" for e in r.events if e.severity != "info"],
                "final_loss": sum(r.losses[-TAIL:]) / TAIL,
                "unguarded_final_loss": sum(bare.losses[-TAIL:]) / TAIL,
            })
        cal = calibration_run("clean_guarded", steps=steps, seed=seed)
        clean = calibration_run("clean", steps=steps, seed=seed)
        runs.append({
            "setup": "calibration_mlp", "seed": seed, "steps": steps,
            "alarms": sum(e.kind in ALARMS for e in cal.events),
            "warnings": [f"{e.kind}@{e.step}" for e in cal.events if e.severity != "info"],
            "final_loss": cal.final_loss, "unguarded_final_loss": clean.final_loss,
        })
    for r in runs:
        r["ratio"] = r["final_loss"] / r["unguarded_final_loss"]
    setups = {}
    for name in dict.fromkeys(r["setup"] for r in runs):
        mine = [r for r in runs if r["setup"] == name]
        setups[name] = {
            "seeds": len(mine),
            "ratio_of_means": statistics.fmean(r["final_loss"] for r in mine)
            / statistics.fmean(r["unguarded_final_loss"] for r in mine),
            "per_seed": [round(r["ratio"], 4) for r in mine],
        }
    total = sum(r["steps"] for r in runs)
    alarms = sum(r["alarms"] for r in runs)
    warnings = sum(len(r["warnings"]) for r in runs)
    within = sum(s["ratio_of_means"] <= HEALTHY_WITHIN for s in setups.values())
    return {"runs": runs, "setups": setups, "steps": total, "alarms": alarms,
            "rate": alarms / total, "warnings": warnings,
            "within_2pct": within, "max_ratio": max(s["ratio_of_means"] for s in setups.values()),
            "runs_within_2pct": sum(r["ratio"] <= HEALTHY_WITHIN for r in runs),
            "pass": alarms / total < 1e-3 and warnings == 0 and within == len(setups)}


def fault_matrix(steps: int) -> dict[str, Any]:
    kinds = ("nan_grad", "inf_grad", "nan_loss", "nan_input", "inf_input", "grad_spike",
             "lr_spike", "fp16_overflow")
    rows = []
    at = steps // 2
    for name in SETUPS:
        for kind in kinds:
            s = make_setup(name)
            layer = {"fp16_overflow": s.half, "nan_grad": s.middle, "inf_grad": s.middle,
                     "grad_spike": s.middle}.get(kind)
            f = Fault(kind, step=at, layer=layer, steps=5 if kind == "lr_spike" else 1)
            r = run_with_faults(s, [f], steps=steps, guard_kwargs={
                "clip": gg.ZClip(), "recovery": gg.Recovery(), "every": 10,
                "watch_activations": True})
            at_step = [e for e in r.events if e.step == at and e.severity != "info"]
            rows.append({
                "setup": name, "fault": kind,
                "detected": [(e.kind, e.layer) for e in at_step],
                "state_nonfinite_steps": r.state_nonfinite_steps,
                "completed": r.steps_run == steps,
                "actions": sorted({e.kind for e in r.events
                                   if e.kind in ("skip", "lr_backoff", "rollback", "abort")}),
            })
    ok = all(r["detected"] and not r["state_nonfinite_steps"] and r["completed"] for r in rows)
    return {"rows": rows, "pass": ok}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="shorter runs (a smoke test)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "quality.json"))
    ap.add_argument("--seeds", type=int, default=SEEDS, help=f"healthy seeds (default {SEEDS})")
    args = ap.parse_args()
    if args.seeds < 1:
        ap.error(f"--seeds {args.seeds}: must be >= 1")
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    res = {
        "calibration": calibration(200 if args.quick else 600),
        "false_positives": false_positives(200 if args.quick else 1000,
                                           1 if args.quick else args.seeds),
        "fault_matrix": fault_matrix(40 if args.quick else 80),
        "quick": args.quick,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }
    res["seconds"] = round(time.perf_counter() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    c, fp, fm = res["calibration"], res["false_positives"], res["fault_matrix"]
    print(f"calibration: clean {c['clean']['final_loss']:.4g}  unprotected "
          f"{c['unprotected']['final_loss']:.4g}  guarded {c['guarded']['final_loss']:.4g}  "
          f"(guarded/clean {c['guarded_over_clean']:.2f}, pass={c['pass']})")
    print(f"false positives: {fp['alarms']} alarms in {fp['steps']} healthy steps "
          f"({fp['rate']:.4%}), {fp['warnings']} warnings; mean final loss over the seeds "
          f"within 2% of unguarded on {fp['within_2pct']}/{len(fp['setups'])} setups (max "
          f"{fp['max_ratio']:.3f}; single runs {fp['runs_within_2pct']}/{len(fp['runs'])}), "
          f"pass={fp['pass']}")
    print(f"fault matrix: {len(fm['rows'])} runs, pass={fm['pass']}")
    print(f"wrote {args.out} in {res['seconds']} s")


if __name__ == "__main__":
    main()
