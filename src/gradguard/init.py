"""Weight initialisation: audit what a model has, apply what it should have.

``audit(model, batch)`` lists every weight layer with its weight std, fan-in/out, the
activation that follows it (measured on one forward pass when a batch is given) and the
std that He (ReLU family) or Xavier (tanh, sigmoid, linear) would give it.
``apply_(model, scheme)`` re-initialises in place with ``"he"``, ``"xavier"``,
``"orthogonal"`` or ``"lsuv"`` (data-dependent; needs a batch).

References:
    Glorot & Bengio 2010 (Xavier); He et al. 2015 (He); Saxe et al. 2014 (orthogonal);
    Mishkin & Matas 2016 (LSUV, "All you need is a good init").

Example:
    >>> import torch, gradguard as gg
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    >>> _ = gg.init.apply_(net, "he")
    >>> rows = gg.init.audit(net, (torch.randn(32, 8), None)).rows
    >>> [(r.path, r.activation) for r in rows]
    [('0', 'relu'), ('2', None)]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ._tensors import call_model
from .doctor._acts import Act
from .doctor._capture import is_weight_layer, run_capture
from .doctor._weights import recommended_std, weight_stats
from .doctor.signal import following_acts
from .naming import refuse_lazy

Scheme = Literal["he", "xavier", "orthogonal", "lsuv"]
SCHEMES: tuple[str, ...] = ("he", "xavier", "orthogonal", "lsuv")
#: a layer whose std is off by more than this factor from the recommended one is flagged
AUDIT_FACTOR = 2.0
#: LSUV: target output variance 1 within this tolerance, at most this many rescalings a layer
LSUV_TOL = 0.1
LSUV_MAX_ITERS = 10


@dataclass
class InitRow:
    """One weight layer in an :class:`InitAudit`."""

    path: str
    kind: str
    std: float
    fan_in: int
    fan_out: int
    activation: str | None
    recommended: str
    recommended_std: float
    output_rms: float | None = None

    @property
    def factor(self) -> float:
        """``std / recommended_std`` (> 1: too large)."""
        return self.std / self.recommended_std if self.recommended_std > 0 else math.inf

    @property
    def ok(self) -> bool:
        return 1 / AUDIT_FACTOR <= self.factor <= AUDIT_FACTOR

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "kind": self.kind,
            "std": self.std,
            "fan_in": self.fan_in,
            "fan_out": self.fan_out,
            "activation": self.activation,
            "recommended": self.recommended,
            "recommended_std": self.recommended_std,
            "factor": self.factor,
            "output_rms": self.output_rms,
            "ok": self.ok,
        }


@dataclass
class InitAudit:
    """Per-layer init report from :func:`audit`."""

    rows: list[InitRow] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    @property
    def flagged(self) -> list[InitRow]:
        return [r for r in self.rows if not r.ok]

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "rows": [r.to_dict() for r in self.rows]}

    def __str__(self) -> str:
        lines = [f"{'layer':24s} {'kind':10s} {'act':8s} {'std':>9s} {'recommended':>12s} {'factor':>7s}"]
        for r in self.rows:
            flag = "" if r.ok else ("  too large" if r.factor > 1 else "  too small")
            lines.append(
                f"{r.path:24s} {r.kind:10s} {r.activation or '-':8s} {r.std:9.4g} "
                f"{r.recommended_std:12.4g} {r.factor:7.3g}{flag}"
            )
        return "\n".join(lines)


def _inputs_of(batch: Any) -> Any:
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0]
    return batch


def _first_tensor(x: Any) -> Tensor:
    if isinstance(x, Tensor):
        return x
    if isinstance(x, (tuple, list)):
        return _first_tensor(x[0])
    if isinstance(x, dict):
        return _first_tensor(next(iter(x.values())))
    raise TypeError(f"model output {type(x).__name__} holds no tensor")


def following_activations(model: nn.Module, batch: Any) -> tuple[dict[str, Act | None], dict[str, float], dict[str, int]]:
    """For each weight layer, the activation applied next on a forward pass of ``batch``
    (None: linear), the rms of its output and the size of its input's last dim."""
    inputs = _inputs_of(batch)
    with torch.random.fork_rng(devices=[]):
        bufs = [(b, b.detach().clone()) for b in model.buffers()]
        try:
            cap = run_capture(model, lambda: call_model(model, inputs), lambda out: _first_tensor(out).float().pow(2).mean())
        finally:
            with torch.no_grad():
                for b, saved in bufs:
                    b.copy_(saved)
    rms: dict[str, float] = {}
    feats: dict[str, int] = {}
    for c in cap.calls:
        if is_weight_layer(c.module):
            rms.setdefault(c.path, c.out_rms)
            feats.setdefault(c.path, c.in_features)
    return following_acts(cap), rms, feats


def audit(model: nn.Module, batch: Any = None) -> InitAudit:
    """Compare each weight layer's std with He/Xavier for the activation that follows it.

    Args:
        model: the model.
        batch: ``(inputs, targets)`` or inputs; when given, one forward pass finds the
            activation after each layer (else ReLU is assumed for all but the last layer).

    Returns:
        InitAudit: ``rows`` (one per weight layer), ``flagged``, ``ok``, ``str()`` a table.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"audit model: expected a torch.nn.Module, got {type(model).__name__}")
    refuse_lazy(model.named_parameters(), "audit model", "audit it")
    layers = [(n, m) for n, m in model.named_modules() if is_weight_layer(m) and not isinstance(m, nn.Embedding)]
    acts: dict[str, Act | None] = {}
    rms: dict[str, float] = {}
    feats: dict[str, int] = {}
    if batch is not None:
        acts, rms, feats = following_activations(model, batch)
    rows = []
    for i, (name, m) in enumerate(layers):
        std, fan_in, fan_out = weight_stats(m, feats.get(name, 0))
        if batch is None:  # no forward pass: ReLU assumed after every layer but the last
            kind, family = ("relu", "relu") if i < len(layers) - 1 else (None, None)
        else:
            act = acts.get(name)
            kind, family = (act.kind, act.family) if act is not None else (None, None)
        rec_name, rec = recommended_std(fan_in, fan_out, family, kind)
        rows.append(InitRow(name, type(m).__name__, std, fan_in, fan_out, kind, rec_name, rec, rms.get(name)))
    return InitAudit(rows)


def _gain(act: Act | None) -> float:
    if act is not None and act.family == "relu":
        return math.sqrt(2.0)
    if act is not None and act.kind == "tanh":
        return 5.0 / 3.0
    return 1.0


def _rnn_(m: nn.Module, scheme: str) -> None:
    for name, p in m.named_parameters(recurse=False):
        if name.startswith("weight_hh"):
            n = p.shape[1]
            for k in range(p.shape[0] // n):  # one square block per gate
                nn.init.orthogonal_(p.data[k * n : (k + 1) * n])
        elif name.startswith("weight_ih"):
            nn.init.xavier_uniform_(p)
        elif name.startswith("bias"):
            nn.init.zeros_(p)
            if isinstance(m, (nn.LSTM, nn.LSTMCell)):  # forget gate opens: Jozefowicz et al. 2015
                h = p.shape[0] // 4
                with torch.no_grad():
                    p[h : 2 * h].fill_(0.5)  # ih + hh biases add up to 1


def apply_(model: nn.Module, scheme: Scheme, batch: Any = None) -> nn.Module:
    """Re-initialise every weight layer of ``model`` in place; returns ``model``.

    Args:
        model: the model.
        scheme: ``"he"`` (kaiming_normal_, fan_in, ReLU gain), ``"xavier"`` (xavier_normal_
            with the gain of the activation that follows, when ``batch`` shows it),
            ``"orthogonal"`` (orthogonal_ with that gain), ``"lsuv"`` (orthogonal, then each
            layer rescaled so its output has unit variance on ``batch``; needs ``batch``).
            Biases are zeroed; recurrent weights get orthogonal blocks.
        batch: ``(inputs, targets)`` or inputs; required by ``"lsuv"``.

    Example:
        >>> import torch, gradguard as gg
        >>> net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
        >>> x = torch.randn(256, 64)
        >>> _ = gg.init.apply_(net, "lsuv", batch=(x, None))
        >>> round(float(net[0](x).detach().std()), 1)
        1.0
    """
    if scheme not in SCHEMES:
        raise ValueError(f"apply_ scheme={scheme!r} is not known; allowed: {SCHEMES}")
    if scheme == "lsuv" and batch is None:
        raise ValueError("apply_ scheme='lsuv' needs batch=(inputs, targets): it scales each layer on data")
    acts, _, feats = following_activations(model, batch) if batch is not None else ({}, {}, {})
    refuse_lazy(model.named_parameters(), "apply_ model", "initialise it")
    layers = [(n, m) for n, m in model.named_modules() if is_weight_layer(m) and not isinstance(m, nn.Embedding)]
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.RNNBase, nn.RNNCellBase)):
                _rnn_(m, scheme)
        for i, (name, m) in enumerate(layers):
            w = m._parameters["weight"]
            assert w is not None
            _, fan_in, fan_out = weight_stats(m, feats.get(name, 0))
            # without a batch, a ReLU is assumed after every layer but the last
            gain = _gain(acts.get(name)) if batch is not None else (math.sqrt(2.0) if i < len(layers) - 1 else 1.0)
            if scheme == "he":
                w.normal_(0.0, math.sqrt(2.0 / fan_in))
            elif scheme == "xavier":
                w.normal_(0.0, gain * math.sqrt(2.0 / (fan_in + fan_out)))
            else:
                nn.init.orthogonal_(w, gain=gain)
            b = m._parameters.get("bias")
            if isinstance(b, Tensor):
                nn.init.zeros_(b)
    if scheme == "lsuv":
        _lsuv_(model, [m for _, m in layers], _inputs_of(batch))
    return model


def _lsuv_(model: nn.Module, layers: list[nn.Module], inputs: Any) -> None:
    """Mishkin & Matas 2016: scale each layer, in order, to unit output variance."""
    out_std: dict[int, float] = {}

    def hook(mod: nn.Module, args: Any, out: Any) -> None:
        if isinstance(out, Tensor):
            out_std[id(mod)] = float(out.detach().float().std())

    with torch.random.fork_rng(devices=[]), torch.no_grad():
        bufs = [(b, b.detach().clone()) for b in model.buffers()]
        for m in layers:
            h = m.register_forward_hook(hook)
            try:
                for _ in range(LSUV_MAX_ITERS):
                    torch.manual_seed(0)
                    call_model(model, inputs)
                    s = out_std.get(id(m))
                    if s is None or not math.isfinite(s) or s == 0 or abs(s - 1) < LSUV_TOL:
                        break
                    w = m._parameters["weight"]
                    assert w is not None
                    w.div_(s)
            finally:
                h.remove()
        for b, saved in bufs:
            b.copy_(saved)
