"""The layers' order in the autograd graph (gradguard.graph_order) and the vanishing test
that compares each layer with the layers after it in that order."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.detectors import detect_vanishing
from gradguard.graph_order import layers_after
from gradguard.telemetry import Telemetry
from test_detectors import window


def order(model: nn.Module, loss: torch.Tensor) -> tuple[list[str], list[list[str]] | None]:
    tel = Telemetry(list(model.named_parameters()))
    loss.backward()
    after = layers_after(loss, tel.params, tel.layer_index, len(tel.layers))
    names = None if after is None else [[tel.layers[k] for k in ks] for ks in after]
    return tel.layers, names


def actor_critic() -> nn.ModuleDict:
    pi = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))
    vf = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    return nn.ModuleDict({"pi": pi, "vf": vf})


def actor_critic_loss(model: nn.ModuleDict, target: torch.Tensor) -> torch.Tensor:
    """A policy's cross-entropy plus a value loss of returns in the hundreds (64 samples)."""
    x = torch.randn(64, 8)
    ret = 100 * x[:, 0].abs() + 50
    return nn.functional.cross_entropy(model["pi"](x), (x @ target).argmax(1)) + \
        0.5 * (model["vf"](x).squeeze(-1) - ret).pow(2).mean()


def test_a_chain_is_in_registration_order():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    layers, after = order(model, model(torch.randn(3, 4)).pow(2).mean())
    assert layers == ["0", "2", "4"] and after == [["2", "4"], ["4"], []]


def test_side_by_side_networks_are_not_after_each_other():
    torch.manual_seed(0)
    model = actor_critic()
    x = torch.randn(5, 8)
    layers, after = order(model, model["pi"](x).logsumexp(1).mean() + model["vf"](x).pow(2).mean())
    assert layers == ["pi.0", "pi.2", "pi.4", "vf.0", "vf.2"]
    assert after == [["pi.2", "pi.4"], ["pi.4"], [], ["vf.2"], []]


def test_the_graph_puts_a_pre_norm_before_the_projections_registered_ahead_of_it():
    """Llama registers each block's ``input_layernorm`` after its attention and MLP; the graph
    puts it before them. Parameters an operation takes side by side (a norm's scale and the
    embedding it normalises) order nothing between them."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                                   num_attention_heads=2, num_key_value_heads=2, vocab_size=50)
    model = transformers.LlamaForCausalLM(cfg)
    ids = torch.randint(0, 50, (2, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layers, after = order(model, model(ids, labels=ids).loss)
    assert after is not None
    of = dict(zip(layers, after))
    block = "model.layers.0."
    assert block + "self_attn.q_proj" in of[block + "input_layernorm"]
    assert block + "input_layernorm" not in of[block + "mlp.down_proj"]
    assert of[block + "self_attn.q_proj"][0] == block + "self_attn.o_proj"
    assert block + "self_attn.k_proj" not in of[block + "self_attn.q_proj"]  # side by side
    assert set(of["model.embed_tokens"]) == set(layers) - {"model.embed_tokens"}
    assert of["lm_head"] == []


class Fused(torch.autograd.Function):
    """One operation that takes two layers' weights (a fused kernel)."""

    @staticmethod
    def forward(ctx, x, a, b):  # type: ignore[override]
        ctx.save_for_backward(x, a, b)
        return x @ a.t() @ b.t()

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, a, b = ctx.saved_tensors
        h = x @ a.t()
        return g @ b @ a, (g @ b).t() @ x, g.t() @ h


def test_no_order_where_the_graph_cannot_give_one():
    torch.manual_seed(0)
    x = torch.randn(3, 4)
    tied = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Tanh(), nn.Linear(4, 4, bias=False))
    tied[2].weight = tied[0].weight  # one weight at both ends: each layer after the other
    assert order(tied, tied(x).sum())[1] is None
    unused = nn.ModuleDict({"a": nn.Linear(4, 4), "b": nn.Linear(4, 4)})
    assert order(unused, unused["a"](x).sum())[1] is None  # `b` is not reached
    twice = nn.ModuleDict({"a": nn.Linear(4, 4), "b": nn.Linear(4, 4)})
    assert order(twice, twice["a"](twice["b"](twice["a"](x))).sum())[1] is None
    fused = nn.ModuleDict({"a": nn.Linear(4, 4, bias=False), "b": nn.Linear(4, 4, bias=False)})
    loss = Fused.apply(x, fused["a"].weight, fused["b"].weight).sum()
    assert order(fused, loss)[1] is None
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    tel = Telemetry(list(model.named_parameters()))
    loss = model(x).sum()
    loss.backward()
    assert layers_after(loss.detach(), tel.params, tel.layer_index, 2) is None
    assert layers_after(1.5, tel.params, tel.layer_index, 2) is None
    assert layers_after(loss, tel.params, tel.layer_index, 2) == [[1], []]


def test_telemetry_reads_the_order_from_the_first_loss_with_a_graph():
    model = actor_critic()
    tel = Telemetry(list(model.named_parameters()), every=4)
    x = torch.randn(5, 8)
    loss = model["pi"](x).sum() + model["vf"](x).sum()
    loss.backward()
    tel.record(tel.measure(), loss=1.0, clip_coef=None, skipped=False)  # a number: no graph
    assert tel.after is None
    tel.record(tel.measure(), loss=loss, clip_coef=None, skipped=False)
    w = tel.flush()
    assert w is not None and w.after == [[1, 2], [2], [], [4], []]


def test_a_layer_is_compared_with_the_layers_after_it_in_the_graph():
    """`a` -> `b` is one network, `c` -> `d` another beside it whose gradients are 1e4 times
    larger: in registration order `a` and `b` "vanish" behind `c` and `d`."""
    rows = [[1e-4, 1e-3, 1.0, 10.0]] * 10
    assert detect_vanishing(window(rows))[0].data["layers"] == ["a", "b"]
    w = window(rows)
    w.after = [[1], [], [3], []]
    assert detect_vanishing(w) == []
    w = window([[1e-7, 1e-3, 1.0, 10.0]] * 10)  # `a` 1e-4 of `b`
    w.after = [[1], [], [3], []]
    events = detect_vanishing(w)
    assert events and events[0].data["layers"] == ["a"]


def test_a_layer_counts_only_when_every_layer_before_it_in_the_graph_vanishes_too():
    rows = [[1e-5, 1e-5, 0.5, 1e-4, 1.0]] * 10  # a -> b -> e and c -> d -> e
    w = window(rows)
    w.after = [[1, 4], [4], [3, 4], [4], []]
    assert detect_vanishing(w)[0].data["layers"] == ["a", "b"]  # `d`: behind `c`, in full


def test_the_guard_finds_no_vanishing_in_a_healthy_actor_critic():
    """A policy and a value network in one ModuleDict, SGD: the value loss of returns in the
    hundreds gives the critic gradients ~1e3 times the policy's. In registration order the
    policy's first layer vanished "behind" the critic (4.9e-4 of the layers after it) at
    every window; its gradients are ordinary for its own network."""
    torch.manual_seed(0)
    model = actor_critic()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    guard = gg.Guard(model, opt, clip=gg.ZClip(), recovery=gg.Recovery())
    target = torch.randn(8, 4)
    for _ in range(150):
        loss = actor_critic_loss(model, target)
        opt.zero_grad()
        loss.backward()
        guard.step(loss)
    guard.close()
    assert not [e for e in guard.events if e.kind == "vanishing_grad"]
    assert guard.telemetry.after == [[1, 2], [2], [], [4], []]


def test_the_guard_still_finds_a_policy_whose_own_gradients_vanish():
    """The same actor-critic with a deep sigmoid policy at a tiny init: its first layers'
    gradients vanish within the policy, and the graph order still says so."""
    torch.manual_seed(0)
    pi = nn.Sequential(*[m for _ in range(8) for m in (nn.Linear(16, 16), nn.Sigmoid())],
                       nn.Linear(16, 4))
    for m in pi:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.05)
    vf = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))
    model = nn.ModuleDict({"pi": pi, "vf": vf})
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    guard = gg.Guard(model, opt)
    for _ in range(50):
        x = torch.randn(32, 16)
        loss = nn.functional.cross_entropy(pi(x), (x[:, :4]).argmax(1)) + vf(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        guard.step(loss)
    guard.close()
    hit = [e for e in guard.events if e.kind == "vanishing_grad"]
    assert hit and hit[0].layer == "pi.0"
    assert all(not name.startswith("vf") for name in hit[0].data["layers"])


class _NanBackward(torch.autograd.Function):
    """The identity forward; a NaN gradient backward (a wrong custom backward)."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def]
        return g * float("nan")


class PreNorm(nn.Module):
    """A projection registered before the norm that feeds it (as Llama's blocks), with a
    backward that goes NaN between the projection's output and the head."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 1)
        self.bad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(self.norm(x))
        return self.head(_NanBackward.apply(h) if self.bad else h)


def test_a_nan_gradient_is_traced_to_the_layer_nearest_the_loss_in_the_graph():
    """The gradient goes NaN below the head: the projection and the norm before it are
    non-finite. Registration order named the norm (registered last of the two); the graph
    says the projection is where backward first went bad."""
    torch.manual_seed(0)
    model = PreNorm()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    guard = gg.Guard(model, opt, recovery=gg.Recovery())
    for step in range(30):
        model.bad = step == 20
        loss = model(torch.randn(16, 8)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        guard.step(loss)
    guard.close()
    hit = [e for e in guard.events if e.kind == "nonfinite_grad"]
    assert len(hit) == 1 and hit[0].step == 20
    assert hit[0].data["layers"] == ["proj", "norm"] and hit[0].layer == "proj"
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_no_graph_order_is_read_when_the_guard_runs_under_torch_distributed():
    """Each rank's graph is its own (one that does not reach a layer would judge by another
    order than the rest): a guard under torch.distributed builds its telemetry with
    ``graph_order=False``, and registration order stands on every rank."""
    model = actor_critic()
    tel = Telemetry(list(model.named_parameters()), every=4, graph_order=False)
    x = torch.randn(5, 8)
    loss = model["pi"](x).sum() + model["vf"](x).sum()
    loss.backward()
    tel.record(tel.measure(), loss=loss, clip_coef=None, skipped=False)
    w = tel.flush()
    assert w is not None and w.after is None and tel.after is None


def test_the_zero_code_loss_carries_its_graph_to_the_first_step_only():
    from gradguard.integrations._hooked import LossTracker

    w = torch.ones(2, requires_grad=True)
    t = LossTracker()
    t.add(w.sum() * 2)
    first = t.take()
    assert first is not None and first.grad_fn is not None
    t.add(w.sum() * 3)
    second = t.take()
    assert second is not None and second.grad_fn is None and float(second) == 6.0
    fresh = LossTracker()
    fresh.add(w.sum())
    fresh.add(w.sum())  # two micro-batches: their sum has no one graph
    summed = fresh.take()
    assert summed is not None and summed.grad_fn is None and float(summed) == 4.0


def test_an_unmodified_actor_critic_script_under_zero_code_has_no_vanishing(tmp_path):
    """`gradguard run` records the losses of `backward` detached; the first step's loss
    keeps its graph, so the order is the graph's there too (it said "HEALTHY: Gradients
    vanished in `pi.0` from step 49" of the healthy actor-critic)."""
    from gradguard.integrations._session import ZeroCodeSession

    torch.manual_seed(0)
    model = actor_critic()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    target = torch.randn(8, 4)
    with ZeroCodeSession(tmp_path, report=False) as session:
        for _ in range(150):
            loss = actor_critic_loss(model, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
    guard = session.units[0].guard
    assert not [e for e in guard.events if e.kind == "vanishing_grad"]
    assert guard.telemetry.after == [[1, 2], [2], [], [4], []]
