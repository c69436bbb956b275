"""The LR probe's two arms, forked by hand: how much lower the loss of the same weights is
after ``TRIAL`` steps at half the LR than after as many at the LR in force.

Run:  OMP_NUM_THREADS=1 python benchmarks/probe_arms.py [--seeds N] [--factor F] [--out F]
Writes benchmarks/results/probe_arms.json (about 8 minutes with 3 seeds).

Every recipe of benchmarks/rescue.py trains unguarded; at a few steps (100 and 200 for the
failing ones, 100-500 for the healthy ones over 600 steps) the training state is copied
twice: one copy trains ``TRIAL`` (30) steps at the LR in force (the control), the other
as many at half of it (the trial), on the batches that follow (the control's first, then
the trial's, as the guard's probe runs them); the run's own weights are untouched and it
goes on with the batches after the arms' (the suite's batch streams are not indexed by
step, as a data loader's are not). Each arm's
level is the median of its last ``MEASURE`` (20) losses, as the probe judges them
(:mod:`gradguard.recovery.probe`). ``ratio`` is trial / control: the probe calls the LR too
high at ``GAIN`` (0.5) or less. No guard is involved: this measures what the probe's test
sees, not when its cue fires.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from gradguard.recovery.probe import FACTOR, GAIN, MEASURE, TRIAL

try:  # as a script (benchmarks/ is on sys.path) or as the module benchmarks.probe_arms
    import rescue as R
    import rescue_cases as rc
except ModuleNotFoundError:
    from benchmarks import rescue as R
    from benchmarks import rescue_cases as rc

OUT = Path(__file__).parent / "results" / "probe_arms.json"
FAILING_AT = (100, 200)
HEALTHY_AT = (100, 200, 300, 400, 500)
HEALTHY_STEPS = 600


def _step(task: rc.Task, recipe: rc.Recipe, model: Any, opt: Any, batch: Any, step: int,
          factor: float) -> float:
    x, y = batch(step)
    loss = task.loss(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if recipe.clip_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.clip_norm)
    lrs = [g["lr"] for g in opt.param_groups]
    for g in opt.param_groups:
        g["lr"] = g["lr"] * factor
    opt.step()
    for g, lr in zip(opt.param_groups, lrs):
        g["lr"] = lr
    return loss.item()


def arms(task: rc.Task, recipe: rc.Recipe, steps: int, at: tuple[int, ...],
         seed: int, factor: float = FACTOR) -> dict[str, Any]:
    """Fork the unguarded run at each step of ``at``: the two arms' levels and their ratio."""
    torch.manual_seed(seed)
    model = task.model()
    opt = recipe.make_optimizer(model)
    sched = recipe.schedule(opt, steps) if recipe.schedule is not None else None
    batch = task.batches(seed)
    forks: list[dict[str, Any]] = []
    for step in range(steps):
        if step in at:
            levels = []
            for f, offset in ((1.0, 0), (factor, TRIAL)):
                m = copy.deepcopy(model)
                o = recipe.make_optimizer(m)
                o.load_state_dict(opt.state_dict())
                levels.append(statistics.median(
                    [_step(task, recipe, m, o, batch, step + offset + i, f)
                     for i in range(TRIAL)][-MEASURE:]))
            control, trial = levels
            ratio = trial / control if control > 0 else math.nan
            forks.append({"step": step, "control": round(control, 5), "trial": round(trial, 5),
                          "ratio": round(ratio, 4), "too_high": ratio <= GAIN})
        _step(task, recipe, model, opt, batch, step, 1.0)
        if sched is not None:
            sched.step()
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            return {"forks": forks, "nonfinite_at": step}
    return {"forks": forks, "nonfinite_at": None}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3, help="seeds of the failing recipes (3)")
    ap.add_argument("--factor", type=float, default=FACTOR,
                    help=f"the trial arm's LR over the control's ({FACTOR}, the probe's)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    if not 0.0 < args.factor < 1.0:
        ap.error(f"--factor must be in (0, 1), got {args.factor}")
    t0 = time.perf_counter()
    failing = [{"name": c.name, "held_out": c.held_out, "seed": seed,
                **arms(c.task, c.failing, max(c.steps, max(FAILING_AT) + 2 * TRIAL),
                       FAILING_AT, seed, args.factor)}
               for c in R.RESCUE_CASES + R.HELD_OUT_CASES for seed in range(args.seeds)]
    healthy = [{"name": c.name, "seed": 0,
                **arms(c.task, c.recipe, HEALTHY_STEPS, HEALTHY_AT, 0, args.factor)}
               for c in R.HEALTHY_CASES]
    low = [f["ratio"] for h in healthy for f in h["forks"] if math.isfinite(f["ratio"])]
    out = {"environment": R.environment(), "trial": TRIAL, "measure": MEASURE, "factor": args.factor,
           "gain": GAIN, "failing": failing, "healthy": healthy,
           "healthy_lowest_ratio": min(low) if low else None,
           "healthy_too_high": sum(f["too_high"] for h in healthy for f in h["forks"]),
           "seconds": round(time.perf_counter() - t0, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    for r in failing + healthy:
        print(f"{r['name']:<36} seed {r['seed']}  "
              + "  ".join(f"@{f['step']} {f['ratio']:.2f}" for f in r["forks"])
              + (f"  non-finite at {r['nonfinite_at']}" if r["nonfinite_at"] is not None else ""))
    print(f"healthy: lowest ratio {out['healthy_lowest_ratio']}, "
          f"{out['healthy_too_high']} fork(s) at or under GAIN; wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
