"""``gg.doctor`` mid-run: the real zoo's healthy models, trained a few steps on their batch at
their own LR and at 100x it, then doctored with the optimizer that trained them.

At their own LR a model must stay healthy to the doctor. At 100x training moves weights off
their scale (grown, an attention collapsed, LayerNorm gains shrunk, channels that stopped
varying); the doctor must blame the LR for what the LR did, not tell the user to
re-initialise (``gradguard.doctor._trained``, docs/doctor.md "Weights moved by training").

For every case and LR multiplier: the loss before and after the steps, the doctor's
findings (cause, severity, where), and how each init or constant-group finding reads:
``trained`` (the remedy blames the LR: "as a learning rate too high does"), ``other
reading`` (the init's advice with the trained reading added: an optimizer with no bound on
its step, or a constant-group finding), or ``init`` (the init's advice alone); for
``nonfinite_loss``, the layer's NaN/Inf weights where the doctor found them.

Run:  OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/doctor_midrun.py [--steps 30] [--mult 1 100]
Writes benchmarks/results/doctor_midrun.json (about 4 minutes).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "doctor_midrun.json"
#: The causes whose remedy is read for the init / training question.
READ = ("init_too_large", "init_too_small", "unscaled_input")


def reading(remedy: str) -> str:
    """How a finding's remedy reads: ``trained``, ``other reading`` or ``init``."""
    if "as a learning rate too high does" in remedy:
        return "trained"
    if "If training moved them" in remedy or "If training got it there" in remedy:
        return "other reading"
    return "init"


def run_case(case: Any, steps: int, mult: float) -> dict[str, Any]:
    """Train ``case`` ``steps`` steps on its batch at ``mult`` x its LR, then doctor it."""
    import gradguard as gg
    from gradguard._tensors import call_model

    t0 = time.perf_counter()
    model, batch, loss_fn, opt = case.build()
    for g in opt.param_groups:
        g["lr"] *= mult
    x, y = batch
    losses = []
    for _ in range(steps):
        loss = loss_fn(call_model(model, x), y)
        losses.append(float(loss))
        opt.zero_grad()
        loss.backward()
        opt.step()
    diag = gg.doctor(model, batch, loss_fn, optimizer=opt)
    findings = [{"cause": f.cause, "severity": f.severity, "where": f.where,
                 **({"reading": reading(f.remedy)} if f.cause in READ else {}),
                 **({"weights_nonfinite": f.evidence["weights_nonfinite"]}
                    if "weights_nonfinite" in f.evidence else {})}
                for f in diag.findings]
    return {"case": case.name, "mult": mult, "optimizer": type(opt).__name__,
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
            "healthy": diag.healthy, "findings": findings,
            "seconds": round(time.perf_counter() - t0, 2)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30, help="training steps before the doctor")
    ap.add_argument("--mult", type=float, nargs="+", default=[1.0, 100.0],
                    help="LR multipliers to train at")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from benchmarks._loop import write_result
    warnings.filterwarnings("ignore")
    from tests.zoo.real.healthy import REAL_HEALTHY

    rows = []
    for mult in args.mult:
        for case in REAL_HEALTHY:
            torch.manual_seed(0)
            try:
                row = run_case(case, args.steps, mult)
            except Exception as e:  # one case's failure must not lose the others
                row = {"case": case.name, "mult": mult, "error": f"{type(e).__name__}: {e}"}
            rows.append(row)
            print(f"x{mult:g} {row['case']:32s} "
                  f"{'healthy' if row.get('healthy') else row.get('error') or ''} "
                  f"{[(f['cause'], f.get('reading')) for f in row.get('findings', [])][:3]}",
                  flush=True)
    summary = {}
    for mult in args.mult:
        sub = [r for r in rows if r["mult"] == mult and "error" not in r]
        reads = Counter(f["reading"] for r in sub for f in r["findings"] if "reading" in f)
        summary[f"x{mult:g}"] = {"cases": len(sub), "healthy": sum(r["healthy"] for r in sub),
                                 "readings": dict(reads),
                                 "nan_weights_named": sum(1 for r in sub for f in r["findings"]
                                                          if "weights_nonfinite" in f),
                                 "errors": sum(1 for r in rows if r["mult"] == mult and "error" in r)}
    result = {"steps": args.steps, "torch": torch.__version__, "summary": summary, "rows": rows}
    return write_result(args.out, result, summary)


if __name__ == "__main__":
    main()
