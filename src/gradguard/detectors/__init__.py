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

from collections.abc import Mapping, Sequence

from ..events import Event
from ..precursors import PrecursorInputs, detect_precursors
from ..telemetry import Window
from .capped import detect_capped
from .config import (  # the named defaults are part of the public surface
    DEAD_FRACTION,
    DEFAULT_CONFIG,
    GRAD_SPIKE_RATIO,
    INPUT_ORIGIN,
    LOSS_ORIGIN,
    LOSS_SPIKE_RATIO,
    LR_JUMP_RATIO,
    MAD_TO_SIGMA,
    MIN_LOG_SCALE,
    SATURATION_FRACTION,
    SATURATION_MARGIN,
    SPIKE_CONFIRM,
    SPIKE_HISTORY,
    SPIKE_WARMUP,
    SPIKE_Z,
    UPDATE_RATIO_HIGH,
    UPDATE_RATIO_LOW,
    VANISH_FLOOR,
    VANISH_FRACTION,
    VANISH_MIN_STEPS,
    VANISH_RATIO,
    DetectorConfig,
    DetectorState,
)
from .layers import detect_activations, detect_update_ratio, detect_vanishing
from .lr import LrTracker
from .nonfinite import ForwardOrigin, detect_nonfinite, detect_untrained_loss, nonfinite_origin
from .silent import detect_no_gradient
from .spikes import detect_spike_skips, detect_spikes, robust_z


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
    lr_annealed: bool = False,
    bad_weights: Mapping[int, Sequence[str]] | None = None,
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
        lr_annealed: the LR is a schedule's tail (:meth:`LrTracker.annealed`): no layer
            is reported for barely changing.
    """
    cfg = config or DetectorConfig()
    st = state if state is not None else DetectorState(history=cfg.spike_history)
    events = detect_nonfinite(window, forward_origins, amp_overflows, bad_weights)
    events += detect_untrained_loss(window)
    events += detect_spikes(window, st, cfg)
    events += detect_spike_skips(window)
    events += detect_vanishing(window, cfg)
    events += detect_no_gradient(window, st, cfg)
    events += detect_capped(window, st)
    optim = precursor_inputs.optim if precursor_inputs is not None else None
    events += detect_update_ratio(window, cfg, st.loss, annealed=lr_annealed,
                                  decay=(optim or {}).get("decay"))
    events += list(lr_events)
    if activations:
        events += detect_activations(window.steps[-1], activations, cfg)
    if cfg.precursors is not None:
        events += detect_precursors(window, st.precursors, cfg.precursors,
                                    precursor_inputs or PrecursorInputs())
    events.sort(key=lambda e: e.step)
    return events


__all__ = [
    "DEAD_FRACTION",
    "DEFAULT_CONFIG",
    "GRAD_SPIKE_RATIO",
    "INPUT_ORIGIN",
    "LOSS_ORIGIN",
    "LOSS_SPIKE_RATIO",
    "LR_JUMP_RATIO",
    "MAD_TO_SIGMA",
    "MIN_LOG_SCALE",
    "SATURATION_FRACTION",
    "SATURATION_MARGIN",
    "SPIKE_CONFIRM",
    "SPIKE_HISTORY",
    "SPIKE_WARMUP",
    "SPIKE_Z",
    "UPDATE_RATIO_HIGH",
    "UPDATE_RATIO_LOW",
    "VANISH_FLOOR",
    "VANISH_FRACTION",
    "VANISH_MIN_STEPS",
    "VANISH_RATIO",
    "DetectorConfig",
    "DetectorState",
    "ForwardOrigin",
    "LrTracker",
    "detect",
    "detect_activations",
    "detect_capped",
    "detect_no_gradient",
    "detect_nonfinite",
    "detect_spike_skips",
    "detect_spikes",
    "detect_untrained_loss",
    "detect_update_ratio",
    "detect_vanishing",
    "nonfinite_origin",
    "robust_z",
]
