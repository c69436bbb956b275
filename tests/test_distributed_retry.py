"""The retry (gradguard.recovery.probe) under DDP on two gloo ranks: a bad shard lowers the
LR, the lowered LR settles, the LR before the trouble is retried and lifted back, and the
ranks stay identical (each rank copies and restores its own training state; every decision
comes from the agreed window and skip flags)."""

from __future__ import annotations

import sys
from typing import Any

import torch
from tests.dist_launch import launch, run_worker
from torch import nn

import gradguard as gg

WORLD = 2
LAUNCH_TIMEOUT_S = 240  # 2 ranks on a shared 2-core machine; a hang fails, never blocks
STEPS = 800


def shard_run(rank: int, world: int) -> dict[str, Any]:
    """The digits MLP on Adam, batches 200-229 x1e4, each rank half of a batch of 64,
    under the ladder in which such a shard lowered the LR (``test_retry.old_ladder``)."""
    from sklearn.datasets import load_digits
    from tests.test_retry import old_ladder

    old_ladder(setattr)

    x, y = load_digits(return_X_y=True)
    xs, ys = torch.tensor(x, dtype=torch.float32) / 16, torch.tensor(y)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                          nn.Linear(128, 10))
    fwd: nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        fwd = DistributedDataParallel(model)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    guard = gg.Guard(fwd, opt, clip=gg.ZClip(), recovery=gg.Recovery())
    g = torch.Generator().manual_seed(1)
    per = 64 // world
    for step in range(STEPS):
        i = torch.randint(0, 1400, (64,), generator=g)[rank * per:(rank + 1) * per]
        xb = xs[i] * (1e4 if 200 <= step < 230 else 1.0)
        loss = nn.functional.cross_entropy(fwd(xb), ys[i])
        loss.backward()
        guard.step(loss)
        opt.zero_grad()
    guard.close()
    return {"decisions": [(a.kind, a.step) for a in guard.recovery.decisions],
            "factor": guard.recovery.lr_factor,
            "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "retries": [e.to_json() for e in guard.events if (e.data or {}).get("retry")]}


def test_a_retry_on_two_ranks_lifts_the_lr_alike_and_keeps_the_ranks_identical(tmp_path):
    r0, r1 = launch(__file__, "ddp", tmp_path, world=WORLD, timeout_s=LAUNCH_TIMEOUT_S)
    kinds = [k for k, _ in r0["decisions"]]
    assert kinds.count("rollback") >= 1 and kinds[-1] == "raised", r0["decisions"]
    assert r0["factor"] == r1["factor"] == 1.0
    assert r0["decisions"] == r1["decisions"] and r0["retries"] == r1["retries"]
    assert r0["retries"][-1]["data"]["raised"]
    for name, p in r0["params"].items():
        assert torch.isfinite(p).all() and torch.equal(p, r1["params"][name]), name


if __name__ == "__main__":
    run_worker(lambda rank, out: shard_run(rank, WORLD), sys.argv[2], LAUNCH_TIMEOUT_S // 2)
