"""Telemetry: norms against torch, layer naming, the ring buffer, and zero host syncs."""

from __future__ import annotations

import math

import pytest
import torch
from tests.helpers import mlp, set_grads
from torch import nn

import gradguard as gg
from gradguard.naming import layer_of
from gradguard.telemetry import measure_grads
from gradguard.updates import UpdateSampler


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.ModuleDict(
            {"q_proj": nn.Linear(4, 4), "k_proj": nn.Linear(4, 4, bias=False)}
        )
        self.norm = nn.LayerNorm(4)


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block() for _ in range(4)])


def test_layer_names_are_module_paths():
    enc = nn.Module()
    enc.encoder = Encoder()  # type: ignore[attr-defined]
    tel = gg.Telemetry(list(enc.named_parameters()), every=3)
    assert "encoder.layers.3.attn.q_proj" in tel.layers
    assert layer_of("encoder.layers.3.attn.q_proj.weight") == "encoder.layers.3.attn.q_proj"
    # q_proj has weight+bias: one layer, two parameters
    assert len(tel.layers) == 4 * 3 and len(tel.names) == 4 * 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_per_param_and_total_norms_match_torch_in_float32(dtype):
    ps = [nn.Parameter(torch.randn(s).to(dtype)) for s in [(5,), (3, 7), (2, 2, 2)]]
    set_grads(ps, scale=3.0)
    stats = measure_grads(ps)
    ref = torch.stack([p.grad.float().norm() for p in ps])
    assert stats.param_norms.dtype == torch.float32
    torch.testing.assert_close(stats.param_norms, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats.total_norm, ref.norm(), rtol=1e-6, atol=1e-6)
    assert bool(stats.finite)


def test_missing_grads_count_as_zero_and_nonfinite_is_flagged():
    ps = [nn.Parameter(torch.randn(3)) for _ in range(3)]
    ps[0].grad = torch.ones(3)
    ps[2].grad = torch.tensor([1.0, math.inf, 0.0])
    stats = measure_grads(ps)
    assert stats.param_norms[1].item() == 0.0
    assert math.isinf(stats.param_norms[2].item())
    assert not bool(stats.finite)


def test_window_layer_norms_combine_params():
    net = mlp(depth=3)
    tel = gg.Telemetry(list(net.named_parameters()), every=4)
    for _ in range(3):
        net(torch.randn(4, 8)).sum().backward()
        tel.record(tel.measure(), loss=1.0, clip_coef=None, skipped=None)
        ref = [
            math.hypot(net[i].weight.grad.norm().item(), net[i].bias.grad.norm().item())
            for i in (0, 2, 4)
        ]
        net.zero_grad()
    w = tel.flush()
    assert w.layers == ["0", "2", "4"]
    assert w.steps == [0, 1, 2]
    assert w.layer_norms()[-1].tolist() == pytest.approx(ref, rel=1e-6)
    assert w.layer_norms() is w.layer_norms()  # once per window, however many read it
    assert w.grad_present == [True] * 6
    assert tel.flush() is None  # emptied


def test_window_says_which_parameters_had_a_gradient_tensor_and_a_checkpoint_keeps_it():
    """A frozen parameter (grad None) and one whose gradient is exactly zero both have norm
    0; the window tells them apart (host-side, from which gradients exist), and a
    checkpoint taken mid-window keeps it."""
    net = mlp(depth=3)
    tel = gg.Telemetry(list(net.named_parameters()), every=4)
    net(torch.randn(4, 8)).sum().backward()
    net[0].weight.grad = None  # frozen: no gradient tensor
    net[0].bias.grad.zero_()  # dead: a zero one
    tel.record(tel.measure(), loss=1.0, clip_coef=None, skipped=None)
    again = gg.Telemetry(list(net.named_parameters()), every=4)
    again.load_state_dict(tel.state_dict())
    for t in (tel, again):
        w = t.flush()
        assert w.param_norms[0, :2].tolist() == [0.0, 0.0]
        assert w.grad_present == [False, True, True, True, True, True]


def test_window_says_per_step_which_parameters_had_no_gradient_tensor():
    """Per step, the parameters a step's graph did not reach (``grad_absent``, host-side),
    and per step the layers none of whose parameters did (``layers_absent``); a
    checkpoint taken mid-window keeps them; so does a Telemetry under torch.distributed
    (``graph_order=False``), whose guard's flush makes them those absent on every rank."""
    net = mlp(depth=3)  # layers 0, 2, 4: weight and bias each
    tel = gg.Telemetry(list(net.named_parameters()), every=4)
    for k in range(3):
        net.zero_grad()
        net(torch.randn(4, 8)).sum().backward()
        if k == 1:
            net[0].weight.grad = net[0].bias.grad = None  # layer `0` not reached
        if k == 2:
            net[2].weight.grad = None  # half of layer `2`: the layer was reached
        tel.record(tel.measure(), loss=1.0, clip_coef=None, skipped=None)
    again = gg.Telemetry(list(net.named_parameters()), every=4)
    again.load_state_dict(tel.state_dict())
    for t in (tel, again):
        w = t.flush()
        assert w.grad_absent == [None, frozenset({0, 1}), frozenset({2})]
        assert w.layers_absent() == [frozenset(), frozenset({0}), frozenset()]
    local = gg.Telemetry(list(net.named_parameters()), every=4, graph_order=False)
    net[0].weight.grad = net[0].bias.grad = None
    local.record(local.measure(), loss=1.0, clip_coef=None, skipped=None)
    assert local.flush().layers_absent() == [frozenset({0})]


def test_ranks_agree_on_the_parameters_no_rank_had_a_gradient_for():
    """Per step, the parameters absent on every rank (a rank that does not know, None for
    a step with all present, or a list of another length: none)."""
    from gradguard.distributed.agree import _absent_everywhere
    f = frozenset
    ranks = [[[0, 1], None, [2]], [[1], [3], [2, 4]]]
    assert _absent_everywhere(ranks, 3) == [f({1}), None, f({2})]
    assert _absent_everywhere([[[1]], None], 1) == [None]
    assert _absent_everywhere([[[1]], [[1], [2]]], 1) == [None]


def test_one_device_to_host_copy_per_flush_and_none_per_step(sync_counter):
    net = mlp(depth=4)
    every = 5
    tel = gg.Telemetry(list(net.named_parameters()), every=every)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sampler = UpdateSampler(tel, opt, budget=50)  # a strided sample, not the whole model
    per_step = []
    flush_calls = []
    for _step in range(3 * every):
        net(torch.randn(4, 8)).pow(2).mean().backward()
        with sync_counter as c:
            stats = tel.measure()
            sampler.armed = tel.flush_due
            opt.step()
            tel.record(stats, loss=stats.total_norm, clip_coef=None, skipped=~stats.finite)
        per_step.append(list(c.calls))
        if tel.pending == every:
            with sync_counter as c:
                tel.flush()
            flush_calls.append(list(c.calls))
        net.zero_grad()
    assert all(calls == [] for calls in per_step), per_step
    assert flush_calls == [["cpu"]] * 3


@pytest.mark.parametrize(
    "factory",
    [
        lambda: gg.NormClip(1.0),
        lambda: gg.NormClip(1.0, norm_type=math.inf),
        lambda: gg.ValueClip(0.1),
        lambda: gg.AutoClip(),
        lambda: gg.AutoClip(history_size=4),
        lambda: gg.ZClip(warmup_steps=3),
        lambda: gg.AGC(),
        lambda: gg.chain(gg.ZClip(warmup_steps=3), gg.NormClip(2.0)),
        lambda: gg.chain(gg.AGC(), gg.AutoClip()),
    ],
)
def test_zero_host_syncs_per_step_for_telemetry_and_every_policy(sync_counter, factory):
    net = mlp(depth=4)
    named = list(net.named_parameters())
    tel = gg.Telemetry(named, every=1000)
    policy = factory()
    for step in range(40):
        net(torch.randn(4, 8) * (100 if step == 20 else 1)).pow(2).mean().backward()
        if step == 30:
            net[0].weight.grad[0, 0] = math.nan
        with sync_counter as c, torch.no_grad():
            stats = tel.measure()
            coef = policy.apply_(stats)
            tel.record(stats, loss=None, clip_coef=coef, skipped=~stats.finite)
        assert c.calls == [], (step, c.calls)
        net.zero_grad()


# ---- update norms in bounded memory ------------------------------------------------------
def test_update_norms_are_exact_when_the_model_fits_the_budget():
    net = mlp(depth=3)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    tel = gg.Telemetry(list(net.named_parameters()), every=1)
    sampler = UpdateSampler(tel, opt)
    assert sampler.stride == 1
    net(torch.randn(4, 8)).pow(2).mean().backward()
    before = [p.detach().clone() for p in net.parameters()]
    sampler.armed = True
    opt.step()
    tel.record(tel.measure(), loss=None, clip_coef=None, skipped=None)
    w = tel.flush()
    ref_u = torch.stack([(p.detach() - b).norm() for p, b in zip(net.parameters(), before)])
    ref_w = torch.stack([p.detach().norm() for p in net.parameters()])
    torch.testing.assert_close(w.update_norms, ref_u)
    torch.testing.assert_close(w.weight_norms, ref_w)
    sampler.detach()


def test_the_first_update_of_a_run_and_after_a_restore_is_measured_apart():
    """The guard's sampler measures the run's first update (and the first from weights a
    rollback restored) whatever the flush cadence, for the rollback of a wreck
    (``gradguard.recovery.wreck.cap``); the flush's sample is left as it was."""
    torch.manual_seed(0)
    net = mlp(depth=3)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    guard = gg.Guard(net, opt, recovery=gg.Recovery(), every=50)
    sampler = guard._sampler
    assert sampler.first_due and sampler.first is None
    x = torch.randn(4, 8)
    net(x).pow(2).mean().backward()
    ref = sum((0.1 * p.grad).square().sum() for p in net.parameters())
    guard.step()
    assert not sampler.first_due and sampler.first_step == 0
    torch.testing.assert_close(sampler.first, ref)
    net.zero_grad()
    net(x).pow(2).mean().backward()
    guard.step()  # not measured: the first is kept, the flush cadence untouched
    assert sampler.first_step == 0 and sampler._offset == 0
    from gradguard.recovery import Action, actions

    snap = {"model": {k: v.clone() for k, v in net.state_dict().items()},
            "optimizer": opt.state_dict()}
    actions.rollback(guard, Action("rollback", 1), snap, [], "none")
    assert sampler.first_due and sampler.first is None
    net.zero_grad()
    net(x).pow(2).mean().backward()
    guard.step()
    assert sampler.first_step == 2 and sampler.first is not None
    guard.close()


def test_a_warm_up_from_lr_0_has_its_first_update_measured_at_its_first_moving_step():
    """Hugging Face's linear warm-up runs its first step at LR 0: that update moves
    nothing, and a wreck by the next ones was halved, not cut by its size. The first update
    measured is the first taken at an LR above 0, with its share of the schedule's peak."""
    torch.manual_seed(0)
    net = mlp(depth=3)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, s / 10))
    guard = gg.Guard(net, opt, recovery=gg.Recovery(), every=50)
    x = torch.randn(4, 8)
    for step in range(3):
        net.zero_grad()
        net(x).pow(2).mean().backward()
        if step == 1:
            ref = sum((0.05 * p.grad).square().sum() for p in net.parameters())
        guard.step()
        sched.step()
    sampler = guard._sampler
    assert sampler.first_step == 1 and sampler.first_share == pytest.approx(0.1)
    torch.testing.assert_close(sampler.first, ref)
    guard.close()


def test_update_sample_copies_at_most_the_budget_and_is_unbiased_over_a_rotation(monkeypatch):
    torch.manual_seed(0)
    net = nn.Linear(21, 15)  # 315 + 15 = 330 elements
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    tel = gg.Telemetry(list(net.named_parameters()), every=1)
    sampler = UpdateSampler(tel, opt, budget=66)
    assert sampler.stride == 5  # ceil(330 / 66), odd
    grads = [torch.randn_like(p) for p in net.parameters()]
    exact = torch.stack([g.norm() for g in grads])  # SGD, lr 1: the update is -grad
    cloned = []
    real_clone = torch.Tensor.clone
    monkeypatch.setattr(torch.Tensor, "clone", lambda t, *a, **k: (cloned.append(t.numel()), real_clone(t, *a, **k))[1])
    squares = []
    for _ in range(sampler.stride):  # one full rotation: every element once
        for p, g in zip(net.parameters(), grads):
            p.grad = g + 0.0
        tel.record(tel.measure(), loss=None, clip_coef=None, skipped=None)
        sampler.armed = True
        cloned.clear()
        opt.step()  # the armed sampler copies its sample before, measures after
        assert sum(cloned) <= 66 + 2  # the budget (+1 per parameter), not the model
        w = tel.flush()
        squares.append(w.update_norms**2)
    monkeypatch.undo()
    torch.testing.assert_close(torch.stack(squares).mean(0).sqrt(), exact, rtol=1e-5, atol=0)
    sampler.detach()


def test_default_update_budget_is_a_share_of_the_model_not_the_model():
    from gradguard.updates import UPDATE_SAMPLE_FRACTION, UPDATE_SAMPLE_MIN

    big = nn.Parameter(torch.empty(10**8, device="meta"))  # 100M elements, no memory
    tel = gg.Telemetry([("w", big)], every=1)
    sampler = UpdateSampler(tel, torch.optim.SGD([big], lr=0.1))
    assert sampler.budget == int(UPDATE_SAMPLE_FRACTION * 10**8)
    assert sampler.stride == 51  # 10**8 / 2e6 = 50, made odd: 1.96M elements per flush
    small = gg.Telemetry(list(mlp().named_parameters()), every=1)
    assert UpdateSampler(small, torch.optim.SGD(mlp().parameters(), lr=0.1)).budget == UPDATE_SAMPLE_MIN


def test_update_sample_of_a_channels_last_weight_needs_no_copy_of_it():
    from gradguard.updates import flat_view

    w = torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last)
    flat = flat_view(w)
    assert flat is not None and flat.data_ptr() == w.data_ptr()
    assert torch.equal(flat.sort().values, w.reshape(-1).sort().values)
    assert flat_view(torch.randn(4, 6)[:, ::2]) is None  # a gapped view
