"""Detectors: pure functions over a host-side telemetry window that return Events.

The guard runs :func:`detect` at every flush. Detectors never touch the device and never
act; recovery decides what to do with their events. The only state they keep is the short
history of recent finite losses and gradient norms that the spike detectors compare
against (:class:`DetectorState`, a few hundred floats on the host).

Example:
    >>> import torch, gradguard as gg
    >>> from gradguard.detectors import detect, DetectorState
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    >>> tel = gg.Telemetry(list(net.named_parameters()), every=40)
    >>> state = DetectorState()
    >>> for step in range(40):
    ...     net.zero_grad(); net(torch.randn(4, 2)).pow(2).mean().backward()
    ...     if step == 35:
    ...         for p in net.parameters(): p.grad *= 1000.0   # a gradient spike
    ...     tel.record(tel.measure(), loss=1.0, clip_coef=None, skipped=False)
    >>> [(e.kind, e.step) for e in detect(tel.flush(), state=state)]
    [('grad_spike', 35)]
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .events import Event
from .precursors import PrecursorConfig, PrecursorInputs, PrecursorState, detect_precursors
from .telemetry import Window

# ---- named defaults -------------------------------------------------------------------
# Spikes: a robust z-score (median / MAD, Hampel's identifier) in log space, so that a
# steady loss with tiny batch-to-batch noise does not turn every 20 % wiggle into a spike,
# plus a minimum ratio to the median so that a near-constant history (MAD ~ 0) cannot fire.
#: Robust z-score above which a value is a spike (Hampel identifiers use 3; we want < 0.1 %
#: false positives on heavy-tailed mini-batch losses, so a wider margin).
SPIKE_Z = 6.0
#: 1.4826 * MAD estimates the standard deviation of a normal sample.
MAD_TO_SIGMA = 1.4826
#: Floor of the robust scale in log space (a 1 % spread), so that a constant history works.
MIN_LOG_SCALE = 0.01
#: A loss spike is at least this many times the recent median loss.
LOSS_SPIKE_RATIO = 2.0
#: A gradient spike is at least this many times the recent median total norm.
GRAD_SPIKE_RATIO = 10.0
#: Finite values seen before the spike detectors may fire.
SPIKE_WARMUP = 20
#: Recent finite values the median/MAD are computed over.
SPIKE_HISTORY = 100
#: A loss spike is *confirmed* (the recovery ladder acts on it) when it lasts this many
#: consecutive steps: one bad batch is not a diverging run.
SPIKE_CONFIRM = 2

#: A layer is vanishing when its gradient norm is this many times below the largest norm of
#: the layers after it (closer to the loss) ...
VANISH_RATIO = 1e-3
#: ... or below this absolute floor (while not exactly zero: zero means disconnected).
VANISH_FLOOR = 1e-8
#: ... on at least this fraction of the window's finite steps ...
VANISH_FRACTION = 0.9
#: ... and on at least this many steps.
VANISH_MIN_STEPS = 5

#: Fraction of a ReLU-family module's units that never fire on the sampled batch above
#: which ``dead_units`` is reported.
DEAD_FRACTION = 0.5
#: Distance to a sigmoid/tanh bound under which an output counts as saturated.
SATURATION_MARGIN = 1e-2
#: Fraction of saturated outputs above which ``saturating_activation`` is reported.
SATURATION_FRACTION = 0.5

#: Update/weight ratio per step: ~1e-3 is the usual healthy value (Karpathy, "A Recipe for
#: Training Neural Networks", 2019). Far above it the layer is rewritten every few steps.
UPDATE_RATIO_HIGH = 1e-1
#: Far below it the layer has effectively stopped learning.
UPDATE_RATIO_LOW = 1e-7

#: An LR that rises this many times from one step to the next is reported (warm-up and
#: schedules move it by a few % per step; a x10 jump is a bug or a config slip).
LR_JUMP_RATIO = 10.0

#: Origin names that are not modules.
INPUT_ORIGIN = "(input)"
LOSS_ORIGIN = "(loss)"


@dataclass(frozen=True)
class DetectorConfig:
    """Thresholds of the detectors (defaults: the module constants above).

    Example:
        >>> from gradguard.detectors import DetectorConfig
        >>> DetectorConfig(spike_z=8.0).grad_spike_ratio
        10.0
    """

    spike_z: float = SPIKE_Z
    loss_spike_ratio: float = LOSS_SPIKE_RATIO
    grad_spike_ratio: float = GRAD_SPIKE_RATIO
    spike_warmup: int = SPIKE_WARMUP
    spike_history: int = SPIKE_HISTORY
    spike_confirm: int = SPIKE_CONFIRM
    vanish_ratio: float = VANISH_RATIO
    vanish_floor: float = VANISH_FLOOR
    vanish_fraction: float = VANISH_FRACTION
    vanish_min_steps: int = VANISH_MIN_STEPS
    dead_fraction: float = DEAD_FRACTION
    saturation_fraction: float = SATURATION_FRACTION
    update_ratio_high: float = UPDATE_RATIO_HIGH
    update_ratio_low: float = UPDATE_RATIO_LOW
    lr_jump_ratio: float = LR_JUMP_RATIO
    #: ``divergence_risk`` thresholds (:mod:`gradguard.precursors`); None turns it off.
    precursors: PrecursorConfig | None = field(default_factory=PrecursorConfig)

    def __post_init__(self) -> None:
        if self.precursors is not None and not isinstance(self.precursors, PrecursorConfig):
            raise TypeError(f"DetectorConfig(precursors={self.precursors!r}): expected a "
                            "gradguard.precursors.PrecursorConfig or None")
        for name in ("spike_z", "loss_spike_ratio", "grad_spike_ratio", "vanish_ratio",
                     "vanish_floor", "update_ratio_high", "update_ratio_low", "lr_jump_ratio"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                raise ValueError(f"DetectorConfig({name}={v!r}): must be a finite number > 0")
        for name in ("spike_warmup", "spike_history", "spike_confirm", "vanish_min_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"DetectorConfig({name}={v!r}): must be an int >= 1")
        for name in ("vanish_fraction", "dead_fraction", "saturation_fraction"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0 < v <= 1):
                raise ValueError(f"DetectorConfig({name}={v!r}): must be in (0, 1]")


@dataclass
class DetectorState:
    """What the detectors remember between flushes: recent finite losses and norms.

    Host-side floats only, so that ranks that all-reduced the same window hold the same state.
    """

    history: int = SPIKE_HISTORY
    loss: deque[float] = field(default_factory=deque)
    grad: deque[float] = field(default_factory=deque)
    loss_run: int = 0  # consecutive spiking loss steps at the end of the last window
    loss_start: dict[str, float] | None = None  # the first step of that run
    precursors: PrecursorState = field(default_factory=PrecursorState)

    def __post_init__(self) -> None:
        self.loss = deque(self.loss, maxlen=self.history)
        self.grad = deque(self.grad, maxlen=self.history)

    def state_dict(self) -> dict[str, Any]:
        return {"loss": list(self.loss), "grad": list(self.grad), "loss_run": self.loss_run,
                "loss_start": self.loss_start, "precursors": self.precursors.state_dict()}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        self.loss = deque((float(x) for x in sd["loss"]), maxlen=self.history)
        self.grad = deque((float(x) for x in sd["grad"]), maxlen=self.history)
        self.loss_run = int(sd.get("loss_run", 0))
        self.loss_start = sd.get("loss_start")
        self.precursors = PrecursorState()
        self.precursors.load_state_dict(sd.get("precursors", {}))


class LrTracker:
    """Watches the learning rates the optimizer will use (host floats, read per step at no
    device cost) and reports a jump of ``ratio`` or more between consecutive steps as an
    ``lr_too_high`` event. Tensor learning rates (capturable optimizers) are not read.

    Example:
        >>> from gradguard.detectors import LrTracker
        >>> tr = LrTracker()
        >>> tr.observe(0, [{"lr": 1e-3}]); tr.observe(1, [{"lr": 0.1}])
        >>> [(e.kind, e.step, e.value) for e in tr.pop_events()]
        [('lr_too_high', 1, 100.0)]
    """

    def __init__(self, ratio: float = LR_JUMP_RATIO) -> None:
        self.ratio = ratio
        self._last: list[float | None] = []
        self._events: list[Event] = []

    def observe(self, step: int, param_groups: Sequence[Mapping[str, Any]]) -> None:
        now = [g["lr"] if isinstance(g.get("lr"), (int, float)) else None for g in param_groups]
        if len(now) == len(self._last):
            for i, (a, b) in enumerate(zip(self._last, now)):
                if a is not None and b is not None and a > 0 and b >= self.ratio * a:
                    self._events.append(Event(
                        kind="lr_too_high", step=step, severity="warning", value=b / a,
                        threshold=self.ratio,
                        message=(f"step {step}: learning rate of param group {i} jumped "
                                 f"{b / a:.3g}x ({a:.3g} -> {b:.3g})"),
                        remedy=("Check the LR schedule / manual LR changes; raise the LR "
                                "gradually (warm-up)."),
                        data={"group": i, "lr": b, "previous_lr": a},
                    ))
        self._last = now

    def pop_events(self) -> list[Event]:
        ev, self._events = self._events, []
        return ev


# ---- non-finite localisation ------------------------------------------------------------
def nonfinite_origin(
    layer_norms_row: torch.Tensor, layers: list[str]
) -> tuple[list[str], str | None]:
    """Layers with non-finite gradient norm in one step, and the *origin*: the non-finite
    layer nearest the loss (last in module order) with every layer after it finite.

    When every layer after the last non-finite one is finite, the gradient first went bad
    there during backward; when the last layer itself is non-finite the trouble came from
    the loss or the forward pass, and the origin is that last layer. Module (registration)
    order stands in for execution order.

    Example:
        >>> import math, torch
        >>> from gradguard.detectors import nonfinite_origin
        >>> nonfinite_origin(torch.tensor([math.nan, math.inf, 1.0]), ["a", "b", "c"])
        (['a', 'b'], 'b')
    """
    bad = [i for i, x in enumerate(layer_norms_row.tolist()) if not math.isfinite(x)]
    if not bad:
        return [], None
    return [layers[i] for i in bad], layers[bad[-1]]


@dataclass(frozen=True)
class ForwardOrigin:
    """The first thing whose forward output went non-finite in one step.

    Attributes:
        module: module path, or ``"(input)"`` when the batch itself held NaN/Inf.
        dtype: dtype of that output (``"torch.float16"`` points to a half overflow).
    """

    module: str
    dtype: str = ""


def _nonfinite_cause(
    loss: float, fwd: ForwardOrigin | None, watched: bool = True
) -> tuple[str | None, str | None, str]:
    """(cause, origin override, remedy) from the forward origin and the loss.

    ``watched`` says whether forward outputs were watched: only then does "no forward
    origin" prove that the activations were finite."""
    if fwd is not None and fwd.module == INPUT_ORIGIN:
        return "nonfinite_input", INPUT_ORIGIN, (
            "The batch contains NaN/Inf: clean or filter the data (torch.isfinite on inputs)."
        )
    if fwd is not None and fwd.dtype in ("torch.float16", "torch.bfloat16"):
        return "half_precision_overflow", fwd.module, (
            f"`{fwd.module}` overflows in {fwd.dtype.split('.')[-1]}: run it in float32, "
            "use bfloat16, or use torch.amp.GradScaler."
        )
    if fwd is not None:
        return None, fwd.module, (
            f"`{fwd.module}` produced NaN/Inf in the forward pass: guard its inputs "
            "(e.g. log(x.clamp_min(eps)), x / (y + eps)) or lower the learning rate."
        )
    if not math.isfinite(loss) and not watched:
        return None, LOSS_ORIGIN, (
            "The loss is NaN/Inf: check this step's batch for NaN/Inf and the loss for "
            "log(0) or x/0; Guard(watch_activations=True) names the first module that "
            "went non-finite."
        )
    if not math.isfinite(loss):
        return "nonfinite_loss", LOSS_ORIGIN, (
            "The loss is NaN/Inf on finite activations: guard log/div in the loss "
            "(clamp_min(eps)) or lower the learning rate."
        )
    return None, None, (
        "Check the inputs and loss of this step for NaN/Inf, lower the learning rate, and "
        "run gg.doctor(model, batch, loss_fn) to find the cause."
    )


def detect_nonfinite(
    window: Window,
    forward_origins: Mapping[int, ForwardOrigin] | None = None,
    amp_overflows: Mapping[int, float] | None = None,
) -> list[Event]:
    """A ``nonfinite_grad`` event per non-finite step, plus ``skip`` when it was skipped.

    Steps in ``amp_overflows`` (step -> loss scale; routine ``GradScaler`` overflows, see
    ``gradguard.guard.AMP_OVERFLOW_MIN_SCALE``) get one ``info`` ``skip`` event with
    ``data["reason"] == "loss_scale_overflow"`` instead.

    The event's ``layer`` is the origin: the first module whose forward output went
    NaN/Inf when ``forward_origins`` knows it (``Guard(watch_activations=True)``),
    ``"(input)"`` for a bad batch, ``"(loss)"`` for a non-finite loss on finite
    activations, else the gradient origin (:func:`nonfinite_origin`).
    """
    events: list[Event] = []
    total = window.total_norm.tolist()
    losses = window.loss.tolist()
    ln = None
    for i, step in enumerate(window.steps):
        if math.isfinite(total[i]):
            continue
        if amp_overflows and step in amp_overflows:
            scale = amp_overflows[step]
            events.append(Event(
                kind="skip", step=step, severity="info", value=scale,
                message=(f"step {step}: loss-scale overflow at scale {scale:g}; the GradScaler "
                         "skipped the step and lowers its scale (routine in mixed precision)"),
                data={"reason": "loss_scale_overflow", "scale": scale},
            ))
            continue
        if ln is None:
            ln = window.layer_norms()
        bad, grad_origin = nonfinite_origin(ln[i], window.layers)
        fwd = (forward_origins or {}).get(step)
        cause, origin, remedy = _nonfinite_cause(losses[i], fwd, forward_origins is not None)
        origin = origin or grad_origin
        kind = "NaN" if math.isnan(total[i]) else "Inf"
        where = {
            "nonfinite_input": "the input batch holds NaN/Inf",
            "nonfinite_loss": "the loss is non-finite",
            "half_precision_overflow": f"`{origin}` overflowed in half precision",
        }.get(cause or "", f"origin `{origin}`")
        data: dict[str, Any] = {"layers": bad, "grad_origin": grad_origin}
        if cause is not None:
            data["cause"] = cause
        if fwd is not None:
            data["forward_origin"] = fwd.module
        events.append(
            Event(
                kind="nonfinite_grad",
                step=step,
                severity="error",
                message=(
                    f"step {step}: gradient norm is {kind}; {where}"
                    f" ({len(bad)} of {len(window.layers)} layers non-finite)"
                ),
                layer=origin,
                value=total[i],
                remedy=remedy,
                data=data,
            )
        )
        if bool(window.skipped[i]):
            events.append(
                Event(
                    kind="skip",
                    step=step,
                    severity="warning",
                    message=f"step {step}: optimizer step skipped (non-finite gradients)",
                    layer=origin,
                    value=total[i],
                )
            )
    return events


# ---- spikes ---------------------------------------------------------------------------
def robust_z(value: float, history: Sequence[float]) -> tuple[float, float]:
    """``(z, median)`` of ``value`` against ``history`` in log space (positive values),
    with the MAD scale floored at :data:`MIN_LOG_SCALE`; raw space if anything is <= 0.

    Example:
        >>> from gradguard.detectors import robust_z
        >>> z, med = robust_z(100.0, [1.0, 1.1, 0.9, 1.0, 1.05])
        >>> round(med, 3), z > 6
        (1.0, True)
    """
    med = statistics.median(history)
    if value > 0 and min(history) > 0:
        logs = [math.log(h) for h in history]
        lmed = math.log(med) if len(history) % 2 else statistics.median(logs)
        mad = statistics.median(abs(x - lmed) for x in logs)
        scale = max(MAD_TO_SIGMA * mad, MIN_LOG_SCALE)
        return (math.log(value) - lmed) / scale, med
    mad = statistics.median(abs(x - med) for x in history)
    scale = max(MAD_TO_SIGMA * mad, MIN_LOG_SCALE * max(abs(med), 1e-12))
    return (value - med) / scale, med


def _is_spike(value: float, z: float, med: float, z_thresh: float, ratio: float) -> bool:
    if med > 0:
        return z > z_thresh and value > ratio * med
    return z > z_thresh and value - med > (ratio - 1.0) * max(abs(med), 1e-12)


def detect_spikes(
    window: Window, state: DetectorState, config: DetectorConfig = DetectorConfig()
) -> list[Event]:
    """``loss_spike`` and ``grad_spike`` events: a robust z-score of each finite value
    against the recent finite history (median/MAD in log space), above ``spike_z`` and at
    least ``*_spike_ratio`` times the median, after ``spike_warmup`` values. Updates
    ``state``. Consecutive spiking steps make one event (at the first of them) whose
    ``data["run"]`` counts them. A loss spike is reported only once *confirmed*, i.e. it
    lasted ``spike_confirm`` steps: single-batch outliers of a healthy heavy-tailed loss
    are not trouble (a run that goes on into the next window gets a ``continued`` event).
    """
    events: list[Event] = []
    losses = window.loss.tolist()
    norms = window.total_norm.tolist()
    ln = None
    run_event: Event | None = None
    grad_event: Event | None = None
    for i, step in enumerate(window.steps):
        g = norms[i]
        g_spiking = False
        if math.isfinite(g):
            if len(state.grad) >= config.spike_warmup:
                z, med = robust_z(g, state.grad)
                g_spiking = _is_spike(g, z, med, config.spike_z, config.grad_spike_ratio)
                if g_spiking and grad_event is not None:
                    grad_event.data["run"] += 1
                    grad_event.data["max"] = max(grad_event.data["max"], g)
                elif g_spiking:
                    if ln is None:
                        ln = window.layer_norms()
                    layers = _spiking_layers(ln, i, window.layers)
                    grad_event = Event(
                        kind="grad_spike",
                        step=step,
                        severity="warning",
                        message=(
                            f"step {step}: gradient norm {g:.3g} is {g / med:.3g}x the "
                            f"recent median {med:.3g} (robust z={z:.1f}); largest jump "
                            f"in `{layers[0]}`"
                        ),
                        layer=layers[0],
                        value=g,
                        threshold=config.grad_spike_ratio * med,
                        remedy=(
                            "Clip gradients (gg.ZClip() adapts to the run), check this "
                            "step's batch for outliers, or lower the learning rate."
                        ),
                        data={"median": med, "z": z, "layers": layers, "run": 1, "max": g},
                    )
                    events.append(grad_event)
            state.grad.append(g)
        if not g_spiking:
            grad_event = None
        loss = losses[i]
        spiking = False
        if math.isfinite(loss):
            if len(state.loss) >= config.spike_warmup:
                z, med = robust_z(loss, state.loss)
                spiking = _is_spike(loss, z, med, config.spike_z, config.loss_spike_ratio)
                if spiking:
                    state.loss_run += 1
                    if state.loss_run == 1:
                        state.loss_start = {"step": step, "loss": loss, "median": med, "z": z}
                    if run_event is None and state.loss_run >= config.spike_confirm:
                        start = state.loss_start or {"step": step, "loss": loss,
                                                     "median": med, "z": z}
                        emitted_before = state.loss_run > config.spike_confirm
                        run_event = _loss_spike_event(
                            step if emitted_before else int(start["step"]), start, config,
                            continued=emitted_before)
                        events.append(run_event)
                    if run_event is not None:
                        run_event.data["run"] = state.loss_run
            state.loss.append(loss)
        if not spiking:
            state.loss_run = 0
            state.loss_start = None
            run_event = None
    return events


def _loss_spike_event(
    step: int, start: Mapping[str, float], config: DetectorConfig, *, continued: bool
) -> Event:
    loss, med, z = start["loss"], start["median"], start["z"]
    ratio = loss / med if med else math.inf
    return Event(
        kind="loss_spike",
        step=step,
        severity="warning",
        message=(
            f"step {step}: loss {'still ' if continued else ''}spiking since step "
            f"{int(start['step'])}: {loss:.4g} is {ratio:.3g}x the recent median {med:.4g} "
            f"(robust z={z:.1f})"
        ),
        value=loss,
        threshold=config.loss_spike_ratio * med,
        remedy="Lower the learning rate or add warm-up; if it follows one batch, inspect it.",
        data={"median": med, "z": z, "run": 0, "since": int(start["step"]),
              "continued": continued},
    )


def _spiking_layers(ln: torch.Tensor, i: int, layers: Sequence[str]) -> list[str]:
    """Up to 3 layers, ordered by how far step ``i``'s norm is above the layer's median."""
    med = ln.nanmedian(dim=0).values.clamp_min(1e-30)
    ratio = (ln[i] / med).nan_to_num(nan=0.0)
    order = torch.argsort(ratio, descending=True).tolist()
    return [layers[int(k)] for k in order[:3]]


# ---- vanishing ------------------------------------------------------------------------
def detect_vanishing(window: Window, config: DetectorConfig = DetectorConfig()) -> list[Event]:
    """``vanishing_grad``: layers whose gradient norm stays ``vanish_ratio`` below the
    largest norm of the layers after them (or below ``vanish_floor``) over the window."""
    ln = window.layer_norms()
    rows = torch.isfinite(ln).all(dim=1)
    if int(rows.sum()) < config.vanish_min_steps or ln.shape[1] < 2:
        return []
    ok = ln[rows].double()
    # largest norm among the layers after each layer (closer to the loss)
    later = torch.flip(torch.cummax(torch.flip(ok, [1]), dim=1).values, [1])
    later = torch.cat([later[:, 1:], torch.zeros_like(later[:, :1])], dim=1)
    ratio = ok / later.clamp_min(1e-300)
    vanish = (ok > 0) & (later > 0) & ((ratio < config.vanish_ratio) | (ok < config.vanish_floor))
    frac = vanish.double().mean(dim=0).tolist()
    med_ratio = ratio.median(dim=0).values.tolist()
    med_norm = ok.median(dim=0).values.tolist()
    hit = [j for j, f in enumerate(frac) if f >= config.vanish_fraction]
    if not hit:
        return []
    first = hit[0]
    names = [window.layers[j] for j in hit]
    step = window.steps[-1]
    return [
        Event(
            kind="vanishing_grad",
            step=step,
            severity="warning",
            message=(
                f"steps {window.steps[0]}-{step}: gradients vanish in {len(hit)} early "
                f"layer(s) starting at `{names[0]}`: its norm {med_norm[first]:.2g} is "
                f"{med_ratio[first]:.1e} of the layers after it"
            ),
            layer=names[0],
            value=med_ratio[first],
            threshold=config.vanish_ratio,
            remedy=(
                "Use ReLU-family activations with He init, add normalisation or residual "
                "connections, or use an LSTM/GRU for long sequences."
            ),
            data={"layers": names, "ratio": [med_ratio[j] for j in hit],
                  "grad_norm": [med_norm[j] for j in hit]},
        )
    ]


# ---- sampled at flush steps -------------------------------------------------------------
def detect_update_ratio(window: Window, config: DetectorConfig = DetectorConfig()) -> list[Event]:
    """``update_ratio``: per-layer ``|update| / |weight|`` at the flush step far above
    (``warning``) or far below (``info``) the healthy ~1e-3."""
    w, u = window.layer_weight_norms(), window.layer_update_norms()
    if w is None or u is None:
        return []
    events: list[Event] = []
    step = window.steps[-1]
    for name, wn, un in zip(window.layers, w.tolist(), u.tolist()):
        if not (math.isfinite(wn) and math.isfinite(un)) or wn <= 0 or un <= 0:
            continue  # a skipped step does not update: nothing to judge
        r = un / wn
        if r > config.update_ratio_high:
            events.append(Event(
                kind="update_ratio", step=step, severity="warning", layer=name, value=r,
                threshold=config.update_ratio_high,
                message=f"step {step}: `{name}` update/weight ratio {r:.2g} (healthy ~1e-3)",
                remedy="Lower the learning rate (or this layer's) until the ratio is ~1e-3.",
            ))
        elif r < config.update_ratio_low:
            events.append(Event(
                kind="update_ratio", step=step, severity="info", layer=name, value=r,
                threshold=config.update_ratio_low,
                message=f"step {step}: `{name}` barely changes: update/weight ratio {r:.2g}",
                remedy="Raise the learning rate or check that this layer receives gradient.",
            ))
    return events


def detect_activations(
    step: int, activations: Mapping[str, Mapping[str, float]],
    config: DetectorConfig = DetectorConfig(),
) -> list[Event]:
    """``dead_units`` / ``saturating_activation`` from activation samples
    (``{module: {"dead": fraction}}`` or ``{module: {"saturated": fraction}}``)."""
    events: list[Event] = []
    for name, sample in activations.items():
        dead = sample.get("dead")
        if dead is not None and dead >= config.dead_fraction:
            events.append(Event(
                kind="dead_units", step=step, severity="warning", layer=name, value=dead,
                threshold=config.dead_fraction,
                message=(f"step {step}: {dead:.0%} of `{name}`'s units never activate on "
                         "the sampled batch"),
                remedy=("Lower the learning rate, use He init, or use LeakyReLU/GELU so "
                        "units can recover."),
            ))
        sat = sample.get("saturated")
        if sat is not None and sat >= config.saturation_fraction:
            events.append(Event(
                kind="saturating_activation", step=step, severity="warning", layer=name,
                value=sat, threshold=config.saturation_fraction,
                message=(f"step {step}: {sat:.0%} of `{name}`'s outputs sit within "
                         f"{SATURATION_MARGIN:g} of the activation's bounds"),
                remedy=("Use Xavier init and normalised inputs, add normalisation before "
                        "the activation, or switch to ReLU-family activations."),
            ))
    return events


def detect(
    window: Window,
    *,
    state: DetectorState | None = None,
    config: DetectorConfig | None = None,
    forward_origins: Mapping[int, ForwardOrigin] | None = None,
    activations: Mapping[str, Mapping[str, float]] | None = None,
    lr_events: Sequence[Event] = (),
    amp_overflows: Mapping[int, float] | None = None,
    precursor_inputs: PrecursorInputs | None = None,
) -> list[Event]:
    """Run every detector over a window, in step order.

    Args:
        window: the flushed telemetry window.
        state: spike history carried between flushes (None: judge this window alone).
        config: thresholds (None: the named defaults).
        forward_origins: step -> first non-finite forward output (from
            ``Guard(watch_activations=True)``).
        activations: activation samples of the flush step (``Guard(sample_activations=True)``).
        lr_events: events from an :class:`LrTracker` since the last flush.
        amp_overflows: steps that were routine loss-scale overflows -> their scale.
        precursor_inputs: what ``divergence_risk`` reads besides the window (the watch's
            logits, the optimizer's LR, the flush interval).
    """
    cfg = config or DetectorConfig()
    st = state if state is not None else DetectorState(history=cfg.spike_history)
    events = detect_nonfinite(window, forward_origins, amp_overflows)
    events += detect_spikes(window, st, cfg)
    events += detect_vanishing(window, cfg)
    events += detect_update_ratio(window, cfg)
    events += list(lr_events)
    if activations:
        events += detect_activations(window.steps[-1], activations, cfg)
    if cfg.precursors is not None:
        events += detect_precursors(window, st.precursors, cfg.precursors,
                                    precursor_inputs or PrecursorInputs())
    events.sort(key=lambda e: e.step)
    return events
