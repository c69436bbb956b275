"""gradguard under torch.distributed: 2 processes, CPU, gloo, loopback.

Each scenario is launched once (``python tests/test_distributed.py SCENARIO OUT`` in two
processes with torchrun's environment variables) under a hard timeout, so a rank that hangs
in a collective fails the tests instead of blocking them. The workers train a tiny MLP on
the halves of a global batch; the parent replays the same global batches in one process,
and the tests compare.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.dist_launch import (
    CollectiveCounter,
    close,
    event,
    full,
    guard_results,
    identical,
    launch,
    run_worker,
)

import gradguard as gg
from gradguard.telemetry import measure_grads

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
STEPS = 10
EVERY = 5
GLOBAL_BS = 16
D_IN = 8
LR = 0.05
NAN_INPUT_STEP = 3  # rank 1's half of the batch holds a NaN
SPIKE_STEP = 5  # rank 1's inputs are scaled by 1000
NAN_GRAD_STEP = 7  # FSDP: a NaN written into rank 1's own shard of layer "0"
LAUNCH_TIMEOUT_S = 90
ZCLIP_WARMUP = 3
NORM_TYPES = (2.0, 3.0, math.inf)
HEADS_STEPS = 200


# ---- the run both the workers and the reference do ------------------------------------


def global_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(123)
    out = []
    for step in range(STEPS):
        x = torch.randn(GLOBAL_BS, D_IN, generator=g)
        y = x.sum(dim=1, keepdim=True).sin()
        if step == NAN_INPUT_STEP:
            x[GLOBAL_BS // 2 + 1, 2] = math.nan  # a row of rank 1's half
        if step == SPIKE_STEP:
            x[GLOBAL_BS // 2 :] *= 1000.0
        out.append((x, y))
    return out


def make_model() -> torch.nn.Module:
    from tests.helpers import mlp

    return mlp(d_in=D_IN, width=16, depth=3, d_out=1, seed=0)


def make_clip(backend: str, world: int = 2) -> gg.ClipPolicy:
    # DDP: a fixed norm clip; FSDP: ZClip, whose running statistics must agree across ranks
    # (the single-process reference: the paper's rule, which a guard under torch.distributed
    # runs, the "gradual" one needing a loss the ranks share)
    if backend == "ddp":
        return gg.NormClip(max_norm=0.25)
    return gg.ZClip(warmup_steps=ZCLIP_WARMUP, **({"gradual": None} if world == 1 else {}))


def train(
    backend: str,
    model: torch.nn.Module,
    rank: int,
    world: int,
    sink_dir: str | None,
    wrapped: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """The guarded loop; ``world == 1`` is the single-process reference. ``wrapped`` is
    the DDP module (the guard is given it; its forward runs the model)."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    fwd = wrapped or model
    sinks = [gg.JsonlSink(sink_dir)] if sink_dir else []
    guard = gg.Guard(fwd, opt, clip=make_clip(backend, world), every=EVERY, sinks=sinks)
    fsdp = backend == "fsdp"
    counts: list[dict[str, int]] = []
    norms, coefs, grads0 = [], [], None
    first = dict(model.named_parameters())["0.weight"]
    for step, (x, y) in enumerate(global_batches()):
        lo, hi = rank * GLOBAL_BS // world, (rank + 1) * GLOBAL_BS // world
        loss = torch.nn.functional.mse_loss(fwd(x[lo:hi]), y[lo:hi])
        loss.backward()
        if fsdp and step == NAN_GRAD_STEP:
            with torch.no_grad():
                if world == 1:
                    first.grad[GLOBAL_BS // 2, 0] = math.nan  # row 8: rank 1's shard
                elif rank == 1:
                    first.grad.to_local()[0, 0] = math.nan  # type: ignore[operator]
        with CollectiveCounter() as cc:
            norms.append(guard.step(loss).detach().clone())
        counts.append(cc.counts)
        if step == 0:
            grads0 = {n: full(p.grad) for n, p in model.named_parameters()}
        opt.zero_grad()
        if guard.telemetry.pending == 0:  # this step flushed
            assert guard.last_window is not None
            coefs.append(guard.last_window.clip_coef.clone())
    guard.close()
    # standalone measurement on DTensor gradients, every norm order, NaN on rank 1 only
    x, y = global_batches()[1]
    lo, hi = rank * GLOBAL_BS // world, (rank + 1) * GLOBAL_BS // world
    torch.nn.functional.mse_loss(fwd(x[lo:hi]), y[lo:hi]).backward()
    params = list(model.parameters())
    measured = {p: measure_grads(params, norm_type=p).total_norm.clone() for p in NORM_TYPES}
    layer2 = dict(model.named_parameters())["2.bias"]
    if world == 1 or rank == 1:
        with torch.no_grad():
            g = layer2.grad.to_local() if world > 1 and fsdp else layer2.grad  # type: ignore[operator]
            g[-1] = math.nan
    nan_norms = {p: measure_grads(params, norm_type=p).total_norm.clone() for p in NORM_TYPES}
    return guard_results(guard, model, norms, coefs) | {
        "grads0": grads0,
        "counts": counts,
        "measured": measured,
        "nan_norms": nan_norms,
    }


ROLLBACK_STEPS = 12
ROLLBACK_NAN_STEPS = (4, 5)  # a skip backs the LR off, a second one rolls back
UNDO_NAN_STEPS = (4,)  # a skip backs the LR off; the finite step after it undoes that
#: rank 0's loss alone jumps x1e4 (a constant: no gradient changes). Each rank sees its
#: own loss, so a per-step loss verdict would skip on rank 0 only and split the replicas.
ROLLBACK_RANK_LOSS_STEP = 2


def train_rollback(
    model: torch.nn.Module, rank: int, world: int, wrapped: torch.nn.Module | None = None,
    *, every: int = 2, steps: int = ROLLBACK_STEPS, zero: bool = False,
    nan_steps: tuple[int, ...] = ROLLBACK_NAN_STEPS,
) -> dict[str, Any]:
    """Recovery on every rank: NaN batches on rank 1 -> back-off, then a rollback.
    ``zero``: the SGD is sharded by a ``ZeroRedundancyOptimizer``; ``nan_steps``: the
    steps whose batch holds a NaN (one alone: a back-off the next step undoes)."""
    fwd = wrapped or model
    opt: torch.optim.Optimizer
    if zero:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.SGD,
                                      lr=LR, momentum=0.9)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    recovery = gg.Recovery(skip_patience=1, snapshot_every=1, restore_steps=50)
    guard = gg.Guard(fwd, opt, clip=gg.NormClip(1.0), every=every, recovery=recovery)
    flushes, flush = [], guard.flush

    def spy() -> Any:
        flushes.append(guard.step_count - 1)
        return flush()

    guard.flush = spy  # type: ignore[method-assign]
    g = torch.Generator().manual_seed(7)
    for step in range(steps):
        x = torch.randn(GLOBAL_BS, D_IN, generator=g)
        y = x.sum(dim=1, keepdim=True).sin()
        if step in nan_steps:
            x[-1, 0] = math.nan  # the last row: rank 1's half
        lo, hi = rank * GLOBAL_BS // world, (rank + 1) * GLOBAL_BS // world
        loss = torch.nn.functional.mse_loss(fwd(x[lo:hi]), y[lo:hi])
        loss.backward()
        if world > 1 and rank == 0 and step == ROLLBACK_RANK_LOSS_STEP:
            loss = loss.detach() + 1e4
        guard.step(loss)
        opt.zero_grad()
    state = guard.state_dict()  # a checkpoint (its weight norms: of each rank's shard)
    guard.close()
    return {
        "params": {n: full(p) for n, p in model.named_parameters()},
        "state_weights": state["weight_norms"],
        "events": [e.to_json() for e in guard.events],
        "decisions": [(d.kind, d.step) for d in recovery.actions if d.kind != "snapshot"],
        "lr": opt.param_groups[0]["lr"],
        "flushes": flushes,
    }


class TaskHeads(torch.nn.Module):
    """A trunk and four task heads; a batch is one task's (the same on every rank)."""

    def __init__(self, heads_first: bool = False) -> None:
        super().__init__()
        if heads_first:  # registered first: the dead-layer test's order rule cannot help
            self.heads = torch.nn.ModuleList(torch.nn.Linear(32, 1) for _ in range(4))
        self.trunk = torch.nn.Sequential(torch.nn.Linear(D_IN, 32), torch.nn.ReLU())
        if not heads_first:
            self.heads = torch.nn.ModuleList(torch.nn.Linear(32, 1) for _ in range(4))

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        return self.heads[task](self.trunk(x))


def train_heads(rank: int, world: int, steps: int = HEADS_STEPS, heads_first: bool = False
                ) -> dict[str, Any]:
    """Four task heads on a trunk under DDP (``find_unused_parameters=True``). Under
    torch.distributed the guard does not read which parameters a step's graph reached (each
    rank's graph is its own), so the heads a batch did not use counted as zero and looked
    dead to the dead-layer test; the run was rolled back three times and raised
    TrainingDiverged at step 109. ``heads_first``: the model registers its heads before its
    trunk."""
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    model = DistributedDataParallel(TaskHeads(heads_first), find_unused_parameters=True)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    guard = gg.Guard(model, opt, clip=gg.ZClip(), recovery=gg.Recovery())
    g = torch.Generator().manual_seed(1 + rank)
    error = None
    try:
        for step in range(steps):
            task = step % 4 if step % 7 or heads_first else 0
            x = torch.randn(GLOBAL_BS // world, D_IN, generator=g)
            loss = torch.nn.functional.mse_loss(model(x, task), x[:, :1] * (task + 1))
            opt.zero_grad()
            loss.backward()
            guard.step(loss.detach())
        guard.close()
    except gg.TrainingDiverged as e:
        error = str(e)
    return {"error": error, "events": [e.to_json() for e in guard.events if e.severity != "info"]}


# ---- the worker --------------------------------------------------------------------


def worker_main(scenario: str) -> Any:
    def main(rank: int, out: str) -> dict[str, Any]:
        model = make_model()
        if scenario == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            res = train("ddp", model, rank, WORLD, None, DistributedDataParallel(model))
            fresh = make_model()
            res["rollback"] = train_rollback(fresh, rank, WORLD, DistributedDataParallel(fresh))
            fresh = make_model()
            res["cadence"] = train_rollback(fresh, rank, WORLD, DistributedDataParallel(fresh),
                                            every=30, steps=40)
            fresh = make_model()
            res["zero"] = train_rollback(fresh, rank, WORLD, DistributedDataParallel(fresh),
                                         zero=True)
            fresh = make_model()
            res["undo"] = train_rollback(fresh, rank, WORLD, DistributedDataParallel(fresh),
                                         nan_steps=UNDO_NAN_STEPS)
            res["heads"] = train_heads(rank, WORLD)
            res["heads_first"] = train_heads(rank, WORLD, heads_first=True)
            return res
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        res = train("fsdp", model, rank, WORLD, os.path.join(out, "run"))
        fresh = make_model()
        for layer in fresh:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(fresh)
        res["rollback"] = train_rollback(fresh, rank, WORLD)
        fresh = make_model()
        for layer in fresh:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(fresh)
        res["undo"] = train_rollback(fresh, rank, WORLD, nan_steps=UNDO_NAN_STEPS)
        return res

    return main


# ---- the launcher --------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    cache: dict[str, Any] = {}

    def get(scenario: str) -> tuple[list[dict[str, Any]], dict[str, Any], Path]:
        if scenario not in cache:
            out = tmp_path_factory.mktemp(scenario)
            ranks = launch(__file__, scenario, out, world=WORLD, timeout_s=LAUNCH_TIMEOUT_S)
            ref = train(scenario, make_model(), 0, 1, None)
            ref["rollback"] = train_rollback(make_model(), 0, 1)
            ref["cadence"] = train_rollback(make_model(), 0, 1, every=30, steps=40)
            ref["undo"] = train_rollback(make_model(), 0, 1, nan_steps=UNDO_NAN_STEPS)
            cache[scenario] = (ranks, ref, out)
        return cache[scenario]

    return get  # type: ignore[return-value]


BACKENDS = ["ddp", "fsdp"]


# ---- norms and clipping equal a single process on the global batch -----------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_total_norms_match_single_process(runs, backend):
    ranks, ref, _ = runs(backend)
    for res in ranks:
        assert close(res["norms"], ref["norms"]), (res["norms"], ref["norms"])
        assert torch.isnan(res["norms"][NAN_INPUT_STEP])


@pytest.mark.parametrize("backend", BACKENDS)
def test_clipped_gradients_match_single_process(runs, backend):
    ranks, ref, _ = runs(backend)
    if backend == "ddp":
        assert ref["clip_coef"][0] < 1.0  # NormClip(0.25) clips step 0
    for res in ranks:
        for name, g in ref["grads0"].items():
            assert close(res["grads0"][name], g), name
        assert close(res["clip_coef"], ref["clip_coef"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_parameters_match_single_process_and_each_other(runs, backend):
    ranks, ref, _ = runs(backend)
    for name, p in ref["params"].items():
        assert torch.isfinite(p).all()
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name]), name
        assert close(ranks[0]["params"][name], p), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_window_per_layer_norms_match_single_process(runs, backend):
    ranks, ref, _ = runs(backend)
    for key in ("loss", "total_norm", "layer_norms", "weight_norms", "update_norms"):
        for res in ranks:
            assert close(res["window"][key], ref["window"][key]), key
        assert identical(ranks[0]["window"][key], ranks[1]["window"][key]), key


def test_fsdp_measure_every_norm_order_matches_single_process(runs):
    ranks, ref, _ = runs("fsdp")
    for p in NORM_TYPES:
        for res in ranks:
            assert close(res["measured"][p], ref["measured"][p]), p
            # a NaN in rank 1's shard only makes the norm NaN on both ranks
            assert torch.isnan(res["nan_norms"][p]), p


# ---- non-finite anywhere: every rank skips the same step ---------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_input_on_rank1_skips_on_both_ranks_and_names_rank1(runs, backend):
    ranks, ref, _ = runs(backend)
    expected_skips = 2 if backend == "fsdp" else 1
    assert ref["skipped"] == expected_skips
    for res in ranks:
        assert res["skipped"] == expected_skips
        ev = event(res, "nonfinite_grad", NAN_INPUT_STEP)
        assert ev["rank"] == 1 and ev["data"]["ranks"] == [1]
        # the origin the detectors name in a single process on the same global batch
        assert ev["layer"] is not None
        assert ev["layer"] == event(ref, "nonfinite_grad", NAN_INPUT_STEP)["layer"]
        assert event(res, "skip", NAN_INPUT_STEP)["rank"] == 1
    assert ranks[0]["events"] == ranks[1]["events"]


def test_fsdp_nan_in_rank1_shard_names_rank1_and_origin_layer(runs):
    ranks, _, _ = runs("fsdp")
    for res in ranks:
        ev = event(res, "nonfinite_grad", NAN_GRAD_STEP)
        assert ev["rank"] == 1
        assert ev["layer"] == "0"
        assert ev["data"]["layers"] == ["0"]
        assert "rank 1" in ev["message"]


# ---- a spike on one rank is clipped identically -------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_spike_on_one_rank_clipped_identically(runs, backend):
    ranks, ref, _ = runs(backend)
    c0, c1 = ranks[0]["clip_coef"][SPIKE_STEP], ranks[1]["clip_coef"][SPIKE_STEP]
    assert c0 < 1e-2, c0  # the x1000 spike is cut down
    assert torch.equal(c0, c1)
    assert close(c0, ref["clip_coef"][SPIKE_STEP])
    if backend == "fsdp":
        for key, value in ranks[0]["clip_state"]["state"].items():
            assert torch.equal(value, ranks[1]["clip_state"]["state"][key]), key
            if key != "rise":  # ZClip's "gradual" rule
                assert close(value.double(), ref["clip_state"]["state"][key].double()), key
        # each rank's loss is its own: the guard gives ZClip none (its "gradual" rule
        # needs one), so the ranks decide alike, by the paper's rule (the reference's)
        assert ranks[0]["clip_state"]["state"]["rise"][3] == 0  # no loss in its EMA


# ---- collectives: none per step for DDP, one for FSDP2 -------------------------------


def _per_step(res: dict[str, Any]) -> list[dict[str, int]]:
    flush_steps = {EVERY - 1, STEPS - 1}
    return [c for i, c in enumerate(res["counts"]) if i not in flush_steps and i != 0]


def test_ddp_guard_issues_no_collective_per_step(runs):
    ranks, _, _ = runs("ddp")
    for c in _per_step(ranks[0]):
        assert sum(c.values()) == 0, c


def test_fsdp_guard_state_dict_saves_each_shards_weight_norms(runs):
    """Found by a review: ``Guard.state_dict()`` of a guard over FSDP2 parameters raised
    ".tolist() is not supported for tensor subclasses, got DTensor" (the weight norms a
    resumed ``gradguard run`` compares, read from the DTensors themselves)."""
    ranks, ref, _ = runs("fsdp")
    n = len(ref["rollback"]["params"])
    for r in ranks:
        norms = r["rollback"]["state_weights"]
        assert len(norms) == n and all(math.isfinite(v) and v >= 0 for v in norms)


def test_fsdp_guard_issues_one_allreduce_per_step(runs):
    ranks, _, _ = runs("fsdp")
    for c in _per_step(ranks[0]):
        assert c["all_reduce"] == 1 and sum(c.values()) == 1, c


# ---- sinks on rank 0, events gathered --------------------------------------------------


def test_fsdp_sinks_write_once_on_rank0_with_events_gathered(runs):
    _, _, out = runs("fsdp")
    run = out / "run"
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m["step"] for m in metrics if m["type"] == "step"]
    assert steps == list(range(STEPS))  # rank 1 wrote nothing: no duplicate lines
    events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    nan_events = [e for e in events if e["kind"] == "nonfinite_grad"]
    assert [(e["step"], e["rank"]) for e in nan_events] == [
        (NAN_INPUT_STEP, 1),
        (NAN_GRAD_STEP, 1),
    ]


# ---- recovery: the same rollback on every rank ---------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_rollback_mid_run_on_two_ranks_keeps_ranks_identical(runs, backend):
    ranks, ref, _ = runs(backend)
    r0, r1, want = ranks[0]["rollback"], ranks[1]["rollback"], ref["rollback"]
    assert want["decisions"] == [("backoff", 4), ("rollback", 5)]
    for res in (r0, r1):
        assert res["decisions"] == want["decisions"]
        rollback = [e for e in res["events"] if e["kind"] == "rollback"]
        # not step 3's snapshot: every step since it was skipped (its weights are the
        # trouble's own); the newest whose weights had finite gradients is step 1's
        assert len(rollback) == 1 and rollback[0]["data"]["snapshot_step"] == 1
        assert res["lr"] == pytest.approx(want["lr"])
    assert r0["events"] == r1["events"]
    for name, p in want["params"].items():
        assert torch.isfinite(r0["params"][name]).all()
        assert torch.equal(r0["params"][name], r1["params"][name]), name
        assert close(r0["params"][name], p), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_back_off_undone_by_the_next_step_on_two_ranks_keeps_ranks_identical(runs, backend):
    """NaN in rank 1's half of one batch: every rank skips and backs off, and the next
    step, finite on the same weights, undoes the back-off on every rank alike (the ladder
    hears the same flags everywhere), as in a single process."""
    ranks, ref, _ = runs(backend)
    r0, r1, want = ranks[0]["undo"], ranks[1]["undo"], ref["undo"]
    assert want["decisions"] == [("backoff", 4), ("sound", 5)]
    for res in (r0, r1):
        assert res["decisions"] == want["decisions"]
        assert [e["kind"] for e in res["events"] if e["kind"] == "nonfinite_input"] == [
            "nonfinite_input"]
    assert r0["events"] == r1["events"]
    for name, p in want["params"].items():
        assert torch.equal(r0["params"][name], r1["params"][name]), name
        assert close(r0["params"][name], p), name


def test_rollback_with_a_zero_redundancy_optimizer_restores_each_ranks_shard(runs):
    """A ``ZeroRedundancyOptimizer`` keeps each rank's shard of the state in a local
    optimizer; its own ``state_dict()`` needs a collective consolidation first, and the
    first snapshot (before step 0) raised. Each rank now snapshots and restores its own
    shard: the same decisions as one process with plain SGD, identical ranks, the same
    weights."""
    ranks, ref, _ = runs("ddp")
    r0, r1, want = ranks[0]["zero"], ranks[1]["zero"], ref["rollback"]
    for res in (r0, r1):
        assert res["decisions"] == want["decisions"] == [("backoff", 4), ("rollback", 5)]
    assert r0["events"] == r1["events"]
    for name, p in want["params"].items():
        assert torch.equal(r0["params"][name], r1["params"][name]), name
        assert close(r0["params"][name], p), name


def test_ranks_flush_together_every_ten_steps_while_the_ladder_is_at_work(runs):
    """Flushes are collectives: after the back-off (step 4) the guard flushes every ten
    steps instead of every 30, decided from the ladder's state, the same on every rank."""
    ranks, ref, _ = runs("ddp")
    want = ref["cadence"]
    assert want["decisions"][0] == ("backoff", 4)
    assert want["flushes"] == [9, 19, 29, 39]
    for res in ranks:
        assert res["cadence"]["decisions"] == want["decisions"]
        assert res["cadence"]["flushes"] == want["flushes"]


def test_task_heads_that_take_turns_under_ddp_are_not_a_network_that_died(runs):
    """The heads come after a trunk that trains, and dead units leave every layer before
    them without a gradient: no rollback, no warning, on either rank."""
    ranks, _, _ = runs("ddp")
    for res in ranks:
        assert res["heads"]["error"] is None
        assert res["heads"]["events"] == []


def test_task_heads_registered_before_their_trunk_under_ddp_are_not_dead(runs):
    """Heads registered before the trunk: the dead-layer test's order rule (dead layers
    come first) cannot tell them from a dead network. Under DDP a parameter keeps no
    gradient after the backward only when no rank's graph reached it (DDP fills the others
    in); the guard's flush now keeps, per step, the parameters without one on every rank,
    as in one process: a head a step did not use counts neither way. It was rolled back
    and stopped with TrainingDiverged."""
    ranks, _, _ = runs("ddp")
    for res in ranks:
        assert res["heads_first"]["error"] is None
        assert res["heads_first"]["events"] == []


def test_merge_events_keeps_rank_only_events():
    shared = gg.Event(kind="lr_backoff", step=3, severity="warning", message="lr halved")
    only1 = gg.Event(kind="grad_spike", step=2, severity="warning", message="spike")
    from gradguard.distributed import merge_events

    merged = merge_events([[shared], [shared, only1]])
    assert [(e.kind, e.rank) for e in merged] == [("grad_spike", 1), ("lr_backoff", None)]


def test_guard_rejects_bad_sink_rank():
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="sink_rank=-1"):
        gg.Guard(model, opt, sink_rank=-1)


if __name__ == "__main__":
    run_worker(worker_main(sys.argv[1]), sys.argv[2], LAUNCH_TIMEOUT_S // 2)
