"""Probe: recurrences (``nn.RNN/GRU/LSTM`` and hand-written loops over a shared layer).

How a recurrence carries gradients over time is measured on its own, whatever the loss:
a fixed random direction ``v`` on its output at the last time step is backpropagated to
every earlier step (``|d(v·h_T)/dx_t|`` for an ``nn.RNN``-family module, ``|d(v·y_T)/dy_t|``
for a loop). A product of ``T - t`` per-step Jacobians grows or shrinks geometrically with a
rate set by the spectral radius of the recurrent weights times the derivative of the
nonlinearity (Bengio et al. 1994; Pascanu et al. 2013). The loss gradient per step would
hide this in a language model (every step gets its own loss term) and is 0 at positions
the loss ignores (the last one of a shifted next-token loss); it is reported as evidence.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ._capture import Call, Capture, is_weight_layer
from ._report import Finding

#: decades between the transfer to the last and to the first time step
RECURRENT_EXPLODE_DECADES = 2.0
RECURRENT_VANISH_DECADES = 4.0
#: A spectral radius this close to 1 is an orthogonal init already.
ORTHOGONAL_TOL = 0.05
#: Gated cells (LSTM/GRU) start with forget gates near 0.5 (the gradient shrinks ~0.6x per
#: step at init, like a default vanilla RNN) but learn to open them along the additive cell
#: path; their decay is a warning only when the gates are shut (per-step factor below this),
#: otherwise an info.
GATED_STEP_FACTOR = 0.3
#: shortest recurrence worth judging
MIN_STEPS = 5
_GATED = (nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell)


def _spectral_radius(w: Tensor) -> float | None:
    if w.ndim != 2 or w.shape[0] != w.shape[1] or w.shape[0] > 2048:
        return None
    return float(torch.linalg.eigvals(w.detach().double()).abs().max())


def _x(r: float) -> str:
    return f"{r:.3g}x" if r > 0 else "0x (underflow)"


def _direction(t: Tensor) -> Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t)


def _per_step(g: Tensor, axis: int) -> list[float]:
    gt = g.detach().float().movedim(axis, 0)
    return [float(x) for x in gt.reshape(gt.shape[0], -1).norm(dim=1)]


def _transfer_rnn(c: Call) -> list[float] | None:
    """|d(v·h_T)/dx_t| for each step t of an ``nn.RNN/GRU/LSTM`` call."""
    leaf, out = c.time_leaf, c.out
    if leaf is None or out is None or out.ndim != 3 or not out.requires_grad:
        return None
    last = out.select(c.time_axis, out.shape[c.time_axis] - 1)
    (g,) = torch.autograd.grad((last * _direction(last)).sum(), leaf, retain_graph=True, allow_unused=True)
    return None if g is None else _per_step(g, c.time_axis)


def _transfer_loop(cs: list[Call]) -> list[float] | None:
    """|d(v·y_T)/dy_t| over the outputs of the calls of a layer in a hand-written loop;
    None when the calls do not feed each other (a per-step layer, not a recurrence)."""
    outs = [c.out for c in cs]
    if any(o is None or not o.requires_grad for o in outs):
        return None
    last = outs[-1]
    assert last is not None
    grads = torch.autograd.grad(
        (last * _direction(last)).sum(), outs[:-1], retain_graph=True, allow_unused=True  # type: ignore[arg-type]
    )
    if all(g is None for g in grads[1:]) or grads[0] is None:
        return None
    return [float(g.detach().float().norm()) if g is not None else 0.0 for g in grads] + [
        float(_direction(last).norm())
    ]


def _loops(cap: Capture) -> dict[str, list[Call]]:
    loops: dict[str, list[Call]] = {}
    for c in sorted(cap.calls, key=lambda c: c.order):
        if cap.call_count[c.path] >= MIN_STEPS and (is_weight_layer(c.module) or isinstance(c.module, nn.RNNCellBase)):
            loops.setdefault(c.path, []).append(c)

    def recurrent(m: nn.Module) -> bool:  # the hidden-to-hidden map, when one is there
        w = m._parameters.get("weight")
        return isinstance(m, nn.RNNCellBase) or (isinstance(w, Tensor) and w.ndim == 2 and w.shape[0] == w.shape[1])

    if any(recurrent(cs[0].module) for cs in loops.values()):
        loops = {p: cs for p, cs in loops.items() if recurrent(cs[0].module)}
    return loops


def _radius(m: nn.Module) -> float | None:
    w = m._parameters.get("weight_hh_l0") if isinstance(m, nn.RNN) else m._parameters.get("weight")
    return _spectral_radius(w) if isinstance(w, Tensor) and not isinstance(m, (nn.LSTM, nn.GRU)) else None


def _trim(s: list[float]) -> list[float]:
    """Drop trailing steps the transfer cannot reach (exactly 0 after the last nonzero one);
    leading zeros are kept: they are an underflow, the strongest vanishing there is."""
    end = max((i for i, x in enumerate(s) if x != 0), default=-1)
    return s[: end + 1]


def probe_recurrent(cap: Capture) -> list[Finding]:
    series: list[tuple[str, nn.Module, list[float], list[float] | None]] = []
    with torch.enable_grad():
        for c in cap.calls:
            if isinstance(c.module, nn.RNNBase):
                s = _transfer_rnn(c)
                if s:
                    loss_s = _per_step(c.time_grad, c.time_axis) if c.time_grad is not None else None
                    series.append((c.path, c.module, s, loss_s))
        for path, cs in _loops(cap).items():
            s = _transfer_loop(cs)
            if s:
                loss_s = [float(c.grad_norm or 0.0) for c in cs] if all(c.grad_norm is not None for c in cs) else None
                series.append((path, cs[0].module, s, loss_s))
    return [f for path, mod, s, loss_s in series if (f := _judge(path, mod, _trim(s), loss_s)) is not None]


def _judge(path: str, mod: nn.Module, s: list[float], loss_s: list[float] | None) -> Finding | None:
    if len(s) < MIN_STEPS:
        return None
    gated = isinstance(mod, _GATED)
    first, last = s[0], s[-1]
    if not all(math.isfinite(x) for x in (first, last)):
        ratio = math.inf
    else:
        ratio = first / last if last > 0 else (math.inf if first > 0 else 1.0)
    dec = math.log10(ratio) if 0 < ratio < math.inf else (30.0 if ratio == math.inf else -30.0)
    # per-step factor over the steps whose transfer did not underflow to 0
    pos = [i for i, x in enumerate(s) if x > 0 and math.isfinite(x)]
    if len(pos) >= 2 and pos[-1] == len(s) - 1 and pos[0] < pos[-1]:
        step = (s[pos[0]] / s[-1]) ** (1.0 / (len(s) - 1 - pos[0]))
    else:
        step = 10 ** (dec / max(1, len(s) - 1))
    rho = _radius(mod)
    ev: dict[str, Any] = {
        "steps": len(s),
        "grad_first_step": first,
        "grad_last_step": last,
        "ratio_first_to_last": ratio,
        "per_step_factor": step,
        "gated": gated,
    }
    if loss_s:
        ev["loss_grad_first_step"], ev["loss_grad_last_step"] = loss_s[0], loss_s[-1]
    if rho is not None:
        ev["spectral_radius"] = rho
    kind = type(mod).__name__
    radius = f", spectral radius {rho:.3g}" if rho is not None else ""
    if dec > RECURRENT_EXPLODE_DECADES:
        fix = (
            "clip the gradient norm (gg.NormClip(1.0)), lower the learning rate, and check the "
            "recurrent weights' init (orthogonal, gg.init.apply_(model, 'orthogonal'))"
            if gated
            else "init the recurrent weights orthogonal (gg.init.apply_(model, 'orthogonal')), "
            "clip the gradient norm (gg.NormClip(1.0)), or use an LSTM/GRU"
        )
        return Finding(
            "recurrent_explosion",
            "error" if dec > 2 * RECURRENT_EXPLODE_DECADES else "warning",
            path,
            ev,
            f"the gradient of `{path}` ({kind}) grows {_x(ratio)} from step {len(s)} back to step 1 "
            f"({step:.3g}x per step{radius}" + (" > 1" if rho is not None and rho > 1 else "") + f"): {fix}.",
            min(1.0, 0.7 + 0.05 * dec),
        )
    if dec < -RECURRENT_VANISH_DECADES:
        if gated and isinstance(mod, (nn.LSTM, nn.LSTMCell)):
            fix = ("init the forget-gate bias to 1 (gg.init.apply_(model, 'orthogonal')), "
                   "shorten the sequence (truncated BPTT) or add attention")
        elif gated:  # a GRU has no forget gate (gg.init's forget-gate bias is an LSTM's)
            fix = ("shorten the sequence (truncated BPTT) or add attention; an LSTM with its "
                   "forget-gate bias at 1 (gg.init.apply_(model, 'orthogonal')) keeps a "
                   "gradient over longer spans")
        elif rho is not None and abs(rho - 1.0) < ORTHOGONAL_TOL:
            # already orthogonal (found as a stranger: the same advice came back after
            # gg.init.apply_(model, 'orthogonal'), 2.9e-9 over 200 steps): tanh's slope does it
            fix = ("its recurrent weights are already orthogonal: the "
                   "activation's slope shrinks it each step; use an LSTM/GRU, or shorten the "
                   "sequence (truncated BPTT)")
        else:
            fix = "use an LSTM/GRU, init the recurrent weights orthogonal, or shorten the sequence"
        return Finding(
            "recurrent_vanishing",
            "info" if gated and step >= GATED_STEP_FACTOR else "warning",
            path,
            ev,
            f"the gradient reaching step 1 of `{path}` ({kind}) from step {len(s)} is {_x(ratio)} the "
            f"one at step {len(s)} ({step:.3g}x per step{radius}): {fix}.",
            min(1.0, 0.6 + 0.03 * abs(dec)),
        )
    return None
