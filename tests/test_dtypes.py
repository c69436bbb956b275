"""Every dtype and layout torch's clip_grad_norm_ takes, and sparse gradients, which it
refuses: NormClip against torch, every policy and the first guard.step on float64 and
complex parameters, sparse embeddings with SparseAdam, and AGC's numerics (float16 scales,
ConvTranspose units)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.measure import measure_grads

MIXES = {
    "f64": [torch.float64],
    "c64": [torch.complex64],
    "c128": [torch.complex128],
    "f32+f64": [torch.float32, torch.float64],
    "f32+c64+bf16": [torch.float32, torch.complex64, torch.bfloat16],
    "f16+f64+c128": [torch.float16, torch.float64, torch.complex128],
}
SHAPES = [(3,), (4, 5), (2, 3, 4)]


def params_of(dtypes, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for dt in dtypes:
        for s in SHAPES:
            p = nn.Parameter(torch.randn(s, generator=g).to(dt))
            if dt.is_complex:
                grad = torch.complex(torch.randn(s, generator=g), torch.randn(s, generator=g))
            else:
                grad = torch.randn(s, generator=g)
            p.grad = (grad * scale).to(dt)
            out.append(p)
    return out


def twin(ps):
    out = []
    for p in ps:
        q = nn.Parameter(p.detach().clone())
        q.grad = p.grad.clone()
        out.append(q)
    return out


# ---- NormClip is clip_grad_norm_ ---------------------------------------------------------
@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, "inf"])
@pytest.mark.parametrize("foreach", [None, True, False])
def test_normclip_equals_clip_grad_norm_on_float64_complex_and_mixed(mix, norm_type, foreach):
    ours = params_of(MIXES[mix])
    ref = twin(ours)
    n_ours = gg.NormClip(0.5, norm_type=norm_type, foreach=foreach).clip_(ours)
    n_ref = torch.nn.utils.clip_grad_norm_(ref, 0.5, norm_type=norm_type, foreach=foreach)
    assert n_ours.dtype == n_ref.dtype
    torch.testing.assert_close(n_ours, n_ref, rtol=1e-6, atol=0)
    for a, b in zip(ours, ref):
        assert a.grad.dtype == b.grad.dtype
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)


def test_normclip_tensor_max_norm_is_used_on_the_device(sync_counter):
    limit = torch.tensor(0.25)
    policy = gg.NormClip(max_norm=limit)
    ours = params_of([torch.float32])
    ref = twin(ours)
    with sync_counter as c:
        policy.clip_(ours)
    assert c.calls == []  # torch's float(max_norm) would read it on the host
    torch.nn.utils.clip_grad_norm_(ref, 0.25)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad, b.grad)
    limit.fill_(1e-3)  # a schedule may change it in place
    policy.clip_(ours)
    total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ours]))
    assert total.item() == pytest.approx(1e-3, rel=1e-3)


def test_normclip_error_if_nonfinite_raises_like_torch():
    ps = params_of([torch.float32])
    ps[1].grad[0, 0] = math.nan
    before = [p.grad.clone() for p in ps]
    with pytest.raises(RuntimeError, match="non-finite"):
        torch.nn.utils.clip_grad_norm_(twin(ps), 1.0, error_if_nonfinite=True)
    with pytest.raises(RuntimeError, match="non-finite"):
        gg.NormClip(1.0, error_if_nonfinite=True).clip_(ps)
    for a, b in zip(ps, before):
        torch.testing.assert_close(a.grad, b, rtol=0, atol=0, equal_nan=True)


def test_normclip_foreach_true_without_foreach_kernels_raises_like_torch():
    w = nn.Parameter(torch.ones(3, device="meta"))
    w.grad = torch.ones(3, device="meta")
    with pytest.raises(RuntimeError, match="foreach=True"):
        torch.nn.utils.clip_grad_norm_([w], 1.0, foreach=True)
    with pytest.raises(RuntimeError, match="foreach=True"):
        gg.NormClip(1.0, foreach=True).clip_([w])
    gg.NormClip(1.0).clip_([w])  # foreach=None falls back to a loop, as torch does


def test_normclip_leaves_grads_unscaled_where_torch_multiplies_by_nan():
    ps = params_of([torch.float64])
    ps[0].grad[1] = math.nan
    ref = twin(ps)
    finite_before = ps[1].grad.clone()
    total = gg.NormClip(1.0).clip_(ps)
    torch.nn.utils.clip_grad_norm_(ref, 1.0)
    assert math.isnan(total.item())
    assert torch.equal(ps[1].grad, finite_before)  # the documented difference
    assert torch.isnan(ref[1].grad).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"norm_type": "fro"}, "norm_type"),
        ({"norm_type": -1}, "norm_type"),
        ({"foreach": "yes"}, "foreach"),
        ({"error_if_nonfinite": 1}, "error_if_nonfinite"),
        ({"max_norm": torch.ones(2)}, "max_norm"),
        ({"max_norm": torch.tensor(-1.0)}, "max_norm"),
        ({"max_norm": torch.tensor(1)}, "max_norm"),
    ],
)
def test_normclip_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        gg.NormClip(**kwargs)


# ---- every policy, and the guard, on float64 and complex parameters ------------------
POLICIES = {
    "norm": lambda: gg.NormClip(1.0),
    "value": lambda: gg.ValueClip(0.1),
    "autoclip": lambda: gg.AutoClip(),
    "zclip": lambda: gg.ZClip(warmup_steps=2),
    "agc": lambda: gg.AGC(clipping=0.01),
    "chain": lambda: gg.chain(gg.AGC(), gg.ZClip(warmup_steps=2), gg.NormClip(2.0)),
}


@pytest.mark.parametrize("mix", ["f64", "c64", "c128", "f16+f64+c128"])
@pytest.mark.parametrize("name", POLICIES)
def test_every_policy_clips_float64_and_complex(mix, name):
    policy = POLICIES[name]()
    for seed in range(4):
        ps = params_of(MIXES[mix], seed=seed, scale=10.0 ** (seed - 1))
        before = torch.stack([p.grad.abs().double().norm() for p in ps])
        total = policy.clip_(ps)
        after = torch.stack([p.grad.abs().double().norm() for p in ps])
        assert not total.is_complex()
        torch.testing.assert_close(total.double(), before.norm(), rtol=1e-3, atol=0)
        assert (after <= before * (1 + 1e-3)).all()
        assert all(torch.isfinite(p.grad).all() for p in ps)


def test_valueclip_clamps_complex_real_and_imaginary_parts():
    w = nn.Parameter(torch.zeros(2, dtype=torch.complex64))
    w.grad = torch.tensor([3 - 0.2j, -0.1 + 5j], dtype=torch.complex64)
    gg.ValueClip(0.5).clip_([w])
    expect = torch.tensor([0.5 - 0.2j, -0.1 + 0.5j], dtype=torch.complex64)
    assert torch.equal(w.grad, expect)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex64, torch.complex128])
@pytest.mark.parametrize("fused", [False, True])
def test_first_guard_step_on_float64_and_complex_equals_clip_then_step(dtype, fused):
    if fused and dtype.is_complex:
        pytest.skip("torch has no fused Adam for complex parameters on CPU")
    torch.manual_seed(0)
    model, ref = nn.Linear(4, 3).to(dtype), nn.Linear(4, 3).to(dtype)
    ref.load_state_dict(model.state_dict())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=fused)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2, fused=fused)
    guard = gg.Guard(model, opt, clip=gg.ZClip(warmup_steps=2), every=2)
    policy = gg.ZClip(warmup_steps=2)
    for step in range(5):
        x = torch.randn(8, 4).to(dtype) * (100 if step == 4 else 1)
        loss = model(x).abs().pow(2).mean()
        loss.backward()
        total = guard.step(loss)
        assert total.dtype == (torch.float64 if dtype in (torch.float64, torch.complex128) else torch.float32)
        ref(x).abs().pow(2).mean().backward()
        policy.clip_(ref.parameters())
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    guard.close()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---- sparse gradients ------------------------------------------------------------------------
def sparse_embedding(seed=0):
    torch.manual_seed(seed)
    emb = nn.Embedding(20, 4, sparse=True)
    idx = torch.tensor([1, 3, 1, 7, 3, 3])  # duplicates: an uncoalesced gradient
    (emb(idx) * torch.arange(1.0, 5.0)).sum().backward()
    assert not emb.weight.grad.is_coalesced()
    return emb


def test_sparse_norm_is_the_norm_of_the_coalesced_values():
    emb = sparse_embedding()
    dense = emb.weight.grad.to_dense()
    stats = measure_grads(list(emb.parameters()))
    torch.testing.assert_close(stats.total_norm, dense.norm())
    assert emb.weight.grad.is_coalesced()  # coalesced in place, once
    with pytest.raises(NotImplementedError):  # what torch 2.13 does
        torch.nn.utils.clip_grad_norm_(sparse_embedding().parameters(), 1.0)


@pytest.mark.parametrize("name", POLICIES)
def test_every_policy_clips_sparse_gradients_as_their_dense_equivalent(name):
    emb = sparse_embedding()
    dense = nn.Parameter(emb.weight.detach().clone())
    dense.grad = emb.weight.grad.to_dense()
    total = POLICIES[name]().clip_([("emb.weight", emb.weight)])
    ref_total = POLICIES[name]().clip_([("emb.weight", dense)])
    torch.testing.assert_close(total, ref_total)
    torch.testing.assert_close(emb.weight.grad.to_dense(), dense.grad)


def test_valueclip_clamps_the_summed_duplicate_entries():
    w = nn.Parameter(torch.zeros(4))
    w.grad = torch.sparse_coo_tensor([[1, 1, 2]], [0.4, 0.4, 0.1], (4,))  # index 1 sums to 0.8
    gg.ValueClip(0.5).clip_([w])
    assert w.grad.to_dense().tolist() == pytest.approx([0.0, 0.5, 0.1, 0.0])


class SparseNet(nn.Module):
    """A sparse embedding bag (mean over each row's indices) and a dense head."""

    def __init__(self, rows: int = 30) -> None:
        super().__init__()
        self.emb = nn.Embedding(rows, 8, sparse=True)
        self.head = nn.Linear(8, 1)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(idx).mean(dim=1))


def test_guard_with_sparse_embedding_and_sparseadam_equals_clip_then_step():
    torch.manual_seed(0)
    net, ref = SparseNet(), SparseNet()
    ref.load_state_dict(net.state_dict())

    def opts(m):
        return (torch.optim.SparseAdam([m.emb.weight], lr=0.05),
                torch.optim.Adam(m.head.parameters(), lr=0.05))

    sparse_opt, dense_opt = opts(net)
    ref_sparse, ref_dense = opts(ref)
    guard = gg.Guard(net, sparse_opt, clip=gg.NormClip(0.01), every=3)
    for step in range(6):
        idx = torch.randint(0, 30, (5, 4), generator=torch.Generator().manual_seed(step))
        loss = net(idx).pow(2).mean()
        loss.backward()
        guard.step(loss)
        dense_opt.step()
        ref(idx).pow(2).mean().backward()
        g = ref.emb.weight.grad.coalesce()
        scale = min(1.0, 0.01 / (g._values().norm().item() + 1e-6))
        ref.emb.weight.grad = g * scale
        ref_sparse.step()
        ref_dense.step()
        for o in (sparse_opt, dense_opt, ref_sparse, ref_dense):
            o.zero_grad()
    guard.close()
    assert guard.skipped_steps == 0
    for a, b in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b)


# ---- AGC numerics ---------------------------------------------------------------------------
def test_agc_on_float16_scales_in_float32_instead_of_underflowing():
    w = nn.Parameter(torch.full((2, 8), 1e-3, dtype=torch.float16))
    w.grad = torch.full((2, 8), 2000.0, dtype=torch.float16)
    gg.AGC(clipping=0.01, eps=1e-3).clip_([("layer.weight", w)])
    # each row: ||G_i|| = 2000 sqrt(8) is clipped to 0.01 ||W_i|| = 1e-5 sqrt(8); the
    # factor 5e-9 is 0 in float16, the product 1e-5 per element is not
    row = w.grad.float().norm(dim=1)
    expect = 0.01 * w.detach().float().norm(dim=1)
    torch.testing.assert_close(row, expect, rtol=1e-2, atol=0)


def agc_reference(p, g, clipping, eps, axis, groups=1):
    """Per output unit, written out with Python loops (Brock et al. 2021, Eq. 3)."""
    g, p = g.clone().double(), p.double()
    if axis == 1 and groups > 1:
        per = p.shape[0] // groups
        for gi in range(groups):
            sl = slice(gi * per, (gi + 1) * per)
            g[sl] = agc_reference(p[sl], g[sl], clipping, eps, axis)
        return g
    for j in range(p.shape[axis]):
        wu, gu = p.select(axis, j), g.select(axis, j)
        wn, gn = max(wu.norm().item(), eps), gu.norm().item()
        if gn > clipping * wn:
            gu.mul_(clipping * wn / max(gn, 1e-6))
    return g


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("conv", [nn.ConvTranspose1d, nn.ConvTranspose2d])
def test_agc_units_of_a_conv_transpose_are_its_output_channels(conv, groups):
    torch.manual_seed(0)
    net = nn.Sequential(conv(4, 6, 3, groups=groups), nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(2, 4, *([5] * (1 if conv is nn.ConvTranspose1d else 2)))
    net(x).pow(2).sum().backward()
    w = net[0].weight
    assert w.shape[:2] == (4, 6 // groups)  # [in, out/groups, *k]
    expect = agc_reference(w, w.grad, 0.01, 1e-3, axis=1, groups=groups)
    gg.AGC(clipping=0.01).clip_(net)
    torch.testing.assert_close(w.grad.double(), expect, rtol=1e-5, atol=1e-8)


def test_agc_finds_conv_transpose_units_through_the_guard():
    torch.manual_seed(0)
    net = nn.Sequential(nn.ConvTranspose2d(3, 5, 3), nn.Flatten(), nn.Linear(5 * 6 * 6, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    guard = gg.Guard(net, opt, clip=gg.AGC(clipping=0.01))
    net(torch.randn(2, 3, 4, 4)).pow(2).sum().backward()
    w = net[0].weight
    expect = agc_reference(w, w.grad, 0.01, 1e-3, axis=1)
    guard.step()
    torch.testing.assert_close(w.grad.double(), expect, rtol=1e-5, atol=1e-8)
    guard.close()


def test_agc_unit_axes_override_for_a_custom_layer():
    w = nn.Parameter(torch.randn(3, 5))
    w.grad = torch.randn(3, 5) * 10
    expect = agc_reference(w, w.grad, 0.05, 1e-3, axis=1)
    gg.AGC(clipping=0.05, exclude=(), unit_axes={"mine.weight": 1}).clip_([("mine.weight", w)])
    torch.testing.assert_close(w.grad.double(), expect, rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="unit_axes"):
        gg.AGC(unit_axes={"mine.weight": -1})


def test_a_rollback_restores_a_sparse_embedding_and_its_sparse_momentum():
    # SGD with momentum keeps a sparse momentum buffer for a sparse gradient: the snapshot
    # check, the copy into the ring, its size and the restore all take it as it is
    torch.manual_seed(0)
    net = SparseNet(rows=1000)
    opt = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9)
    guard = gg.Guard(net, opt, clip=gg.ZClip(), recovery=gg.Recovery(), every=10)
    weights: dict[int, torch.Tensor] = {}
    # skip, skip, back-off, and three more on the same weights: a rollback at the sixth
    nan_steps = set(range(120, 126))
    for step in range(140):
        idx = torch.randint(0, 40, (16, 4), generator=torch.Generator().manual_seed(step))
        loss = (net(idx) - idx.float().mean(1, keepdim=True) / 40).pow(2).mean()
        loss.backward()
        if step in nan_steps:
            net.emb.weight.grad = net.emb.weight.grad * float("nan")
        guard.step(loss)
        opt.zero_grad()
        weights[step] = net.emb.weight.detach().clone()
    guard.close()
    back = [e for e in guard.events if e.kind == "rollback"]
    assert len(back) == 1 and back[0].step == 125
    snap = back[0].data["snapshot_step"]
    assert 0 <= snap < 120
    # the rollback restored the snapshot's weights (step 125 itself was skipped)
    torch.testing.assert_close(weights[125], weights[snap])
    buf = opt.state[net.emb.weight]["momentum_buffer"]
    assert buf.is_sparse and torch.isfinite(buf._values()).all()
    assert all(torch.isfinite(p).all() for p in net.parameters())
    # the memory budget counts what a sparse buffer stores (its rows), not its dense size
    from gradguard.recovery.snapshots import state_bytes
    rows = buf._values()
    assert rows.shape[0] < 1000
    assert state_bytes(buf) == rows.numel() * 4 + buf._indices().numel() * 8


def _said_at_construction(model: nn.Module, opt: torch.optim.Optimizer,
                          text: str) -> list[warnings.WarningMessage]:
    """The warnings containing ``text`` that building a guard over ``model`` raises."""
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        gg.Guard(model, opt)
    return [x for x in w if text in str(x.message)]


@pytest.mark.parametrize("opt_cls, eps, warns", [
    (torch.optim.Adam, 1e-8, True), (torch.optim.AdamW, 1e-8, True),
    (torch.optim.Adagrad, 1e-10, True), (torch.optim.Adam, 1e-4, False),
    (torch.optim.Adadelta, 1e-6, False), (torch.optim.SGD, None, False)])
def test_an_eps_that_is_zero_in_float16_on_float16_weights_warns_at_construction(opt_cls, eps, warns):
    """Pure float16 weights on Adam's default eps=1e-8 (0 in float16): the first step's
    update is 0/0 where a gradient is exactly 0, NaN in the weights from finite gradients
    (checked below, unguarded); the guard says so when it is built."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).half()
    kw = {} if eps is None else {"eps": eps}
    opt = opt_cls(model.parameters(), lr=1e-3, **kw)
    said = _said_at_construction(model, opt, "is 0 in float16")
    assert len(said) == int(warns)
    if warns:
        assert f"eps={eps:g}" in str(said[0].message) and "eps=1e-4" in str(said[0].message)
        x = torch.zeros(16, 4, dtype=torch.float16)
        x[:, 1:] = torch.randn(16, 3, dtype=torch.float16)  # input 0 is always 0
        model(x).float().pow(2).mean().backward()
        opt.step()
        assert not torch.isfinite(model[0].weight).all()  # what it warned of
    float32 = nn.Linear(4, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gg.Guard(float32, opt_cls(float32.parameters(), lr=1e-3, **kw))  # no warning


def test_an_eps_that_is_zero_in_float16_is_the_remedy_of_the_trouble_it_makes(tmp_path):
    """Found by a stranger: float16 weights on fused Adam (eps=1e-8, 0 in float16): on the
    CPU the fused kernel computes in float32, no NaN is written, but where a gradient's
    square underflows the update divides by 0 and the loss spikes; three rollbacks, the LR
    held low, "recovered" at 5-10x its twin with no cause and no remedy. The construction's
    warning is an event of the run, and the remedy of its trouble."""
    from gradguard.report import load_run
    from gradguard.report._outcome import judge

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).half()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    guard = gg.Guard(model, opt, sinks=[gg.JsonlSink(tmp_path)], every=5)
    [event] = [e for e in guard.events if (e.data or {}).get("eps_underflow")]
    assert event.kind == "update_ratio" and event.step == 0 and "eps=1e-08" in event.message
    x = torch.zeros(16, 4, dtype=torch.float16)
    x[:, 1:] = torch.randn(16, 3, dtype=torch.float16)  # input 0 is always 0: a 0/0 update
    for _ in range(10):
        loss = model(x).float().pow(2).mean()
        loss.backward()
        guard.step(loss)
        opt.zero_grad()
    guard.close()
    out = judge(load_run(tmp_path))
    assert out.status != "healthy" and out.remedy is not None and "eps to 1e-4" in out.remedy


@pytest.mark.parametrize("dtype, opt_cls, lr, warns", [
    (torch.bfloat16, torch.optim.Adam, 1e-5, True), (torch.bfloat16, torch.optim.AdamW, 1e-4, True),
    (torch.bfloat16, torch.optim.RMSprop, 1e-5, True), (torch.bfloat16, torch.optim.Adam, 1e-3, False),
    (torch.bfloat16, torch.optim.SGD, 1e-5, False), (torch.float32, torch.optim.Adam, 1e-5, False),
    (torch.float16, torch.optim.Adam, 1e-4, False)])
def test_half_weights_whose_updates_round_away_warn_at_construction(dtype, opt_cls, lr, warns):
    """Pure bfloat16 weights on Adam at 1e-5: an update of the full LR is under half the
    spacing of bfloat16 numbers at most of the weights and rounds away (checked below: most
    weights do not move in ten steps); the guard says so when it is built. Float32 weights
    (autocast keeps them), float16's finer spacing at 1e-4, an LR that moves them (1e-3),
    and SGD (whose update is the gradient's size, not the LR's) do not warn. A warm-up that
    starts at 0 is judged at its peak."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10)).to(dtype)
    kw = {"eps": 1e-4} if opt_cls is not torch.optim.SGD else {}
    opt = opt_cls(model.parameters(), lr=lr, **kw)
    said = _said_at_construction(model, opt, "rounds away")
    assert len(said) == int(warns)
    if warns:
        before = [p.detach().clone() for p in model.parameters()]
        x, y = torch.randn(32, 64, dtype=dtype), torch.randint(0, 10, (32,))
        for _ in range(10):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x).float(), y).backward()
            opt.step()
        still = sum(int((p == b).sum()) for p, b in zip(model.parameters(), before))
        assert still > 0.5 * sum(p.numel() for p in model.parameters())  # what it warned of
    if dtype is torch.bfloat16 and opt_cls is torch.optim.Adam and warns:
        warm = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-4)
        torch.optim.lr_scheduler.LambdaLR(warm, lambda s: s / 100)  # lr 0 now, 1e-3 planned
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            gg.Guard(model, warm)


def test_rounded_away_updates_are_an_event_the_run_summary_tells(tmp_path):
    """The construction warning is also an ``update_ratio`` warning event at step 0, so the
    run's files, its report and ``gradguard run``'s summary say it: a pure bfloat16 run
    whose loss still falls a little is no longer just "no gradient trouble"."""
    from gradguard.report import load_run
    from gradguard.report._summary import summary_sentence

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10)).to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, eps=1e-4)
    with pytest.warns(gg.GradGuardWarning, match="rounds away"):
        guard = gg.Guard(model, opt, sinks=[gg.JsonlSink(tmp_path)])
    x, y = torch.randn(32, 64, dtype=torch.bfloat16), torch.randint(0, 10, (32,))
    for _ in range(20):
        loss = nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad()
        loss.backward()
        guard.step(loss)
    guard.close()
    said = [e for e in guard.events if e.kind == "update_ratio"]
    assert [(e.step, e.severity) for e in said] == [(0, "warning")]
    assert said[0].data["rounded_share"] > 0.5
    assert "rounds away in their dtype" in summary_sentence(load_run(tmp_path))


@pytest.mark.parametrize("cast, said", [
    (torch.float16, "is 0 in float16"), (torch.bfloat16, "rounds away"), (torch.float32, None)])
def test_weights_cast_after_the_guard_was_built_are_judged_at_its_first_step(cast, said):
    """Found as a stranger: a guard built over a float32 model that was then cast
    (``model.half()`` on a model the optimizer already held) said nothing, and Adam's
    eps=1e-8, 0 in float16, wrote NaN into the weights at step 7 (three rollbacks, then an
    abort). The dtypes the construction judged are compared at the first step; weights cast
    since are judged then, once, with the same warnings (and the rounding's event)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    lr = 1e-3 if cast is torch.float16 else 1e-5
    opt = torch.optim.Adam(model.parameters(), lr=lr, eps=1e-8 if cast is torch.float16 else 1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        guard = gg.Guard(model, opt)  # float32 weights: nothing to say
    model.to(cast)
    x, y = torch.randn(32, 64, dtype=cast), torch.randint(0, 10, (32,))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for _ in range(3):
            loss = nn.functional.cross_entropy(model(x).float(), y)
            opt.zero_grad()
            loss.backward()
            guard.step(loss.detach())
    guard.close()
    heard = [str(x.message) for x in w if issubclass(x.category, gg.GradGuardWarning)]
    assert len(heard) == (0 if said is None else 1)  # once, at the first step
    if said is not None:
        assert said in heard[0]
    events = [e for e in guard.events if e.kind == "update_ratio"]
    # the rounding's event for bfloat16, the eps's for float16 (each once)
    assert [("eps_underflow" in (e.data or {})) for e in events] == (
        [] if said is None else [cast is torch.float16])
