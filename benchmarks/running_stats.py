"""What keeping the batch norm running statistics costs a guarded step (gradguard/_running.py):
a CNN with nine BatchNorm2d layers, guarded with ZClip, in the same process.

Run:  OMP_NUM_THREADS=1 python benchmarks/running_stats.py [--rounds N] [--out F]
Writes benchmarks/results/running_stats.json. Two figures, this thread's CPU time:

* the whole step with the statistics kept (the default) and with the copy turned off:
  per round the median over 50 steps of each arm, the rounds alternating which arm runs
  first; the ratio is the median over rounds of kept / off. Whole steps of two models
  differ by several per cent from run to run on a shared CPU, so this ratio is noisy;
* the copy itself: ``RunningStats.settle`` timed over 2,000 calls on the same model (a
  taken step's path, and a skipped step's), as a share of the median step;
* the off-scale test a Recovery runs at every step (``RunningStats.offscale``: a batch
  on another scale, seen in the statistics alone), timed the same way, on this model and
  on 53 BatchNorm2d layers (ResNet-50 has 53).
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
from torch import nn

import gradguard as gg
from gradguard._running import RunningStats

OUT = Path(__file__).parent / "results" / "running_stats.json"


def net() -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU()]
    for _ in range(8):
        layers += [nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def arm(kept: bool, steps: int = 60) -> float:
    torch.manual_seed(0)
    model = net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    guard = gg.Guard(model, opt, clip=gg.ZClip())
    if not kept:
        guard._running.buffers = []  # the copy off: nothing to keep
    x, y = torch.randn(32, 3, 16, 16), torch.randint(0, 10, (32,))
    times = []
    for _ in range(steps):
        t = time.thread_time()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        guard.step(loss)
        opt.zero_grad()
        times.append(time.thread_time() - t)
    guard.close()
    return statistics.median(times[10:])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    rounds = []
    for r in range(args.rounds):
        order = (True, False) if r % 2 == 0 else (False, True)
        got = {k: arm(k) for k in order}
        rounds.append({"kept": got[True], "off": got[False], "ratio": got[True] / got[False]})
    ratio = statistics.median(x["ratio"] for x in rounds)
    torch.manual_seed(0)
    model = net()
    guard = gg.Guard(model, torch.optim.AdamW(model.parameters(), lr=1e-3), clip=gg.ZClip())
    settle = {}
    for trouble in (False, True):
        t = time.thread_time()
        for _ in range(2000):
            guard._running.settle(trouble)
        settle["skipped" if trouble else "taken"] = (time.thread_time() - t) / 2000
    test = {"9 layers": _offscale_time(guard._running)}
    guard.close()
    wide = nn.Sequential(*[nn.BatchNorm2d(64 * (1 + i % 4)) for i in range(53)])
    test["53 layers"] = _offscale_time(RunningStats(wide))
    step = statistics.median(x["off"] for x in rounds)
    share = {k: v / step for k, v in settle.items()}
    out = {"environment": {"torch": torch.__version__, "python": platform.python_version(),
                           "threads": torch.get_num_threads()},
           "workload": "9x Conv2d(32)+BatchNorm2d, batch 32x3x16x16, AdamW, Guard(ZClip)",
           "buffers": 27, "rounds": rounds, "ratio_kept_over_off": ratio,
           "settle_seconds": settle, "settle_share_of_step": share,
           "offscale_seconds": test, "offscale_share_of_step": test["9 layers"] / step}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"guarded step, statistics kept / off: {ratio:.3f} (median of {args.rounds} rounds); "
          f"the copy alone: {settle['taken'] * 1e6:.0f} us a taken step "
          f"({share['taken']:.2%} of a step), {settle['skipped'] * 1e6:.0f} us a skipped one; "
          f"the off-scale test: {test['9 layers'] * 1e6:.0f} us "
          f"({test['9 layers'] / step:.2%} of a step), {test['53 layers'] * 1e6:.0f} us on 53 "
          "layers")
    return out


def _offscale_time(stats: RunningStats, calls: int = 2000) -> float:
    device = torch.device("cpu")
    stats.offscale(device)
    t = time.thread_time()
    for _ in range(calls):
        stats.offscale(device)
    return (time.thread_time() - t) / calls


if __name__ == "__main__":
    main()
