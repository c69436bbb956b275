"""Probe: recurrences (``nn.RNN/GRU/LSTM`` and hand-written loops over a shared layer).

The gradient that reaches the recurrence at its first time step is compared with the one
at its last step: a product of T per-step Jacobians grows or shrinks geometrically with a
rate set by the spectral radius of the recurrent weights times the derivative of the
nonlinearity (Bengio et al. 1994; Pascanu et al. 2013).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ._capture import Call, Capture, is_weight_layer
from ._report import Finding

#: decades between the gradient at the last and the first time step
RECURRENT_EXPLODE_DECADES = 2.0
RECURRENT_VANISH_DECADES = 4.0
#: Gated cells (LSTM/GRU) start with forget gates near 0.5 (the gradient shrinks ~0.6x per
#: step at init, like a default vanilla RNN) but learn to open them along the additive cell
#: path; their decay is a warning only when the gates are shut (per-step factor below this),
#: otherwise an info.
GATED_STEP_FACTOR = 0.3
#: shortest recurrence worth judging
MIN_STEPS = 5


def _spectral_radius(w: Tensor) -> float | None:
    if w.ndim != 2 or w.shape[0] != w.shape[1] or w.shape[0] > 2048:
        return None
    return float(torch.linalg.eigvals(w.detach().double()).abs().max())


def _x(r: float) -> str:
    return f"{r:.3g}x" if r > 0 else "0x (underflow)"


def _series_rnn(c: Call) -> list[float] | None:
    g = c.time_leaf
    if g is None or g.ndim < 2:
        return None
    gt = g.detach().float().movedim(c.time_axis, 0)
    return [float(x) for x in gt.reshape(gt.shape[0], -1).norm(dim=1)]


def _rnn_radius(m: nn.Module) -> float | None:
    if isinstance(m, nn.RNN):
        w_hh = m._parameters.get("weight_hh_l0")
        return _spectral_radius(w_hh) if isinstance(w_hh, Tensor) else None
    w = m._parameters.get("weight")
    return _spectral_radius(w) if isinstance(w, Tensor) else None


def probe_recurrent(cap: Capture) -> list[Finding]:
    out: list[Finding] = []
    series: list[tuple[str, nn.Module, list[float], bool]] = []
    for c in cap.calls:
        if isinstance(c.module, nn.RNNBase):
            s = _series_rnn(c)
            if s:
                series.append((c.path, c.module, s, isinstance(c.module, (nn.LSTM, nn.GRU))))
    loops: dict[str, list[Call]] = {}
    for c in sorted(cap.calls, key=lambda c: c.order):
        if cap.call_count[c.path] >= MIN_STEPS and (
            is_weight_layer(c.module) or isinstance(c.module, (nn.RNNCellBase,))
        ):
            loops.setdefault(c.path, []).append(c)
    def _recurrent(m: nn.Module) -> bool:
        w = m._parameters.get("weight")
        return isinstance(m, nn.RNNCellBase) or (isinstance(w, Tensor) and w.ndim == 2 and w.shape[0] == w.shape[1])

    if any(_recurrent(cs[0].module) for cs in loops.values()):  # the hidden-to-hidden map
        loops = {p: cs for p, cs in loops.items() if _recurrent(cs[0].module)}
    for path, cs in loops.items():
        g = [c.grad_rms for c in cs]
        if any(x is None for x in g):
            continue
        gated = isinstance(cs[0].module, (nn.LSTMCell, nn.GRUCell))
        series.append((path, cs[0].module, [float(x or 0.0) for x in g], gated))
    for path, mod, s, gated in series:
        if len(s) < MIN_STEPS:
            continue
        first, last = s[0], s[-1]
        if not all(math.isfinite(x) for x in (first, last)):
            ratio = math.inf
        else:
            ratio = first / last if last > 0 else (math.inf if first > 0 else 1.0)
        dec = math.log10(ratio) if 0 < ratio < math.inf else (30.0 if ratio == math.inf else -30.0)
        # per-step factor over the steps whose gradient did not underflow to 0
        pos = [i for i, x in enumerate(s) if x > 0 and math.isfinite(x)]
        if len(pos) >= 2 and pos[-1] == len(s) - 1 and pos[0] < pos[-1]:
            step = (s[pos[0]] / s[-1]) ** (1.0 / (len(s) - 1 - pos[0]))
        else:
            step = 10 ** (dec / max(1, len(s) - 1))
        rho = _rnn_radius(mod)
        ev: dict[str, Any] = {
            "steps": len(s),
            "grad_first_step": first,
            "grad_last_step": last,
            "ratio_first_to_last": ratio,
            "per_step_factor": step,
            "gated": gated,
        }
        if rho is not None:
            ev["spectral_radius"] = rho
        kind = type(mod).__name__
        if dec > RECURRENT_EXPLODE_DECADES:
            out.append(
                Finding(
                    "recurrent_explosion",
                    "error" if dec > 2 * RECURRENT_EXPLODE_DECADES else "warning",
                    path,
                    ev,
                    f"the gradient of `{path}` ({kind}) grows {_x(ratio)} from step {len(s)} back "
                    f"to step 1 ({ev['per_step_factor']:.3g}x per step"
                    + (f", spectral radius {rho:.3g} > 1" if rho is not None else "")
                    + "): init the recurrent weights orthogonal (gg.init.apply_(model, 'orthogonal')), "
                    "clip the gradient norm (gg.NormClip(1.0)), or use an LSTM/GRU.",
                    min(1.0, 0.7 + 0.05 * dec),
                )
            )
        elif dec < -RECURRENT_VANISH_DECADES:
            out.append(
                Finding(
                    "recurrent_vanishing",
                    "info" if gated and step >= GATED_STEP_FACTOR else "warning",
                    path,
                    ev,
                    f"the gradient reaching step 1 of `{path}` ({kind}) is {_x(ratio)} the one at "
                    f"step {len(s)} ({ev['per_step_factor']:.3g}x per step"
                    + (f", spectral radius {rho:.3g}" if rho is not None else "")
                    + "): "
                    + (
                        "init the forget-gate bias to 1 (gg.init.apply_(model, 'orthogonal')), shorten the sequence (truncated BPTT) or add attention."
                        if gated
                        else "use an LSTM/GRU, init the recurrent weights orthogonal, or shorten the sequence."
                    ),
                    min(1.0, 0.6 + 0.03 * abs(dec)),
                )
            )
    return out
