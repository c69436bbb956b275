"""Cost of gg.doctor on ~10M-parameter models on CPU.

Measures the wall time of one ``gg.doctor`` call (all probes, LR probe included) on a
10.5M-parameter MLP and a 10.3M-parameter GPT-style transformer, each next to the time of
one plain forward+backward on the same batch, and writes
``benchmarks/results/doctor_cost.json``.

Run:  OMP_NUM_THREADS=1 python benchmarks/doctor_cost.py [--threads N] [--repeats R]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import gradguard as gg

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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    cases = (
        ("mlp_10m", mlp_10m, 1e-3),
        ("gpt_10m", gpt_10m, 1e-3),
        # worst case: the loss rises, so the LR/10 run happens too
        ("mlp_10m_lr_too_high", mlp_10m, 10.0),
        # SGD adds the curvature rule (power iteration of Hessian-vector products)
        ("mlp_10m_sgd", mlp_10m, 0.01),
        ("gpt_10m_sgd", gpt_10m, 0.01),
    )
    for name, build, lr in cases:
        model, batch, loss_fn = build()
        n = sum(p.numel() for p in model.parameters())
        opt = (
            torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
            if name.endswith("_sgd")
            else torch.optim.AdamW(model.parameters(), lr=lr)
        )

        def fwd_bwd(model=model, batch=batch, loss_fn=loss_fn) -> None:
            model.zero_grad(set_to_none=True)
            loss_fn(model(batch[0]), batch[1]).backward()

        fwd_bwd()  # warm-up
        base = _time(fwd_bwd, args.repeats)
        model.zero_grad(set_to_none=True)
        gg.doctor(model, batch, loss_fn, opt)  # warm-up
        no_opt = _time(lambda m=model, b=batch, lf=loss_fn: gg.doctor(m, b, lf), args.repeats)
        with_opt = _time(lambda m=model, b=batch, lf=loss_fn, o=opt: gg.doctor(m, b, lf, o), args.repeats)
        diag = gg.doctor(model, batch, loss_fn, opt)
        row = {
            "model": name,
            "n_params": n,
            "fwd_bwd_s": statistics.median(base),
            "doctor_s": statistics.median(no_opt),
            "doctor_with_lr_probe_s": statistics.median(with_opt),
            "doctor_over_fwd_bwd": statistics.median(with_opt) / statistics.median(base),
            "healthy": diag.healthy,
            "findings": [f.cause for f in diag.findings],
        }
        results.append(row)
        print(
            f"{name}: {n / 1e6:.1f}M params  fwd+bwd {row['fwd_bwd_s']:.3f}s  doctor {row['doctor_s']:.2f}s  "
            f"with LR probe {row['doctor_with_lr_probe_s']:.2f}s  ({row['doctor_over_fwd_bwd']:.1f}x fwd+bwd)  "
            f"healthy={diag.healthy}"
        )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(
        json.dumps(
            {
                "benchmark": "doctor_cost",
                "device": "cpu",
                "threads": args.threads,
                "torch": torch.__version__,
                "machine": platform.machine(),
                "budget_s": 5.0,
                "command": "OMP_NUM_THREADS=1 python benchmarks/doctor_cost.py --threads 1 --repeats 3",
                "within_budget": all(r["doctor_with_lr_probe_s"] <= 5.0 for r in results),
                "results": results,
            },
            indent=1,
            default=lambda x: None if isinstance(x, float) and not math.isfinite(x) else str(x),
        )
    )
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
