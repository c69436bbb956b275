"""gradguard on 2-D device meshes: 4 processes (2 x 2), CPU, gloo, loopback.

One launch (``python tests/test_distributed_mesh.py mesh OUT`` on 4 ranks, hard timeout)
trains the same tiny transformer-like net three ways and the tests compare each with one
process on the global batch:

* ``tp``: torchtitan's recipe on a (dp=2, tp=2) mesh: ``parallelize_module`` with
  Colwise/Rowwise on "tp", then ``fully_shard`` on "dp". The linears are 2-D DTensors
  (``_StridedShard`` on dp), the norms, embedding and head live on the dp sub-mesh only,
  replicated over tp. At ``NAN_STEP`` rank 3 writes a NaN into its own shard of a norm
  weight: its TP replica (rank 1) and the other dp group (ranks 0, 2) must skip too.
* ``hsdp``: ``fully_shard`` on a (replicate=2, shard=2) mesh; rank 3 writes the NaN.
* ``sp``: tensor parallel alone with a SequenceParallel norm, whose gradients are
  ``Partial``: refused with a clear error, then reduced by ``reduce_partial_grads_``.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import pytest
import torch
from tests.dist_launch import (
    COLLECTIVES,
    HOST_SYNCS,
    CollectiveCounter,
    SyncCounter,
    close,
    event,
    full,
    guard_results,
    identical,
    launch,
    run_worker,
)
from torch import nn

import gradguard as gg
from gradguard.telemetry import measure_grads

pytestmark = pytest.mark.slow  # 4 processes, ~30 s on 2 cores; CI runs it

WORLD = 4
STEPS = 8
EVERY = 4
GLOBAL_BS = 16
D_IN, D, H = 4, 8, 16
LR = 0.05
NAN_STEP = 5
SPIKE_STEP = 4  # targets of the last quarter of the batch x100: ZClip (past warm-up) clips
NAN_RANK = 3
ZCLIP_WARMUP = 3
NORM_TYPES = (2.0, 3.0, math.inf)
LAUNCH_TIMEOUT_S = 240  # 4 ranks on a shared 2-core machine; a hang fails, never blocks
MESHES = ("tp", "hsdp")


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.up = nn.Linear(D, H)
        self.down = nn.Linear(H, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(self.norm(x))))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Linear(D_IN, D)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.emb(x)
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x))


def global_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    out = []
    for step in range(STEPS + 1):  # the last one for the standalone measurements
        x = torch.randn(GLOBAL_BS, D_IN, generator=g)
        y = x.sum(dim=1, keepdim=True).sin()
        if step == SPIKE_STEP:
            y[3 * GLOBAL_BS // 4 :] *= 100.0
        out.append((x, y))
    return out


def nan_param(model: Net) -> torch.Tensor:
    """The weight rank 3 poisons: a norm (dp sub-mesh only, replicated over tp)."""
    return model.blocks[1].norm.weight


def parallelize(mesh_kind: str, model: Net) -> tuple[int, int]:
    """Shard ``model`` in place; returns (data shard index, number of data shards)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    if mesh_kind == "tp":
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        for b in model.blocks:
            parallelize_module(b, mesh["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
            fully_shard(b, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
        return mesh["dp"].get_local_rank(), 2  # TP ranks of one dp group see the same rows
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    for b in model.blocks:
        fully_shard(b, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return mesh.get_rank(), 4


def poison_(model: Net, rank: int, world: int) -> None:
    """A NaN in rank 3's own shard of ``nan_param`` (in the reference: the same element)."""
    g: Any = nan_param(model).grad
    with torch.no_grad():
        if world == 1:
            g[D // 2] = math.nan  # rank 3's shard starts at row D/2 on both meshes
        elif rank == NAN_RANK:
            g.to_local()[0] = math.nan


def train(mesh_kind: str, rank: int, world: int) -> dict[str, Any]:
    """The guarded loop; ``world == 1`` is the single-process reference."""
    model = Net()
    shard, n_shards = parallelize(mesh_kind, model) if world > 1 else (0, 1)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    # one skip: back off. The loss spike at SPIKE_STEP is left to ZClip: the reference (one
    # process) would skip it by its loss, which a rank alone does not judge per step
    recovery = gg.Recovery(skip_patience=1, snapshot_every=EVERY, skip_spikes=False)
    # the reference clips by the paper's rule, as a guard under torch.distributed does (it
    # gives ZClip no loss: each rank's is its own; the "gradual" rule needs one)
    clip = gg.ZClip(warmup_steps=ZCLIP_WARMUP, **({"gradual": None} if world == 1 else {}))
    guard = gg.Guard(model, opt, clip=clip, every=EVERY, recovery=recovery)
    norms, coefs, counts, grads0 = [], [], [], None
    rows = slice(shard * GLOBAL_BS // n_shards, (shard + 1) * GLOBAL_BS // n_shards)
    batches = global_batches()
    for step in range(STEPS):
        x, y = batches[step]
        loss = nn.functional.mse_loss(model(x[rows]), y[rows])
        loss.backward()
        if step == NAN_STEP:
            poison_(model, rank, world)
        with CollectiveCounter() as cc, SyncCounter() as sc:
            total = guard.step(loss)
        norms.append(total.detach().clone())
        counts.append(cc.counts | sc.counts)
        if step == 0:  # the gradients as the optimizer stepped them (after clipping)
            grads0 = {n: full(p.grad) for n, p in model.named_parameters()}
        opt.zero_grad()
        if guard.telemetry.pending == 0:
            assert guard.last_window is not None
            coefs.append(guard.last_window.clip_coef.clone())
    guard.close()
    x, y = batches[STEPS]
    nn.functional.mse_loss(model(x[rows]), y[rows]).backward()
    params = list(model.parameters())
    measured = {p: measure_grads(params, norm_type=p).total_norm.clone() for p in NORM_TYPES}
    poison_(model, rank, world)
    nan_norms = {p: measure_grads(params, norm_type=p).total_norm.clone() for p in NORM_TYPES}
    return guard_results(guard, model, norms, coefs) | {
        "grads0": grads0,
        "placements": {n: str(getattr(p, "placements", None)) for n, p in model.named_parameters()},
        "counts": counts,
        "decisions": [(d.kind, d.step) for d in recovery.decisions],
        "lr": opt.param_groups[0]["lr"],
        "measured": measured,
        "nan_norms": nan_norms,
    }


def sequence_parallel(rank: int, world: int) -> dict[str, Any]:
    """Tensor parallel alone (no FSDP) with a SequenceParallel norm: Partial gradients."""
    torch.manual_seed(1)
    block = Block()
    seq = 4
    x = torch.randn(2, seq, D, generator=torch.Generator().manual_seed(3))
    if world == 1:
        block(x).sum().backward()
        return {"norm": measure_grads(list(block.parameters())).total_norm}
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    tp = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))["tp"]
    plan = {
        "norm": SequenceParallel(),
        "up": ColwiseParallel(input_layouts=Shard(1)),
        "down": RowwiseParallel(output_layouts=Shard(1)),
    }
    parallelize_module(block, tp, plan)
    half = tp.get_local_rank() * seq // 2
    # no residual: SequenceParallel's output is a DTensor, the input a local shard
    (block.down(torch.relu(block.up(block.norm(x[:, half : half + seq // 2]))))).sum().backward()
    params = list(block.parameters())
    placements = [str(p.grad.placements) for p in params]  # type: ignore[union-attr]
    try:
        measure_grads(params)
        error = ""
    except TypeError as e:
        error = str(e)
    reduced = gg.distributed.reduce_partial_grads_(params)
    return {
        "placements": placements,
        "error": error,
        "reduced": reduced,
        "norm": measure_grads(params).total_norm,
    }


def main(rank: int, out: str) -> dict[str, Any]:
    res = {m: train(m, rank, WORLD) for m in MESHES}
    res["sp"] = sequence_parallel(rank, WORLD)
    return res


# ---- launcher and reference, once per module -----------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    ranks = launch(__file__, "mesh", tmp_path_factory.mktemp("mesh"), world=WORLD,
                   timeout_s=LAUNCH_TIMEOUT_S)
    ref = {m: train(m, 0, 1) for m in MESHES}
    ref["sp"] = sequence_parallel(0, 1)
    return ranks, ref


@pytest.fixture(params=MESHES)
def mesh(request: pytest.FixtureRequest, runs: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    ranks, ref = runs
    return [r[request.param] for r in ranks], ref[request.param]


def test_scenarios_have_the_layouts_of_the_issue(runs):
    """2-D linears with _StridedShard beside dp-only norms (torchtitan's recipe), HSDP's
    (Replicate, Shard), and Partial gradients under SequenceParallel."""
    ranks, _ = runs
    tp, hsdp = ranks[0]["tp"]["placements"], ranks[0]["hsdp"]["placements"]
    assert tp["blocks.0.up.weight"] == "(_StridedShard(dim=0, sf=2), Shard(dim=0))"
    assert tp["blocks.0.down.weight"] == "(Shard(dim=0), Shard(dim=1))"
    assert tp["blocks.0.down.bias"] == "(Shard(dim=0), Replicate())"
    assert tp["blocks.1.norm.weight"] == "(Shard(dim=0),)"  # the dp sub-mesh only
    assert set(hsdp.values()) == {"(Replicate(), Shard(dim=0))"}
    assert ranks[0]["sp"]["placements"][:2] == ["(Partial(sum),)"] * 2


def test_total_norms_match_single_process(mesh):
    ranks, ref = mesh
    for res in ranks:
        assert close(res["norms"], ref["norms"]), (res["norms"], ref["norms"])
    assert torch.isnan(ref["norms"][NAN_STEP])


def test_clipped_gradients_match_single_process(mesh):
    ranks, ref = mesh
    for res in ranks:
        for name, g in ref["grads0"].items():
            assert close(res["grads0"][name], g), name


def test_parameters_match_single_process_and_every_rank(mesh):
    ranks, ref = mesh
    for name, p in ref["params"].items():
        assert torch.isfinite(p).all(), name
        for res in ranks:
            assert close(res["params"][name], p), name
            assert identical(res["params"][name], ranks[0]["params"][name]), name


def test_nan_in_one_ranks_shard_of_a_norm_weight_skips_on_every_rank(mesh):
    ranks, ref = mesh
    assert ref["skipped"] == 1
    for res in ranks:
        assert res["skipped"] == 1
        ev = event(res, "nonfinite_grad", NAN_STEP)
        assert ev["rank"] == NAN_RANK and ev["data"]["ranks"] == [NAN_RANK]
        assert ev["layer"] == "blocks.1.norm"
    assert all(r["events"] == ranks[0]["events"] for r in ranks)


def test_zclip_coefficients_and_state_identical_across_ranks(mesh):
    ranks, ref = mesh
    assert ref["clip_coef"][SPIKE_STEP] < 0.5  # ZClip did clip: the comparison means something
    for res in ranks:
        assert identical(res["clip_coef"], ranks[0]["clip_coef"])
        assert close(res["clip_coef"], ref["clip_coef"])
        for key, value in res["clip_state"]["state"].items():
            assert torch.equal(value, ranks[0]["clip_state"]["state"][key]), key
            if key != "rise":  # the "gradual" rule's
                assert close(value.double(), ref["clip_state"]["state"][key].double()), key
        assert res["clip_state"]["state"]["rise"][3] == 0  # no loss reached ZClip on a rank


def test_recovery_ladder_takes_the_same_decisions_on_every_rank(mesh):
    ranks, ref = mesh
    assert ("backoff", NAN_STEP) in ref["decisions"]
    for res in ranks:
        assert res["decisions"] == ref["decisions"]
        assert res["lr"] == pytest.approx(ref["lr"])
        assert [e for e in res["events"] if e["kind"] == "lr_backoff"] == [
            e for e in ranks[0]["events"] if e["kind"] == "lr_backoff"
        ]


def test_per_layer_norms_and_names_match_single_process(mesh):
    ranks, ref = mesh
    assert ref["window"]["layers"] == ["emb", *[f"blocks.{i}.{m}" for i in (0, 1) for m in
                                      ("norm", "up", "down")], "norm", "head"]
    for res in ranks:
        assert res["window"]["layers"] == ref["window"]["layers"]
        for key in ("layer_norms", "weight_norms", "update_norms"):
            assert close(res["window"][key], ref["window"][key]), key


def test_measure_every_norm_order_matches_single_process(mesh):
    ranks, ref = mesh
    for p in NORM_TYPES:
        for res in ranks:
            assert close(res["measured"][p], ref["measured"][p]), p
            assert torch.isnan(res["nan_norms"][p]), p  # rank 3's NaN reaches every rank


def _non_flush_steps(res: dict[str, Any]) -> list[dict[str, int]]:
    """Steps other than the flushes and step 0 (which takes Recovery's first snapshot:
    every rank agrees that the weights are finite, one all-reduce of its own)."""
    return [c for i, c in enumerate(res["counts"]) if i not in (0, EVERY - 1, STEPS - 1)]


def test_guard_issues_one_allreduce_per_step(mesh):
    ranks, _ = mesh
    for res in ranks:
        for c in _non_flush_steps(res):
            assert c["all_reduce"] == 1, c
            assert sum(c[n] for n in COLLECTIVES) == 1, c


def test_no_host_sync_per_step_beyond_the_guards_skip_decision(mesh):
    """SGD is not fused: the Guard reads the step's verdict once (``int``); the reduction
    over the meshes adds no host sync. Step 0 also caches the meshes' ranks, and the
    recovery ladder reads the bad layers on the host when the NaN step triggers it."""
    ranks, _ = mesh
    healthy = [i for i in range(1, STEPS) if i not in (EVERY - 1, STEPS - 1, NAN_STEP)]
    for res in ranks:
        for i in healthy:
            c = res["counts"][i]
            assert {n: c[n] for n in HOST_SYNCS if c[n]} == {"__int__": 1}, (i, c)


def test_partial_gradients_are_refused_then_reduced(runs):
    ranks, ref = runs
    for res in ranks:
        sp = res["sp"]
        assert "Partial(sum)" in sp["error"] and "'tp'" in sp["error"]
        assert "reduce_partial_grads_" in sp["error"]
        assert sp["reduced"] == 2  # the norm's weight and bias
        assert close(sp["norm"], ref["sp"]["norm"])


if __name__ == "__main__":
    run_worker(main, sys.argv[2], LAUNCH_TIMEOUT_S // 2)
