"""Probe: signal propagation through depth.

Measured on one pass: the rms of every weight layer's output (forward signal) and of the
gradient that reaches it (backward signal), in execution order. A healthy network keeps
both within a few decades from the first layer to the last; a broken one grows or decays
geometrically. The decay is then attributed, in log10 units, to what multiplies the
backward signal at each layer: the weights (``std(W) * sqrt(fan_out)``, relative to the
gain that would exactly compensate a ReLU) and the activation derivatives measured at the
actual pre-activations (ReLU: sqrt of the share of active units; sigmoid/tanh: rms of
``s'(x)``). The largest term names the cause.

References:
    Glorot & Bengio 2010 (Xavier); He et al. 2015 (He/kaiming); Schoenholz et al. 2017
    (deep information propagation); Lu et al. 2019 (dying ReLU).
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor, nn

from ..events import Severity
from ._capture import Act, Call, Capture, is_weight_layer
from ._report import Finding

#: Backward (and forward) signal ratio between the first and the last weight layer, in
#: decades. A He-initialised 50-layer ReLU MLP stays within ~1 decade; PyTorch's default
#: init loses ~0.4 decade per plain ReLU layer, so a 6-layer default MLP stays above -3.
VANISH_DECADES = 3.0
EXPLODE_DECADES = 2.0
#: Share of a layer's ReLU units that are off on every sample of the batch. Deep ReLU nets
#: correlate their samples (the sign of a unit becomes the same for the whole batch), so up
#: to ~50 % of units can be off on a batch at init in a healthy deep network.
DEAD_FRACTION = 0.9
#: Share of a sigmoid/tanh layer's pre-activations in the flat tails (derivative < 1 % of
#: its peak).
SATURATED_FRACTION = 0.5
_RELU_IDEAL = math.log10(math.sqrt(0.5))


def weight_stats(m: nn.Module) -> tuple[float, int, int]:
    """(std, fan_in, fan_out) of a weight layer."""
    w = m._parameters["weight"]
    assert w is not None
    wd = w.detach().float()
    rf = int(wd[0][0].numel()) if wd.ndim > 2 else 1
    if isinstance(m, nn.Embedding):
        return float(wd.std()), 1, int(wd.shape[1])
    fan_out, fan_in = int(wd.shape[0]) * rf, int(wd.shape[1]) * rf
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        fan_in, fan_out = fan_out, fan_in
    return float(wd.std()) if wd.numel() > 1 else float(wd.abs().mean()), fan_in, fan_out


def chain(cap: Capture) -> list[Call]:
    """Weight-layer calls of modules called once (repeated calls are recurrences)."""
    return [
        c
        for c in sorted(cap.calls, key=lambda c: c.order)
        if is_weight_layer(c.module) and cap.call_count[c.path] == 1 and c.grad_rms is not None
    ]


def next_activation(cap: Capture) -> dict[str, str | None]:
    """For each weight layer, the kind of the first activation that ran after it and before
    the next weight layer (None: linear)."""
    calls = sorted((c for c in cap.calls if is_weight_layer(c.module)), key=lambda c: c.order)
    out: dict[str, str | None] = {}
    for i, c in enumerate(calls):
        nxt = calls[i + 1].order if i + 1 < len(calls) else math.inf
        after = [a for a in cap.acts if c.order < a.order < nxt]
        out.setdefault(c.path, after[0].kind if after else None)
    return out


def _span(layers: list[Call]) -> str:
    if not layers:
        return "-"
    a, b = layers[0].path, layers[-1].path
    return a if a == b else f"{a} … {b}"


def _log(x: float) -> float:
    return math.log10(x) if x > 0 else -30.0


def direct_findings(cap: Capture) -> list[Finding]:
    """Dead and saturated activation layers, whatever the depth."""
    out: list[Finding] = []
    model_acts = [a for a in cap.acts if cap.call_count.get(a.where, 1) <= 1 or a.where == ""]
    dead = [a for a in model_acts if a.kind == "relu" and a.dead_frac >= DEAD_FRACTION]
    if dead:
        worst = max(dead, key=lambda a: a.dead_frac)
        n_relu = sum(1 for a in model_acts if a.kind == "relu")
        ev: dict[str, Any] = {
            "dead_fraction": worst.dead_frac,
            "layers_dead": len(dead),
            "relu_layers": n_relu,
            "n_units": worst.n_units,
            "pre_activation_mean": worst.pre_mean,
            "pre_activation_rms": worst.pre_rms,
            "threshold": DEAD_FRACTION,
        }
        fix = "re-init with He (kaiming_normal_, zero bias), lower the learning rate, or use LeakyReLU/GELU"
        producer = next((c.module for c in cap.calls if c.path == worst.after), None)
        bias = producer._parameters.get("bias") if producer is not None else None
        if isinstance(bias, Tensor) and bias.numel():
            ev["input_layer"] = worst.after
            ev["bias_mean"] = float(bias.detach().float().mean())
            if ev["bias_mean"] < 0 and abs(ev["bias_mean"]) > 0.5 * abs(worst.pre_mean):
                fix = (
                    f"the bias of `{worst.after}` averages {ev['bias_mean']:.3g} and pushes "
                    f"the pre-activations (mean {worst.pre_mean:.3g}) below 0: zero the biases "
                    f"(nn.init.zeros_) or use LeakyReLU/GELU"
                )
            elif worst.pre_mean < 0:
                fix = (
                    f"the pre-activations after `{worst.after}` have mean {worst.pre_mean:.3g} "
                    f"(weights pushed negative, e.g. by a too large update): re-init it with He "
                    f"(kaiming_normal_, zero bias), lower the learning rate, or use LeakyReLU/GELU"
                )
        out.append(
            Finding(
                "dead_units",
                "error" if worst.dead_frac >= 0.99 else "warning",
                worst.where or None,
                ev,
                f"{len(dead)} of {n_relu} ReLU layers have ≥{DEAD_FRACTION:.0%} units off on "
                f"the whole batch (worst {worst.dead_frac:.0%} at `{worst.where or 'model'}`): "
                f"{fix}.",
                min(1.0, 0.5 + worst.dead_frac / 2),
            )
        )
    sat = [a for a in model_acts if a.kind in ("sigmoid", "tanh") and a.sat_frac >= SATURATED_FRACTION]
    if sat:
        worst = max(sat, key=lambda a: a.sat_frac)
        out.append(_saturation_finding(sat, worst, len(model_acts), None))
    return out


def _saturation_finding(sat: list[Act], worst: Act, n_acts: int, decay: float | None) -> Finding:
    kinds = sorted({a.kind for a in sat})
    thr = {"sigmoid": 6, "tanh": 3}
    ev: dict[str, Any] = {
        "saturated_fraction": worst.sat_frac,
        "layers": len(sat),
        "activation": "/".join(kinds),
        "derivative_rms": worst.deriv_rms,
        "pre_activation_rms": worst.pre_rms,
    }
    if decay is not None:
        ev["grad_decay_decades"] = decay
    span = f"`{sat[0].where}` … `{sat[-1].where}`" if len(sat) > 1 else f"`{worst.where}`"
    peak = 0.25 if worst.kind == "sigmoid" else 1.0
    if worst.sat_frac > 0.05:
        msg = (
            f"{len(sat)} {'/'.join(kinds)} layer(s) ({span}) have |pre-activation| > "
            f"{thr[worst.kind]} on up to {worst.sat_frac:.0%} of units (worst after `{worst.where}`)"
        )
    else:
        msg = (
            f"{len(sat)} stacked {'/'.join(kinds)} layers ({span}) each multiply the gradient "
            f"by ≤ {peak} (measured rms {worst.deriv_rms:.3g} after `{worst.where}`)"
        )
    if decay is not None:
        msg += f", and the gradient decays {10 ** -decay:.3g}x over depth"
    return Finding(
        "saturating_activation",
        "error" if worst.sat_frac >= 0.9 or (decay is not None and decay < -2 * VANISH_DECADES) else "warning",
        worst.where or None,
        ev,
        f"{msg}: use ReLU/GELU in hidden layers or add LayerNorm/BatchNorm before them "
        f"(and Xavier init).",
        0.85,
    )


def probe_signal(cap: Capture) -> list[Finding]:
    """Growth/decay of the forward and backward signal over depth, and its cause."""
    layers = chain(cap)
    if len(layers) < 3:
        return direct_findings(cap)
    g = [c.grad_rms or 0.0 for c in layers]
    a = [c.out_rms for c in layers]
    # extremes over the chain, not only its ends: a pooling head or a narrow output layer
    # must not hide a trunk that grows or decays
    back_hi = max(_log(x) for x in g[:-1]) - _log(g[-1])
    # decay is judged at the input end: side branches (attention queries/keys at init)
    # legitimately carry tiny gradients while the residual trunk does not vanish
    back_lo = _log(g[0]) - _log(g[-1])
    fa = [x for c, x in zip(layers, a) if math.isfinite(x) and x > 0 and not isinstance(c.module, nn.Embedding)]
    fwd_hi = max(_log(x) for x in fa) - _log(fa[0]) if fa else 0.0
    fwd_lo = min(_log(x) for x in fa) - _log(fa[0]) if fa else 0.0
    first, last = layers[0].order, layers[-1].order
    acts = [a for a in cap.acts if first <= a.order <= last and cap.call_count.get(a.where, 1) <= 1]
    gains = []
    for c in layers[1:]:  # the weights the backward signal crosses from the last layer down
        if isinstance(c.module, nn.Embedding):
            continue
        std, _, fan_out = weight_stats(c.module)
        gains.append((c, std, _log(std * math.sqrt(fan_out))))
    relu = [x for x in acts if x.kind == "relu"]
    satur = [x for x in acts if x.kind in ("sigmoid", "tanh")]
    s_w = sum(x[2] for x in gains) + len(relu) * _RELU_IDEAL
    s_dead = sum(_log(x.deriv_rms) - _RELU_IDEAL for x in relu)
    s_sat = sum(_log(x.deriv_rms) for x in satur)
    ev: dict[str, Any] = {
        "layers": len(layers),
        "grad_decades_max": round(back_hi, 3),
        "grad_decades_min": round(back_lo, 3),
        "act_decades_max": round(fwd_hi, 3),
        "act_decades_min": round(fwd_lo, 3),
        "grad_rms_first": g[0],
        "grad_rms_last": g[-1],
        "weights_decades": round(s_w, 3),
        "relu_decades": round(s_dead, 3),
        "saturation_decades": round(s_sat, 3),
    }
    found = direct_findings(cap)
    if back_lo < -VANISH_DECADES or (fwd_lo < -VANISH_DECADES and back_lo < -VANISH_DECADES / 2):
        decay = min(back_lo, fwd_lo)
        severity: Severity = "error" if decay < -2 * VANISH_DECADES else "warning"
        blame = min(("init_too_small", s_w), ("dead_units", s_dead), ("saturating_activation", s_sat), key=lambda t: t[1])
        if blame[0] == "saturating_activation" and satur:
            worst = min(satur, key=lambda x: x.deriv_rms)
            found = [f for f in found if f.cause != "saturating_activation"]
            f = _saturation_finding(satur, worst, len(acts), decay)
            f.evidence.update(ev)
            found.append(f)
        elif blame[0] == "dead_units" and relu and not any(f.cause == "dead_units" for f in found):
            worst_r = min(relu, key=lambda x: x.deriv_rms)
            found.append(
                Finding(
                    "dead_units",
                    severity,
                    worst_r.where or None,
                    {**ev, "active_fraction": worst_r.deriv_rms**2, "dead_fraction": worst_r.dead_frac},
                    f"ReLU layers keep only {worst_r.deriv_rms**2:.0%} of units active (worst "
                    f"`{worst_r.where}`) and the gradient decays {10 ** -decay:.3g}x over "
                    f"{len(layers)} layers: re-init with He and zero bias, or use LeakyReLU/GELU.",
                    0.75,
                )
            )
        elif blame[0] == "init_too_small":
            found.append(_init_finding("init_too_small", severity, layers, next_activation(cap), ev, decay))
    elif back_hi > EXPLODE_DECADES or fwd_hi > EXPLODE_DECADES:
        growth = max(back_hi, fwd_hi)
        severity = "error" if growth > 2 * EXPLODE_DECADES else "warning"
        found.append(_init_finding("init_too_large", severity, layers, next_activation(cap), ev, growth))
    return found


def recommended_std(fan_in: int, fan_out: int, act: str | None) -> tuple[str, float]:
    """The init a layer followed by ``act`` should have: He for ReLU, Xavier otherwise."""
    if act == "relu":
        return "He (kaiming_normal_, fan_in)", math.sqrt(2.0 / fan_in)
    gain = 5.0 / 3.0 if act == "tanh" else 1.0
    return "Xavier (xavier_normal_)", gain * math.sqrt(2.0 / (fan_in + fan_out))


def _init_finding(
    cause: str,
    severity: Severity,
    layers: list[Call],
    acts: dict[str, str | None],
    ev: dict[str, Any],
    decades: float,
) -> Finding:
    # the layer whose weight is furthest from the scale that keeps the signal constant
    rows = []
    for c in layers:
        if isinstance(c.module, nn.Embedding):
            continue
        std, fan_in, fan_out = weight_stats(c.module)
        name, rec = recommended_std(fan_in, fan_out, acts.get(c.path))
        rows.append((c.path, std, rec, name))
    if len(rows) > 1 and layers[-1].path == rows[-1][0]:
        rows = rows[:-1]  # the output layer has no activation to keep the signal for
    big = cause == "init_too_large"
    path, std, rec, scheme = max(rows, key=lambda r: (r[1] / r[2]) if big else (r[2] / max(r[1], 1e-30)))
    factor = std / rec if big else rec / max(std, 1e-30)
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
