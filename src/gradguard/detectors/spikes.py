"""Loss and gradient-norm spikes: robust z-scores against the recent finite history."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

import torch

from .._running import OFFSCALE_RATIO
from ..events import UNIT_ERROR_REMEDY, Event
from ..telemetry import Window
from .config import DEFAULT_CONFIG, MAD_TO_SIGMA, MIN_LOG_SCALE, DetectorConfig, DetectorState

# ---- spikes ---------------------------------------------------------------------------
#: A run of spiking losses is confirmed once chance gives a run that long at most this
#: share of the steps, from batches spiking at the rate the recent losses show
#: (:func:`confirm_length`) ...
CHANCE_RUN = 1e-4
#: ... and by this many steps in a row at the latest.
MAX_CONFIRM = 8


def robust_z(value: float, history: Sequence[float]) -> tuple[float, float]:
    """``(z, median)`` of ``value`` against ``history`` in log space (positive values),
    with the MAD scale floored at :data:`MIN_LOG_SCALE`; raw space if anything is <= 0.

    Example:
        >>> from gradguard.detectors import robust_z
        >>> z, med = robust_z(100.0, [1.0, 1.1, 0.9, 1.0, 1.05])
        >>> round(med, 3), z > 6
        (1.0, True)
    """
    med, center, scale, logs = _center_scale(history)
    if logs and value > 0:
        return (math.log(value) - center) / scale, med
    if logs:  # a value <= 0 against positive history: raw space
        med, center, scale, _ = _center_scale(history, raw=True)
    return (value - center) / scale, med


def _center_scale(history: Sequence[float], raw: bool = False
                  ) -> tuple[float, float, float, bool]:
    """``(median, center, scale, in_logs)`` of :func:`robust_z`: in log space when every
    value is positive (and not ``raw``), else raw."""
    med = statistics.median(history)
    if not raw and min(history) > 0:
        logs = [math.log(h) for h in history]
        lmed = math.log(med) if len(history) % 2 else statistics.median(logs)
        mad = statistics.median(abs(x - lmed) for x in logs)
        return med, lmed, max(MAD_TO_SIGMA * mad, MIN_LOG_SCALE), True
    mad = statistics.median(abs(x - med) for x in history)
    return med, med, max(MAD_TO_SIGMA * mad, MIN_LOG_SCALE * max(abs(med), 1e-12)), False


def confirm_length(history: Sequence[float], config: DetectorConfig = DEFAULT_CONFIG,
                   run: int = 0) -> tuple[int, float]:
    """``(steps, share)``: how many spiking losses in a row confirm a loss spike, and the
    share of ``history`` (the recent finite losses, of which the last ``run`` are the
    spiking run to be judged, left out) that spikes against it.

    One bad batch is no diverging run, and neither is a run of bad batches as long as the
    run's own data gives by chance: where single batches spike on a share ``p`` of the
    steps (heavy-tailed data: a regression whose targets hold 2% gross outliers spikes on
    14% of its batches of 16), ``k`` of them in a row come ``p**k`` of the steps. A run is
    confirmed at ``spike_confirm`` steps, or at the shortest length that chance gives at
    most :data:`CHANCE_RUN` of the steps (at most :data:`MAX_CONFIRM`): 2 up to ``p`` = 1%,
    5 at 14%. Wrecked weights keep spiking, and are confirmed a few steps later.

    Example:
        >>> from gradguard.detectors.spikes import confirm_length
        >>> calm = [1.0 + 0.01 * (i % 7) for i in range(100)]
        >>> confirm_length(calm)
        (2, 0.0)
        >>> heavy = [50.0 if i % 7 == 0 else v for i, v in enumerate(calm)]
        >>> n, share = confirm_length(heavy); n, round(share, 2)
        (5, 0.15)
    """
    values = list(history)
    values = values[:len(values) - run] if run > 0 else values
    if len(values) < max(config.spike_warmup, 1):
        return config.spike_confirm, 0.0
    med, center, scale, logs = _center_scale(values)
    hits = sum(_is_spike(v, ((math.log(v) if logs else v) - center) / scale, med,
                         config.spike_z, config.loss_spike_ratio) for v in values)
    share = hits / len(values)
    need = config.spike_confirm
    if share > 0:
        need = max(need, min(MAX_CONFIRM, math.ceil(math.log(CHANCE_RUN) / math.log(share))))
    return need, share


def _is_spike(value: float, z: float, med: float, z_thresh: float, ratio: float) -> bool:
    if med == 0.0:
        # a history mostly of exact zeros has no scale to be above: a hinge loss fit to 0,
        # whose batches break the margin now and then (found by a regression hunt: a
        # healthy linear SVM got a grad_spike warning at each)
        return False
    if med > 0:
        return z > z_thresh and value > ratio * med
    return z > z_thresh and value - med > (ratio - 1.0) * max(abs(med), 1e-12)


def detect_spikes(
    window: Window, state: DetectorState, config: DetectorConfig = DEFAULT_CONFIG
) -> list[Event]:
    """``loss_spike`` and ``grad_spike`` events: a robust z-score of each finite value
    against the recent finite history (median/MAD in log space), above ``spike_z`` and at
    least ``*_spike_ratio`` times the median, after ``spike_warmup`` values. Updates
    ``state``. Consecutive spiking steps make one event (at the first of them) whose
    ``data["run"]`` counts them. A loss spike is reported only once *confirmed*, i.e. it
    lasted ``spike_confirm`` steps: single-batch outliers of a healthy heavy-tailed loss
    are not trouble (a run that goes on into the next window gets a ``continued`` event).
    A one-step gradient spike that the clip policy clipped, under ``grad_spike_warn_ratio``
    times the median, is ``info``: heavy-tailed healthy norms have such outliers, and the
    policy handled it; lasting two steps, unclipped or larger, it is a warning. One under
    that ratio is info too at a step whose loss is below its recent median (:func:`_loss_falls`):
    a norm that jumps while the loss falls is a network leaving a plateau.
    """
    events: list[Event] = []
    losses = window.loss.tolist()
    norms = window.total_norm.tolist()
    coefs = window.clip_coef.tolist()
    ln = None
    run_event: Event | None = None
    grad_event: Event | None = None
    need: int | None = None  # the run length that confirms (:func:`confirm_length`)
    share = 0.0
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
                    if not (g < config.grad_spike_warn_ratio * med
                            and _loss_falls(losses[i], state.loss)):
                        grad_event.severity = "warning"  # it lasted: no outlier
                elif g_spiking:
                    if ln is None:
                        ln = window.layer_norms()
                    layers = _spiking_layers(ln, i, window.layers)
                    c = coefs[i]
                    small = g < config.grad_spike_warn_ratio * med
                    clipped = math.isfinite(c) and c < 1.0 and small
                    falls = not clipped and small and _loss_falls(losses[i], state.loss)
                    handled = clipped or falls
                    grad_event = Event(
                        kind="grad_spike",
                        step=step,
                        severity="info" if handled else "warning",
                        message=(
                            f"step {step}: gradient norm {g:.3g} is {_above(g, med, 3)} "
                            f"(robust z={z:.1f}); largest jump "
                            f"in `{layers[0]}`" + ("; clipped" if clipped else "")
                            + ("; the loss fell at it" if falls else "")
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
                    if run_event is None and state.loss_run >= config.spike_confirm \
                            and need is None:
                        # once a window; the run's earlier steps are in the history
                        need, share = confirm_length(state.loss, config, state.loss_run - 1)
                    if run_event is None and need is not None and state.loss_run >= need:
                        start = state.loss_start or {"step": step, "loss": loss,
                                                     "median": med, "z": z}
                        emitted_before = state.loss_run > need
                        run_event = _loss_spike_event(
                            step if emitted_before else int(start["step"]), start, config,
                            continued=emitted_before, confirm=(need, share),
                            now={"loss": loss, "median": med, "z": z})
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
    step: int, start: Mapping[str, float], config: DetectorConfig, *, continued: bool,
    confirm: tuple[int, float] | None = None, now: Mapping[str, float] | None = None,
) -> Event:
    """``now``: the loss at ``step`` of a run still spiking, quoted beside where it began
    (found by a stranger: "still spiking" messages kept quoting the first spike's 6.86 while
    the loss went to 200 and more)."""
    loss, med, z = start["loss"], start["median"], start["z"]
    need, share = confirm if confirm is not None else (config.spike_confirm, 0.0)
    why = "" if need <= config.spike_confirm else (
        f"; {need} steps in a row, as single batches spike on {share:.0%} of the recent ones")
    if continued and now is not None:
        first = f"{loss:.4g} at step {int(start['step'])}"
        loss, med, z = now["loss"], now["median"], now["z"]
        said = (f"step {step}: loss still spiking since step {int(start['step'])} ({first}): "
                f"{loss:.4g} is {_above(loss, med, 4)} (robust z={z:.1f}){why}")
    else:
        said = (f"step {step}: loss {'still ' if continued else ''}spiking since step "
                f"{int(start['step'])}: {loss:.4g} is {_above(loss, med, 4)} (robust "
                f"z={z:.1f}){why}")
    return Event(
        kind="loss_spike",
        step=step,
        severity="warning",
        message=said,
        value=loss,
        threshold=config.loss_spike_ratio * med,
        remedy="Lower the learning rate or add warm-up; if it follows one batch, inspect it.",
        data={"median": med, "z": z, "run": 0, "since": int(start["step"]),
              "continued": continued, "confirm": need, "share": share},
    )


def _loss_falls(loss: float, history: Sequence[float]) -> bool:
    """Whether a step's loss is below the median of the recent losses: a gradient
    norm that jumps while the loss falls is a network leaving a plateau, no trouble (found
    by a stranger: a healthy digits CNN on SGD with Nesterov, its norm 13-19x its plateau's
    median at steps 66-75 as the loss fell from 1.5 to 0.6, got warning-level spikes)."""
    if not math.isfinite(loss) or len(history) < 2:
        return False
    return loss < statistics.median(history)


def _above(value: float, med: float, digits: int) -> str:
    """How far ``value`` is above the recent median: a ratio on a positive median; a
    difference on a median of zero (a gradient that was exactly zero: a converged or
    disconnected model) or below (a loss that can be negative)."""
    if med > 0:
        return f"{value / med:.3g}x the recent median {med:.{digits}g}"
    return f"{value - med:.{digits}g} above the recent median {med:.{digits}g}"


def _spiking_layers(ln: torch.Tensor, i: int, layers: Sequence[str]) -> list[str]:
    """Up to 3 layers, ordered by how far step ``i``'s norm is above the layer's median."""
    med = ln.nanmedian(dim=0).values.clamp_min(1e-30)
    ratio = (ln[i] / med).nan_to_num(nan=0.0)
    order = torch.argsort(ratio, descending=True).tolist()
    return [layers[int(k)] for k in order[:3]]


def _offscale_skip(step: int, norm: float, loss: float, code: int) -> Event:
    if code & 32:  # gradguard.recovery.verdict.RUNNING_NAN
        return Event(
            kind="skip", step=step, severity="warning", value=norm,
            message=(f"step {step}: optimizer step skipped: a forward since the last step "
                     "turned a batch norm layer's running statistics NaN/Inf (a batch with "
                     "NaN/Inf, whose loss the loop may have skipped before backward): they "
                     "are put back to the step before's, and this step's update with them"),
            remedy=("Check the batches before this step for NaN/Inf (torch.isfinite on the "
                    "inputs): a loop that skips a non-finite loss has run its forward, and a "
                    "batch norm layer has learnt from it already."),
            data={"reason": "nonfinite_running_stats", "cause": "nonfinite_input",
                  "code": code, "loss": loss if math.isfinite(loss) else None},
        )
    return Event(
        kind="skip", step=step, severity="warning", value=norm, threshold=OFFSCALE_RATIO,
        message=(f"step {step}: optimizer step skipped: its batch multiplied a batch norm "
                 f"layer's running variance by more than {OFFSCALE_RATIO:g} in one step (loss "
                 f"{loss:.4g}, gradient norm {norm:.3g}: the layer divided the scale out), "
                 "so its inputs are on another scale; the weights and the running "
                 "statistics never saw it"),
        remedy=UNIT_ERROR_REMEDY,
        data={"reason": "offscale_batch", "cause": "unscaled_input", "code": code,
              "loss": loss if math.isfinite(loss) else None},
    )


def detect_spike_skips(window: Window) -> list[Event]:
    """A ``skip`` event (warning) for every step the recovery ladder skipped at the step
    because its gradient norm or loss spiked (``window.skip_codes`` bits 2 and 4, see
    :mod:`gradguard.recovery.verdict`), or because its batch moved a batch norm layer's
    running variance from another scale (bit 16): the spike never reached the weights; an ``info``
    one for a step whose update was voided by a restore after its backward (bit 8,
    :data:`gradguard.executors.STALE`)."""
    if window.skip_codes is None:
        return []
    events = []
    codes = window.skip_codes.tolist()
    norms, losses = window.total_norm.tolist(), window.loss.tolist()
    for step, c, g, loss in zip(window.steps, codes, norms, losses):
        c = int(c) if math.isfinite(c) else 0
        if c & 8:  # gradguard.executors.STALE: voided by a rollback, not a spike
            events.append(Event(
                kind="skip", step=step, severity="info", value=g,
                message=(f"step {step}: update not applied: the weights were restored after "
                         "its backward (a rollback, or the LR probe forking its trial), and "
                         "its gradients belong to the weights replaced"),
                data={"reason": "rolled_back", "code": c},
            ))
            continue
        what = [w for bit, w in ((2, "gradient norm"), (4, "loss")) if c & bit]
        if c & 16 and not what:  # gradguard.recovery.verdict.OFFSCALE
            events.append(_offscale_skip(step, g, loss, c))
            continue
        if not what:
            continue
        events.append(Event(
            kind="skip", step=step, severity="warning", value=g,
            message=(f"step {step}: optimizer step skipped: the {' and the '.join(what)} "
                     f"spiked (norm {g:.3g}, loss {loss:.4g}); the weights never saw it"),
            remedy=("Repeated spikes mean the learning rate is too high for this model; the "
                    "ladder backs it off."),
            data={"reason": "_and_".join(w.replace("gradient norm", "grad").replace(" ", "_")
                                         for w in what) + "_spike", "code": c},
        ))
    return events
