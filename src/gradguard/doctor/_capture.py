"""One instrumented forward/backward pass: what every layer and activation did.

Module hooks record each call's output scale and (through a tensor hook) the gradient that
reaches it; a ``TorchFunctionMode`` sees every activation function whatever the model's
style (``nn.ReLU``, ``F.relu``, ``x.sigmoid()``) and records its pre-activations before it
runs (an in-place ReLU would overwrite them). Gradients are taken with
``torch.autograd.grad`` so that no ``.grad`` of the user's model is touched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .._tensors import iter_floats, iter_tensors

#: |pre-activation| above which a unit is saturated: its derivative is < 1 % of its peak.
SIGMOID_SATURATION = 6.0
TANH_SATURATION = 3.0

_RELU = "relu"
_SIGMOID = "sigmoid"
_TANH = "tanh"
_ACT_FUNCS: dict[Any, str] = {
    F.relu: _RELU,
    F.relu_: _RELU,
    torch.relu: _RELU,
    torch.relu_: _RELU,
    Tensor.relu: _RELU,
    Tensor.relu_: _RELU,
    F.relu6: _RELU,
    torch.sigmoid: _SIGMOID,
    Tensor.sigmoid: _SIGMOID,
    F.sigmoid: _SIGMOID,
    torch.special.expit: _SIGMOID,
    torch.tanh: _TANH,
    Tensor.tanh: _TANH,
    F.tanh: _TANH,
}


@dataclass
class Call:
    """One call of one module."""

    path: str
    module: nn.Module
    order: int  # global event counter at the end of the call
    out: Tensor | None  # first floating output (kept for the tensor hook)
    out_rms: float = math.nan
    out_absmax: float = math.nan
    out_dtype: torch.dtype | None = None
    out_finite: bool = True
    in_finite: bool = True
    in_absmax: float = 0.0
    grad_rms: float | None = None  # rms of dL/d(output), times positions per unit
    grad_finite: bool = True
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    in_nodes: set[Any] = field(default_factory=set)
    out_nodes: list[Any] = field(default_factory=list)
    time_leaf: Tensor | None = None  # zero leaf added to an RNN's input: its grad per step
    time_axis: int = 0


@dataclass
class Act:
    """One call of a ReLU/sigmoid/tanh activation, measured at its input."""

    kind: str
    where: str
    order: int
    n_units: int
    dead_frac: float  # ReLU: units <= 0 on every sample of the batch
    sat_frac: float  # sigmoid/tanh: share of pre-activations in the flat tails
    deriv_rms: float  # rms of the activation's derivative at the measured inputs
    pre_rms: float
    pre_absmax: float
    pre_mean: float = 0.0
    after: str = ""  # the weight layer that ran last before it (its likely input)


@dataclass
class Capture:
    """Everything one instrumented pass measured."""

    calls: list[Call]
    acts: list[Act]
    loss: float
    loss_dtype: torch.dtype
    output_finite: bool
    param_grads: dict[str, Tensor | None]
    call_count: dict[str, int]
    graph_root: Any


def _units_by_samples(x: Tensor) -> Tensor:
    """[units, samples]: channels of a conv map, the last dim of [B, D] and [B, T, D]."""
    if x.ndim >= 4:
        return x.transpose(0, 1).reshape(x.shape[1], -1)
    if x.ndim <= 1:
        return x.reshape(1, -1)
    return x.reshape(-1, x.shape[-1]).T


def positions_per_unit(t: Tensor) -> float:
    """Positions that share one unit per sample (H*W of a conv map, T of a sequence).

    A mean over N positions (global pooling, a mean-reduced loss over tokens) divides the
    gradient per element by N while the weight gradient, summed over positions, keeps its
    scale: multiplying by N compares layers of different geometry on one footing.
    """
    if t.ndim <= 2:
        return 1.0
    units = t.shape[1] if t.ndim >= 4 else t.shape[-1]
    return t.numel() / max(1, t.shape[0] * units)


def measure_activation(kind: str, x: Tensor, where: str, order: int) -> Act:
    """Dead/saturated fraction and the derivative at the inputs ``x`` of one activation."""
    with torch.no_grad():
        xf = x.detach().float()
        u = _units_by_samples(xf)
        n_units = int(u.shape[0])
        pre_rms = float(xf.pow(2).mean().sqrt()) if xf.numel() else 0.0
        pre_absmax = float(xf.abs().max()) if xf.numel() else 0.0
        pre_mean = float(xf.mean()) if xf.numel() else 0.0
        dead = sat = 0.0
        if kind == _RELU:
            dead = float((u.amax(dim=1) <= 0).float().mean()) if u.shape[1] > 1 else 0.0
            deriv_rms = math.sqrt(float((xf > 0).float().mean()))
        elif kind == _SIGMOID:
            s = torch.sigmoid(xf)
            deriv_rms = float((s * (1 - s)).pow(2).mean().sqrt())
            sat = float((xf.abs() > SIGMOID_SATURATION).float().mean())
        else:
            deriv_rms = float((1 - torch.tanh(xf).pow(2)).pow(2).mean().sqrt())
            sat = float((xf.abs() > TANH_SATURATION).float().mean())
    return Act(kind, where, order, n_units, dead, sat, deriv_rms, pre_rms, pre_absmax, pre_mean)


class _ActivationMode(TorchFunctionMode):
    def __init__(self, on_act: Callable[[str, Tensor], None]) -> None:
        super().__init__()
        self.on_act = on_act

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        try:
            kind = _ACT_FUNCS.get(func)
        except TypeError:  # an unhashable callable
            kind = None
        if kind is not None and args and isinstance(args[0], Tensor) and args[0].is_floating_point():
            self.on_act(kind, args[0])
        return func(*args, **kwargs)


def is_weight_layer(m: nn.Module) -> bool:
    """A module that mixes units with a matrix/kernel of its own (Linear, Conv, Embedding)."""
    w = m._parameters.get("weight")
    return isinstance(w, Tensor) and w.ndim >= 2 and not isinstance(m, nn.RNNBase)


def _absmax(t: Tensor) -> float:
    with torch.no_grad():
        return float(t.detach().abs().max())


def _stats(t: Tensor) -> tuple[float, float, bool]:
    """rms and max |x| over the finite entries, and whether all were finite (the mask is
    built only when needed)."""
    with torch.no_grad():
        x = t.detach()
        if x.numel() == 0:
            return math.nan, math.nan, True
        peak = float(x.abs().max())
        finite = math.isfinite(peak)
        if not finite:
            x = x[torch.isfinite(x)]
            if x.numel() == 0:
                return math.nan, math.nan, False
            peak = float(x.abs().max())
        return float(x.float().pow(2).mean().sqrt()), peak, finite


def _finite(t: Tensor) -> bool:
    return bool(torch.isfinite(t).all()) if t.is_floating_point() else True


@contextmanager
def _hooks(model: nn.Module, calls: list[Call], acts: list[Act], counter: list[int]) -> Iterator[None]:
    stack: list[str] = []
    pending: dict[int, list[Call]] = {}
    handles: list[Any] = []

    last_weight = [""]

    def on_act(kind: str, x: Tensor) -> None:
        counter[0] += 1
        # an activation module (nn.ReLU) is named by its own path; a functional call
        # (F.relu in some forward) by the weight layer whose output it most likely reads
        top = stack[-1] if stack else ""
        where = top if top and not list(modules[top].children()) and not is_weight_layer(modules[top]) else last_weight[0]
        act = measure_activation(kind, x, where, counter[0])
        act.after = last_weight[0]
        acts.append(act)

    def pre(path: str) -> Callable[..., Any]:
        def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            stack.append(path)
            ins = list(iter_tensors((args, kwargs)))
            call = Call(path=path, module=mod, order=-1, out=None, args=args, kwargs=kwargs)
            # one pass per input: max |x| is NaN/Inf exactly when x holds a NaN/Inf
            peaks = [_absmax(t) for t in ins if t.is_floating_point() and t.numel()]
            call.in_finite = all(math.isfinite(v) for v in peaks)
            call.in_absmax = max((v for v in peaks if math.isfinite(v)), default=0.0)
            call.in_nodes = {t.grad_fn for t in ins if t.grad_fn is not None}
            pending.setdefault(id(mod), []).append(call)
            if isinstance(mod, nn.RNNBase) and args and isinstance(args[0], Tensor):
                x = args[0]
                if x.is_floating_point() and x.ndim >= 2:
                    leaf = torch.zeros_like(x, requires_grad=True)
                    call.time_leaf = leaf
                    call.time_axis = 1 if (mod.batch_first and x.ndim == 3) else 0
                    return (x + leaf, *args[1:]), kwargs
            return None

        return hook

    def post(path: str) -> Callable[..., Any]:
        def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            stack.pop()
            counter[0] += 1
            call = pending[id(mod)].pop()
            call.order = counter[0]
            if is_weight_layer(mod):
                last_weight[0] = path
            outs = list(iter_floats(out))
            call.out_nodes = [t.grad_fn for t in outs if t.grad_fn is not None]
            call.out_finite = all(math.isfinite(_absmax(t)) for t in outs if t.numel())
            if outs:
                o = outs[0]
                call.out = o
                call.out_dtype = o.dtype
                call.out_rms, call.out_absmax, _ = _stats(o)
                if o.requires_grad and (
                    is_weight_layer(mod) or isinstance(mod, (nn.RNNBase, nn.RNNCellBase))
                ):

                    def grad_hook(g: Tensor, call: Call = call) -> None:
                        rms, _, finite = _stats(g)
                        call.grad_finite = finite
                        call.grad_rms = (rms if math.isfinite(rms) else 0.0) * positions_per_unit(g)

                    o.register_hook(grad_hook)
            calls.append(call)

        return hook

    modules = dict(model.named_modules())
    try:
        for path, mod in modules.items():
            handles.append(mod.register_forward_pre_hook(pre(path), with_kwargs=True))
            handles.append(mod.register_forward_hook(post(path), with_kwargs=True))
        with _ActivationMode(on_act):
            yield
    finally:
        for h in handles:
            h.remove()


def run_capture(
    model: nn.Module,
    call_model: Callable[[], Any],
    compute_loss: Callable[[Any], Tensor],
) -> Capture:
    """Forward, loss and ``autograd.grad`` with every probe hook in place."""
    calls: list[Call] = []
    acts: list[Act] = []
    counter = [0]
    with _hooks(model, calls, acts, counter):
        out = call_model()
    loss = compute_loss(out)
    output_finite = all(_finite(t) for t in iter_tensors(out))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    leaves = [c.time_leaf for c in calls if c.time_leaf is not None]
    grads: list[Tensor | None] = []
    if loss.requires_grad:
        grads = list(
            torch.autograd.grad(
                loss, [p for _, p in named] + leaves, allow_unused=True, retain_graph=True
            )
        )
    else:
        grads = [None] * (len(named) + len(leaves))
    for c, g in zip([c for c in calls if c.time_leaf is not None], grads[len(named) :]):
        c.time_leaf = g  # the leaf's gradient replaces the leaf: grad per time step
    count: dict[str, int] = {}
    for c in calls:
        count[c.path] = count.get(c.path, 0) + 1
    return Capture(
        calls=calls,
        acts=acts,
        loss=float(loss.detach().float()),
        loss_dtype=loss.dtype,
        output_finite=output_finite,
        param_grads={n: g for (n, _), g in zip(named, grads[: len(named)])},
        call_count=count,
        graph_root=loss.grad_fn,
    )
