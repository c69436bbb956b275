"""Overhead of ``Guard(watch_activations=True)`` (forward non-finite origin) vs off.

Run:  OMP_NUM_THREADS=1 python benchmarks/watch_overhead.py [--quick]
Writes benchmarks/results/watch_overhead.json: per model, the median step time with the
watch on divided by the median step time with it off, both guarded (``Guard(clip=ZClip())``),
one thread. Both variants stay alive and each round times one step of each in random order,
so load on a shared machine hits both alike. Target: <= 1.05x.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import gradguard as gg


def mlp(width: int = 512, depth: int = 8) -> tuple[nn.Module, Callable[[], torch.Tensor]]:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(width, 1))
    x = torch.randn(128, width)
    return model, lambda: model(x).pow(2).mean()


def transformer(d: int = 128, n_layers: int = 2) -> tuple[nn.Module, Callable[[], torch.Tensor]]:
    layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.Linear(16, d), nn.TransformerEncoder(layer, n_layers,
                                                                  enable_nested_tensor=False),
                          nn.Linear(d, 1))
    x = torch.randn(16, 32, 16)
    return model, lambda: model(x).pow(2).mean()


def cnn() -> tuple[nn.Module, Callable[[], torch.Tensor]]:
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(512, 10))
    x = torch.randn(32, 3, 32, 32)
    return model, lambda: model(x).pow(2).mean()


MODELS = {"mlp_8x512": mlp, "transformer_2x128": transformer, "cnn_2x32": cnn}


def make_step(factory: Callable[[], tuple[nn.Module, Callable[[], torch.Tensor]]],
              watch: bool) -> tuple[Callable[[], None], gg.Guard]:
    torch.manual_seed(0)
    model, loss_fn = factory()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    guard = gg.Guard(model, opt, clip=gg.ZClip(), watch_activations=watch)

    def step() -> None:
        loss = loss_fn()
        loss.backward()
        guard.step(loss)
        opt.zero_grad()

    return step, guard


def run(quick: bool) -> dict[str, Any]:
    """Both variants stay alive; each round times one step of each, in random order, and
    the figure is the ratio of the median step times (robust to load on a shared box)."""
    torch.set_num_threads(1)
    rounds = 15 if quick else 61
    rng = random.Random(0)
    out: dict[str, Any] = {}
    for name, factory in MODELS.items():
        variants = {w: make_step(factory, w) for w in (False, True)}
        for step, _ in variants.values():
            for _ in range(5):  # warm-up
                step()
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(rounds):
            order = [False, True]
            rng.shuffle(order)
            for w in order:
                t = time.perf_counter()
                variants[w][0]()
                times[w].append(time.perf_counter() - t)
        for _, guard in variants.values():
            guard.close()
        off, on = statistics.median(times[False]), statistics.median(times[True])
        out[name] = {
            "ratio_median": on / off,
            "step_ms_off_median": 1e3 * off,
            "step_ms_on_median": 1e3 * on,
            "rounds": rounds,
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                         "watch_overhead.json"))
    args = ap.parse_args()
    res = {"models": run(args.quick), "quick": args.quick, "threads": 1,
           "torch": torch.__version__, "python": platform.python_version(),
           "target_ratio": 1.05}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    for name, r in res["models"].items():
        print(f"{name:20s} watch on/off = {r['ratio_median']:.3f}x "
              f"({r['step_ms_off_median']:.2f} -> {r['step_ms_on_median']:.2f} ms/step)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
