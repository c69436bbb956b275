"""gradguard under pipeline parallel: 2 stages, torch.distributed.pipelining, CPU, gloo.

One launch (``python tests/test_distributed_pp.py pp OUT`` on 2 ranks, hard timeout): each
rank holds one stage of a 3-layer net (torchtitan's split: the stage keeps the layers'
names) and runs a GPipe schedule with 2 micro-batches; every rank builds its Guard with
``pipeline_group=mesh["pp"]`` and calls ``guard.step`` (the last stage with the loss, the
first with None). At ``NAN_STEP`` rank 0 writes a NaN into its own gradient. The parent
trains the whole net in one process on the same global batches, and the tests compare.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import pytest
import torch
from tests.dist_launch import (
    CollectiveCounter,
    close,
    event,
    guard_results,
    identical,
    launch,
    run_worker,
)
from torch import nn

import gradguard as gg
from gradguard.telemetry import measure_grads

pytestmark = pytest.mark.slow  # 2 processes, ~15 s on 2 cores; CI runs it

WORLD = 2
STEPS = 8
EVERY = 4
GLOBAL_BS = 8
D_IN, D = 6, 12
LR = 0.1
NAN_STEP = 5
SPIKE_STEP = 4
ZCLIP_WARMUP = 3
STAGE_LAYERS = (("0",), ("1", "2"))
LAUNCH_TIMEOUT_S = 150


class Net(nn.Module):
    """Layers in a ModuleDict, so that a stage keeps its layers' names."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleDict(
            {"0": nn.Linear(D_IN, D), "1": nn.Linear(D, D), "2": nn.Linear(D, 1)}
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name, layer in self.layers.items():
            x = layer(x) if name == "2" else torch.tanh(layer(x))
        return x


def global_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    out = []
    for step in range(STEPS + 1):
        x = torch.randn(GLOBAL_BS, D_IN, generator=g)
        y = x.sum(dim=1, keepdim=True).sin()
        if step == SPIKE_STEP:
            y *= 100.0
        out.append((x, y))
    return out


def poison_(net: Net) -> None:
    with torch.no_grad():
        net.layers["0"].weight.grad[1, 2] = math.nan  # type: ignore[index]


def reference() -> dict[str, Any]:
    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    guard = gg.Guard(net, opt, clip=gg.ZClip(warmup_steps=ZCLIP_WARMUP), every=EVERY)
    norms, coefs = [], []
    for step, (x, y) in enumerate(global_batches()[:STEPS]):
        loss = nn.functional.mse_loss(net(x), y)
        loss.backward()
        if step == NAN_STEP:
            poison_(net)
        norms.append(guard.step(loss).clone())
        opt.zero_grad()
        if guard.telemetry.pending == 0:
            coefs.append(guard.last_window.clip_coef.clone())  # type: ignore[union-attr]
    guard.close()
    out = guard_results(guard, net, norms, coefs)
    x, y = global_batches()[STEPS]
    nn.functional.mse_loss(net(x), y).backward()
    out["measured"] = measure_grads(list(net.parameters())).total_norm
    return out


def main(rank: int, out: str) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    pp = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("pp",))
    net = Net()
    for name in [n for n in net.layers if n not in STAGE_LAYERS[rank]]:
        del net.layers[name]
    stage = PipelineStage(net, rank, WORLD, torch.device("cpu"), group=pp.get_group())
    schedule = ScheduleGPipe(stage, n_microbatches=2, loss_fn=nn.functional.mse_loss)
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    guard = gg.Guard(net, opt, clip=gg.ZClip(warmup_steps=ZCLIP_WARMUP), every=EVERY,
                     pipeline_group=pp)
    last = rank == WORLD - 1
    norms, coefs, counts = [], [], []
    for step, (x, y) in enumerate(global_batches()[:STEPS]):
        losses: list[torch.Tensor] = []
        if last:
            schedule.step(target=y, losses=losses)
        else:
            schedule.step(x)
        if step == NAN_STEP and rank == 0:
            poison_(net)
        loss = torch.stack(losses).mean() if last else None  # only the last stage has one
        with CollectiveCounter() as cc:
            norms.append(guard.step(loss).clone())
        counts.append(cc.counts)
        opt.zero_grad()
        if guard.telemetry.pending == 0:
            coefs.append(guard.last_window.clip_coef.clone())  # type: ignore[union-attr]
    guard.close()
    res = guard_results(guard, net, norms, coefs)
    res["counts"] = counts
    x, y = global_batches()[STEPS]
    (schedule.step(target=y, losses=[]) if last else schedule.step(x))
    res["measured"] = measure_grads(list(net.parameters()), pipeline_group=pp).total_norm
    res["stage_only"] = measure_grads(list(net.parameters())).total_norm
    return res


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    out = tmp_path_factory.mktemp("pp")
    return launch(__file__, "pp", out, world=WORLD, timeout_s=LAUNCH_TIMEOUT_S), reference()


def test_total_norm_is_the_whole_models_on_every_stage(runs):
    ranks, ref = runs
    for res in ranks:
        assert close(res["norms"], ref["norms"]), (res["norms"], ref["norms"])
        assert close(res["measured"], ref["measured"])
    # without the group each stage would see its own part only
    assert ranks[0]["stage_only"] < ref["measured"] - 1e-3


def test_per_layer_norms_are_each_stages_own(runs):
    ranks, ref = runs
    want = ref["window"]
    for res, names in zip(ranks, STAGE_LAYERS):
        win = res["window"]
        assert win["layers"] == [f"layers.{n}" for n in names]
        cols = [want["layers"].index(lay) for lay in win["layers"]]
        assert close(win["layer_norms"], want["layer_norms"][:, cols])
        params = [want["names"].index(n) for n in win["names"]]
        for key in ("weight_norms", "update_norms"):
            assert close(win[key], want[key][params]), key


def test_nan_in_the_first_stage_skips_on_both_stages(runs):
    ranks, ref = runs
    assert ref["skipped"] == 1 and torch.isnan(ref["norms"][NAN_STEP])
    for res in ranks:
        assert res["skipped"] == 1
        ev = event(res, "nonfinite_grad", NAN_STEP)
        assert ev["rank"] == 0 and ev["data"]["ranks"] == [0]
    assert event(ranks[0], "nonfinite_grad", NAN_STEP)["layer"] == "layers.0"


def test_clip_coefficients_and_parameters_match_single_process(runs):
    ranks, ref = runs
    assert ref["clip_coef"][SPIKE_STEP] < 0.5
    assert identical(ranks[0]["clip_coef"], ranks[1]["clip_coef"])
    for res in ranks:
        assert close(res["clip_coef"], ref["clip_coef"])
        for key, value in res["clip_state"]["state"].items():
            assert torch.equal(value, ranks[0]["clip_state"]["state"][key]), key
        for name, p in res["params"].items():
            assert close(p, ref["params"][name]), name


def test_window_loss_is_the_last_stages_on_every_stage(runs):
    ranks, ref = runs
    for res in ranks:
        assert torch.isfinite(res["window"]["loss"]).all()
        assert close(res["window"]["loss"], ref["window"]["loss"])


def test_one_allreduce_per_step_for_all_stages(runs):
    ranks, _ = runs
    for res in ranks:
        for i, c in enumerate(res["counts"]):
            if i not in (EVERY - 1, STEPS - 1):  # flush steps also agree on the window
                assert c["all_reduce"] == 1 and sum(c.values()) == 1, (i, c)


if __name__ == "__main__":
    run_worker(main, sys.argv[2], LAUNCH_TIMEOUT_S // 2)
