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
    assert tel.flush() is None  # emptied


def test_one_device_to_host_copy_per_flush_and_none_per_step(sync_counter):
    net = mlp(depth=4)
    every = 5
    tel = gg.Telemetry(list(net.named_parameters()), every=every)
    per_step = []
    flush_calls = []
    for _step in range(3 * every):
        net(torch.randn(4, 8)).pow(2).mean().backward()
        with sync_counter as c:
            stats = tel.measure()
            if tel.flush_due:
                tel.begin_update_sample()
                tel.end_update_sample()
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
