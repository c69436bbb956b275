"""Clip policies against their references: torch for norm/value, the papers' equations
(in plain Python floats) for ZClip, AutoClip and AGC."""

from __future__ import annotations

import copy
import math
import random
import warnings

import numpy as np
import pytest
import torch
from tests.helpers import set_grads
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import gradguard as gg
from gradguard import measure
from gradguard.measure import measure_grads

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(3,), (4, 5), (2, 3, 4), (6, 1, 3, 3)]


def make_params(dtypes, seed=0, scale=1.0):
    torch.manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(s).to(dt)) for dt in dtypes for s in SHAPES]
    set_grads(ps, seed=seed, scale=scale)
    return ps


def clone_params(ps):
    out = []
    for p in ps:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = p.grad.clone()
        out.append(q)
    return out


@pytest.mark.parametrize("dtypes", [[torch.float32], [torch.bfloat16], [torch.float16], DTYPES])
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_normclip_equals_torch_clip_grad_norm(dtypes, norm_type, max_norm):
    ours = make_params(dtypes, scale=3.0)
    ref = clone_params(ours)
    n_ours = gg.NormClip(max_norm=max_norm, norm_type=norm_type).clip_(ours)
    n_ref = torch.nn.utils.clip_grad_norm_(ref, max_norm, norm_type=norm_type, foreach=True)
    assert n_ours.dtype == n_ref.dtype
    torch.testing.assert_close(n_ours, n_ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad.float(), b.grad.float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtypes", [[torch.float32], [torch.bfloat16], [torch.float16], DTYPES])
def test_valueclip_equals_torch_clip_grad_value(dtypes):
    ours = make_params(dtypes, scale=2.0)
    ref = clone_params(ours)
    gg.ValueClip(0.7).clip_(ours)
    torch.nn.utils.clip_grad_value_(ref, 0.7)
    for a, b in zip(ours, ref):
        assert torch.equal(a.grad, b.grad)


def test_normclip_returns_prenorm_and_never_increases_norm():
    for seed in range(20):
        ps = make_params([torch.float32], seed=seed, scale=random.Random(seed).uniform(0.01, 10))
        before = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in ps]))
        total = gg.NormClip(1.0).clip_(ps)
        after = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in ps]))
        torch.testing.assert_close(total, before)
        assert after <= min(before, torch.tensor(1.0)) * (1 + 1e-5)


def test_normclip_leaves_nonfinite_grads_unscaled():
    ps = make_params([torch.float32])
    ps[0].grad[0] = float("nan")
    finite_before = ps[1].grad.clone()
    total = gg.NormClip(0.1).clip_(ps)
    assert torch.isnan(total)
    assert torch.equal(ps[1].grad, finite_before)


def one_param_with_norm(norm: float) -> torch.nn.Parameter:
    w = torch.nn.Parameter(torch.zeros(4))
    w.grad = torch.tensor([0.5, 0.5, 0.5, 0.5]) * norm  # unit direction * norm
    return w


def grad_norm(w) -> float:
    return w.grad.norm().item()


# ---- AutoClip ------------------------------------------------------------------------
def norms_sequence(n=80, seed=0, spikes=(30, 55)):
    rng = random.Random(seed)
    xs = [abs(rng.gauss(1.0, 0.2)) + 0.05 for _ in range(n)]
    for s in spikes:
        if s < n:
            xs[s] *= 50
    return xs


#: AutoClip's whole-run histogram: an order statistic is off by less than one bfloat16
#: bin, i.e. 2**-7 of its value (documented in AutoClip's docstring).
AUTOCLIP_BIN_REL = 2.0**-7


@pytest.mark.parametrize("percentile", [10.0, 50.0, 90.0, 100.0])
@pytest.mark.parametrize("history_size", [None, 7])
def test_autoclip_matches_paper_equation(percentile, history_size):
    policy = gg.AutoClip(percentile=percentile, history_size=history_size)
    rel = 1e-5 if history_size else AUTOCLIP_BIN_REL  # windowed: exact; whole run: binned
    hist: list[float] = []
    for g in norms_sequence():
        hist.append(g)
        window = hist if history_size is None else hist[-history_size:]
        thr = float(np.percentile(window, percentile))
        w = one_param_with_norm(g)
        total = policy.clip_([w])
        assert total.item() == pytest.approx(g, rel=1e-6)
        assert policy.threshold().item() == pytest.approx(thr, rel=rel)
        expected = g * min(1.0, policy.threshold().item() / (g + 1e-6))
        assert grad_norm(w) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("percentile", [0.5, 10.0, 37.5, 99.0])
def test_autoclip_whole_run_threshold_within_one_bin_of_numpy(percentile):
    rng = np.random.default_rng(0)
    # norms over 12 decades, with heavy repeats, as long runs produce
    xs = np.exp(rng.uniform(-14, 14, 3000)).astype(np.float32)
    xs[::7] = xs[3]
    policy = gg.AutoClip(percentile=percentile)
    for i, g in enumerate(xs):
        policy.coefficient(measure_grads([one_param_with_norm(float(g))]))
        if i % 500 == 499 or i < 5:
            ref = float(np.percentile(xs[: i + 1].astype(np.float64), percentile))
            assert policy.threshold().item() == pytest.approx(ref, rel=AUTOCLIP_BIN_REL), i


def test_autoclip_whole_run_is_exact_when_norms_do_not_share_a_bin():
    policy = gg.AutoClip(percentile=30.0)
    xs = [float(2**k) * 1.5 for k in range(-20, 20)]  # one norm per binade
    random.Random(0).shuffle(xs)
    for g in xs:
        policy.clip_([one_param_with_norm(g)])
    assert policy.threshold().item() == pytest.approx(float(np.percentile(xs, 30.0)), rel=1e-6)


def test_autoclip_whole_run_state_is_bounded():
    """The paper's whole-run history used to be a buffer that grew with the run and was
    sorted every step (97 ms/step at 1M steps); its state is now a fixed-size histogram."""
    policy = gg.AutoClip()
    sizes = []
    for i, g in enumerate(norms_sequence(400, spikes=())):
        policy.clip_([one_param_with_norm(g)])
        if i in (10, 399):
            sizes.append(sum(v.numel() for v in policy.state_dict()["state"].values()))
    assert sizes[0] == sizes[1]


def test_autoclip_loads_a_checkpoint_of_the_growing_history():
    xs = norms_sequence(50)
    old = {"percentile": 10.0, "history_size": None, "calls": 50,
           "history": torch.tensor(xs + [math.nan] * 14), "count": torch.tensor(50)}
    policy = gg.AutoClip()
    policy.load_state_dict(old)
    assert policy.threshold().item() == pytest.approx(
        float(np.percentile(xs, 10.0)), rel=AUTOCLIP_BIN_REL)


@pytest.mark.parametrize("history_size", [5, None])
def test_autoclip_ignores_nonfinite_norm(history_size):
    policy = gg.AutoClip(percentile=10.0, history_size=history_size)
    for g in norms_sequence(12):
        policy.clip_([one_param_with_norm(g)])
    before = policy.threshold().clone()
    hist_before = policy.state_dict()["state"]
    for bad in (math.nan, math.inf):
        w = one_param_with_norm(1.0)
        w.grad[0] = bad
        policy.clip_([w])
        assert torch.equal(policy.threshold(), before)
        for k, v in policy.state_dict()["state"].items():
            assert torch.equal(v, hist_before[k]), k


# ---- ZClip ---------------------------------------------------------------------------
class RefZClip:
    """ZClip in plain Python floats, transcribed from the paper (Kumar et al. 2025, Alg. 1)
    with gradguard's documented choices: warm-up over finite norms only, no hard cap.
    ``log=True``: the same equations on the log of the norm (gradguard's ``space="log"``),
    the clipped norm is ``exp`` of the threshold; a norm of 0 is left out."""

    def __init__(self, alpha=0.97, z_thresh=2.5, warmup=25, eps=1e-6, mode="reciprocal",
                 log=False, gradual=None):
        self.alpha, self.zt, self.warmup, self.eps, self.mode = alpha, z_thresh, warmup, eps, mode
        self.log = log
        self.buf: list[float] = []
        self.mean = self.var = 0.0
        # gradguard's "gradual" rule, as the ZClip docstring states it
        self.gradual = gradual
        self.prev, self.fired, self.chain = 0.0, False, False
        self.loss_ema: float | None = None
        self.relaxed = 0  # steps the rule left unclipped that the z-test flagged

    def step(self, g: float, loss: float | None = None) -> float:
        """Return the norm after clipping; ``loss``: the step's loss (a guard's)."""
        falling = False
        if self.gradual is not None and loss is not None and math.isfinite(loss):
            falling = self.loss_ema is not None and loss < self.loss_ema
            self.loss_ema = loss if self.loss_ema is None else 0.9 * self.loss_ema + 0.1 * loss
        if not math.isfinite(g) or (self.log and g <= 1e-30):
            return g
        if self.log:
            return math.exp(self._step(math.log(g), falling))
        return self._step(g, falling)

    def _step(self, g: float, falling: bool = False) -> float:
        chain = False
        if self.gradual is not None:  # within `gradual` of the previous step, from a calm one
            rise = (g - self.prev <= math.log(self.gradual) if self.log
                    else g <= self.prev * self.gradual)
            chain = rise and (self.chain or not self.fired)
            self.prev, self.chain, self.fired = g, chain, False
        if len(self.buf) < self.warmup:
            self.buf.append(g)
            if len(self.buf) == self.warmup:
                self.mean = sum(self.buf) / len(self.buf)
                self.var = sum((x - self.mean) ** 2 for x in self.buf) / len(self.buf)
            return g
        std = self.var**0.5
        z = (g - self.mean) / (std + self.eps)
        clipped = g
        if z > self.zt:
            self.fired = True
            if self.mode == "reciprocal":
                thr = self.mean + self.zt / (z / self.zt) * std  # eta = z / z_thresh
            elif self.mode == "percentile":
                thr = self.mean + self.zt * std
            else:
                thr = self.mean
            if thr < g and chain and falling:
                self.relaxed += 1
            elif thr < g:
                clipped = thr
        self.mean = self.alpha * self.mean + (1 - self.alpha) * clipped
        self.var = self.alpha * self.var + (1 - self.alpha) * (clipped - self.mean) ** 2
        return clipped


@pytest.fixture(params=["host", "device"])
def zclip_path(request, monkeypatch):
    """ZClip's two forms of one rule: on CPU it updates in Python numbers (``host``); on a
    GPU, and here with ``READ_CPU_COEFFICIENT`` off, in tensor ops (``device``)."""
    monkeypatch.setattr(measure, "READ_CPU_COEFFICIENT", request.param == "host")
    return request.param


@pytest.mark.parametrize("space", ["linear", "log"])
@pytest.mark.parametrize("mode", ["reciprocal", "percentile", "mean"])
@pytest.mark.parametrize("warmup", [1, 5, 25])
def test_zclip_matches_paper_equations(mode, warmup, space, zclip_path):
    """``space="linear"`` is the paper's algorithm; ``"log"`` the same on the log norm."""
    ref = RefZClip(warmup=warmup, mode=mode, log=space == "log")
    policy = gg.ZClip(warmup_steps=warmup, mode=mode, space=space, warmup_cap=None)
    n_clipped = 0
    for g in norms_sequence(90, spikes=(40, 41, 70)):
        expected = ref.step(g)
        w = one_param_with_norm(g)
        policy.clip_([w])
        # the grad is scaled by thr/(g+1e-6), as clip_grad_norm_ does
        assert grad_norm(w) == pytest.approx(
            expected * g / (g + 1e-6) if expected < g else g, rel=1e-5
        )
        n_clipped += expected < g
        if len(ref.buf) >= warmup:
            # (the log norm's mean is near 0: float32 rounding of the logs, absolute)
            assert policy.mean.item() == pytest.approx(ref.mean, rel=1e-5, abs=1e-6)
            assert policy.var.item() == pytest.approx(ref.var, rel=1e-4)
    assert n_clipped >= 3  # the three spikes


def test_zclip_ignores_nonfinite_norm_after_warmup(zclip_path):
    policy = gg.ZClip(warmup_steps=5)
    for g in norms_sequence(20, spikes=()):
        policy.clip_([one_param_with_norm(g)])
    sd = policy.state_dict()
    for bad in (math.nan, math.inf, -math.inf):
        w = one_param_with_norm(1.0)
        w.grad[1] = bad
        policy.clip_([w])
        for k, v in policy.state_dict()["state"].items():
            assert torch.equal(v, sd["state"][k]), k


@pytest.mark.parametrize("space", ["linear", "log"])
def test_zclip_nan_during_warmup_does_not_disable_it(space, zclip_path):
    policy = gg.ZClip(warmup_steps=5, space=space)
    ref = RefZClip(warmup=5, log=space == "log")
    seq = norms_sequence(40, spikes=(30,))
    seq[2] = math.nan
    for g in seq:
        w = one_param_with_norm(g)
        if math.isnan(g):
            w.grad[0] = math.nan
        policy.clip_([w])
        ref.step(g)
    assert math.isfinite(policy.mean.item())
    assert policy.mean.item() == pytest.approx(ref.mean, rel=1e-5)
    w = one_param_with_norm(100.0)
    policy.clip_([w])
    assert grad_norm(w) < 10.0  # still clips


@pytest.mark.parametrize("seed", range(3))
def test_zclip_log_space_leaves_heavy_tailed_healthy_norms_alone_and_clips_spikes(seed, zclip_path):
    """Healthy gradient norms are heavy-tailed (multiplicative noise): on the norm itself the
    paper's z-score clips 4-10% of such steps, on its log about 1%, the rate of a Gaussian
    tail. x100 spikes are clipped in both spaces."""
    rng = random.Random(seed)
    seq = [math.exp(rng.gauss(0.0, 0.6)) for _ in range(2000)]  # geometric mean 1
    spikes = set(range(300, 2000, 250))
    for i in spikes:
        seq[i] *= 100
    clipped = {}
    for space in ("linear", "log"):
        policy = gg.ZClip(space=space)
        after = []
        for g in seq:
            w = one_param_with_norm(g)
            policy.clip_([w])
            after.append(grad_norm(w))
        clipped[space] = sum(a < g * (1 - 1e-4) for i, (a, g) in enumerate(zip(after, seq))
                             if i not in spikes) / (len(seq) - len(spikes))
        assert all(after[i] < 5.0 for i in spikes), space  # e^(2.5 * 0.6) = 4.5
    assert clipped["linear"] > 0.04
    assert clipped["log"] < 0.02


def test_zclip_alone_keeps_clipping_a_norm_settled_higher_after_warm_up(zclip_path):
    """The paper's rule, which ``clip_`` alone follows (docs/clipping.md): the statistics
    learn from the *clipped* norm, and the reciprocal mode clips the harder the higher the
    z-score, so a norm that settles at 4x its warm-up level is clipped for as long as it
    stays there; the percentile mode's statistics catch up within a few dozen steps. Under
    a guard, the flush re-anchors such a norm (tests/test_zclip_shift.py)."""
    rng = random.Random(0)
    seq = [math.exp(rng.gauss(0.0, 0.1)) * (1.0 if i < 25 else 4.0) for i in range(400)]
    clipped = {}
    for mode in ("reciprocal", "percentile"):
        policy = gg.ZClip(mode=mode)
        n = 0
        for g in seq:
            w = one_param_with_norm(g)
            policy.clip_([w])
            n += grad_norm(w) < g * (1 - 1e-4)
        clipped[mode] = n
    assert clipped["reciprocal"] > 300  # held near the warm-up scale for the whole run
    assert clipped["percentile"] < 60


def test_zclip_log_space_skips_a_zero_norm(zclip_path):
    policy = gg.ZClip(warmup_steps=3)
    assert policy.space == "log"  # the default
    for g in [1.0, 1.1, 0.9, 1.0, 0.0]:
        policy.clip_([one_param_with_norm(g)])
    assert policy.mean.item() == pytest.approx(math.log(1.0) * 0.03 + 0.97 * sum(
        math.log(g) for g in [1.0, 1.1, 0.9]) / 3, abs=1e-6)
    assert math.isfinite(policy.var.item()) and policy.var.item() < 0.1
    w = one_param_with_norm(1.0)
    policy.clip_([w])
    assert grad_norm(w) == pytest.approx(1.0, rel=1e-6)  # a zero norm did not blow up the scale


def test_zclip_checkpoint_keeps_the_space_of_its_statistics():
    old = gg.ZClip(warmup_steps=3, space="linear")
    for g in [1.0, 1.1, 0.9, 1.0]:
        old.clip_([one_param_with_norm(g)])
    sd = old.state_dict()
    assert sd["space"] == "linear"
    sd.pop("space")  # a checkpoint from before ``space`` existed holds norms
    new = gg.ZClip(warmup_steps=3)
    new.load_state_dict(sd)
    assert new.space == "linear" and new.mean.item() == pytest.approx(1.0, rel=0.05)
    fresh = gg.ZClip(space="linear")
    fresh.load_state_dict(gg.ZClip().state_dict())  # no statistics yet: nothing to keep
    assert fresh.space == "linear"


def test_zclip_has_no_hard_cap_by_default(zclip_path):
    policy = gg.ZClip(warmup_steps=3)
    for g in [5.0, 5.1, 4.9, 5.05]:
        w = one_param_with_norm(g)
        policy.clip_([w])
        assert grad_norm(w) == pytest.approx(g, rel=1e-6)  # healthy norms of 5 pass unclipped
    capped = gg.ZClip(warmup_steps=3, max_norm=1.0)
    w = one_param_with_norm(5.0)
    capped.clip_([w])
    assert grad_norm(w) == pytest.approx(1.0, rel=1e-5)


def rise_sequence() -> tuple[list[float], list[float | None]]:
    """Norms and losses for ZClip's "gradual" rule: a calm warm-up; a rise of 1.2x a step
    while the loss rises (clipped, steps 25-34); a rise that begins with a jump the z-test
    flags (clipped, 65-74); a rise of 1.2x a step while the loss falls (left alone,
    105-116); a x50 jump and a stretch at its level while the loss falls (clipped,
    157-166); NaN norms and losses, and steps without a loss."""
    rng = random.Random(5)
    norms = [1.0 + 0.05 * rng.gauss(0, 1) for _ in range(25)]
    losses: list[float | None] = [3.0 - 0.01 * i for i in range(25)]

    def add(ns, ls):
        norms.extend(ns)
        losses.extend(ls)

    add([1.2 ** k for k in range(1, 11)], [2.76 + 0.05 * k for k in range(1, 11)])  # 25-34
    add([1.0 + 0.05 * rng.gauss(0, 1) for _ in range(30)], [2.7 - 0.005 * i for i in range(30)])
    add([3.0 * 1.1 ** k for k in range(10)], [2.5 - 0.01 * k for k in range(10)])  # 65-74
    add([1.0 + 0.05 * rng.gauss(0, 1) for _ in range(30)], [2.4 - 0.005 * i for i in range(30)])
    add([1.2 ** k for k in range(1, 13)], [2.2 - 0.02 * k for k in range(1, 13)])  # 105-116
    add([1.0 + 0.05 * rng.gauss(0, 1) for _ in range(40)], [2.0 - 0.005 * i for i in range(40)])
    add([50.0 + rng.random() for _ in range(10)], [1.8 - 0.01 * i for i in range(10)])  # 157-166
    add([1.0, math.nan, 1.02, math.inf, 1.01], [2.0, 1.9, math.nan, 1.8, None])
    add([1.0 + 0.05 * rng.gauss(0, 1) for _ in range(20)], [None] * 20)
    return norms, losses


def stats_with_loss(g: float, loss: float | None):
    w = one_param_with_norm(1.0 if not math.isfinite(g) else g)
    if not math.isfinite(g):
        w.grad[0] = g
    stats = measure_grads([w])
    stats.loss = None if loss is None else torch.tensor(loss)
    return stats


@pytest.mark.parametrize("space", ["linear", "log"])
@pytest.mark.parametrize("mode", ["reciprocal", "percentile", "mean"])
def test_zclip_leaves_a_gradual_rise_alone_while_the_loss_falls_as_its_rule_says(
        mode, space, zclip_path):
    """gradguard's ``gradual`` rule against its reference in Python floats: a rise of at
    most 1.5x a step, from a step the z-test did not flag, while the loss is below its EMA,
    is not clipped; a jump, the level after it, a rise while the loss rises and a rise
    from a flagged step are clipped as the paper's rule clips them."""
    norms, losses = rise_sequence()
    ref = RefZClip(mode=mode, log=space == "log", gradual=1.5)
    paper = gg.ZClip(mode=mode, space=space, warmup_cap=None, gradual=None)
    policy = gg.ZClip(mode=mode, space=space, warmup_cap=None)
    out, out_paper, expected = [], [], []
    for g, loss in zip(norms, losses):
        expected.append(ref.step(g, loss))
        out.append(policy.coefficient(stats_with_loss(g, loss)).item())
        out_paper.append(paper.coefficient(stats_with_loss(g, loss)).item())
    for i, (g, e, c) in enumerate(zip(norms, expected, out)):
        if math.isfinite(g):
            assert c * g == pytest.approx(e * g / (g + 1e-6) if e < g else g, rel=1e-5), i
    assert ref.relaxed >= 10  # the rule did leave flagged steps alone
    # the rise while the loss rises (from its second step: the loss's EMA lags a step)
    assert all(c < 0.9 for c in out[26:35])
    assert out[26:35] == pytest.approx(out_paper[26:35], rel=0.05)
    assert all(c < 0.5 for c in out[65:75])  # the rise that begins with a flagged jump
    assert all(c == 1.0 for c in out[105:117])  # the rise while the loss falls...
    assert all(c < 1.0 for c in out_paper[106:117])  # ... which the paper's rule clips
    # the x50 jump and the steps at its level (the percentile mode's statistics learn from
    # mu + z_thresh * sigma: they climb, as the paper's do, from a wider start)
    assert all(c < (0.25 if mode == "percentile" else 0.05) for c in out[157:167])


@pytest.mark.parametrize("space", ["linear", "log"])
def test_zclip_without_a_loss_is_the_papers_rule(space, zclip_path):
    """``clip_`` alone (no loss), ``gradual=None`` with a loss, and steps while a recovery
    holds the LR down (``StepStats.calm`` False) clip as the paper does."""
    norms, losses = rise_sequence()
    a, b, c = (gg.ZClip(space=space), gg.ZClip(space=space), gg.ZClip(space=space, gradual=None))
    d = gg.ZClip(space=space)
    differ = 0
    for g, loss in zip(norms, losses):
        ca = a.coefficient(stats_with_loss(g, None)).item()
        cb = b.coefficient(stats_with_loss(g, loss)).item()  # with its loss: the rule acts
        assert ca == c.coefficient(stats_with_loss(g, loss)).item()
        held = stats_with_loss(g, loss)
        held.calm = False
        assert ca == d.coefficient(held).item()
        differ += ca != cb
    assert differ >= 10
    assert torch.equal(a.mean, c.mean) and not torch.equal(a.mean, b.mean)


@pytest.mark.parametrize("space", ["linear", "log"])
@pytest.mark.parametrize("kw", [{}, {"mode": "percentile"}, {"max_norm": 3.0}, {"warmup_steps": 1}])
def test_zclip_gradual_rule_host_and_device_forms_agree(kw, space, monkeypatch):
    """The "gradual" rule's Python-number and tensor-op forms: the same coefficients and
    state, bit for bit (losses as float32, float64 and bfloat16 tensors and floats)."""
    norms, losses = rise_sequence()
    runs = {}
    for host in (True, False):
        monkeypatch.setattr(measure, "READ_CPU_COEFFICIENT", host)
        policy, coefs, states = gg.ZClip(**kw, space=space), [], []
        for i, (g, loss) in enumerate(zip(norms, losses)):
            stats = stats_with_loss(g, loss)
            if loss is not None and i % 3:
                stats.loss = (float(loss) if i % 3 == 1 else
                              torch.tensor(loss, dtype=torch.float64 if i % 2 else torch.bfloat16))
            stats.calm = i % 17 != 5
            coefs.append(policy.coefficient(stats).item())
            states.append({k: v.clone() for k, v in policy.state_dict()["state"].items()})
        runs[host] = coefs, states
    (c_host, s_host), (c_dev, s_dev) = runs[True], runs[False]
    assert c_host == c_dev
    for a, b in zip(s_host, s_dev):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype, k
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("gradual", [1.5, None])
def test_zclip_state_is_finite_from_its_first_step(gradual, zclip_path):
    """A recovery refuses a snapshot with a NaN/Inf in it (the policy's state goes with the
    weights): ZClip's state holds none, from a first step whose norm is NaN on. (The
    "gradual" rule's first sentinel was +inf: under ``gradual=None`` no snapshot was ever
    taken, and lab T3 stopped with TrainingDiverged.)"""
    from gradguard.recovery.finite import all_finite
    policy = gg.ZClip(gradual=gradual)
    for g, loss in [(math.nan, math.nan), (math.inf, 1.0), (1.0, None), (1.1, 2.0)]:
        policy.coefficient(stats_with_loss(g, loss))
        assert all_finite(policy.state_dict())


def test_zclip_loads_a_checkpoint_from_before_the_gradual_rule():
    """A state dict without the rule's keys loads and runs (they start afresh)."""
    old = gg.ZClip(warmup_steps=3)
    for g in (1.0, 1.1, 0.9, 1.0):
        old.coefficient(stats_with_loss(g, 1.0))
    sd = old.state_dict()
    del sd["state"]["rise"]
    new = gg.ZClip(warmup_steps=3)
    new.load_state_dict(sd)
    assert new.coefficient(stats_with_loss(1.2, 0.9)).item() == 1.0
    assert new.coefficient(stats_with_loss(100.0, 0.8)).item() < 0.05
    with pytest.raises(ValueError, match=r"gradual=1"):
        gg.ZClip(gradual=1)


@pytest.mark.parametrize("space", ["linear", "log"])
@pytest.mark.parametrize("kw", [
    {}, {"mode": "percentile"}, {"mode": "mean"}, {"max_norm": 3.0}, {"warmup_cap": None},
    {"warmup_steps": 1}, {"eps": 0.0, "warmup_steps": 3},
])
def test_zclip_host_and_device_forms_agree(kw, space, monkeypatch):
    """The Python-number update (CPU) and the tensor-op update (GPU) give the same
    coefficients and statistics, bit for bit, on a run with an explosion in warm-up,
    NaN/Inf, spikes and a constant stretch (std 0), and on long random runs."""
    seq = [1.0, 1.2, 0.9, 1.1, 1.0, 30.0, 500.0, math.nan, 1.05, *norms_sequence(60, seed=3)]
    seq[40:44] = [math.inf, 2.0, 2.0, 2.0]
    seq += [2.0] * 10 + [9.0, 0.0, 1e4]
    runs = {}
    for host in (True, False):
        monkeypatch.setattr(measure, "READ_CPU_COEFFICIENT", host)
        policy, coefs, states = gg.ZClip(**kw, space=space), [], []
        for g in seq:
            w = one_param_with_norm(1.0 if not math.isfinite(g) else g)
            if not math.isfinite(g):
                w.grad[0] = g
            coefs.append(policy.coefficient(measure_grads([w])).item())
            states.append({k: v.clone() for k, v in policy.state_dict()["state"].items()})
        runs[host] = coefs, states
    (c_host, s_host), (c_dev, s_dev) = runs[True], runs[False]
    assert c_host == c_dev  # bit for bit
    assert min(c_host) < 0.5  # the rule did clip (the explosion or the spikes)
    for a, b in zip(s_host, s_dev):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype, k
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("space", ["linear", "log"])
@pytest.mark.parametrize("mode", ["reciprocal", "percentile", "mean"])
def test_zclip_host_and_device_forms_agree_bit_for_bit_on_long_runs(mode, space, monkeypatch):
    rng = random.Random(7)
    seq = [math.exp(rng.gauss(0, 1.5)) * (300 if rng.random() < 0.02 else 1) for _ in range(1500)]
    out = {}
    for host in (True, False):
        monkeypatch.setattr(measure, "READ_CPU_COEFFICIENT", host)
        policy = gg.ZClip(mode=mode, max_norm=40.0, space=space)
        out[host] = [policy.coefficient(measure_grads([one_param_with_norm(g)])).item() for g in seq]
        out[host].append(policy.mean.item())
    assert out[True] == out[False]
    assert sum(c < 1 for c in out[True]) > 30


# ---- AGC -----------------------------------------------------------------------------
def agc_literal(p: torch.Tensor, g: torch.Tensor, clipping: float, eps: float) -> torch.Tensor:
    """Per-row AGC written out with Python loops (Brock et al. 2021, Eq. 3)."""
    g = g.clone().double()
    p = p.double()
    if p.ndim <= 1:
        wn = max(p.norm().item(), eps)
        gn = g.norm().item()
        if gn > clipping * wn:
            g *= clipping * wn / max(gn, 1e-6)
        return g
    for i in range(p.shape[0]):
        wn = max(p[i].norm().item(), eps)
        gn = g[i].norm().item()
        if gn > clipping * wn:
            g[i] *= clipping * wn / max(gn, 1e-6)
    return g


@pytest.mark.parametrize("clipping", [0.01, 0.1, 1.0])
def test_agc_matches_literal_per_row(clipping):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 4 * 4, 8),
        torch.nn.Linear(8, 2),
    )
    with torch.no_grad():
        net[0].bias.zero_()  # zero weights exercise the eps floor
    net(torch.randn(5, 3, 6, 6)).pow(2).sum().backward()
    expected = {n: agc_literal(p, p.grad, clipping, 1e-3) for n, p in net.named_parameters()}
    head = {n: p.grad.clone() for n, p in net.named_parameters() if n.startswith("3.")}
    gg.AGC(clipping=clipping).clip_(net)
    for n, p in net.named_parameters():
        if n.startswith("3."):
            assert torch.equal(p.grad, head[n])  # the classifier is excluded by default
        else:
            torch.testing.assert_close(p.grad.double(), expected[n], rtol=1e-5, atol=1e-7)


class OpCounter(TorchDispatchMode):
    """Counts the aten ops that compute something (kernels, on a GPU) inside the block;
    views and dtype bookkeeping launch nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func is not torch.ops.aten.promote_types.default:
            self.ops += 1
        return func(*args, **(kwargs or {}))


def agc_ops(n_layers: int) -> int:
    torch.manual_seed(0)
    net = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(n_layers)])
    net(torch.randn(4, 8)).pow(2).sum().backward()
    stats = gg.Telemetry(list(net.named_parameters()), every=1).measure()
    policy = gg.AGC()
    policy.apply_(stats)  # the first call builds the cached plan
    with OpCounter() as counter:
        policy.apply_(stats)
    return counter.ops


def test_agc_is_grouped_not_a_dozen_kernels_per_parameter():
    # per extra parameter: two unit-norm reductions (weight, gradient) and its share of
    # one _foreach_mul_ (bias norms go through one _foreach_norm); the rest is per group
    per_param = (agc_ops(24) - agc_ops(8)) / (2 * 16)
    assert per_param <= 3.0, per_param


def test_agc_exclude_by_name():
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    net(torch.randn(3, 4)).pow(2).sum().backward()
    before = net[0].weight.grad.clone()
    gg.AGC(clipping=1e-4, exclude=("0",)).clip_(net)
    assert torch.equal(net[0].weight.grad, before)
    assert net[1].weight.grad.norm() < before.norm()


# ---- shared invariants ---------------------------------------------------------------
POLICY_FACTORIES = {
    "norm": lambda: gg.NormClip(1.0),
    "value": lambda: gg.ValueClip(0.1),
    "autoclip": lambda: gg.AutoClip(),
    "zclip": lambda: gg.ZClip(warmup_steps=3),
    "agc": lambda: gg.AGC(),
    "chain": lambda: gg.chain(gg.ZClip(warmup_steps=3), gg.NormClip(5.0)),
    "chain_agc": lambda: gg.chain(gg.AGC(), gg.AutoClip()),
}


@pytest.mark.parametrize("name", POLICY_FACTORIES)
def test_policy_never_increases_a_gradient_norm(name):
    policy = POLICY_FACTORIES[name]()
    for seed in range(12):
        ps = make_params(
            [torch.float32], seed=seed, scale=10.0 ** random.Random(seed).uniform(-2, 2)
        )
        before = torch.stack([p.grad.norm() for p in ps])
        total = policy.clip_(ps)
        after = torch.stack([p.grad.norm() for p in ps])
        assert (after <= before * (1 + 1e-5)).all()
        torch.testing.assert_close(total, before.norm(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", POLICY_FACTORIES)
def test_policy_state_dict_roundtrip_gives_same_future(name):
    a = POLICY_FACTORIES[name]()
    seq = norms_sequence(30)
    for g in seq[:15]:
        a.clip_([one_param_with_norm(g)])
    b = POLICY_FACTORIES[name]()
    b.load_state_dict(a.state_dict())
    for g in seq[15:]:
        wa, wb = one_param_with_norm(g), one_param_with_norm(g)
        a.clip_([wa])
        b.clip_([wb])
        assert torch.equal(wa.grad, wb.grad)


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: gg.NormClip(max_norm=-1), "max_norm"),
        (lambda: gg.NormClip(max_norm=0.0), "max_norm"),
        (lambda: gg.NormClip(max_norm=1.0, norm_type=0), "norm_type"),
        (lambda: gg.ValueClip(clip_value=-0.5), "clip_value"),
        (lambda: gg.ZClip(alpha=1.5), "alpha"),
        (lambda: gg.ZClip(z_thresh=0), "z_thresh"),
        (lambda: gg.ZClip(warmup_steps=0), "warmup_steps"),
        (lambda: gg.ZClip(mode="banana"), "mode"),
        (lambda: gg.ZClip(space="ln"), "space"),
        (lambda: gg.AutoClip(percentile=0), "percentile"),
        (lambda: gg.AutoClip(percentile=101), "percentile"),
        (lambda: gg.AutoClip(history_size=0), "history_size"),
        (lambda: gg.AGC(clipping=0), "clipping"),
        (lambda: gg.AGC(exclude="head"), "exclude"),
        (lambda: gg.NormClip(max_norm="1"), "max_norm"),
        (lambda: gg.chain(), "at least one"),
        (lambda: gg.chain(gg.ZClip), "argument 0"),
    ],
)
def test_bad_policy_arguments_name_the_argument(factory, match):
    with pytest.raises((ValueError, TypeError), match=match):
        factory()


# ---- chain ---------------------------------------------------------------------------------
def test_chain_coefficient_is_the_minimum_of_its_members():
    members = lambda: (gg.ZClip(warmup_steps=4), gg.NormClip(3.0), gg.AutoClip(50.0))  # noqa: E731
    chained, alone = gg.chain(*members()), members()
    mins = []
    for g in norms_sequence(40):
        w, ref = one_param_with_norm(g), one_param_with_norm(g)
        stats = gg.Telemetry([("w", ref)], every=1).measure()
        coefs = [p.coefficient(stats) for p in alone]  # each advances its own statistics
        expect = torch.stack(coefs).amin()
        total = chained.clip_([w])
        torch.testing.assert_close(total, stats.total_norm)
        torch.testing.assert_close(w.grad, ref.grad * expect, rtol=0, atol=0)
        mins.append(int(torch.stack(coefs).argmin()))
    assert len(set(mins)) >= 2, mins  # the smallest came from different members over time


def test_chain_zclip_normclip_is_zclip_with_a_cap():
    capped, z = gg.chain(gg.ZClip(warmup_steps=3), gg.NormClip(2.0)), gg.ZClip(warmup_steps=3)
    for g in [1.0, 1.1, 0.9, 1.0, 50.0, 1.0]:
        a, b = one_param_with_norm(g), one_param_with_norm(g)
        capped.clip_([a])
        z.clip_([b])
        assert float(a.grad.norm()) <= 2.0 + 1e-5
        assert float(a.grad.norm()) == pytest.approx(min(float(b.grad.norm()), 2.0), rel=1e-5)


def test_chain_with_a_unitwise_member_acts_in_order():
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    net(torch.randn(16, 4) * 30).pow(2).sum().backward()
    ref = copy.deepcopy(net)
    for p, q in zip(net.parameters(), ref.parameters()):
        q.grad = p.grad.clone()
    gg.chain(gg.AGC(clipping=0.01), gg.NormClip(0.5)).clip_(net)
    gg.AGC(clipping=0.01).clip_(ref)
    gg.NormClip(0.5).clip_(ref)
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    with pytest.raises(TypeError, match="no single coefficient"):
        gg.chain(gg.AGC(), gg.NormClip(1.0)).coefficient(
            gg.Telemetry(list(net.named_parameters()), every=1).measure())


def test_one_policy_instance_cannot_serve_two_guards():
    policy = gg.ZClip()
    a, b = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    ga = gg.Guard(a, torch.optim.SGD(a.parameters(), lr=0.1), clip=policy)
    with pytest.raises(ValueError, match="already used by another Guard"):
        gg.Guard(b, torch.optim.SGD(b.parameters(), lr=0.1), clip=policy)
    gb = gg.Guard(b, torch.optim.SGD(b.parameters(), lr=0.1), clip=copy.deepcopy(policy))
    ga.close()  # released: a later guard may take it
    gg.Guard(a, torch.optim.SGD(a.parameters(), lr=0.1), clip=policy).close()
    gb.close()


def test_a_policy_of_a_closed_guard_starts_afresh_over_other_parameters():
    """Found as a stranger: a sweep that built ``gg.ZClip()`` once gave it to each fold's
    guard; after the first guard closed, the next fold's (another model) was accepted
    silently and clipped its healthy steps by the first fold's norms. Over other
    parameters the policy now starts afresh, with a warning; over the same parameters (the
    same run, a guard built again) it goes on with its statistics."""
    import warnings

    from tests.helpers import mlp

    def fold(model, policy, scale, steps=30):
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        guard = gg.Guard(model, opt, clip=policy, every=5)
        for i in range(steps):
            torch.manual_seed(i)
            (model(torch.randn(16, 8) * scale) ** 2).mean().backward()
            guard.step()
            opt.zero_grad()
        guard.close()
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    shared = gg.ZClip(warmup_steps=5)
    fold(mlp(seed=0), shared, 1.0)  # the norms it learns are 20x smaller than the next's
    with pytest.warns(gg.GradGuardWarning, match="over other parameters"):
        reused = fold(mlp(seed=1), shared, 20.0)
    assert torch.equal(reused, fold(mlp(seed=1), gg.ZClip(warmup_steps=5), 20.0))
    same = mlp(seed=2)
    fold(same, shared, 1.0)
    learnt = str(shared.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        guard = gg.Guard(same, torch.optim.SGD(same.parameters(), lr=0.01), clip=shared)
    assert str(shared.state_dict()) == learnt  # the same parameters: kept
    guard.close()


@pytest.mark.parametrize("make", [
    lambda: gg.ZClip(warmup_steps=5),
    lambda: gg.AutoClip(percentile=10, history_size=20),
    lambda: gg.clipping.Chain(gg.ZClip(warmup_steps=5), gg.AutoClip(percentile=10)),
])
def test_reset_forgets_the_statistics_and_warms_up_again(make):
    """After ``reset()`` a policy clips a new norm scale as a fresh one does (the guard
    calls it on ``add_param_group``); before it, the old scale's statistics clip it."""
    params = [torch.zeros(50, requires_grad=True)]

    def run(policy, scales):
        out = []
        for i, s in enumerate(scales):
            set_grads(params, seed=i, scale=s)
            policy.clip_(params)
            out.append(params[0].grad.norm().item())
        return out

    old, fresh = make(), make()
    run(old, [1.0] * 30)
    new_scale = [100.0] * 10
    kept = run(copy.deepcopy(old), new_scale)
    old.reset()
    assert run(old, new_scale) == run(fresh, new_scale)
    assert kept[0] < run(make(), new_scale)[0] / 10  # without the reset: clipped to the old scale
    gg.NormClip(1.0).reset()  # stateless: nothing to forget


def test_agc_given_unnamed_parameters_says_it_excludes_no_last_layer():
    """Found by a stranger: ``AGC().clip_(model.parameters())`` (the README's standalone
    call) clipped the classifier the docs say is left alone, without a word: unnamed
    parameters have no last layer to find."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    model(torch.randn(16, 4)).pow(2).sum().mul(1e3).backward()
    head = model[2].weight.grad.clone()
    with pytest.warns(gg.GradGuardWarning, match=r"came without names .* nothing is excluded"):
        gg.AGC(clipping=0.01).clip_(model.parameters())
    assert not torch.equal(model[2].weight.grad, head)  # as it says: the head was clipped
    model.zero_grad()
    model(torch.randn(16, 4)).pow(2).sum().mul(1e3).backward()
    head = model[2].weight.grad.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error", gg.GradGuardWarning)
        gg.AGC(clipping=0.01).clip_(model)  # named: the head is left alone, nothing said
    assert torch.equal(model[2].weight.grad, head)


def test_agc_exclude_that_matches_no_parameter_says_so():
    """Found by a stranger: ``AGC(exclude=["2.bais"])`` (a typo) clipped the layer it was
    meant to spare, without a word."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    model(torch.randn(16, 4)).pow(2).sum().mul(1e3).backward()
    with pytest.warns(gg.GradGuardWarning, match=r"'2\.bais' matches no parameter name"):
        gg.AGC(clipping=0.01, exclude=["2.bais", "2.weight"]).clip_(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", gg.GradGuardWarning)
        gg.AGC(clipping=0.01, exclude=["2.bias", "0.*"]).clip_(model)  # every pattern hits
        gg.AGC(clipping=0.01, exclude=[]).clip_(model)
