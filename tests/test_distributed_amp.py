"""A GradScaler under DDP on two gloo ranks: the loss scale stays equal on every rank when
one rank's batch has a NaN (its loss is NaN, the other's finite: the scaler's own
found_inf stands, the guard does not withhold the back-off on one rank only) and when the
guard skips spiking steps (no back-off on any rank); weights identical throughout
(gradguard/executors/_amp.py, merge_into_scaler); and the NaN step is a NaN on every rank's
record, no routine overflow (gradguard/monitor.py, AmpLedger.overflows)."""

from __future__ import annotations

import math
import sys
from typing import Any

import torch
from tests.dist_launch import launch, run_worker
from torch import nn

import gradguard as gg

WORLD = 2
LAUNCH_TIMEOUT_S = 180  # 2 ranks on a shared 2-core machine; a hang fails, never blocks
NAN_STEP, SPIKES = 30, range(40, 46)


def amp_run(rank: int, world: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    fwd: nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        fwd = DistributedDataParallel(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=10_000)
    guard = gg.Guard(fwd, opt, clip=gg.ZClip(), recovery=gg.Recovery())
    g = torch.Generator().manual_seed(5)
    scales = []
    for step in range(60):
        x, y = torch.randn(2, 16, 8, generator=g), torch.randn(2, 16, 1, generator=g)
        xb, yb = x[rank].clone(), y[rank]
        if step == NAN_STEP and rank == 1:
            xb[0, 0] = math.nan  # this rank's loss is NaN, the other's finite
        loss = nn.functional.mse_loss(fwd(xb), yb) * (1e3 if step in SPIKES else 1.0)
        scaler.scale(loss).backward()
        guard.step(loss, scaler=scaler)
        scaler.update()
        opt.zero_grad()
        scales.append(scaler.get_scale())
    guard.close()
    at_nan = sorted((e.kind, e.severity) for e in guard.events if e.step == NAN_STEP)
    return {"scales": scales, "skips": sorted({e.step for e in guard.events if e.kind == "skip"}),
            "at_nan": at_nan,
            "params": {n: p.detach().clone() for n, p in model.named_parameters()}}


def test_the_loss_scale_and_the_weights_stay_equal_on_every_rank(tmp_path):
    r0, r1 = launch(__file__, "ddp", tmp_path, world=WORLD, timeout_s=LAUNCH_TIMEOUT_S)
    assert r0["scales"] == r1["scales"]
    assert NAN_STEP in r0["skips"] and set(SPIKES) <= set(r0["skips"]), r0["skips"]
    # the NaN step: the scaler's own back-off, on both ranks; the spike skips: none
    assert r0["scales"][NAN_STEP - 1] == 2.0**10 and r0["scales"][NAN_STEP] == 2.0**9
    assert r0["scales"][-1] == 2.0**9
    for name, p in r0["params"].items():
        assert torch.isfinite(p).all() and torch.equal(p, r1["params"][name]), name
    # rank 0, which writes the files, calls rank 1's NaN batch what it is, not a routine
    # loss-scale overflow (its own loss was finite: found as a stranger, an info)
    assert r0["at_nan"] == r1["at_nan"] and ("nonfinite_grad", "error") in r0["at_nan"]
    assert ("skip", "info") not in r0["at_nan"]


if __name__ == "__main__":
    run_worker(lambda rank, out: amp_run(rank, WORLD), sys.argv[2], LAUNCH_TIMEOUT_S // 2)
