"""Divergence precursors: warn before a run diverges (``divergence_risk`` events).

A run that diverges late rarely does so out of the blue: something grows first. Past the
edge of stability a mode grows geometrically (Cohen et al. 2021); without qk-LayerNorm the
attention logits grow until the softmax collapses (Wortsman et al. 2023); weights and
activations grow until a half-precision value overflows. Healthy training changes too,
but like a power of the step count: the loss falls, weight norms creep up and settle.

So, at every flush, each signal becomes one robust point (the window's median, sampled
values at the flush step), and over the last :data:`TREND_POINTS` points we ask three
questions on its logarithm:

1. Is it rising at all? Mann–Kendall's rank test, ``z >= TREND_Z`` (a monotone trend
   survives outliers and heavy-tailed mini-batch noise; Mann 1945, Kendall 1975).
2. By how much? The Theil–Sen slope ``b`` (median of pairwise slopes; Sen 1968) times the
   span, at least :data:`GROWTH` for that signal.
3. Faster than healthy training grows? The elasticity ``d ln x / d ln t = b·t`` at least
   :data:`ELASTICITY`: a power law ``x ∝ t^k`` has elasticity ``k`` for ever, geometric
   growth has ``b·t``, which leaves every power behind. This is what keeps the early,
   fast-but-healthy phase of training (weights leaving their init, features forming) from
   counting: the same growth at step 300 is a small elasticity.

While the loss itself falls significantly (:data:`PROGRESS_DROP`), the run is making
progress and rising gradients, weights or logits are taken as learning, not instability.
A loss that goes below zero (a Gaussian negative log-likelihood, a normalising flow's) has
no ratio: its fall is judged on its values against its batch-to-batch spread
(:data:`LEVEL_DROP`). A heteroscedastic regression under ``nn.GaussianNLLLoss`` learns
its variances, and its gradient grows like one over them: "divergence risk: the gradient
norm grew 28x" came at step 399 of every seed while its loss fell from 0.26 to -1.5.
A half-precision output (watched) is judged against its ceiling instead: overflow within
one trend span at the current rate is a risk whatever the step.

Signals: the loss, its spread (variance rises before a critical transition, Scheffer et al.
2009), the gradient norm, the weight norm; with ``Guard(watch_activations=True)`` attention
and output logits and half-precision headroom (:mod:`gradguard._logit_watch`).

Example:
    >>> import torch, gradguard as gg
    >>> from gradguard.precursors import PrecursorState, detect_precursors
    >>> net = torch.nn.Linear(4, 1)
    >>> tel = gg.Telemetry(list(net.named_parameters()), every=10)
    >>> state, events = PrecursorState(), []
    >>> for step in range(400):
    ...     net.zero_grad(); net(torch.ones(2, 4)).sum().backward()
    ...     net.weight.grad *= 1.03 ** max(0, step - 250)   # grows 3 % a step from 250 on
    ...     tel.record(tel.measure(), loss=1.0, clip_coef=None, skipped=False)
    ...     if tel.pending == tel.every:
    ...         events += detect_precursors(tel.flush(), state)
    >>> [(e.kind, e.step, e.data["signal"], e.layer) for e in events]
    [('divergence_risk', 289, 'grad_norm', '(root)')]
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ._logit_watch import Magnitude, watch_signals
from ._precursor_signals import layer_medians, loss_level, window_signals
from ._trend import Trend, fall, trend
from .events import Event
from .telemetry import Window

# ---- named defaults -------------------------------------------------------------------
#: Flush points a trend is judged over (8 x the default ``every=50`` = 400 steps). Fewer
#: points cannot reach :data:`TREND_Z`: Mann–Kendall's largest z for 7 points is 2.7.
TREND_POINTS = 8
#: Steps a trend spans at the least (``PrecursorConfig(points=None)``, the default): a
#: guard that flushes more often judges more points, not a shorter span. The thresholds
#: below were set on 400-step trends; at ``every=10`` eight points span 80 steps, and the
#: runs of benchmarks/warning.py then had 2.5 false alarms per 10,000 healthy steps (none
#: over 400 steps, as at ``every=50``).
TREND_STEPS = 400
#: Mann–Kendall z above which a signal is rising (one-sided p ~ 0.006).
TREND_Z = 2.5
#: Least elasticity ``b·t`` (growth faster than ``t^2``) for a trend to count as runaway.
ELASTICITY = 2.0
#: The loss's spread needs this many times the elasticity: a MAD of one window's losses is a
#: noisier point than a median, and the spread of a loss settling near its floor grows
#: like a power of the step (a healthy calibration MLP of benchmarks/quality.py: 2.4x at
#: elasticity 2.1 as its loss reached 0.0008; chosen after seeing it, the diverging runs
#: of benchmarks/warning.py warned on their spread at elasticity 3.2 to 7.8).
SPREAD_ELASTICITY = 1.5
#: Least growth over the trend span, per signal: what a person would call "growing".
GROWTH: dict[str, float] = {
    "loss": 1.3, "loss_spread": 1.3, "grad_norm": 1.5, "weight_norm": 1.2,
    "attn_logits": 2.0, "output_logits": 2.0, "half_overflow": 1.5,
}
#: The loss falling to this fraction or below over the span, with Mann–Kendall z below
#: -PROGRESS_Z (one-sided p ~ 0.05), is progress: other signals rising meanwhile are
#: learning, not instability. A lower bar than TREND_Z: it can only silence a warning.
PROGRESS_DROP = 0.8
PROGRESS_Z = 1.645
#: A loss not positive at every point has no ratio: it fell when Mann–Kendall says so (z
#: below -PROGRESS_Z) and its Theil–Sen fall over the span is at least this many times its
#: batch-to-batch spread (the median over the span of each window's median absolute
#: deviation). 0.26 to -1.5 nats against a spread of ~0.1 in the Gaussian NLL regression.
LEVEL_DROP = 2.0
#: "Steps left" estimates the steps until a signal is this many times its level at the
#: start of its trend: the divergence label of benchmarks/warning.py (loss > 10x median).
BLOWUP = 10.0
#: A signal that stopped rising for this many flushes (the trend's points) may warn again.
COOLDOWN = TREND_POINTS

SIGNAL_TEXT = {"loss": "the loss", "loss_spread": "the loss's batch-to-batch spread",
               "grad_norm": "the gradient norm", "weight_norm": "the weight norm",
               "attn_logits": "the attention logits", "output_logits": "the output logits"}


@dataclass(frozen=True)
class PrecursorConfig:
    """Thresholds of :func:`detect_precursors` (defaults: the module constants above).

    ``points``: the flush points a trend is judged over; None (the default) takes
    :data:`TREND_POINTS`, or more when the guard flushes more often than every 50 steps,
    so that a trend spans :data:`TREND_STEPS` (400) steps at any ``every``
    (:func:`trend_points`).

    Example:
        >>> from gradguard.precursors import PrecursorConfig, trend_points
        >>> cfg = PrecursorConfig(z=3.0)
        >>> trend_points(cfg, every=50), trend_points(cfg, every=10), trend_points(cfg, every=200)
        (8, 40, 8)
        >>> trend_points(PrecursorConfig(points=8), every=10)
        8
    """

    points: int | None = None
    z: float = TREND_Z
    elasticity: float = ELASTICITY
    progress_drop: float = PROGRESS_DROP

    def __post_init__(self) -> None:
        if self.points is not None and (isinstance(self.points, bool)
                                        or not isinstance(self.points, int) or self.points < 4):
            raise ValueError(f"PrecursorConfig(points={self.points!r}): must be None or an "
                             "int >= 4")
        for name in ("z", "elasticity"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                raise ValueError(f"PrecursorConfig({name}={v!r}): must be a finite number > 0")
        if not (isinstance(self.progress_drop, (int, float)) and 0 < self.progress_drop <= 1):
            raise ValueError(f"PrecursorConfig(progress_drop={self.progress_drop!r}): must be "
                             "in (0, 1]")


def trend_points(config: PrecursorConfig, every: int | None) -> int:
    """The flush points a trend is judged over: ``config.points`` when set, else
    :data:`TREND_POINTS`, or enough points to span :data:`TREND_STEPS` steps at the guard's
    flush interval ``every`` (None: unknown, ``TREND_POINTS``)."""
    if config.points is not None:
        return config.points
    if not every:
        return TREND_POINTS
    return max(TREND_POINTS, math.ceil(TREND_STEPS / every))


@dataclass
class PrecursorState:
    """Per-signal history of flush points (host floats) and the warning cool-down."""

    points: dict[str, deque[tuple[int, float]]] = field(default_factory=dict)
    layers: deque[tuple[int, list[float]]] = field(default_factory=deque)
    lr: deque[tuple[int, float]] = field(default_factory=deque)
    cooldown: dict[str, int] = field(default_factory=dict)
    full_window: int = 0
    #: the loss's window median and median absolute deviation per flush, of any sign
    level: deque[tuple[int, float, float]] = field(default_factory=deque)

    def add(self, key: str, step: int, value: float | None, keep: int) -> None:
        if value is None or not (math.isfinite(value) and value > 0):
            return
        q = self.points.get(key)
        if q is None or q.maxlen != keep:  # new, or kept for another config.points
            q = self.points[key] = deque(q or (), maxlen=keep)
        q.append((step, float(value)))

    def state_dict(self) -> dict[str, Any]:
        return {"points": {k: [list(p) for p in v] for k, v in self.points.items()},
                "layers": [[s, list(v)] for s, v in self.layers], "lr": [list(p) for p in self.lr],
                "cooldown": dict(self.cooldown), "full_window": self.full_window,
                "level": [list(p) for p in self.level]}

    def load_state_dict(self, sd: Mapping[str, Any], keep: int = TREND_POINTS) -> None:
        # at least as many points as were saved (a guard flushing often keeps more)
        keep = max([keep, *(len(v) for v in sd.get("points", {}).values()),
                    len(sd.get("layers", []))])
        self.points = {k: deque(((int(s), float(x)) for s, x in v), maxlen=keep)
                       for k, v in sd.get("points", {}).items()}
        self.layers = deque(((int(s), [float(x) for x in v]) for s, v in sd.get("layers", [])),
                            maxlen=keep)
        self.lr = deque(((int(s), float(x)) for s, x in sd.get("lr", [])), maxlen=keep)
        self.cooldown = {k: int(v) for k, v in sd.get("cooldown", {}).items()}
        self.full_window = int(sd.get("full_window", 0))
        self.level = deque(((int(s), float(m), float(d)) for s, m, d in sd.get("level", [])),
                           maxlen=keep)


@dataclass(frozen=True)
class PrecursorInputs:
    """What the guard knows at a flush besides the window.

    Attributes:
        magnitudes: the activation watch's sample of the flush step (attention logits,
            output logits, half-precision outputs; ``Guard(watch_activations=True)``).
        optim: :func:`optimizer_info` of the guarded optimizer (for the remedy).
        every: the guard's flush interval. A window of another length was flushed off
            schedule (a checkpoint, close): its weight norms may come from an update
            sampled for the window before, so they are not used.
    """

    magnitudes: Mapping[str, Magnitude] | None = None
    optim: Mapping[str, Any] | None = None
    every: int | None = None


def optimizer_info(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The largest learning rate and weight decay of the param groups, the optimizer's
    name, and the share of its norm a weight loses to the decay alone in a step where that
    is known (:func:`decay_per_step`; host floats already in ``param_groups``: no device
    access; tensor LRs skipped).

    Example:
        >>> import torch
        >>> from gradguard.precursors import optimizer_info
        >>> opt = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=3e-4)
        >>> optimizer_info(opt)
        {'lr': 0.0003, 'weight_decay': 0.01, 'optimizer': 'AdamW'}
    """
    lrs = [g["lr"] for g in optimizer.param_groups if isinstance(g.get("lr"), (int, float))]
    wds = [g.get("weight_decay", 0.0) or 0.0 for g in optimizer.param_groups]
    return {"lr": max(lrs) if lrs else None,
            "weight_decay": max((float(w) for w in wds if isinstance(w, (int, float))),
                                default=0.0),
            "optimizer": type(optimizer).__name__,
            **({} if (d := decay_per_step(optimizer)) is None else {"decay": d})}


#: The highest weight decay in common use, per optimizer (SGD: 1e-4 to 5e-4 on vision
#: models, 1e-3 at most; AdamW: 0.01 to 0.1, 0.3 at most): above it, a decay that alone
#: makes an update ratio far above is named (:func:`decay_per_step`).
USUAL_DECAY = {"SGD": 1e-3, "AdamW": 0.3}


def decay_per_step(optimizer: torch.optim.Optimizer) -> float | None:
    """The largest share of its norm a weight loses to weight decay alone in a step, where
    the optimizer adds it outside an adaptive scale: SGD's ``lr x weight_decay`` (over ``1
    - momentum`` once its momentum builds up; dampening aside), AdamW's decoupled ``lr x
    weight_decay``; None for others (Adam's L2 goes through its normalisation), and for a
    decay in its usual range (``USUAL_DECAY``: at an LR 100x too high, 5e-4 on SGD moves
    the weights as far, and the LR is at fault: found by a regression hunt)."""
    name = type(optimizer).__name__
    if name not in USUAL_DECAY:
        return None
    shares = []
    for g in optimizer.param_groups:
        lr, wd = g.get("lr"), g.get("weight_decay") or 0.0
        if not isinstance(lr, (int, float)) or not isinstance(wd, (int, float)) \
                or wd <= USUAL_DECAY[name]:
            continue
        momentum = float(g.get("momentum") or 0.0) if name == "SGD" else 0.0
        shares.append(float(lr) * float(wd) / (1.0 - momentum if momentum < 1 else 1.0))
    return max(shares) if shares else None


# ---- the detector -----------------------------------------------------------------------
def _fastest_layer(state: PrecursorState, layers: Sequence[str]) -> str | None:
    """The layer whose gradient norm has the largest Theil–Sen log-slope over the kept
    flush points (per-layer window medians)."""
    pts = [(s, v) for s, v in state.layers if len(v) == len(layers)]
    if len(pts) < 3:
        return None
    x = torch.tensor([float(s) for s, _ in pts], dtype=torch.float64)
    y = torch.tensor([v for _, v in pts], dtype=torch.float64).log()  # [K, L], NaN if absent
    i, j = torch.triu_indices(len(pts), len(pts), 1)
    slopes = (y[j] - y[i]) / (x[j] - x[i]).unsqueeze(1)
    med = slopes.nanmedian(dim=0).values.nan_to_num(nan=-math.inf)
    return layers[int(med.argmax())]


def _progress(lt: Trend | None, state: PrecursorState, step: int, keep: int,
              config: PrecursorConfig) -> bool:
    """The loss falls significantly over the span (see the module docstring): by ratio when
    it was positive at every point (``lt``, its trend), else by its values against its
    spread (:data:`LEVEL_DROP`)."""
    if lt is not None:
        return lt.z <= -PROGRESS_Z and lt.growth <= config.progress_drop
    pts = list(state.level)
    if len(pts) < keep or pts[-1][0] != step or (f := fall([(s, m) for s, m, _ in pts])) is None:
        return False
    z, change = f
    return z <= -PROGRESS_Z and -change >= LEVEL_DROP * statistics.median(d for *_, d in pts)


def _is_rising(key: str, t: Trend, cfg: PrecursorConfig, progress: bool) -> bool:
    family = key.split(":")[0]
    if t.z < cfg.z or t.growth < GROWTH[family]:
        return False
    if family == "half_overflow":  # an absolute ceiling: overflow within one span
        return math.log(1.0 / t.last) / t.slope <= t.end - t.start
    least = cfg.elasticity * (SPREAD_ELASTICITY if family == "loss_spread" else 1.0)
    return t.elasticity >= least and (family == "loss" or not progress)


def detect_precursors(
    window: Window,
    state: PrecursorState,
    config: PrecursorConfig = PrecursorConfig(),
    inputs: PrecursorInputs = PrecursorInputs(),
) -> list[Event]:
    """At most one ``divergence_risk`` warning per flush; updates ``state``.

    Args:
        window: the flushed telemetry window.
        state: the flush points kept between flushes.
        config: thresholds.
        inputs: the watch's sample, the optimizer's LR and the flush interval.

    A signal warns when its last :func:`trend_points` flush points rise (Mann–Kendall z),
    grow by at least :data:`GROWTH` and faster than any power of the step (elasticity);
    see the module docstring. It may warn again after it stopped rising for
    :data:`COOLDOWN` flushes (with ``points=None``, the trend's points: 400 steps).
    """
    if len(window) == 0 or len(window) < state.full_window / 2:
        return []  # a partial window (close, abort) is too short to be a point
    state.full_window = max(state.full_window, len(window))
    step, keep = window.steps[-1], trend_points(config, inputs.every)
    for key, v in window_signals(window).items():
        if key != "weight_norm" or inputs.every in (None, len(window)):
            state.add(key, step, v, keep)
    vals, where = watch_signals(inputs.magnitudes or {})
    for key, v in vals.items():
        state.add(key, step, v, keep)
    if state.layers.maxlen != keep:
        state.layers = deque(state.layers, maxlen=keep)
        state.lr = deque(state.lr, maxlen=keep)
        state.level = deque(state.level, maxlen=keep)
    state.layers.append((step, layer_medians(window)))
    if (level := loss_level(window)) is not None:
        state.level.append((step, *level))
    optim = inputs.optim or {}
    lr = optim.get("lr")
    if isinstance(lr, (int, float)) and lr > 0:
        state.lr.append((step, float(lr)))
    trends = {k: t for k, q in state.points.items()
              if len(q) >= keep and q[-1][0] == step and (t := trend(list(q))) is not None}
    progress = _progress(lt := trends.get("loss"), state, step, keep, config)
    # a falling loss silences its spread (a plateau left, not a transition: early-warning.md)
    quiet = {"loss_spread"} if lt is not None and lt.z <= -PROGRESS_Z else set()
    rising = {k: t for k, t in trends.items()
              if k not in quiet and _is_rising(k, t, config, progress)}
    for k in list(state.cooldown):
        if k not in rising:
            state.cooldown[k] -= 1
            if state.cooldown[k] <= 0:
                del state.cooldown[k]
    new = {k: t for k, t in rising.items() if k not in state.cooldown}
    for k in rising:
        state.cooldown[k] = keep if config.points is None else COOLDOWN  # 400 steps at any every
    if not new:
        return []
    return [_risk_event(step, new, rising, where, state, window, optim)]


def _steps_left(key: str, t: Trend) -> float:
    if key.startswith("half_overflow"):
        return math.log(1.0 / t.last) / t.slope
    return t.steps_to(BLOWUP)


def _risk_event(step: int, new: Mapping[str, Trend], rising: Mapping[str, Trend],
                where: Mapping[str, str], state: PrecursorState, window: Window,
                optim: Mapping[str, Any]) -> Event:
    key = min(new, key=lambda k: _steps_left(k, new[k]))
    t, family = new[key], key.split(":")[0]
    left = _steps_left(key, t)
    module = where.get(key)
    layer = module or (_fastest_layer(state, window.layers) if family == "grad_norm" else None)
    span = t.end - t.start
    if family == "half_overflow":
        what = (f"`{module}`'s half-precision output is at {t.last:.2%} of its range and grew "
                f"{t.growth:.2g}x over the last {span} steps (Mann–Kendall z={t.z:.1f}); at "
                f"this rate it overflows in ~{left:.0f} steps")
    else:
        eta = (f"at this rate it reaches {BLOWUP:g}x in ~{left:.0f} steps" if left >= 1 else
               f"it is already past {BLOWUP:g}x its level at step {t.start}")
        what = (f"{SIGNAL_TEXT[family]} grew {t.growth:.2g}x over the last {span} steps "
                f"(Mann–Kendall z={t.z:.1f}, elasticity {t.elasticity:.1f}: faster than the "
                f"run's own pace); {eta}")
    lr_text, lr_data = _lr_remedy(state, t.start, optim)
    remedy = {
        "attn_logits": "Add qk-LayerNorm (normalise queries and keys before q·kᵀ; Wortsman "
                       f"et al. 2023), or {lr_text}.",
        "output_logits": f"Add a z-loss (1e-4·log²Z on the output logits), or {lr_text}.",
        "half_overflow": f"Run `{module}` in float32 (or bfloat16), or {lr_text}.",
    }.get(family, f"{lr_text[0].upper()}{lr_text[1:]}.")
    if family == "weight_norm" and not optim.get("weight_decay"):
        remedy = f"Add weight decay (e.g. AdamW(weight_decay=0.1)), or {lr_text}."
    w, u = window.weight_norms, window.update_norms
    data: dict[str, Any] = {
        "signal": family, "trend": _trend_data(t), "steps_left": round(left), "module": module,
        "signals": {k: _trend_data(v) for k, v in rising.items()}, **lr_data,
        "update_ratio": float(u.norm() / w.norm()) if w is not None and u is not None
        and float(w.norm()) > 0 else None}
    return Event(kind="divergence_risk", step=step, severity="warning",
                 message=f"step {step}: divergence risk: {what}", layer=layer,
                 value=t.growth, threshold=GROWTH[family], remedy=remedy, data=data)


def _trend_data(t: Trend) -> dict[str, float]:
    return {"growth": t.growth, "over_steps": t.end - t.start, "since": t.start, "z": t.z,
            "elasticity": t.elasticity, "slope_per_step": t.slope, "last": t.last}


def _lr_remedy(state: PrecursorState, start: int, optim: Mapping[str, Any]
               ) -> tuple[str, dict[str, Any]]:
    """'lower the LR to x': half the LR at which the growth began (the LR may have risen
    since, as in a warm-up or ramp that overshoots)."""
    lrs = [lr for s, lr in state.lr if s >= start]  # the LR of each flush since the start
    if not lrs:
        return "lower the learning rate (halve it)", {}
    lr0, lr = lrs[0], lrs[-1]
    target = 0.5 * min(lr0, lr)
    text = f"lower the learning rate to {target:.3g} (now {lr:.3g})"
    if lr >= 1.5 * lr0:
        text += f"; it rose {lr / lr0:.2g}x since step {start}, when the growth began"
    return text, {"lr": lr, "lr_at_start": lr0, "suggested_lr": target}
