"""Probe: a normalisation layer that amplifies the gradient far more than it rescales its
input (groups of its input that are constant, divided by ``sqrt(eps)``).

A normalisation layer divides each group of its input (a position's channels for a
LayerNorm, a channel for a BatchNorm) by that group's standard deviation, and its backward
pass multiplies the gradient by the same ``1 / sqrt(var + eps)``. Over the whole tensor the
backward gain then matches the forward one (``out_rms / in_rms``). A group whose input is
constant has ``var = 0``: its output is 0 whatever the input, yet its gradient is
multiplied by ``1 / sqrt(eps)`` (1000x at ``eps=1e-6``, a million at 1e-12). Found as a
stranger: a ConvNeXt from ``transformers`` (its own init) on 16x16 digits, whose black
background gives patches of zeros: the patchify conv's bias is 0, so those positions reach
the stem's LayerNorm as constant vectors; the gradient reaching the conv is 1,000x the
LayerNorm's (its input's scale accounts for 36x), the conv's bias gradient is 1.5e4 where
every other is under 1 (a norm clip spends its whole budget on it), and the doctor called
the library's init "too large". Standardising the inputs (``(x - mean) / std``) gives those
patches a value the conv's weights spread over its channels, and the gain falls to the
forward one.

The gain is read from what the instrumented pass already records: the gradient at the
output of the layer that feeds the normalisation layer (its only module consumer) over the
gradient at the normalisation layer's output. No extra pass.
"""

from __future__ import annotations

import math

from ..events import Severity
from ._capture import Call, Capture, is_norm
from ._report import Finding

#: Backward gain (gradient at the input over gradient at the output) from which a
#: normalisation layer is looked at ...
GAIN = 100.0
#: ... when it exceeds the forward gain (``out_rms / in_rms``) this many times.
EXCESS = 10.0
#: An excess from which the finding is an error.
EXCESS_ERROR = 1000.0


def probe_norm_gain(cap: Capture) -> list[Finding]:
    """Normalisation layers whose backward gain exceeds their forward gain ``EXCESS`` times
    and ``GAIN`` in all (see the module docstring), largest excess first."""
    # the recorded call whose output feeds one module and nothing else a module takes
    producers: dict[str, Call] = {}
    for p in cap.calls:
        if len(p.consumers) == 1 and p.grad_norm:
            producers.setdefault(p.consumers[0], p)
    found: list[tuple[float, Finding]] = []
    for c in cap.calls:
        if not is_norm(c.module) or not c.grad_norm or cap.call_count[c.path] != 1:
            continue
        if not (math.isfinite(c.in_rms) and c.in_rms > 0 and math.isfinite(c.out_rms)):
            continue
        src = producers.get(c.path)
        if src is None or src is c or src.grad_norm is None or not math.isfinite(src.grad_norm):
            continue
        back = src.grad_norm / c.grad_norm
        # its input's scale as it divides by it: a mean-dominated input (a sigmoid's outputs
        # into a BatchNorm) has an rms far above it, and its gain is no excess (found as a
        # stranger: a timm ResNet with sigmoids was told "groups of its input are constant")
        scale = c.in_scale if math.isfinite(c.in_scale) and c.in_scale > 0 else c.in_rms
        fwd = max(c.out_rms / scale, 1.0)
        excess = back / fwd
        if back < GAIN or excess < EXCESS:
            continue
        eps = getattr(c.module, "eps", None)
        sev: Severity = "error" if excess >= EXCESS_ERROR else "warning"
        eps_text = f"eps={eps:g}" if isinstance(eps, (int, float)) else "its eps"
        ev = {"backward_gain": back, "forward_gain": fwd, "excess": excess, "eps": eps,
              "grad_norm_in": src.grad_norm, "grad_norm_out": c.grad_norm, "fed_by": src.path}
        found.append((excess, Finding(
            "unscaled_input",
            sev,
            c.path,
            ev,
            f"`{c.path}` passes the gradient back {back:.3g}x larger ({fwd:.3g}x is its input's "
            f"scale): groups of its input are constant (blank patches, zero padding, an unscaled "
            f"input with a zero background) and it divides their gradient by sqrt({eps_text}); "
            f"`{src.path}` gets a gradient of {src.grad_norm:.3g}. Standardise the inputs "
            f"((x - mean) / std per channel, fitted on the training set), or raise its eps.",
            min(1.0, 0.6 + 0.1 * math.log10(excess)),
        )))
    return [f for _, f in sorted(found, key=lambda t: -t[0])]
