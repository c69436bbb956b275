"""The default guard on the real zoo's healthy models, against the same loop unguarded: does
it leave real architectures alone?

Each of the real zoo's healthy models (``tests/zoo/real/healthy.py``: the transformers
models from their configs, torchvision's MobileNetV3 and VGG, timm's ResNet, recurrent LMs,
PyTorch encoders, with the optimizer and LR their authors train them with) is trained for
``--steps`` steps on a stream made from its batch (each step the batch permuted, float
inputs given 10% of their std in noise), once unguarded and once under
``gg.Guard(model, opt, clip=gg.ZClip(), recovery=gg.Recovery())``, from the same seed. Per
model: the mean of the last ten losses of each run, their ratio (guarded over unguarded),
and the guard's warning- and error-level events. The batches are small and the models
fit them: most losses end near zero, where ratios are noise; read ``loss_unguarded`` with
the ratio.

Run:  OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/zoo_guard.py [--steps 300] [--case NAME ...]
Writes benchmarks/results/zoo_guard.json (about 20 minutes at 300 steps).
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
OUT = ROOT / "benchmarks" / "results" / "zoo_guard.json"
#: Noise added to float inputs each step, as a share of their std.
NOISE = 0.1
#: The last losses averaged for a run's final loss.
TAIL = 10


def stream(batch: Any, step: int) -> Any:
    """The batch of ``step``: ``batch`` with its rows permuted (one permutation for every
    tensor whose first dimension is the batch's) and float tensors given noise."""
    g = torch.Generator().manual_seed(1000 + step)
    tensors = [t for t in _leaves(batch) if t.ndim]
    rows = tensors[0].shape[0] if tensors else 0
    perm = torch.randperm(rows, generator=g)

    def tweak(t: Any) -> Any:
        if isinstance(t, dict):
            return {k: tweak(v) for k, v in t.items()}
        if isinstance(t, (list, tuple)):
            return type(t)(tweak(v) for v in t)
        if not torch.is_tensor(t):
            return t
        if t.ndim and t.shape[0] == rows:
            t = t[perm]
        if t.is_floating_point():
            t = t + NOISE * t.std() * torch.randn(t.shape, generator=g, dtype=t.dtype)
        return t

    return tweak(batch)


def _leaves(x: Any) -> list[torch.Tensor]:
    if isinstance(x, dict):
        return [t for v in x.values() for t in _leaves(v)]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _leaves(v)]
    return [x] if torch.is_tensor(x) else []


def train(case: Any, steps: int, *, guarded: bool) -> dict[str, Any]:
    """One run of ``case``; its losses' tail and, guarded, the guard's warnings."""
    import gradguard as gg
    from gradguard._tensors import call_model

    t0 = time.perf_counter()
    torch.manual_seed(0)
    model, batch, loss_fn, opt = case.build()
    guard = gg.Guard(model, opt, clip=gg.ZClip(), recovery=gg.Recovery()) if guarded else None
    losses = []
    for step in range(steps):
        x, y = stream(batch, step)
        loss = loss_fn(call_model(model, x), y)
        opt.zero_grad()
        loss.backward()
        if guard is not None:
            guard.step(loss.detach())
        else:
            opt.step()
        losses.append(float(loss))
    out: dict[str, Any] = {"loss_first": losses[0], "loss_end": sum(losses[-TAIL:]) / TAIL}
    if guard is not None:
        guard.close()
        out["warnings"] = [{"kind": e.kind, "step": e.step, "severity": e.severity,
                            "layer": e.layer} for e in guard.events if e.severity != "info"]
        out["clipped_info"] = [e.message for e in guard.events if e.kind == "clip"]
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--case", action="append", default=None, help="only these cases")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from benchmarks._loop import write_result
    warnings.filterwarnings("ignore")
    from tests.zoo.real.healthy import REAL_HEALTHY

    rows = []
    for case in REAL_HEALTHY:
        if args.case and case.name not in args.case:
            continue
        try:
            bare = train(case, args.steps, guarded=False)
            guarded = train(case, args.steps, guarded=True)
            ratio = guarded["loss_end"] / bare["loss_end"] if bare["loss_end"] > 0 else None
            row = {"case": case.name, "loss_unguarded": bare["loss_end"],
                   "loss_guarded": guarded["loss_end"], "ratio": ratio,
                   "warnings": guarded["warnings"], "clip_info": guarded["clipped_info"],
                   "seconds": bare["seconds"] + guarded["seconds"]}
        except Exception as e:  # one case's failure must not lose the others
            row = {"case": case.name, "error": f"{type(e).__name__}: {e}"}
        rows.append(row)
        print(f"{row['case']:28s} {row.get('loss_unguarded', float('nan')):.4g} "
              f"{row.get('loss_guarded', float('nan')):.4g} ratio {row.get('ratio')} "
              f"warnings {Counter(w['kind'] for w in row.get('warnings', []))} "
              f"{row.get('error', '')}", flush=True)
    ok = [r for r in rows if "error" not in r]
    summary = {
        "cases": len(ok),
        "errors": len(rows) - len(ok),
        "with_warnings": [r["case"] for r in ok if r["warnings"]],
        "over_2pct": {r["case"]: round(r["ratio"], 3) for r in ok
                      if r["ratio"] is not None and r["ratio"] > 1.02},
        "identical": sum(1 for r in ok if r["loss_guarded"] == r["loss_unguarded"]),
    }
    result = {"steps": args.steps, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "summary": summary, "rows": rows}
    return write_result(args.out, result, summary)


if __name__ == "__main__":
    main()
