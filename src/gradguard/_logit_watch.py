"""Activation magnitudes at flush steps, for the divergence precursors (``precursors.py``).

Behind ``Guard(watch_activations=True)``. Armed for the forward of a flush step only, the
hooks reduce each module's output to its largest magnitude (one ``amax`` on the device, no
sync) and, for every ``nn.MultiheadAttention``, recompute the attention logits ``q·kᵀ/√d``
from the module's own inputs and projection weights (those logits never leave the fused
kernel). At the flush the values come to the host in one small copy. Outside armed
forwards a hook returns at once.

What the precursors read from it (Wortsman et al. 2023, "Small-scale proxies for
large-scale Transformer training instabilities"): the growth of attention logits (fixed by
qk-LayerNorm), of the output logits (fixed by z-loss), and how close a half-precision
output is to the largest finite value of its dtype.

Attention logits never leave the fused kernels, so they are bounded instead of
materialised (a ``[T, T]`` matrix per head would not fit for long sequences): by
Cauchy–Schwarz ``|q_i·k_j| ≤ max_i |q_i| · max_j |k_j|``, times the softmax scale. The
bound grows exactly when queries and keys grow, which is what qk-LayerNorm prevents. It
is taken for every ``F.scaled_dot_product_attention`` call of the armed forward (through a
``TorchFunctionMode`` entered for that forward only, named by the innermost module that
made the call) and for every ``nn.MultiheadAttention`` (from its inputs and weights).

Example:
    >>> import torch
    >>> from gradguard._logit_watch import LogitWatch
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    >>> watch = LogitWatch(net)
    >>> watch.armed = True
    >>> _ = net(torch.full((2, 4), 100.0))
    >>> sample = watch.take()
    >>> sorted(sample), sample[""].dtype
    (['', '0', '1'], 'torch.float32')
    >>> watch.remove()
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

#: Suffix of the attention-logit bound of a module (``"blocks.0.attn.attn_logits"``).
ATTN_LOGITS = "attn_logits"
#: Containers that only route tensors: their output is some child's output (no new sample).
_ROUTING = frozenset({"Sequential", "ModuleList", "ModuleDict", "Identity", "Flatten",
                      "Unflatten", "Dropout"})


@dataclass(frozen=True)
class Magnitude:
    """Largest magnitude of one module's output in the sampled forward.

    Attributes:
        value: ``max |x|`` over the output (``inf``/``nan`` when it already overflowed).
        dtype: the dtype it was computed in (the autocast dtype under autocast).
        kind: ``"output"`` (a module's output), ``"attn_logits"`` (``q·kᵀ/√d`` of an
            ``nn.MultiheadAttention``) or ``"model_output"`` (the model's own output).
    """

    value: float
    dtype: str
    kind: str = "output"


def _first_float(x: Any) -> Tensor | None:
    if isinstance(x, Tensor):
        return x if x.is_floating_point() and x.numel() > 0 else None
    if isinstance(x, (tuple, list)):
        for y in x:
            t = _first_float(y)
            if t is not None:
                return t
    if isinstance(x, dict):
        return _first_float(list(x.values()))
    return None


def _dtype_of(t: Tensor) -> str:
    dt = t.dtype
    dev = t.device.type
    if dt not in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)  # computed in half precision, handed on widened
    return str(dt)


def _logit_bound(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """``max_i |q_i| · max_j |k_j| · scale`` (device scalar): a bound of ``max |q·kᵀ|·scale``."""
    qn = torch.linalg.vector_norm(q.detach().float(), dim=-1).amax()
    kn = torch.linalg.vector_norm(k.detach().float(), dim=-1).amax()
    return qn * kn * scale


def _mha_logits(m: nn.MultiheadAttention, query: Tensor, key: Tensor) -> Tensor:
    """The logit bound of an ``nn.MultiheadAttention`` forward, from its own projections."""
    d, h = m.embed_dim, m.num_heads
    if m.in_proj_weight is not None:
        wq, wk = m.in_proj_weight[:d], m.in_proj_weight[d : 2 * d]
    else:
        wq, wk = m.q_proj_weight, m.k_proj_weight
    bq = bk = None
    if m.in_proj_bias is not None:
        bq, bk = m.in_proj_bias[:d], m.in_proj_bias[d : 2 * d]
    q = F.linear(query, wq, bq).unflatten(-1, (h, d // h))  # per-head rows
    k = F.linear(key, wk, bk).unflatten(-1, (h, d // h))
    return _logit_bound(q, k, (d // h) ** -0.5)


class _AttentionProbe(TorchFunctionMode):
    """Sees every ``F.scaled_dot_product_attention`` call while entered (one forward)."""

    def __init__(self, watch: LogitWatch) -> None:
        super().__init__()
        self.watch = watch

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q = args[0] if args else kwargs.get("query")
            k = args[1] if len(args) > 1 else kwargs.get("key")
            if isinstance(q, Tensor) and isinstance(k, Tensor) and q.is_floating_point():
                scale = kwargs.get("scale") or q.shape[-1] ** -0.5
                with torch.no_grad():
                    self.watch._keep(f"{self.watch._stack[-1]}.{ATTN_LOGITS}",
                                     _logit_bound(q, k, scale), _dtype_of(q), ATTN_LOGITS)
        return func(*args, **kwargs)


class LogitWatch:
    """Forward hooks on every module of ``model`` (the model itself included, under the
    name ``""``), active only while :attr:`armed`; see the module docstring."""

    def __init__(self, model: nn.Module) -> None:
        self.armed = False
        self._handles: list[RemovableHandle] = []
        self._values: dict[str, Tensor] = {}
        self._meta: dict[str, tuple[str, str]] = {}
        self._stack: list[str] = []  # the modules the armed forward is inside of
        self._probe: _AttentionProbe | None = None
        for name, m in model.named_modules():
            if type(m).__name__ in _ROUTING and name:
                continue
            self._handles.append(m.register_forward_pre_hook(self._enter(name, m is model)))
            self._handles.append(m.register_forward_hook(self._hook(name, m is model)))
            if isinstance(m, nn.MultiheadAttention):
                self._handles.append(
                    m.register_forward_pre_hook(self._mha_hook(name), with_kwargs=True))

    def _keep(self, key: str, value: Tensor, dtype: str, kind: str) -> None:
        if key not in self._values:  # the first call of a module in the armed forward
            self._values[key] = value.detach()
            self._meta[key] = (dtype, kind)

    def _enter(self, name: str, root: bool) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            if not self.armed or not torch.is_grad_enabled():
                return
            self._stack.append(name or "(model)")
            if root and self._probe is None:
                self._probe = _AttentionProbe(self)
                self._probe.__enter__()
        return hook

    def _leave(self) -> None:
        if self._probe is not None:
            self._probe.__exit__(None, None, None)
            self._probe = None
        self._stack = []

    def _hook(self, name: str, root: bool) -> Any:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if not self.armed or not torch.is_grad_enabled():
                return
            if self._stack:
                self._stack.pop()
            t = _first_float(out)
            if t is not None:
                self._keep(name, t.detach().abs().amax().float(), _dtype_of(t),
                           "model_output" if root else "output")
            if root:
                self._leave()
        return hook

    def _mha_hook(self, name: str) -> Any:
        def hook(module: nn.MultiheadAttention, args: tuple[Any, ...], kwargs: dict[str, Any]
                 ) -> None:
            if not self.armed or not torch.is_grad_enabled():
                return
            q = args[0] if args else kwargs.get("query")
            k = args[1] if len(args) > 1 else kwargs.get("key")
            if isinstance(q, Tensor) and isinstance(k, Tensor) and q.is_floating_point():
                with torch.no_grad():
                    self._keep(f"{name or '(model)'}.{ATTN_LOGITS}", _mha_logits(module, q, k),
                               _dtype_of(q), ATTN_LOGITS)
        return hook

    def take(self) -> dict[str, Magnitude]:
        """The magnitudes of the armed forward (one host copy), then disarm and reset."""
        self.armed = False
        self._leave()  # a forward that raised never reached the model's own hook
        if not self._values:
            return {}
        keys = list(self._values)
        vals = torch.stack([self._values[k].to(self._values[keys[0]].device) for k in keys])
        out = {k: Magnitude(v, *self._meta[k]) for k, v in zip(keys, vals.tolist())}
        self._values, self._meta = {}, {}
        return out

    def remove(self) -> None:
        self._leave()
        for h in self._handles:
            h.remove()
        self._handles = []


def watch_signals(magnitudes: Mapping[str, Magnitude]) -> tuple[dict[str, float], dict[str, str]]:
    """The precursor signals of a sample: the largest attention-logit bound, the model's
    output, and for each half-precision output the fraction of its dtype's range in use
    (overflow at 1); plus the module each came from.

    Example:
        >>> from gradguard._logit_watch import Magnitude, watch_signals
        >>> vals, where = watch_signals({"fc": Magnitude(6550.4, "torch.float16")})
        >>> round(vals["half_overflow:fc"], 3), where["half_overflow:fc"]
        (0.1, 'fc')
    """
    vals: dict[str, float] = {}
    where: dict[str, str] = {}

    def keep(key: str, v: float, name: str) -> None:
        if math.isfinite(v) and v > vals.get(key, 0.0):
            vals[key], where[key] = v, name

    for name, m in magnitudes.items():
        if m.kind == "attn_logits":
            keep("attn_logits", m.value, name)
        elif m.kind == "model_output":
            keep("output_logits", m.value, name or "(output)")
        if m.dtype in ("torch.float16", "torch.bfloat16"):
            dt = torch.float16 if m.dtype == "torch.float16" else torch.bfloat16
            keep(f"half_overflow:{name}", m.value / torch.finfo(dt).max, name)
    return vals, where
