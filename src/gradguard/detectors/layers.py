"""Per-layer health: vanishing gradients, update/weight ratios, saturated units (layers
without a gradient: :mod:`.silent`)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..events import Event
from ..telemetry import Window
from .config import (
    DEFAULT_CONFIG,
    SATURATION_MARGIN,
    UPDATE_RATIO_HISTORY,
    VANISH_LEARNS,
    DetectorConfig,
)


# ---- vanishing ------------------------------------------------------------------------
def detect_vanishing(window: Window, config: DetectorConfig = DEFAULT_CONFIG) -> list[Event]:
    """``vanishing_grad``: layers whose gradient norm stays ``vanish_ratio`` below the
    largest norm of the layers after them (or below ``vanish_floor``) over the window.

    Only layers with a weight matrix or kernel are compared (``Window.matrix_layers``,
    when some layers have one): a norm layer's scale or a bias of a few elements has a
    gradient norm small by its size alone (a qk-LayerNorm of 16 elements sits at 3e-4 of
    the attention matrices after it in a healthy transformer).

    A small gradient is only a fault when the layer stops learning: where the flush step's
    update/weight ratios were sampled, a layer whose ratio is at least ``VANISH_LEARNS``
    of the largest ratio of the layers after it is left out. An adaptive optimizer (Adam,
    RMSprop) normalises each parameter's step, so the query and key projections of a
    transformer at its init (gradients ~1e-4 of the layers after them, BERT from its config)
    learn at the pace of the rest; under SGD the update is the gradient and a vanishing
    layer's ratio is as small as its gradient.

    A signal that vanished on its way back leaves every layer before the first it failed
    to reach small too: only layers all of whose earlier layers vanish as well count. A
    small gradient behind layers that get theirs in full is the layer's own (found as a
    stranger: timm's ``regnetx_002`` on 32-pixel digits at SGD 0.01, whose last stage runs
    on 1x1 maps; its residual branches sit behind a BatchNorm gain initialised to 0, timm's
    ``zero_init_last``, which grows slowly there: their convolutions' gradients were 5e-4
    of the head's at step 49 while the stem's were in full, and were called "vanishing in
    13 early layers", the remedy residual connections and normalisation it has).

    "After" is the autograd graph's order where the telemetry could read it from the loss
    (``Window.after``, :mod:`gradguard.graph_order`): the layers a layer's output flows
    through to the loss. Registration order is that of a chain only: a policy and a value
    network side by side in one ``ModuleDict`` made the critic's gradients "the layers
    after" the actor's first layer. Without a graph order, registration order stands.

    Steps whose loss is exactly zero are left out: a classifier that fits its batch to a
    cross-entropy that rounds to 0.0 has nothing to pass back, and the rounding left in its
    gradients sits under ``vanish_floor`` in every layer (found as a stranger: a MobileNetV3-small
    (torchvision's design) on RMSprop, its batch memorised, "vanishing" at an SE block's 8e-13).
    A loss not given to the guard (NaN) leaves every step in."""
    ln = window.layer_norms()
    layers = window.layers
    w, u = window.layer_weight_norms(), window.layer_update_norms()
    rates = None if w is None or u is None else (u.double() / w.double()).tolist()
    cols = list(range(len(layers)))
    keep = window.matrix_layers
    if keep is not None and any(keep) and not all(keep):
        cols = [j for j, k in enumerate(keep) if k]
        ln, layers = ln[:, cols], [layers[j] for j in cols]
        rates = None if rates is None else [rates[j] for j in cols]
    after = _after(window.after, cols)
    # a step whose loss is exactly zero has no signal to pass back: what gradient is left
    # is rounding, under the absolute floor in every layer (see the docstring)
    rows = torch.isfinite(ln).all(dim=1) & (window.loss.to(ln.device) != 0)
    if int(rows.sum()) < config.vanish_min_steps or ln.shape[1] < 2:
        return []
    ok = ln[rows].double()
    later = _later(ok, after)  # the largest norm among the layers after each layer
    ratio = ok / later.clamp_min(1e-300)
    vanish = (ok > 0) & (later > 0) & ((ratio < config.vanish_ratio) | (ok < config.vanish_floor))
    frac = vanish.double().mean(dim=0).tolist()
    med_ratio = ratio.median(dim=0).values.tolist()
    med_norm = ok.median(dim=0).values.tolist()
    # the layers from the input up to the first that got its gradient (see the docstring):
    # a layer counts when it and every layer before it vanish
    gone = [f >= config.vanish_fraction for f in frac]
    if after is None:
        chain = next((j for j, g in enumerate(gone) if not g), len(gone))
        counted = list(range(chain))
    else:
        fine = {k for i, ks in enumerate(after) if not gone[i] for k in ks}  # after a layer
        counted = [j for j, g in enumerate(gone) if g and j not in fine]  # that got its own
    hit = [j for j in counted if not (rates is not None and _learns(rates, j, after))]
    if not hit:
        return []
    first = hit[0]
    names = [layers[j] for j in hit]
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
            remedy=vanishing_remedy(window.norm_layers),
            data={**({"norms": list(window.norm_layers)} if window.norm_layers else {}),
                  "layers": names, "ratio": [med_ratio[j] for j in hit],
                  "grad_norm": [med_norm[j] for j in hit]},
        )
    ]


#: What gradients that vanish in a network without normalisation layers call for.
VANISHING_REMEDY = ("Use ReLU-family activations with He init, add normalisation (LayerNorm, "
                    "BatchNorm) or residual connections, or an LSTM/GRU for long sequences; "
                    "run gg.doctor on a batch to see where the signal fades.")


def vanishing_remedy(norms: Sequence[str] | None) -> str:
    """The remedy for vanishing gradients: :data:`VANISHING_REMEDY`, unless the model
    already has normalisation layers (``norms``, :func:`gradguard.naming.norm_layers`).
    Then the fault is rarely the architecture's lack of them: a post-LN transformer (the
    norm after each residual sum) on Adam without warm-up collapses in its first steps,
    its early layers' gradients vanishing behind the norms (found by a stranger: told to
    add LayerNorm or residual connections, it had both in every block; a 100-step warm-up
    trained it to 0.4x the loss)."""
    if not norms:
        return VANISHING_REMEDY
    shown = ", ".join(f"`{n}`" for n in list(norms)[:2]) + (", ..." if len(norms) > 2 else "")
    return ("The model has normalisation layers already (" + shown + "): use ReLU-family "
            "activations with He init, and normalisation or residual connections between the "
            "layers where the signal fades; in a transformer with each norm after its "
            "residual sum (post-LN), add LR warm-up (a few hundred steps), lower the learning "
            "rate, or put each norm before its sublayer (pre-LN). Run gg.doctor on a batch to "
            "see where it fades.")


def _learns(rates: Sequence[float], j: int, after: list[list[int]] | None = None) -> bool:
    """Layer ``j`` moved at least ``VANISH_LEARNS`` of the largest update/weight ratio of
    the layers after it at the sampled step (the reference of the gradient test: the
    largest norm after it); a skipped step, ratio 0, says nothing."""
    nxt = rates[j + 1:] if after is None else [rates[k] for k in after[j]]
    later = [r for r in nxt if math.isfinite(r) and r > 0]
    r = rates[j]
    return bool(later) and math.isfinite(r) and r > 0 and r >= VANISH_LEARNS * max(later)


def _after(after: list[list[int]] | None, cols: list[int]) -> list[list[int]] | None:
    """The graph order (``Window.after``) among the columns ``cols`` (layer indices),
    in column positions; None: registration order."""
    if after is None:
        return None
    pos = {layer: c for c, layer in enumerate(cols)}
    return [[pos[k] for k in after[layer] if k in pos] for layer in cols]


def _later(ok: torch.Tensor, after: list[list[int]] | None) -> torch.Tensor:
    """Per step and layer, the largest norm among the layers after it (0: none)."""
    if after is None:  # registration order: every later column
        later = torch.flip(torch.cummax(torch.flip(ok, [1]), dim=1).values, [1])
        return torch.cat([later[:, 1:], torch.zeros_like(later[:, :1])], dim=1)
    later = torch.zeros_like(ok)
    for j, ks in enumerate(after):
        if ks:
            later[:, j] = ok[:, ks].amax(dim=1)
    return later


# ---- sampled at flush steps -------------------------------------------------------------
def detect_update_ratio(window: Window, config: DetectorConfig = DEFAULT_CONFIG,
                        history: Sequence[float] = (), *, annealed: bool = False,
                        decay: float | None = None) -> list[Event]:
    """``update_ratio``: per-layer ``|update| / |weight|`` at the flush step far above
    (``warning``) or far below (``info``) the healthy ~1e-3. A high ratio while the loss
    still falls (the newer half's median below the older half's) is ``info``: large steps
    that train (a tanh RNN at SGD lr 3 with its gradients clipped) are a choice, not a
    fault. The loss falls when it does over the window or over ``history`` (the detectors'
    recent finite losses, up to ``spike_history`` steps, this window's included): ten steps
    of a noisy loss rise half the time. Before step ``UPDATE_RATIO_HISTORY`` - 1 (49, the
    first flush at the default ``every``) it is not judged (``info``). ``annealed``: the
    LR in force is below ``ANNEALED_LR`` of the run's highest (:meth:`LrTracker.annealed`:
    the tail of a schedule that anneals to zero), and a ratio far below is not reported: a
    run's last steps under cosine to zero barely change any layer, and "raise the learning
    rate" would be wrong advice there. ``decay``: the share of its norm a weight loses to
    weight decay alone per step (:func:`gradguard.precursors.decay_per_step`); where it is
    a third of a ratio far above or more, the remedy names weight decay first (found by a
    stranger: SGD at 0.1 with momentum 0.9 and weight_decay=0.1 shrank a digits MLP's
    weights to 0 at chance, told "Lower the learning rate", which did not help)."""
    w, u = window.layer_weight_norms(), window.layer_update_norms()
    if w is None or u is None:
        return []
    events: list[Event] = []
    step = window.steps[-1]
    window_losses = [x for x in window.loss.tolist() if math.isfinite(x)]
    falling = _falling(window_losses) or (len(history) > len(window_losses)
                                          and _falling(list(history)))
    early = step + 1 < UPDATE_RATIO_HISTORY  # too early to say it is not falling
    note = ("; the loss is still falling" if falling else
            "; too early to judge the loss's trend" if early else "")
    high: list[tuple[str, float]] = []
    low: list[tuple[str, float]] = []
    for name, wn, un in zip(window.layers, w.tolist(), u.tolist()):
        if not (math.isfinite(wn) and math.isfinite(un)) or wn <= 0 or un <= 0:
            continue  # a skipped step does not update: nothing to judge
        r = un / wn
        if r > config.update_ratio_high:
            high.append((name, r))
        elif r < config.update_ratio_low and not annealed:
            low.append((name, r))
    for name, r, n in _grouped(high, max):
        events.append(Event(
            kind="update_ratio", step=step, severity="info" if note else "warning",
            layer=name, value=r, threshold=config.update_ratio_high,
            message=(f"step {step}: `{name}` update/weight ratio {r:.2g} (healthy ~1e-3)" if n
                     is None else f"step {step}: {len(n)} layers' update/weight ratio "
                     f"{min(x for _, x in n):.2g} to {r:.2g} (the largest in `{name}`; healthy "
                     "~1e-3)") + note,
            remedy=_high_remedy(named := decay if decay is not None and decay >= r / 3 else None),
            data=({} if n is None else {"layers": [x for x, _ in n], "ratios": [x for _, x in n]})
            | ({} if named is None else {"decay": named}),
        ))
    for name, r, n in _grouped(low, min):
        events.append(Event(
            kind="update_ratio", step=step, severity="info", layer=name, value=r,
            threshold=config.update_ratio_low,
            message=(f"step {step}: `{name}` barely changes: update/weight ratio {r:.2g}" if n
                     is None else f"step {step}: {len(n)} layers barely change: update/weight "
                     f"ratio {r:.2g} to {max(x for _, x in n):.2g} (the smallest in `{name}`)"),
            remedy="Raise the learning rate or check that this layer receives gradient.",
            data={} if n is None else {"layers": [x for x, _ in n], "ratios": [x for _, x in n]},
        ))
    return events


def _high_remedy(decay: float | None) -> str:
    """The remedy of an update/weight ratio far above: weight decay first when it alone
    moves the weights by a third of the ratio or more (``decay``), else the learning rate."""
    if decay is not None:
        return (f"Lower weight_decay: it alone shrinks the weights by {decay:.2g} of their "
                "norm a step here (lr x weight_decay, over 1 - momentum for SGD), and a "
                "lower LR shrinks them as surely over more steps; SGD is usually run at "
                "1e-4 to 5e-4, AdamW at 0.01 to 0.1.")
    return "Lower the learning rate (or this layer's) until the ratio is ~1e-3."


#: More layers than this out of range at one flush are one event, not one each (found by a
#: stranger: 29 warnings at one step of a ResNet whose LR ramped up).
UPDATE_RATIO_EVENTS = 3


def _grouped(hits: list[tuple[str, float]], worst: Any) -> list[tuple[str, float, Any]]:
    """``(layer, ratio, None)`` per hit, or one ``(worst layer, its ratio, hits)``."""
    if len(hits) <= UPDATE_RATIO_EVENTS:
        return [(name, r, None) for name, r in hits]
    name, r = worst(hits, key=lambda h: h[1])
    return [(name, r, hits)]


def _falling(loss: Sequence[float]) -> bool:
    """The second half's median below the first half's."""
    half = len(loss) // 2
    if half < 2:
        return False
    return statistics.median(loss[half:]) < statistics.median(loss[:half])


def detect_activations(
    step: int, activations: Mapping[str, Mapping[str, float]],
    config: DetectorConfig = DEFAULT_CONFIG,
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
