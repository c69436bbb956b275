"""Early warning: does ``divergence_risk`` fire before runs diverge, and never on healthy ones?

Run:  OMP_NUM_THREADS=1 python benchmarks/warning.py [--split tune|heldout|all] [--rounds N]
Writes benchmarks/results/warning.json.

Every run of ``benchmarks/warning_runs.py`` trains under
``Guard(clip=None, on_nonfinite="off", recovery=None, watch_activations=True)``: the guard
only observes, the run is the same as unguarded. A run's divergence step is the first step
whose loss is non-finite or above 10x the median of the previous 100 steps (at least 10).

Two configurations are scored from the same training run:

* ``default`` -- what ``Guard(...)`` does out of the box (no activation watch): the
  detector replayed over the flushed windows with the optimizer's LR of each flush, exactly
  as the guard calls it (a unit test checks the replay against the guard);
* ``watch`` -- the guard's own events with ``watch_activations=True`` (attention/output
  logits, half-precision headroom).

Figures: hit rate (a warning >= 50 steps before the divergence step), per-run lead times,
``divergence_risk`` events per 10,000 healthy steps, warnings of any kind on healthy runs,
separately for the runs used to choose the defaults (``tune``) and the held-out runs.
Overhead: step time with the detector on vs off vs bare AdamW, interleaved in one process.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/warning.py`

import gradguard as gg
from benchmarks.warning_runs import SPECS, Spec
from gradguard import precursors
from gradguard.cli import bench
from gradguard.detectors import DetectorConfig, DetectorState, detect

#: The divergence label: the loss above this multiple of its running median ...
LABEL_RATIO = 10.0
#: ... over this many previous steps (at least LABEL_MIN of them).
LABEL_HISTORY, LABEL_MIN = 100, 10
#: A warning counts when it comes at least this many steps before the divergence step.
LEAD = 50
EVERY = 50


def divergence_step(losses: list[float]) -> int | None:
    """The first step whose loss is non-finite or > 10x the median of the previous 100.

    Example:
        >>> divergence_step([1.0] * 20 + [1.5, 30.0])
        21
    """
    for t, x in enumerate(losses):
        if not math.isfinite(x):
            return t
        prev = losses[max(0, t - LABEL_HISTORY) : t]
        if len(prev) >= LABEL_MIN and x > LABEL_RATIO * statistics.median(prev):
            return t
    return None


class _Capture:
    """A sink keeping every flushed window, with the optimizer state the guard saw."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.flushes: list[tuple[Any, dict[str, Any]]] = []
        self.events: list[gg.Event] = []

    def write(self, flush: gg.events.Flush) -> None:
        self.events += flush.events
        if flush.window is not None:
            self.flushes.append((flush.window, precursors.optimizer_info(self.optimizer)))

    def close(self) -> None:
        pass


def train(spec: Spec) -> dict[str, Any]:
    """One run under an observing guard; returns its label, events and timings."""
    torch.manual_seed(spec.seed)
    run = spec.make(spec.seed)
    cap = _Capture(run.optimizer)
    guard = gg.Guard(run.model, run.optimizer, clip=None, on_nonfinite="off", every=EVERY,
                     sinks=[cap], watch_activations=True)
    t0 = time.perf_counter()
    div = None
    for t in range(spec.steps):
        for g in run.optimizer.param_groups:
            g["lr"] = run.lr(t)
        loss = run.loss(run.model, run.batch(t))
        loss.backward()
        guard.step(loss)
        run.optimizer.zero_grad(set_to_none=True)
        if guard.telemetry.pending == 0:  # just flushed: label what we have (host floats)
            div = divergence_step([x for w, _ in cap.flushes for x in w.loss.tolist()])
            if div is not None:
                break
    guard.close()
    seconds = time.perf_counter() - t0
    losses = [x for w, _ in cap.flushes for x in w.loss.tolist()]
    div = divergence_step(losses)
    # the default configuration: the same detector without the activation watch
    state, default = DetectorState(), []
    for w, optim in cap.flushes:
        inputs = precursors.PrecursorInputs(optim=optim, every=EVERY)
        default += detect(w, state=state, config=DetectorConfig(), precursor_inputs=inputs)
    return {"spec": spec, "div": div, "steps": len(losses), "seconds": seconds,
            "events": {"default": default, "watch": cap.events}}


def score(r: dict[str, Any], config: str) -> dict[str, Any]:
    spec: Spec = r["spec"]
    div = r["div"]
    evs = [e for e in r["events"][config] if div is None or e.step < div]
    risk = [e for e in evs if e.kind == "divergence_risk"]
    out: dict[str, Any] = {
        "name": spec.name, "expect": spec.expect, "split": spec.split, "note": spec.note,
        "steps": r["steps"], "divergence_step": div,
        "risk_events": [{"step": e.step, "signal": e.data.get("signal"),
                         "steps_left": e.data.get("steps_left"), "layer": e.layer,
                         "message": e.message, "remedy": e.remedy} for e in risk],
        "other_warnings": sorted({e.kind for e in evs
                                  if e.severity != "info" and e.kind != "divergence_risk"}),
    }
    if spec.expect == "diverge":
        first = risk[0].step if risk else None
        out["first_warning"] = first
        out["lead"] = None if first is None or div is None else div - first
        out["hit"] = out["lead"] is not None and out["lead"] >= LEAD
    return out


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    div = [r for r in rows if r["expect"] == "diverge"]
    labelled = [r for r in div if r["divergence_step"] is not None]
    healthy = [r for r in rows if r["expect"] == "healthy"]
    h_steps = sum(r["steps"] for r in healthy)
    h_events = sum(len(r["risk_events"]) for r in healthy)
    leads = [r["lead"] for r in labelled if r["hit"]]
    return {
        "diverging_runs": len(div), "diverged_as_labelled": len(labelled),
        "hits": sum(r["hit"] for r in labelled),
        "hit_rate": sum(r["hit"] for r in labelled) / max(len(labelled), 1),
        "median_lead_of_hits": statistics.median(leads) if leads else None,
        "healthy_runs": len(healthy), "healthy_steps": h_steps,
        "healthy_risk_events": h_events,
        "risk_events_per_10k_healthy_steps": h_events / max(h_steps, 1) * 1e4,
        "healthy_runs_with_false_alarms": [r["name"] for r in healthy if r["risk_events"]],
        "healthy_runs_diverged": [r["name"] for r in healthy if r["divergence_step"] is not None],
        "healthy_runs_with_other_warnings": {r["name"]: r["other_warnings"] for r in healthy
                                             if r["other_warnings"]},
    }


# ---- overhead ----------------------------------------------------------------------------
def _variants(wl: bench.Workload) -> dict[str, Any]:
    x, y = wl.batch
    fns = {}
    for name, kw in (("adamw", None),
                     ("Guard(precursors off)", {"detector_config": DetectorConfig(
                         precursors=None)}),
                     ("Guard(default: precursors on)", {}),
                     ("Guard(watch_activations=True)", {"watch_activations": True})):
        model = copy.deepcopy(wl.model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        guard = None if kw is None else gg.Guard(model, opt, clip=None, every=EVERY, **kw)

        def step(model: Any = model, opt: Any = opt, guard: Any = guard, wl: Any = wl,
                 x: Any = x, y: Any = y) -> None:
            loss = wl.loss_fn(model(x), y)
            loss.backward()
            opt.step() if guard is None else guard.step(loss)
            opt.zero_grad(set_to_none=True)
        fns[name] = step
    return fns


def detector_ms(wl: bench.Workload, repeats: int = 20) -> float:
    """Milliseconds the precursors take per flush on a full window of ``wl``'s parameters,
    with a full history (every signal judged)."""
    names = [n for n, _ in wl.model.named_parameters()]
    layers = list(dict.fromkeys(n.rpartition(".")[0] for n in names))
    gen = torch.Generator().manual_seed(0)

    def window(k: int) -> Any:
        n, p = EVERY, len(names)
        return gg.telemetry.Window(
            steps=list(range(k * n, k * n + n)), loss=torch.rand(n, generator=gen) + 1,
            total_norm=torch.rand(n, generator=gen) + 1, clip_coef=torch.ones(n),
            skipped=torch.zeros(n, dtype=torch.bool), param_norms=torch.rand(n, p, generator=gen),
            names=names, layers=layers,
            layer_index=[layers.index(m.rpartition(".")[0]) for m in names],
            weight_norms=torch.rand(p, generator=gen) + 1, update_norms=torch.rand(p) * 1e-3)

    state = precursors.PrecursorState()
    inputs = precursors.PrecursorInputs(optim={"lr": 1e-3, "weight_decay": 0.0}, every=EVERY)
    ws = [window(k) for k in range(precursors.TREND_POINTS + repeats)]
    for w in ws[: precursors.TREND_POINTS]:
        precursors.detect_precursors(w, state, inputs=inputs)
    t0 = time.perf_counter()
    for w in ws[precursors.TREND_POINTS :]:
        precursors.detect_precursors(w, state, inputs=inputs)
    return (time.perf_counter() - t0) / repeats * 1e3


def overhead(rounds: int, block: int = EVERY) -> dict[str, Any]:
    """Interleaved step times on small workloads (the detector's cost is largest relative
    to a small step), plus the detector's own time per flush on the standard overhead
    workloads of ``gradguard.bench`` as a fraction of their bare AdamW step time."""
    small = []
    for wl in (bench.mlp_workload(width=256, depth=4, batch=64),
               bench.transformer_workload(d=64, layers=2, batch=4, seq=32)):
        # mean over blocks of ``block`` steps (each holds one flush, so the detector's cost
        # is in it), variants in random order per round; the median over rounds
        fns = _variants(wl)
        for fn in fns.values():  # warm-up: one block each, so every guard has flushed
            for _ in range(block):
                fn()
        times: dict[str, list[float]] = {k: [] for k in fns}
        names, rng = list(fns), random.Random(0)
        for _ in range(rounds):
            rng.shuffle(names)
            for n in names:
                t0 = time.perf_counter()
                for _ in range(block):
                    fns[n]()
                times[n].append((time.perf_counter() - t0) / block)
        med = {k: statistics.median(v) for k, v in times.items()}
        small.append({"workload": wl.name, "seconds_per_step": med,
                      "ratio_to_adamw": {k: v / med["adamw"] for k, v in med.items()},
                      "precursors_on_over_off": med["Guard(default: precursors on)"]
                      / med["Guard(precursors off)"], "rounds": rounds, "block": block})
    standard = []
    for wl in (bench.mlp_workload(), bench.transformer_workload()):
        x, y = wl.batch
        opt = torch.optim.AdamW(wl.model.parameters(), lr=1e-4)
        ts = []
        for _ in range(4):
            t0 = time.perf_counter()
            wl.loss_fn(wl.model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            ts.append(time.perf_counter() - t0)
        bare = statistics.median(ts[1:])
        ms = detector_ms(wl)
        standard.append({"workload": wl.name, "adamw_seconds_per_step": bare,
                         "detector_ms_per_flush": ms,
                         "added_per_step_ratio": 1 + ms / 1e3 / (EVERY * bare)})
    return {"interleaved_small": small, "standard_workloads": standard}


def markdown(report: dict[str, Any]) -> str:
    """The figures of docs/early-warning.md from a results file."""
    out = ["| split | configuration | diverging runs warned >= 50 steps ahead | "
           "median lead of those | false alarms (healthy steps) | per 10k healthy steps |",
           "|---|---|---|---|---|---|"]
    for split in ("tune", "heldout", "all"):
        for config in ("default", "watch"):
            s = report[config][split]
            out.append(f"| {split} | {config} | {s['hits']}/{s['diverged_as_labelled']} | "
                       f"{s['median_lead_of_hits']} | {s['healthy_risk_events']} "
                       f"({s['healthy_steps']:,}) | "
                       f"{s['risk_events_per_10k_healthy_steps']:.2f} |")
    out += ["", "| run | split | divergence step | first warning (default / watch) | "
            "lead (default / watch) | signal | steps left estimated |", "|---|---|---|---|---|---|---|"]
    watch = {r["name"]: r for r in report["watch"]["runs"]}
    for r in report["default"]["runs"]:
        if r["expect"] != "diverge":
            continue
        w = watch[r["name"]]
        first = (r["risk_events"] or w["risk_events"] or [{}])[0]
        out.append(f"| `{r['name']}` | {r['split']} | {r['divergence_step']} | "
                   f"{r['first_warning']} / {w['first_warning']} | {r['lead']} / {w['lead']} | "
                   f"{first.get('signal', '')} | {first.get('steps_left', '')} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--split", default="all", choices=("tune", "heldout", "all"))
    ap.add_argument("--names", nargs="*", default=None)
    ap.add_argument("--rounds", type=int, default=15, help="overhead rounds (0: skip)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "warning.json"))
    ap.add_argument("--markdown", action="store_true", help="print the docs tables of --out")
    ap.add_argument("--overhead-only", action="store_true",
                    help="re-measure the overhead into the existing --out")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(Path(args.out).read_text())))
        return
    torch.set_num_threads(1)
    if args.overhead_only:
        report = json.loads(Path(args.out).read_text())
        report["overhead"] = overhead(args.rounds)
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))
        print(json.dumps(report["overhead"], indent=1))
        return
    specs = [s for s in SPECS if (args.split == "all" or s.split == args.split)
             and (not args.names or s.name in args.names)]
    runs = []
    for s in specs:
        r = train(s)
        runs.append(r)
        d = score(r, "default")
        print(f"{s.split:8s} {s.expect:8s} {s.name:32s} div={r['div']} "
              f"lead={d.get('lead')} risk={[e['step'] for e in d['risk_events']]} "
              f"({r['seconds']:.0f}s)", flush=True)
    report: dict[str, Any] = {
        "torch": torch.__version__, "python": platform.python_version(), "threads": 1,
        "every": EVERY, "lead_required": LEAD,
        "label": f"first step with a non-finite loss or loss > {LABEL_RATIO:g}x the median of "
                 f"the previous {LABEL_HISTORY} steps",
        "defaults": {"points": precursors.TREND_POINTS, "z": precursors.TREND_Z,
                     "elasticity": precursors.ELASTICITY, "growth": precursors.GROWTH,
                     "progress_drop": precursors.PROGRESS_DROP},
    }
    for config in ("default", "watch"):
        rows = [score(r, config) for r in runs]
        report[config] = {split: summarise([r for r in rows if split == "all"
                                            or r["split"] == split])
                          for split in ("tune", "heldout", "all")}
        report[config]["runs"] = rows
    if args.rounds:
        report["overhead"] = overhead(args.rounds)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    for config in ("default", "watch"):
        for split in ("tune", "heldout", "all"):
            s = report[config][split]
            print(f"{config:8s} {split:8s} hits {s['hits']}/{s['diverged_as_labelled']} "
                  f"false alarms {s['healthy_risk_events']} in {s['healthy_steps']} healthy "
                  f"steps ({s['risk_events_per_10k_healthy_steps']:.2f} per 10k)")
    for o in report.get("overhead", {}).get("interleaved_small", []):
        print(o["workload"], {k: round(v, 3) for k, v in o["ratio_to_adamw"].items()},
              f"on/off {o['precursors_on_over_off']:.3f}")
    for o in report.get("overhead", {}).get("standard_workloads", []):
        print(o["workload"], f"detector {o['detector_ms_per_flush']:.2f} ms/flush, "
              f"x{o['added_per_step_ratio']:.5f} per step")


if __name__ == "__main__":
    main()
