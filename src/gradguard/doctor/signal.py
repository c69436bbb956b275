"""Probe: signal propagation through depth, along the chain of weight layers.

Measured on one pass: the rms of every weight layer's output (forward signal, per element,
as He/Xavier keep it) and the L2 norm of the gradient that reaches it (backward signal,
over the whole tensor), in execution order. Whole-tensor gradient norms are what He init
keeps constant through a conv (whatever its stride) and what a softmax cross-entropy
produces independently of the vocabulary, so layers of any width, vocabulary or number of
positions compare on one footing. A healthy network keeps both within a few decades from
the first layer to the last; a broken one grows or decays geometrically. Layers whose
gradient is exactly 0 (a zero-initialised head, positions the loss ignores) carry no
backward information and are left out of the backward comparison.

A decay is attributed, in log10 units, to what multiplies the backward signal at each layer:
the weights (``std(W) * sqrt(fan_out)``, relative to the gain that would exactly
compensate a ReLU), normalisation layers (their measured gain), and the activation
derivatives measured at the actual pre-activations. The largest term names the cause.

References:
    Glorot & Bengio 2010 (Xavier); He et al. 2015 (He/kaiming); Schoenholz et al. 2017
    (deep information propagation); Lu et al. 2019 (dying ReLU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from ..events import Severity
from ._acts import Act
from ._capture import Call, Capture, is_norm, is_weight_layer
from ._report import Finding
from ._weights import recommended_std, weight_stats
from .activations import direct_findings, model_acts, saturation_finding

#: Backward (and forward) signal ratio between the first and the last weight layer, in
#: decades. A He-initialised 50-layer ReLU MLP stays within ~1 decade; PyTorch's default
#: init loses ~0.4 decade per plain ReLU layer, so a 6-layer default MLP stays above -3.
VANISH_DECADES = 3.0
EXPLODE_DECADES = 2.0
#: Forward growth, in decades, of the weight layers' output rms: healthy models at init
#: stay within 0.7 decade of their first layer (the zoos' maximum is 0.64, MobileViT).
FORWARD_EXPLODE_DECADES = 1.5
#: share of the weight layers that feed a normalisation layer above which the chain's
#: signal is the normalisation's business, not the weights'
NORMALIZED_SHARE = 0.5
#: share of the chain (from the input) whose strongest layer stands for the input end
INPUT_END = 0.2
_RELU_IDEAL = math.log10(math.sqrt(0.5))


def _log(x: float) -> float:
    return math.log10(x) if x > 0 else -30.0


def chain(cap: Capture) -> list[Call]:
    """Weight-layer calls of modules called once (repeated calls are recurrences)."""
    return [
        c
        for c in sorted(cap.calls, key=lambda c: c.order)
        if is_weight_layer(c.module) and cap.call_count[c.path] == 1 and c.grad_norm is not None
    ]


def following_acts(cap: Capture) -> dict[str, Act | None]:
    """For each weight layer, the first activation that ran after it and before the next
    weight layer (None: linear)."""
    calls = sorted((c for c in cap.calls if is_weight_layer(c.module)), key=lambda c: c.order)
    out: dict[str, Act | None] = {}
    for i, c in enumerate(calls):
        nxt = calls[i + 1].order if i + 1 < len(calls) else math.inf
        after = [a for a in cap.acts if c.order < a.order < nxt]
        out.setdefault(c.path, after[0] if after else None)
    return out


def next_activation(cap: Capture) -> dict[str, str | None]:
    """For each weight layer, the name of the activation that follows it (None: linear)."""
    return {p: (a.kind if a is not None else None) for p, a in following_acts(cap).items()}


def _span(layers: list[Call]) -> str:
    if not layers:
        return "-"
    a, b = layers[0].path, layers[-1].path
    return a if a == b else f"{a} … {b}"


def _norm_gain_decades(cap: Capture, first: int, last: int) -> float:
    """Sum of log10(out/in) of the normalisation-like layers (a 1-D gain, no matrix) run
    between two orders: their weights and eps set how much signal they pass on."""
    s = 0.0
    for c in cap.calls:
        w = c.module._parameters.get("weight")
        if not (first < c.order < last and isinstance(w, Tensor) and w.ndim == 1 and cap.call_count[c.path] == 1):
            continue
        if math.isfinite(c.in_rms) and math.isfinite(c.out_rms) and c.in_rms > 0 and c.out_rms > 0:
            s += min(0.0, _log(c.out_rms) - _log(c.in_rms))  # a norm layer that rescales up is not a loss
    return s


@dataclass
class DepthProfile:
    """The chain's signal over depth, in decades, and what multiplies it (see the module doc)."""

    trunk: list[Call]  # weight layers, embeddings excluded
    relu: list[Act]  # ReLU-family activations on the signal path
    satur: list[Act]  # sigmoid/tanh-family activations on the signal path
    has_back: bool  # enough layers with a nonzero gradient to judge the backward signal
    back_hi: float  # largest gradient before the last layer, over the last layer's
    back_lo: float  # the input end's gradient over the strongest later layer's
    fwd_hi: float  # largest output rms over the first layer's
    fwd_lo: float  # smallest output rms over the first layer's
    weights_matter: bool  # False when most weight layers feed a normalisation layer
    s_w: float
    s_norm: float
    s_dead: float
    s_sat: float
    evidence: dict[str, Any]


def depth_profile(cap: Capture) -> DepthProfile | None:
    """The forward/backward signal along the chain of weight layers; None for fewer than 3."""
    layers = chain(cap)
    trunk = [c for c in layers if not isinstance(c.module, (nn.Embedding, nn.EmbeddingBag))]
    # embeddings carry the trunk gradient at the input end of a transformer; their outputs
    # are looked up, not computed, so only the backward signal uses them
    back = [c for c in layers if (c.grad_norm or 0.0) > 0]
    fwd = [c for c in trunk if math.isfinite(c.out_rms) and c.out_rms > 0]
    if not trunk or (len(back) < 3 and len(fwd) < 3):
        return None
    g = [_log(c.grad_norm or 0.0) for c in back]
    a = [_log(c.out_rms) for c in fwd]
    has_back = len(g) >= 3
    # decay is judged from the input end (its strongest layers: side branches such as
    # attention queries/keys legitimately carry tiny gradients at init) to the strongest
    # later layer
    k = max(1, math.ceil(len(g) * INPUT_END))
    back_lo = max(g[:k]) - max(g[k:]) if has_back else 0.0
    back_hi = max(g[:-1]) - g[-1] if has_back else 0.0
    fwd_hi = max(a) - a[0] if len(a) >= 3 else 0.0
    fwd_lo = min(a) - a[0] if len(a) >= 3 else 0.0
    first, last = trunk[0].order, trunk[-1].order
    acts = [x for x in model_acts(cap) if first <= x.order <= last]
    gains = []
    for c in trunk[1:]:  # the weights the backward signal crosses from the last layer down
        std, _, fan_out = weight_stats(c.module, c.in_features)
        gains.append(_log(std * math.sqrt(fan_out)))
    # only activations whose output goes on into a layer multiply the signal by their
    # derivative; a sigmoid gate (squeeze-excitation, x * sigmoid(x)) scales it by its value
    relu = [x for x in acts if x.family == "relu" and x.feeds]
    satur = [x for x in acts if x.family == "bounded" and x.feeds]
    # a weight layer feeding a normalisation layer is scale-invariant: its init cannot make
    # the signal grow or decay (a BatchNorm net's gradient grows backwards by itself, Yang
    # et al. 2019, and no re-init changes that)
    modules = {c.path: c.module for c in cap.calls}
    normed = sum(1 for c in trunk if any(is_norm(modules[p]) for p in c.consumers if p in modules))
    weights_matter = normed < NORMALIZED_SHARE * len(trunk)
    s_w = sum(gains) + len(relu) * _RELU_IDEAL if weights_matter else 0.0
    s_norm = _norm_gain_decades(cap, first, last)
    # a ReLU passes the gradient of its active units: sqrt(active share) against the half
    # He init compensates (a SiLU near 0 has slope 0.5 everywhere: nothing is dead there)
    s_dead = sum(_log(math.sqrt(x.active_frac)) - _RELU_IDEAL for x in relu)
    s_sat = sum(_log(x.deriv_rms) for x in satur)
    ev: dict[str, Any] = {
        "layers": len(trunk),
        "grad_decades_max": round(back_hi, 3),
        "grad_decades_min": round(back_lo, 3),
        "act_decades_max": round(fwd_hi, 3),
        "act_decades_min": round(fwd_lo, 3),
        "grad_norm_first": back[0].grad_norm if back else None,
        "grad_norm_last": back[-1].grad_norm if back else None,
        "normalized_layers": normed,
        "weights_decades": round(s_w, 3),
        "norm_layers_decades": round(s_norm, 3),
        "relu_decades": round(s_dead, 3),
        "saturation_decades": round(s_sat, 3),
    }
    return DepthProfile(trunk, relu, satur, has_back, back_hi, back_lo, fwd_hi, fwd_lo, weights_matter, s_w, s_norm, s_dead, s_sat, ev)


def probe_signal(cap: Capture) -> list[Finding]:
    """Growth/decay of the forward and backward signal over depth, and its cause."""
    found = direct_findings(cap)
    prof = depth_profile(cap)
    if prof is None:
        return found
    trunk, relu, satur, ev = prof.trunk, prof.relu, prof.satur, prof.evidence
    back_lo, fwd_lo = prof.back_lo, prof.fwd_lo
    vanish = back_lo < -VANISH_DECADES or (fwd_lo < -VANISH_DECADES and (back_lo < -VANISH_DECADES / 2 or not prof.has_back))
    if vanish:
        decay = min(back_lo, fwd_lo)
        severity: Severity = "error" if decay < -2 * VANISH_DECADES else "warning"
        blame = min(
            ("weights", prof.s_w), ("norm", prof.s_norm), ("dead_units", prof.s_dead), ("saturating_activation", prof.s_sat),
            key=lambda t: t[1],
        )
        if blame[0] == "saturating_activation" and satur:
            worst = min(satur, key=lambda x: x.deriv_rms)
            found = [f for f in found if f.cause != "saturating_activation"]
            f = saturation_finding(satur, worst, decay)
            f.evidence.update(ev)
            found.append(f)
        elif blame[0] == "dead_units" and relu and not any(f.cause == "dead_units" for f in found):
            worst_r = min(relu, key=lambda x: x.active_frac)
            found.append(
                Finding(
                    "dead_units",
                    severity,
                    worst_r.where or None,
                    {**ev, "active_fraction": worst_r.active_frac, "dead_fraction": worst_r.dead_frac},
                    f"ReLU layers keep only {worst_r.active_frac:.0%} of units active (worst "
                    f"`{worst_r.where}`) and the gradient decays {10 ** -decay:.3g}x over "
                    f"{len(trunk)} layers: re-init with He and zero bias, or use LeakyReLU/GELU.",
                    0.75,
                )
            )
        elif blame[0] == "norm":
            found.append(_norm_finding(cap, severity, trunk, ev, decay))
        elif blame[0] == "weights":
            small = init_finding("init_too_small", severity, trunk, following_acts(cap), ev, decay)
            if small is not None:
                found.append(small)
    elif prof.weights_matter and (prof.back_hi > EXPLODE_DECADES or prof.fwd_hi > FORWARD_EXPLODE_DECADES):
        growth = max(prof.back_hi, prof.fwd_hi)
        severity = "error" if growth > 2 * EXPLODE_DECADES else "warning"
        large = init_finding("init_too_large", severity, trunk, following_acts(cap), ev, growth)
        if large is not None:
            found.append(large)
    return found


def _norm_finding(cap: Capture, severity: Severity, layers: list[Call], ev: dict[str, Any], decay: float) -> Finding:
    first, last = layers[0].order, layers[-1].order
    worst = None
    for c in cap.calls:
        w = c.module._parameters.get("weight")
        if first < c.order < last and isinstance(w, Tensor) and w.ndim == 1 and c.in_rms > 0 and c.out_rms > 0:
            r = c.out_rms / c.in_rms
            if worst is None or r < worst[1]:
                worst = (c, r)
    assert worst is not None
    c, r = worst
    w = c.module._parameters["weight"]
    assert isinstance(w, Tensor)
    w_rms = float(w.detach().float().pow(2).mean().sqrt())
    return Finding(
        "init_too_small",
        severity,
        c.path,
        {**ev, "norm_layer_gain": r, "norm_weight_rms": w_rms},
        f"the signal decays {10 ** -decay:.3g}x over {len(layers)} weight layers ({_span(layers)}), "
        f"and the normalisation layers pass it on scaled down ({type(c.module).__name__} `{c.path}` "
        f"has weights of rms {w_rms:.3g} and output/input {r:.3g}): initialise the normalisation "
        f"weights to 1 (nn.init.ones_) and check their eps against the activation scale.",
        min(1.0, 0.6 + 0.1 * abs(decay)),
    )


def init_finding(
    cause: str,
    severity: Severity,
    layers: list[Call],
    acts: dict[str, Act | None],
    ev: dict[str, Any],
    decades: float,
) -> Finding | None:
    """``init_too_large`` / ``init_too_small`` naming the layer furthest from He/Xavier; None
    for ``init_too_large`` when no layer is larger than recommended: the signal grows for
    another reason (a normalisation layer's gain, :mod:`.norms`), and "re-init, 0.2x too
    large" was the doctor's word on a ``transformers`` ConvNeXt's own init."""
    rows = []
    for c in layers:
        if isinstance(c.module, (nn.Embedding, nn.EmbeddingBag)):
            continue
        std, fan_in, fan_out = weight_stats(c.module, c.in_features)
        act = acts.get(c.path)
        name, rec = recommended_std(fan_in, fan_out, act.family if act else None, act.kind if act else None)
        rows.append((c.path, std, rec, name))
    if len(rows) > 1 and layers[-1].path == rows[-1][0]:
        rows = rows[:-1]  # the output layer has no activation to keep the signal for
    big = cause == "init_too_large"
    path, std, rec, scheme = max(rows, key=lambda r: (r[1] / r[2]) if big else (r[2] / max(r[1], 1e-30)))
    factor = std / rec if big else rec / max(std, 1e-30)
    if big and factor <= 1.0:
        return None
    n = len(layers)
    direction = "grows" if big else "decays"
    ev = {**ev, "worst_layer_std": std, "recommended_std": rec, "factor": factor}
    prefix = _common_prefix([r[0] for r in rows if (r[1] / r[2] > 2) == big and r[1] / r[2] != 1])
    target = f"`{prefix}*`" if prefix.strip(".") else "the weight layers"
    return Finding(
        cause,
        severity,
        path,
        ev,
        f"the signal {direction} {10 ** abs(decades):.3g}x over {n} weight layers "
        f"({_span(layers)}): re-init {target} with {scheme} "
        f"(gg.init.apply_(model, {'he' if scheme.startswith('He') else 'xavier'!r})); current std {std:.3g} at `{path}` is "
        f"{factor:.3g}x too {'large' if big else 'small'} (recommended {rec:.3g}).",
        min(1.0, 0.6 + 0.1 * abs(decades)),
    )


def _common_prefix(paths: list[str]) -> str:
    if not paths:
        return ""
    p = paths[0]
    for q in paths[1:]:
        while not q.startswith(p):
            p = p[:-1]
    return p
