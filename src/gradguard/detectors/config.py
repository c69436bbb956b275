"""Detector thresholds (named defaults with the reason that chose them) and the small state
the detectors carry between flushes."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..precursors import PrecursorConfig, PrecursorState

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
#: A gradient spike of one step that the clip policy clipped is ``info`` below this many
#: times the median (the policy handled it: healthy norms are heavy-tailed, x14 late in a
#: healthy MLP run of benchmarks/quality.py); at or above it, as when the per-step verdict
#: skips (recovery.verdict.STEP_GRAD_RATIO), or lasting two steps, or unclipped: a warning.
GRAD_SPIKE_WARN_RATIO = 50.0
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
#: A layer's gradient norm below this share of the largest layer norm of its step is
#: numerically nothing: the underflow of a signal that vanished on its way there (1e-19 of
#: it in the last block of a ``transformers`` EfficientNet that never learns), no sign that
#: the layer had a gradient, and its falling to exactly zero is no death of its units.
NEGLIGIBLE = 1e-12
#: ... on at least this fraction of the window's finite steps ...
VANISH_FRACTION = 0.9
#: ... and on at least this many steps.
VANISH_MIN_STEPS = 5
#: A layer still learns, and is not vanishing, when its update/weight ratio at the flush
#: step is at least this share of the largest ratio of the layers after it (an adaptive
#: optimizer makes up for a small gradient).
VANISH_LEARNS = 0.01
#: A layer that had a gradient and has had exactly none for this many taken steps in a row
#: died (``disconnected_layer``, a warning): a task head that takes turns with others in
#: shorter stretches, LayerDrop, an expert a few batches did not route to, is not dead;
#: steps whose graph did not reach it (no gradient tensor, ``Window.grad_absent``) count
#: neither way.
DIED_STEPS = 50

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
#: An LR below this fraction of the highest the run has had or planned is a schedule's
#: tail (cosine to zero) or the recovery ladder's back-off: every layer barely changes
#: there, by design, and no layer is reported for it.
ANNEALED_LR = 0.05
#: A high update ratio is a ``warning`` only from this many steps into the run on (the
#: first flush at the default ``every``): judged on the 20 losses of a guard flushing
#: every ten steps, a healthy tanh RNN at SGD lr 3 (clipped) warned at step 19 on four of
#: five seeds of benchmarks/rescue.py; by step 49 its loss is falling.
UPDATE_RATIO_HISTORY = 50

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
    grad_spike_warn_ratio: float = GRAD_SPIKE_WARN_RATIO
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
        for name in ("spike_z", "loss_spike_ratio", "grad_spike_ratio", "grad_spike_warn_ratio",
                     "vanish_ratio",
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
    no_gradient: bool = False  # an all-zero-gradient stretch was reported and goes on
    precursors: PrecursorState = field(default_factory=PrecursorState)
    silent_layers: list[str] = field(default_factory=list)  # reported as disconnected
    grad_layers: list[str] = field(default_factory=list)  # have had a gradient (not zero)
    silent_run: dict[str, int] = field(default_factory=dict)  # of those: steps since their last
    capped: bool = False  # norms capped before the guard measured them were reported
    had_loss: bool = False  # a finite loss above 0 was seen (a loss of 0 since is a fit)

    def __post_init__(self) -> None:
        self.loss = deque(self.loss, maxlen=self.history)
        self.grad = deque(self.grad, maxlen=self.history)

    def spike_history(self) -> dict[str, list[float]]:
        """The recent finite losses and norms the spike tests judge against (a snapshot
        keeps them with the weights they led to)."""
        return {"loss": list(self.loss), "grad": list(self.grad)}

    def restart(self, history: Mapping[str, Sequence[float]] | None = None) -> None:
        """Judge spikes against ``history`` (:meth:`spike_history` of weights restored;
        None: none, they are learnt again) from here; a spike under way ends."""
        self.loss = deque((history or {}).get("loss", ()), maxlen=self.history)
        self.grad = deque((history or {}).get("grad", ()), maxlen=self.history)
        self.loss_run, self.loss_start = 0, None

    def state_dict(self) -> dict[str, Any]:
        return {"loss": list(self.loss), "grad": list(self.grad), "loss_run": self.loss_run,
                "loss_start": self.loss_start, "no_gradient": self.no_gradient,
                "silent_layers": list(self.silent_layers),
                "grad_layers": list(self.grad_layers), "silent_run": dict(self.silent_run),
                "had_loss": self.had_loss, "precursors": self.precursors.state_dict()}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        self.loss = deque((float(x) for x in sd["loss"]), maxlen=self.history)
        self.grad = deque((float(x) for x in sd["grad"]), maxlen=self.history)
        self.loss_run = int(sd.get("loss_run", 0))
        self.loss_start = sd.get("loss_start")
        self.no_gradient = bool(sd.get("no_gradient", False))
        self.silent_layers = list(sd.get("silent_layers", []))
        self.grad_layers = list(sd.get("grad_layers", []))
        self.silent_run = {str(k): int(v) for k, v in dict(sd.get("silent_run", {})).items()}
        self.had_loss = bool(sd.get("had_loss", True))  # older checkpoints: assume it
        self.precursors = PrecursorState()
        self.precursors.load_state_dict(sd.get("precursors", {}))


#: The default thresholds (a frozen instance, shared).
DEFAULT_CONFIG = DetectorConfig()
