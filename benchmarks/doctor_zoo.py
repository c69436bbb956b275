"""Accuracy and cost of ``gg.doctor`` on the model zoos.

* ``tests/zoo`` -- the synthetic zoo (small MLP/CNN/RNN/transformer setups, one or more per
  cause);
* ``tests/zoo/real`` -- real architectures: transformers configs with the library's own
  random init (GPT-2 at its 50257-token vocabulary, Llama, BERT, T5, ResNet, ConvNeXt,
  MobileNet, EfficientNet, ViT, Swin ...) and torch.nn models written as torchvision/timm
  write them, healthy and broken on purpose with a known cause.

For every case: the doctor's top cause against the expected one, its wall time (one thread),
the parameters, what the time budget cut. With ``--train-steps N`` every healthy case and every
broken case whose cause is about training dynamics is also trained N steps on its own batch
with its own optimizer, as a check of the label: healthy models fit their batch, broken ones
fit it much less or diverge.

With ``--copy-task-steps N`` the label of the x0.01 GPT-2 is also checked on a task that needs
attention (see :func:`copy_task`).

Run:  OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/doctor_zoo.py --train-steps 20 --copy-task-steps 200
Writes benchmarks/results/doctor_zoo.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gradguard as gg  # noqa: E402
from gradguard._tensors import call_model  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "doctor_zoo.json"
#: causes whose label a short training run can check (the others hold by construction: a NaN
#: in the batch, a detached layer, a wrong backward)
DYNAMIC = {"init_too_large", "init_too_small", "saturating_activation", "dead_units", "lr_too_high",
           "recurrent_explosion", "recurrent_vanishing"}


def _train(case: Any, steps: int) -> dict[str, Any]:
    """Loss before and after ``steps`` optimizer steps on the case's own batch."""
    model, (x, y), loss_fn, opt = case.build()
    if opt is None:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for i in range(steps + 1):
        torch.manual_seed(i)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(call_model(model, x), y) if y is not None else loss_fn(call_model(model, x))
        v = float(loss.detach().float())
        losses.append(v)
        if not math.isfinite(v) or i == steps:
            break
        loss.backward()
        opt.step()
    end = min(losses[-3:]) if all(math.isfinite(v) for v in losses) else math.inf
    return {
        "loss_start": losses[0],
        "loss_end": end,
        "fit": (losses[0] - end) / abs(losses[0]) if math.isfinite(end) and losses[0] else -math.inf,
        "diverged": not math.isfinite(end) or end > 2 * losses[0],
    }


def copy_task(steps: int) -> dict[str, Any]:
    """The label of the x0.01 GPT-2: trained on a task that needs attention (each sequence
    repeats a random pair of tokens, so the next token is the one two positions back), the
    healthy GPT-2 learns it, the one with every weight x0.01 stays at the unigram loss."""
    import torch.nn.functional as F
    from tests.zoo.real.broken import _scale_weights_
    from tests.zoo.real.healthy import hf_setup

    out: dict[str, Any] = {"task": "next token = the token two positions back", "steps": steps, "runs": []}
    for scale in (1.0, 0.01):
        for opt_name, lr in (("sgd", 0.1), ("adamw", 1e-3)):
            model = _scale_weights_(hf_setup("gpt2", vocab_size=1000)[0], scale)
            opt = (torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9) if opt_name == "sgd"
                   else torch.optim.AdamW(model.parameters(), lr=lr))
            losses = []
            for step in range(steps):
                g = torch.Generator().manual_seed(step)
                ids = torch.randint(0, 50, (16, 2), generator=g).repeat(1, 16)
                loss = F.cross_entropy(model(ids).logits[:, :-1].reshape(-1, 1000), ids[:, 1:].reshape(-1))
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(float(loss))
            k = max(1, steps // 10)
            run = {"weights_x": scale, "optimizer": f"{opt_name} lr={lr:g}",
                   "loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k}
            out["runs"].append(run)
            print(f"copy task: weights x{scale:g} {run['optimizer']}: {run['loss_first']:.2f} -> {run['loss_last']:.2f}", flush=True)
    return out


def run_case(case: Any, zoo: str, train_steps: int) -> dict[str, Any]:
    t = time.perf_counter()
    model, batch, loss_fn, opt = case.build()
    build_s = time.perf_counter() - t
    diag = gg.doctor(model, batch, loss_fn, opt)
    top = diag.top.cause if diag.top is not None and not diag.healthy else None
    row: dict[str, Any] = {
        "zoo": zoo,
        "case": case.name,
        "expected": case.cause,
        "top": top,
        "right": top == case.cause,
        "n_params": diag.n_params,
        "doctor_s": round(diag.elapsed_s, 3),
        "build_s": round(build_s, 3),
        "budget_s": diag.budget_s,
        "cut_by_budget": diag.cut,
        "findings": [[f.cause, f.severity, f.where] for f in diag.findings],
        "slow": case.slow,
    }
    if train_steps and (case.cause is None or case.cause in DYNAMIC):
        row["train"] = _train(case, train_steps)
    return row


def summarize(rows: list[dict[str, Any]], zoo: str) -> dict[str, Any]:
    healthy = [r for r in rows if r["zoo"] == zoo and r["expected"] is None]
    broken = [r for r in rows if r["zoo"] == zoo and r["expected"] is not None]
    small = [r["doctor_s"] for r in rows if r["zoo"] == zoo and r["n_params"] <= 25_000_000]
    out: dict[str, Any] = {
        "healthy": len(healthy),
        "healthy_without_alarm": sum(r["right"] for r in healthy),
        "healthy_share": sum(r["right"] for r in healthy) / max(1, len(healthy)),
        "broken": len(broken),
        "broken_top_right": sum(r["right"] for r in broken),
        "broken_share": sum(r["right"] for r in broken) / max(1, len(broken)),
        "misses": [{k: r[k] for k in ("case", "expected", "top", "findings")} for r in healthy + broken if not r["right"]],
        "doctor_s_median": statistics.median(small) if small else None,
        "doctor_s_max": max(small) if small else None,
        "over_budget": [r["case"] for r in rows if r["zoo"] == zoo and r["doctor_s"] > (r["budget_s"] or math.inf)],
    }
    fits = [r["train"] for r in healthy if "train" in r]
    if fits:
        out["train_fit_median_healthy"] = statistics.median(f["fit"] for f in fits)
        out["train_fit_median_broken_dynamic"] = statistics.median(
            [r["train"]["fit"] for r in broken if "train" in r] or [math.nan]
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--train-steps", type=int, default=0, help="also train each case this many steps")
    ap.add_argument("--only", nargs="*", default=[], help="run the cases whose name contains one of these")
    ap.add_argument("--copy-task-steps", type=int, default=0, help="also run the x0.01 GPT-2 label check this long")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    from tests.zoo import BROKEN, HEALTHY
    from tests.zoo.real import REAL_BROKEN, REAL_HEALTHY

    rows = []
    for zoo, cases in (("synthetic", BROKEN + HEALTHY), ("real", REAL_HEALTHY + REAL_BROKEN)):
        for case in cases:
            if args.only and not any(s in case.name for s in args.only):
                continue
            row = run_case(case, zoo, args.train_steps)
            rows.append(row)
            fit = f" fit {row['train']['fit']:+.2f}" if "train" in row else ""
            print(f"{'ok ' if row['right'] else 'BAD'} {zoo:9s} {case.name:34s} expected={case.cause} top={row['top']} "
                  f"{row['doctor_s']:.2f}s{fit}", flush=True)
    result = {
        "benchmark": "doctor_zoo",
        "device": "cpu",
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "command": "OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/doctor_zoo.py " + " ".join(sys.argv[1:]),
        "summary": {zoo: summarize(rows, zoo) for zoo in ("synthetic", "real")},
        "cases": rows,
    }
    if args.copy_task_steps:
        result["copy_task"] = copy_task(args.copy_task_steps)
    if not args.only:
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(result, indent=1, default=lambda v: None if isinstance(v, float) and not math.isfinite(v) else str(v)))
        print(f"wrote {OUT}")
    for zoo, s in result["summary"].items():
        print(f"{zoo}: healthy {s['healthy_without_alarm']}/{s['healthy']}, broken {s['broken_top_right']}/{s['broken']}, "
              f"doctor median {s['doctor_s_median']}s max {s['doctor_s_max']}s")


if __name__ == "__main__":
    main()
