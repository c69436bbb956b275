"""divergence_risk: fires on a growing precursor, stays silent on healthy shapes."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard import precursors as pc
from gradguard._logit_watch import LogitWatch, Magnitude
from gradguard._trend import Trend
from gradguard.detectors import DetectorConfig, DetectorState, detect
from gradguard.precursors import (
    PrecursorConfig,
    PrecursorInputs,
    PrecursorState,
    detect_precursors,
    trend,
)
from gradguard.telemetry import Window
from helpers import batches, gaussian_nll_run, mlp

EVERY = 50


def window(start: int, loss: list[float], grad: list[float], weight: float | None = None,
           layers: int = 2) -> Window:
    """A window whose per-step loss and total gradient norm are given (the norm is split
    evenly over ``layers`` one-parameter layers)."""
    n = len(loss)
    g = torch.tensor(grad, dtype=torch.float32)
    pn = (g / math.sqrt(layers)).unsqueeze(1).repeat(1, layers)
    w = None if weight is None else torch.full((layers,), weight / math.sqrt(layers))
    return Window(steps=list(range(start, start + n)), loss=torch.tensor(loss),
                  total_norm=g, clip_coef=torch.ones(n), skipped=torch.zeros(n, dtype=torch.bool),
                  param_norms=pn, names=[f"l{i}.weight" for i in range(layers)],
                  layers=[f"l{i}" for i in range(layers)], layer_index=list(range(layers)),
                  weight_norms=w, update_norms=None if w is None else w * 1e-3)


def windows(loss_at, grad_at, steps: int, weight_at=None, noise: float = 0.1, seed: int = 0
            ) -> list[Window]:
    """``steps`` steps of synthetic signals with log-normal batch noise, EVERY a window."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for s0 in range(0, steps, EVERY):
        ts = range(s0, s0 + EVERY)
        eps = (noise * torch.randn(2, EVERY, generator=gen)).exp().tolist()
        out.append(window(s0, [loss_at(t) * e for t, e in zip(ts, eps[0])],
                          [grad_at(t) * e for t, e in zip(ts, eps[1])],
                          None if weight_at is None else weight_at(s0 + EVERY - 1)))
    return out


def feed(ws: list[Window], state: PrecursorState | None = None, magnitudes_at=None,
         optim=None) -> list[gg.Event]:
    state = state if state is not None else PrecursorState()
    events: list[gg.Event] = []
    for w in ws:
        mags = None if magnitudes_at is None else magnitudes_at(w.steps[-1])
        events += detect_precursors(w, state, inputs=PrecursorInputs(mags, optim))
    return events


def run(loss_at, grad_at, steps: int, weight_at=None, noise: float = 0.1, seed: int = 0,
        magnitudes_at=None, optim=None) -> list[gg.Event]:
    return feed(windows(loss_at, grad_at, steps, weight_at, noise, seed),
                magnitudes_at=magnitudes_at, optim=optim)


# ---- the trend statistics ---------------------------------------------------------------
def test_trend_of_geometric_growth_matches_the_formulas():
    t = trend([(100 * i, 2.0 ** i) for i in range(1, 9)])
    assert t.slope == pytest.approx(math.log(2) / 100)
    assert t.growth == pytest.approx(2.0 ** 7)
    # Mann–Kendall: S = 28 for 8 increasing points, var = 8*7*21/18, continuity-corrected
    assert t.z == pytest.approx(27 / math.sqrt(8 * 7 * 21 / 18))
    assert t.elasticity == pytest.approx(math.log(2) / 100 * 801)
    assert t.steps_to(2.0 ** 10) == pytest.approx(300)


def test_theil_sen_ignores_one_outlier():
    pts = [(50 * i, 1.0) for i in range(8)]
    pts[6] = (300, 1000.0)  # one huge window
    t = trend(pts)
    assert t.growth == pytest.approx(1.0)
    assert abs(t.z) < 1.0


# ---- fires on precursors ----------------------------------------------------------------
def test_exponential_gradient_growth_warns_well_before_it_reaches_10x():
    onset, rate = 3000, 0.004  # the gradient norm grows 0.4 % a step from step 3000
    events = run(lambda t: 1.0, lambda t: math.exp(rate * max(0, t - onset)), 5000)
    assert [e.kind for e in events] == ["divergence_risk"]
    e = events[0]
    assert e.severity == "warning" and e.data["signal"] == "grad_norm"
    ten_x = onset + math.log(10) / rate
    assert onset < e.step <= ten_x - 50  # a lead of more than 50 steps
    # steps left: the fitted rate extrapolated to 10x the level where the trend began
    start = e.data["trend"]["since"]
    truth = math.log(10) / rate - (e.step - max(start, onset))
    assert e.data["steps_left"] == pytest.approx(truth, rel=0.35)
    assert e.data["trend"]["growth"] >= pc.GROWTH["grad_norm"]


def test_rising_loss_and_its_spread_warn():
    def loss(t):
        return 0.5 * math.exp(0.002 * max(0, t - 2500))

    events = run(loss, lambda t: 1.0, 4000)
    assert len(events) == 1 and events[0].data["signal"] in ("loss", "loss_spread")
    assert "loss" in events[0].data["signals"]


@pytest.mark.parametrize("signal, elasticity, rising", [
    ("loss_spread", 2.12, False),  # the healthy calibration MLP of benchmarks/quality.py
    ("loss_spread", 3.2, True),  # the lowest of the diverging runs of benchmarks/warning.py
    ("grad_norm", 2.12, True),  # the other signals keep the elasticity of 2
    ("loss", 2.12, True),
])
def test_the_loss_spread_needs_a_higher_elasticity_than_the_other_signals(
        signal, elasticity, rising):
    """The spread (a MAD of one window's losses) is a noisier point than a median, and a
    loss settling near its floor widens its log-spread like a power of the step."""
    t = Trend(slope=elasticity / 849, z=3.1, growth=2.4, elasticity=elasticity, start=499,
              end=849, last=0.1)
    assert pc._is_rising(signal, t, pc.PrecursorConfig(), progress=False) is rising


def test_remedy_names_a_learning_rate_and_the_ramp():
    events = run(lambda t: 1.0, lambda t: math.exp(0.004 * max(0, t - 3000)), 5000,
                 optim={"lr": 0.1, "weight_decay": 0.0, "optimizer": "SGD"})
    assert events[0].data["suggested_lr"] == pytest.approx(0.05)
    assert "lower the learning rate to 0.05" in events[0].remedy.lower()


def test_half_precision_output_warns_before_overflow():
    def mags(t):
        v = 10.0 * math.exp(0.004 * t)  # reaches float16's 65504 at t ~ 2200
        return {"mlp.fc": Magnitude(v, "torch.float16"), "": Magnitude(1.0, "torch.float32",
                                                                      "model_output")}

    events = run(lambda t: 1.0, lambda t: 1.0, 2500, magnitudes_at=mags, noise=0.01)
    e = next(e for e in events if e.data["signal"] == "half_overflow")
    overflow = math.log(65504 / 10) / 0.004
    assert e.step < overflow - 50 and e.data["module"] == "mlp.fc"
    assert e.data["steps_left"] == pytest.approx(overflow - e.step, rel=0.2)
    assert "float32" in e.remedy


def test_attention_logit_growth_names_the_module_and_qk_layernorm():
    def mags(t):
        v = 5.0 * math.exp(0.003 * max(0, t - 2000))
        return {"blocks.1.attn.attn_logits": Magnitude(v, "torch.float32", "attn_logits")}

    events = run(lambda t: 2.0, lambda t: 1.0, 3500, magnitudes_at=mags)
    e = events[0]
    assert e.data["signal"] == "attn_logits" and e.layer == "blocks.1.attn.attn_logits"
    assert "qk-LayerNorm" in e.remedy


def test_weight_growth_without_decay_suggests_weight_decay():
    events = run(lambda t: 1.0, lambda t: 1.0, 4000,
                 weight_at=lambda t: 10.0 * math.exp(0.002 * max(0, t - 2500)),
                 optim={"lr": 1e-3, "weight_decay": 0.0, "optimizer": "Adam"})
    assert events[0].data["signal"] == "weight_norm"
    assert events[0].remedy.startswith("Add weight decay")


# ---- silent on healthy shapes ----------------------------------------------------------
def _warmup_cosine(t, peak=1.0, warm=500, total=6000):
    return peak * (t + 1) / warm if t < warm else peak * 0.5 * (1 + math.cos(
        math.pi * (t - warm) / (total - warm)))


HEALTHY = {
    # loss falls like a power of t; the gradient norm rises early then settles
    "power_law": (lambda t: 3.0 * (t + 10) ** -0.4, lambda t: 2.0 - 1.5 * math.exp(-t / 400)),
    # gradient norm and loss follow a warm-up then cosine LR
    "warmup_cosine": (lambda t: 1.0 + 0.5 * _warmup_cosine(t),
                      lambda t: 0.1 + _warmup_cosine(t)),
    # cosine restarts every 800 steps: the loss jumps back up at each restart
    "restarts": (lambda t: 0.5 + 0.3 * math.cos(math.pi * (t % 800) / 800),
                 lambda t: 1.0 + 0.5 * math.cos(math.pi * (t % 800) / 800)),
    # a plateau, then the task is solved: the gradient norm rises 10x while the loss drops
    "phase_transition": (lambda t: 1.0 if t < 3000 else max(0.05, 1.0 - (t - 3000) / 400),
                         lambda t: 0.1 if t < 3000 else min(1.0, 0.1 * 1.01 ** (t - 3000))),
}


@pytest.mark.parametrize("shape", sorted(HEALTHY))
@pytest.mark.parametrize("seed", [0, 1])
def test_healthy_shapes_stay_silent(shape, seed):
    loss, grad = HEALTHY[shape]
    assert run(loss, grad, 6000, weight_at=lambda t: 5.0 * (t + 100) ** 0.25, seed=seed,
               noise=0.2) == []


def test_the_same_growth_early_in_training_is_not_a_risk():
    def grad(onset):
        return lambda t: math.exp(0.002 * min(max(0, t - onset), 600))  # x3.3, then flat

    assert run(lambda t: 1.0, grad(0), 2000, noise=0.05) == []  # steps 0-600: elasticity < 2
    assert len(run(lambda t: 1.0, grad(3000), 5000, noise=0.05)) == 1


def test_rising_gradients_while_the_loss_falls_are_progress():
    def grad(t):
        return math.exp(0.004 * max(0, t - 3000))

    assert run(lambda t: 2.0 * math.exp(-0.004 * max(0, t - 3000)), grad, 4000) == []
    assert run(lambda t: 2.0, grad, 4000) != []


def test_a_loss_below_zero_that_falls_is_progress_too():
    """A loss that goes below zero (a Gaussian negative log-likelihood) has no ratio: its
    fall is judged on its values against its batch-to-batch spread."""
    gen = torch.Generator().manual_seed(0)

    def run_shifted(loss_at) -> list[gg.Event]:
        ws = []
        for s0 in range(0, 4000, EVERY):
            eps = torch.randn(2, EVERY, generator=gen).tolist()
            ts = range(s0, s0 + EVERY)
            ws.append(window(s0, [loss_at(t) + 0.1 * e for t, e in zip(ts, eps[0])],
                             [math.exp(0.004 * max(0, t - 3000) + 0.1 * e)
                              for t, e in zip(ts, eps[1])]))
        return feed(ws)

    assert run_shifted(lambda t: 0.3 - 2.0 * min(1.0, max(0, t - 3000) / 1000)) == []
    assert run_shifted(lambda t: -1.0) != []  # below zero and flat: the growth is a risk
    assert run_shifted(lambda t: -1.0 + 0.5 * max(0, t - 3000) / 1000) != []  # rising
    assert run_shifted(lambda t: -1.0 - 0.05 * max(0, t - 3000) / 1000) != []  # within noise


def test_a_heteroscedastic_regression_whose_gradient_grows_as_it_learns_is_not_at_risk():
    """``nn.GaussianNLLLoss`` learns the variances, and its gradient grows like one over them:
    "divergence risk: the gradient norm grew 28x over the last 350 steps" came at step 399
    while the loss fell from 0.26 to -1.5 (every seed of three)."""
    _, losses, guard = gaussian_nll_run(450, gg.Guard)
    assert losses[0] > 0 > sum(losses[-50:]) / 50  # the loss went below zero
    norms = [e for e in guard.events if e.kind == "divergence_risk"]
    assert norms == []


def test_one_event_per_episode_then_quiet_before_warning_again():
    def grad(t):  # grows for 1500 steps, flat for 1500, grows again
        g = 0.002 * (min(max(0, t - 3000), 1500) + max(0, t - 6000))
        return math.exp(g)

    events = run(lambda t: 1.0, grad, 8000, noise=0.05)
    assert len(events) == 2
    assert 3000 < events[0].step < 4500 and events[1].step > 6000


def test_state_dict_round_trip_resumes_identically():
    ws = windows(lambda t: 1.0, lambda t: math.exp(0.004 * max(0, t - 3000)), 5000)
    whole = feed(ws)
    first = PrecursorState()
    assert feed(ws[:50], first) == []  # steps 0-2499
    resumed = PrecursorState()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    rest = feed(ws[50:], resumed)
    assert len(whole) == 1
    assert [(e.step, e.message, e.remedy) for e in rest] == [
        (e.step, e.message, e.remedy) for e in whole]


# ---- configuration and wiring ----------------------------------------------------------
@pytest.mark.parametrize(("kw", "arg"), [({"points": 3}, "points"), ({"z": -1.0}, "z"),
                                        ({"elasticity": math.inf}, "elasticity")])
def test_config_errors_name_the_argument(kw, arg):
    with pytest.raises(ValueError, match=f"PrecursorConfig\\({arg}="):
        PrecursorConfig(**kw)
    with pytest.raises(TypeError, match="precursors="):
        DetectorConfig(precursors="off")  # type: ignore[arg-type]


def _guarded(steps: int, growth_from: int, config: DetectorConfig | None = None,
             **kw) -> gg.Guard:
    model = mlp(width=8)
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)  # the grads are faked: keep still
    guard = gg.Guard(model, opt, clip=None, on_nonfinite="off", every=10,
                     detector_config=config, **kw)
    for t, (x, y) in enumerate(batches(steps)):
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        for p in model.parameters():
            p.grad *= 1.03 ** max(0, t - growth_from)
        guard.step(loss)
        opt.zero_grad()
    guard.close()
    return guard


def test_guard_warns_by_default_and_can_turn_it_off():
    """The gradient norm grows 3% a step from step 250. At ``every=10`` the default trend
    spans 400 steps (40 flush points, as 8 do at ``every=50``): the warning comes at step
    399, the norm 80x its level; eight points (80 steps) warn sooner, with more false
    alarms (docs/early-warning.md)."""
    guard = _guarded(400, 250)
    risk = [e for e in guard.events if e.kind == "divergence_risk"]
    assert len(risk) == 1 and 250 < risk[0].step < 400
    assert risk[0].data["lr"] == pytest.approx(1e-6)
    assert risk[0].data["trend"]["over_steps"] >= 390  # 40 points, ten steps apart
    quick = _guarded(400, 250, DetectorConfig(precursors=PrecursorConfig(points=8)))
    early = [e.step for e in quick.events if e.kind == "divergence_risk"]
    assert len(early) == 1 and 250 < early[0] < min(330, risk[0].step)
    assert guard.state_dict()["monitor"]["detectors"]["precursors"]["points"]["grad_norm"]
    off = _guarded(400, 250, DetectorConfig(precursors=None))
    assert [e for e in off.events if e.kind == "divergence_risk"] == []


def test_replaying_the_windows_gives_the_guards_events():
    """benchmarks/warning.py scores the default configuration by replaying detect()."""

    class Keep:
        def __init__(self) -> None:
            self.windows: list[Window] = []

        def write(self, flush):
            self.windows.append(flush.window)

        def close(self):
            pass

    keep = Keep()
    guard = _guarded(400, 250, sinks=[keep])
    state, replay = DetectorState(), []
    for w in keep.windows:
        replay += detect(w, state=state, precursor_inputs=PrecursorInputs(
            optim=pc.optimizer_info(guard.optimizer), every=10))
    assert [(e.kind, e.step, e.message) for e in replay] == [
        (e.kind, e.step, e.message) for e in guard.events]


def test_logit_watch_bounds_attention_logits_and_sleeps_when_unarmed():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 5, 8)
    watch = LogitWatch(mha)
    mha(x, x, x)
    assert watch.take() == {}  # not armed: nothing recorded
    watch.armed = True
    mha(x, x, x)
    got = watch.take()["(model).attn_logits"]
    q, k, _ = nn.functional.linear(x, mha.in_proj_weight, mha.in_proj_bias).chunk(3, -1)
    q, k = q.unflatten(-1, (2, 4)), k.unflatten(-1, (2, 4))
    exact = torch.einsum("bthd,bshd->bhts", q, k).abs().max().item() / 2.0
    assert exact <= got.value <= 4 * exact and got.kind == "attn_logits"
    watch.remove()


def test_logit_watch_sees_sdpa_in_a_custom_module_and_half_outputs():
    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            q, k = self.q(x), self.k(x)
            return nn.functional.scaled_dot_product_attention(q, k, x).half()

    torch.manual_seed(0)
    model = nn.Sequential(Attn())
    watch = LogitWatch(model)
    watch.armed = True
    x = torch.randn(1, 3, 4)
    model(x)
    got = watch.take()
    q, k = model[0].q(x), model[0].k(x)
    bound = (q.norm(dim=-1).max() * k.norm(dim=-1).max() / 2.0).item()
    assert got["0.attn_logits"].value == pytest.approx(bound, rel=1e-5)
    assert got["0"].dtype == "torch.float16"
    assert torch.overrides._get_current_function_mode() is None  # the probe was left
    watch.remove()


def test_report_summary_says_how_early_the_warning_came():
    np = pytest.importorskip("numpy")
    from pathlib import Path

    from gradguard.report._data import RunData
    from gradguard.report._plots import loss_plot
    from gradguard.report._summary import summary_sentence

    n = 100
    events = [{"kind": "divergence_risk", "step": 40, "severity": "warning", "layer": None,
               "message": "", "data": {"signal": "grad_norm"}},
              {"kind": "nonfinite_grad", "step": 90, "severity": "error", "layer": "fc",
               "message": "gradient norm is NaN", "data": {}}]
    d = RunData(Path("x"), np.arange(n), np.linspace(1, 0.1, n), np.full(n, 2.0), np.ones(n),
                np.zeros(n, dtype=bool), [], np.zeros(0, dtype=np.int64), np.zeros((0, 0)),
                np.zeros((0, 0)), events)
    assert summary_sentence(d).startswith(
        "Gradients exploded at step 90 in `fc` (NaN). gradguard warned of a divergence risk "
        "at step 40 (grad norm), 50 steps before.")
    assert loss_plot(d).startswith("data:image/png;base64,")


def test_weight_norms_of_an_off_schedule_flush_are_not_used():
    """A checkpoint flush can carry an update sampled for the window before it."""
    state = PrecursorState()
    inputs = PrecursorInputs(every=50)
    detect_precursors(window(0, [1.0] * 50, [1.0] * 50, weight=3.0), state, inputs=inputs)
    detect_precursors(window(50, [1.0] * 30, [1.0] * 30, weight=4.0), state, inputs=inputs)
    assert list(state.points["weight_norm"]) == [(49, pytest.approx(3.0))]
    assert [s for s, _ in state.points["loss"]] == [49, 79]


def test_a_loss_leaving_a_slow_warm_ups_plateau_is_no_spread_warning():
    """Found as a stranger: a digits MLP on SGD with a 400-step linear warm-up to 0.03 sits
    at ln(10) while the LR is tiny, then learns; its loss's batch-to-batch spread grows
    50x as the batches stop being alike, and the Theil-Sen fall of the loss (2.30 -> 1.94
    over the span) was short of "progress": "divergence risk ... Lower the learning rate
    to 0.00187 (now 0.03)" at step 399, on 5 of 5 seeds. A loss that falls at every flush
    point silences its spread."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16
    x, y = (x - x.mean(0)) / (x.std(0) + 1e-6), torch.tensor(y)
    torch.manual_seed(1)
    gen = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                          nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.03)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / 400))
    guard = gg.Guard(model, opt, clip=None, on_nonfinite="off")
    losses = []
    for _ in range(450):
        i = torch.randint(0, 1797, (64,), generator=gen)
        loss = nn.functional.cross_entropy(model(x[i]), y[i])
        loss.backward()
        guard.step(loss)
        opt.zero_grad()
        sched.step()
        losses.append(loss.detach())
    guard.close()
    assert float(torch.stack(losses[-20:]).mean()) < 0.7 * math.log(10)  # it learns
    assert [e for e in guard.events if e.kind == "divergence_risk"] == []


def test_a_trend_over_many_flush_points_is_fit_over_block_medians():
    """Found by a stranger: at ``every=1`` a trend spans 400 flush points, and the pairwise
    fit over them (80,000 pairs per signal and flush) made each step take 100-400 ms. More
    than ``MAX_POINTS`` points are fit as the medians of blocks of them: the same trend."""
    from gradguard._trend import MAX_POINTS, _blocks

    pts = [(s, 1.5 * math.exp(0.01 * s) * (1.1 if s % 2 else 0.9)) for s in range(400)]
    x, _ = _blocks([float(s) for s, _ in pts], [math.log(v) for _, v in pts])
    assert len(x) <= MAX_POINTS and x[-1] == 396.0  # the newest block is whole: 393-399
    t = gg.precursors.trend(pts)
    assert t is not None and t.slope == pytest.approx(0.01, rel=0.05) and t.z > 5
    assert (t.start, t.end, t.last) == (0, 399, pts[-1][1])
    few = pts[::10]  # 40 points: no blocks, the fit of old
    assert _blocks([float(s) for s, _ in few], [v for _, v in few])[0] == [float(s) for s, _ in few]
