"""Probe: activations that pass no gradient -- ReLU-family units that are off, sigmoid/tanh
(or ReLU6) inputs in the flat tails -- whatever the depth.

References:
    Lu et al. 2019 (dying ReLU); Glorot & Bengio 2010 (saturated sigmoid/tanh units).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ._acts import Act
from ._capture import Capture
from ._report import Finding

#: the gradient decays by at least this many decades before a saturation finding is an
#: error on that count alone (the depth probe's VANISH_DECADES, twice)
SEVERE_DECAY_DECADES = 6.0

#: Share of a layer's ReLU units that are off on every sample of the batch, or of its inputs
#: that are below 0 (zero gradient). Deep ReLU nets correlate their samples (the sign of a
#: unit becomes the same for the whole batch), so up to ~50 % of units can be off on a batch
#: at init in a healthy deep network; at most 68 % of inputs are off on the zoos.
DEAD_FRACTION = 0.9
#: Share of an activation's inputs in a flat tail (derivative < 1 % of its peak; for the
#: ReLU family, of its positive inputs). At a He/Xavier init a sigmoid/tanh sees |x| beyond
#: the tail edge (6 and 3) on well under 2 % of inputs (1.1 % at most on the zoos).
SATURATED_FRACTION = 0.25
def model_acts(cap: Capture) -> list[Act]:
    """Activations outside recurrent loops (a loop's activations are the recurrent probe's)."""
    return [a for a in cap.acts if cap.call_count.get(a.where, 1) <= 1 or a.where == ""]


def direct_findings(cap: Capture) -> list[Finding]:
    """Dead and saturated activation layers, whatever the depth."""
    out: list[Finding] = []
    acts = model_acts(cap)
    relu = [a for a in acts if a.family == "relu"]
    dead = [a for a in relu if max(a.dead_frac, a.off_frac) >= DEAD_FRACTION]
    if dead:
        out.append(_dead_finding(cap, dead, len(relu)))
    sat = [a for a in acts if a.family in ("bounded", "relu") and a.sat_frac >= SATURATED_FRACTION]
    if sat:
        worst = max(sat, key=lambda a: a.sat_frac)
        out.append(saturation_finding(sat, worst, None))
    return out


def _dead_finding(cap: Capture, dead: list[Act], n_relu: int) -> Finding:
    worst = max(dead, key=lambda a: max(a.dead_frac, a.off_frac))
    share = max(worst.dead_frac, worst.off_frac)
    ev: dict[str, Any] = {
        "dead_fraction": worst.dead_frac,
        "off_fraction": worst.off_frac,
        "layers_dead": len(dead),
        "relu_layers": n_relu,
        "activation": worst.kind,
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
    what = (
        f"{worst.dead_frac:.0%} of its units off on the whole batch"
        if worst.dead_frac >= worst.off_frac
        else f"{worst.off_frac:.0%} of its inputs below 0 (no gradient)"
    )
    return Finding(
        "dead_units",
        "error" if share >= 0.99 else "warning",
        worst.where or None,
        ev,
        f"{len(dead)} of {n_relu} ReLU-family layers are ≥{DEAD_FRACTION:.0%} off (worst "
        f"`{worst.where or 'model'}`: {what}): {fix}.",
        min(1.0, 0.5 + share / 2),
    )


#: A saturating activation's input rms from which the scale, not the activation, is the
#: trouble (tanh's derivative is under 1% of its peak beyond |x| = 3).
LARGE_INPUT_RMS = 3.0


def saturation_finding(sat: list[Act], worst: Act, decay: float | None) -> Finding:
    kinds = sorted({a.kind for a in sat})
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
    if worst.sat_frac > 0.05:
        msg = (
            f"{len(sat)} {'/'.join(kinds)} layer(s) ({span}) have inputs in the flat part of "
            f"the activation (derivative < 1% of its peak) on up to {worst.sat_frac:.0%} of "
            f"units (worst after `{worst.where}`, input rms {worst.pre_rms:.3g})"
        )
    else:
        msg = (
            f"{len(sat)} stacked {'/'.join(kinds)} layers ({span}) each multiply the gradient "
            f"by their derivative (measured rms {worst.deriv_rms:.3g} after `{worst.where}`)"
        )
    if decay is not None:
        msg += f", and the gradient decays {10 ** -decay:.3g}x over depth"
    if worst.pre_rms >= LARGE_INPUT_RMS:
        # the inputs are what is out of scale, not the activation: an 8-layer tanh MLP at
        # N(0, 1) weights (input rms 7.7) was told "use ReLU/GELU"; with ReLU and the same
        # weights it exploded (held-out 4e4), with Xavier it trained (0.35 against 1.98)
        fix = (f"their inputs are out of scale (rms {worst.pre_rms:.3g}, about 1 keeps them "
               "in the slope): re-initialise the layers before them with Xavier "
               "(gg.init.apply_(model, 'xavier', batch)) or add LayerNorm/BatchNorm before them; "
               "ReLU alone would keep the scale and let it grow")
    else:
        fix = ("use ReLU/GELU in hidden layers or add LayerNorm/BatchNorm before them "
               "(and Xavier init)")
    return Finding(
        "saturating_activation",
        "error" if worst.sat_frac >= 0.9 or (decay is not None and decay < -SEVERE_DECAY_DECADES) else "warning",
        worst.where or None,
        ev,
        f"{msg}: {fix}.",
        0.85,
    )


