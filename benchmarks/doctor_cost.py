"""Cost of gg.doctor on CPU, from 10M parameters to GPT-2 small.

Measures the wall time of one ``gg.doctor`` call (all probes, LR probe included) next to the
time of one plain forward+backward on the same batch, and the extra peak memory (resident
set size sampled during the call), for: a 10.5M-parameter MLP and a 10.3M-parameter
GPT-style transformer (AdamW, SGD, and a too-high LR); ResNet-50 (25.6M, transformers'
``ResNetConfig()``) with no optimizer, SGD at a sane and at a too-high LR, and AdamW; GPT-2
small (124M, ``GPT2Config()``) with no optimizer, SGD and AdamW. The default time budget is
5 s up to 30M parameters (10.2 s at 124M). Writes ``benchmarks/results/doctor_cost.json``.

Run:  OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/doctor_cost.py --threads 1 [--repeats R]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import gradguard as gg

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # configs and random init only: nothing is downloaded
OUT = Path(__file__).resolve().parent / "results" / "doctor_cost.json"


def mlp_10m() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor], nn.Module]:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(10):
        layers += [nn.Linear(1024, 1024), nn.ReLU()]
    layers.append(nn.Linear(1024, 10))
    m = nn.Sequential(*layers)
    gg.init.apply_(m, "he")
    x, y = torch.randn(64, 1024), torch.randint(0, 10, (64,))
    return m, (x, y), nn.CrossEntropyLoss()


class _Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 6, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int = 4096, d: int = 384, layers: int = 4, t: int = 64) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(1, t, d))
        self.blocks = nn.Sequential(*[_Block(d) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln(self.blocks(self.tok(idx) + self.pos)))


def gpt_10m() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor], object]:
    torch.manual_seed(0)
    m = GPT()
    idx = torch.randint(0, 4096, (8, 64))

    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    return m, (idx, idx.roll(-1, 1)), loss


def resnet50() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor], object]:
    import transformers

    torch.manual_seed(0)
    m = transformers.ResNetForImageClassification(transformers.ResNetConfig(num_labels=1000))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 1000, (8,), generator=g)

    def loss(out: object, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.logits, t)  # type: ignore[attr-defined]

    return m, (x, y), loss


def gpt2_small() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor], object]:
    import transformers

    torch.manual_seed(0)
    m = transformers.GPT2LMHeadModel(transformers.GPT2Config())
    idx = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(1))

    def loss(out: object, t: torch.Tensor) -> torch.Tensor:
        z = out.logits[:, :-1]  # type: ignore[attr-defined]
        return F.cross_entropy(z.reshape(-1, z.shape[-1]), t[:, 1:].reshape(-1))

    return m, (idx, idx), loss


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_extra_mb(fn: Callable[[], object]) -> tuple[object, float]:
    """``fn()`` and the peak resident memory above the level before the call (sampled)."""
    base = _rss_mb()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.005)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        out = fn()
    finally:
        done.set()
        th.join()
    return out, max(peak[0], _rss_mb()) - base


def _time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", nargs="*", default=[], help="run the cases whose name contains one of these (no JSON)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    cases = (
        ("mlp_10m", mlp_10m, "adamw", 1e-3),
        ("gpt_10m", gpt_10m, "adamw", 1e-3),
        # worst case: the loss rises, so the smaller LRs are tried too
        ("mlp_10m_lr_too_high", mlp_10m, "adamw", 10.0),
        # SGD adds the curvature rule (power iteration of Hessian-vector products)
        ("mlp_10m_sgd", mlp_10m, "sgd", 0.01),
        ("gpt_10m_sgd", gpt_10m, "sgd", 0.01),
        ("resnet50_sgd", resnet50, "sgd", 0.01),
        ("resnet50_sgd_lr_too_high", resnet50, "sgd", 0.5),
        ("resnet50_adamw", resnet50, "adamw", 1e-3),
        ("gpt2_small_sgd", gpt2_small, "sgd", 0.01),
        ("gpt2_small_adamw", gpt2_small, "adamw", 6e-4),
    )
    for name, build, kind, lr in cases:
        if args.only and not any(o in name for o in args.only):
            continue
        model, batch, loss_fn = build()
        n = sum(p.numel() for p in model.parameters())
        opt = (
            torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
            if kind == "sgd"
            else torch.optim.AdamW(model.parameters(), lr=lr)
        )

        def fwd_bwd(model=model, batch=batch, loss_fn=loss_fn) -> None:
            model.zero_grad(set_to_none=True)
            loss_fn(model(batch[0]), batch[1]).backward()

        fwd_bwd()  # warm-up
        base = _time(fwd_bwd, args.repeats)
        model.zero_grad(set_to_none=True)
        no_opt = _time(lambda m=model, b=batch, lf=loss_fn: gg.doctor(m, b, lf), args.repeats)
        with_opt = _time(lambda m=model, b=batch, lf=loss_fn, o=opt: gg.doctor(m, b, lf, o), args.repeats)
        diag, extra = peak_extra_mb(lambda m=model, b=batch, lf=loss_fn, o=opt: gg.doctor(m, b, lf, o))
        assert isinstance(diag, gg.Diagnosis)
        row = {
            "model": name,
            "n_params": n,
            "optimizer": f"{kind} lr={lr:g}",
            "fwd_bwd_s": statistics.median(base),
            "doctor_s": statistics.median(no_opt),
            "doctor_with_lr_probe_s": statistics.median(with_opt),
            "doctor_over_fwd_bwd": statistics.median(with_opt) / statistics.median(base),
            "budget_s": diag.budget_s,
            "cut_by_budget": diag.cut,
            "extra_peak_rss_mb": round(extra, 1),
            "param_mb": round(n * 4 / 2**20, 1),
            "healthy": diag.healthy,
            "findings": [[f.cause, f.severity] for f in diag.findings],
        }
        results.append(row)
        print(
            f"{name}: {n / 1e6:.1f}M params  fwd+bwd {row['fwd_bwd_s']:.3f}s  doctor {row['doctor_s']:.2f}s  "
            f"with LR probe {row['doctor_with_lr_probe_s']:.2f}s  ({row['doctor_over_fwd_bwd']:.1f}x fwd+bwd)  "
            f"budget {diag.budget_s:.1f}s  +{extra:.0f} MB  findings={row['findings']} cut={diag.cut}",
            flush=True,
        )
    if args.only:
        return
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(
        json.dumps(
            {
                "benchmark": "doctor_cost",
                "device": "cpu",
                "threads": args.threads,
                "torch": torch.__version__,
                "machine": platform.machine(),
                "load_average": os.getloadavg(),
                "command": "OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/doctor_cost.py --threads 1 --repeats "
                + str(args.repeats),
                "acceptance": {
                    "resnet50_any_optimizer_s": 5.0,
                    "gpt2_small_s": 15.0,
                    "resnet50_met": all(r["doctor_with_lr_probe_s"] <= 5.0 for r in results if r["model"].startswith("resnet50")),
                    "gpt2_small_met": all(r["doctor_with_lr_probe_s"] <= 15.0 for r in results if r["model"].startswith("gpt2_small")),
                },
                "within_budget": [r["model"] for r in results if r["doctor_with_lr_probe_s"] <= (r["budget_s"] or math.inf)],
                "results": results,
            },
            indent=1,
            default=lambda x: None if isinstance(x, float) and not math.isfinite(x) else str(x),
        )
    )
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
