"""One instrumented forward/backward pass: what every layer, block and activation did.

Module hooks record each call's input and output scale and, through a tensor hook, the
gradient that reaches its output; a ``TorchFunctionMode`` sees every activation function
whatever the model's style (``nn.ReLU``, ``F.silu``, ``x.sigmoid_()``) and measures its
pre-activations before it runs (an in-place activation overwrites them). A parameter-free
module that computes an activation out of several functions (``x * sigmoid(1.702 x)``,
GPT-2's tanh-GELU) is measured as one activation. Gradients are taken with
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
from ._acts import Act, activation_fn, extra_args, fn_name, measure
from ._attention import is_attention_softmax, normalized_entropy, sdpa_entropy, valid_keys


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
    in_rms: float = math.nan  # first floating input
    #: a normalisation layer's input scale as it divides by it: the rms over its groups of
    #: each group's standard deviation (NaN: not a centring norm, or unknown)
    in_scale: float = math.nan
    in_features: int = 0  # size of the first floating input's last dim (fan-in of a matmul)
    delta_rms: float | None = None  # rms(out - in) of a shape-preserving block, None if unknown
    grad_norm: float | None = None  # L2 norm of dL/d(output) over the whole tensor
    consumers: list[str] = field(default_factory=list)  # modules whose first input was our output
    grad_finite: bool = True
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    in_nodes: set[Any] = field(default_factory=set)
    out_nodes: list[Any] = field(default_factory=list)
    time_leaf: Tensor | None = None  # zero leaf added to an RNN's input (a probe point per step)
    time_grad: Tensor | None = None  # dL/d(time_leaf): the loss gradient at each step's input
    time_axis: int = 0


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
    attention: list[tuple[str, float]] = field(default_factory=list)  # (where, normalised entropy)
    #: the shapes of the model's output tensors (a target of one of them is regressed on)
    output_shapes: list[tuple[int, ...]] = field(default_factory=list)


def is_weight_layer(m: nn.Module) -> bool:
    """A module that mixes units with a matrix/kernel of its own (Linear, Conv, Embedding)."""
    w = m._parameters.get("weight")
    return isinstance(w, Tensor) and w.ndim >= 2 and not isinstance(m, nn.RNNBase)


def _group_scale(m: nn.Module, x: Tensor) -> float:
    """The rms over a centring normalisation layer's groups of each group's standard
    deviation (a BatchNorm's channels, a LayerNorm's positions, a GroupNorm's groups): the
    scale it divides its input by. A mean-dominated input (sigmoid outputs at 0.45 +- 0.005)
    has an rms far above it. NaN for other modules (an RMSNorm divides by the rms itself)."""
    with torch.no_grad():
        v = x.detach().float()
        if isinstance(m, nn.modules.batchnorm._NormBase) and v.ndim >= 2:
            var = v.transpose(0, 1).reshape(v.shape[1], -1).var(dim=1, unbiased=False)
        elif isinstance(m, nn.LayerNorm) and v.ndim >= len(m.normalized_shape):
            var = v.reshape(-1, math.prod(m.normalized_shape)).var(dim=1, unbiased=False)
        elif isinstance(m, nn.GroupNorm) and v.ndim >= 2:
            var = v.reshape(v.shape[0], m.num_groups, -1).var(dim=2, unbiased=False)
        else:
            return math.nan
        return float(var.mean().sqrt()) if var.numel() else math.nan


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


def _norm(t: Tensor) -> tuple[float, bool]:
    """L2 norm over the finite entries, and whether all were finite."""
    with torch.no_grad():
        x = t.detach().float()
        n = float(x.norm())
        if math.isfinite(n):
            return n, True
        x = x[torch.isfinite(x)]
        return (float(x.norm()) if x.numel() else 0.0), False


def _finite(t: Tensor) -> bool:
    return bool(torch.isfinite(t).all()) if t.is_floating_point() else True


class _ActivationMode(TorchFunctionMode):
    """Sees every torch function call: activations (measured before they run, an in-place
    one overwrites its input) and attention softmaxes (their entropy)."""

    def __init__(
        self,
        on_act: Callable[[Any, tuple[Any, ...], dict[str, Any]], Act],
        acts_out: dict[tuple[int, tuple[int, ...]], Act],
        where: Callable[[], str],
    ) -> None:
        super().__init__()
        self.on_act = on_act
        self.acts_out = acts_out  # (data_ptr, shape) of an activation's output -> the Act
        self.where = where
        self.attention: list[tuple[str, float]] = []  # (module path, normalised entropy)
        self.suspended = False

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        act = None
        live = not self.suspended and args and isinstance(args[0], Tensor) and args[0].is_floating_point()
        if live and activation_fn(func) is not None:
            act = self.on_act(func, args, kwargs)
        if live and func is F.scaled_dot_product_attention:
            self.attention.append((self.where(), sdpa_entropy(args, kwargs)))
        out = func(*args, **kwargs)
        if act is not None and isinstance(out, Tensor):
            self.acts_out[(out.data_ptr(), tuple(out.shape))] = act
        if live and isinstance(out, Tensor) and is_attention_softmax(func, args, kwargs):
            self.attention.append((self.where(), normalized_entropy(out, valid_keys(args[0]))))
        return out


#: normalisation layers: the scale of the weights before them does not reach the output
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm)


def is_norm(m: nn.Module) -> bool:
    """A normalisation layer, torch's or a library's own (``LlamaRMSNorm``, ``T5LayerNorm``)."""
    return isinstance(m, _NORMS) or ("Norm" in type(m).__name__ and not any(p.ndim >= 2 for p in m.parameters()))


def _recorded_module(m: nn.Module) -> bool:
    """Modules whose output gradient is recorded: weight layers, recurrences and
    normalisation layers (their backward gain: :mod:`.norms`)."""
    return is_weight_layer(m) or isinstance(m, (nn.RNNBase, nn.RNNCellBase)) or is_norm(m)


@contextmanager
def _hooks(
    model: nn.Module, calls: list[Call], acts: list[Act], counter: list[int], blocks: set[str]
) -> Iterator[list[tuple[str, float]]]:
    stack: list[str] = []
    producers: dict[tuple[int, tuple[int, ...]], Call] = {}  # (data_ptr, shape) of an output -> its call
    pending: dict[int, list[tuple[Call, int, int, int]]] = {}
    # a module's input is mostly the output of the module before it: a module output (kept
    # alive by its Call, so its storage is not reused) is measured once (key: storage, shape,
    # in-place version)
    seen: dict[tuple[int, tuple[int, ...], int], tuple[float, float]] = {}

    def peak_rms(t: Tensor, rms: bool) -> tuple[float, float]:
        got = seen.get((t.data_ptr(), tuple(t.shape), t._version))
        if got is not None:
            return got
        if rms:
            r, p, finite = _stats(t)
            return (p if finite else math.inf, r)
        return float(t.detach().abs().max()), math.nan

    handles: list[Any] = []
    last_weight = [""]
    modules = dict(model.named_modules())
    # a parameter-free leaf module may be an activation written out of several functions
    composite = {p for p, m in modules.items() if not list(m.children()) and not list(m.parameters(recurse=False))}

    acts_out: dict[tuple[int, tuple[int, ...]], Act] = {}

    def on_act(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Act:
        counter[0] += 1
        fn = activation_fn(func)
        assert fn is not None
        # an activation module (nn.ReLU) is named by its own path; a functional call
        # (F.relu in some forward) by the weight layer whose output it most likely reads
        top = stack[-1] if stack else ""
        where = top if top and top in composite else last_weight[0]
        extra, kw = extra_args(args, kwargs)
        act = measure(fn_name(func), fn, args[0], where, counter[0], extra, kw)
        act.after = last_weight[0]
        acts.append(act)
        return act

    mode = _ActivationMode(on_act, acts_out, lambda: stack[-1] if stack else "")

    def pre(path: str) -> Callable[..., Any]:
        def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            stack.append(path)
            ins = list(iter_tensors((args, kwargs)))
            call = Call(path=path, module=mod, order=-1, out=None, args=args, kwargs=kwargs)
            # one pass per input: max |x| is NaN/Inf exactly when x holds a NaN/Inf
            floats = [t for t in ins if t.is_floating_point() and t.numel()]
            first_stats = peak_rms(floats[0], True) if floats else (0.0, math.nan)
            peaks = [first_stats[0]] + [peak_rms(t, False)[0] for t in floats[1:]] if floats else []
            call.in_finite = all(math.isfinite(v) for v in peaks)
            call.in_absmax = max((v for v in peaks if math.isfinite(v)), default=0.0)
            if floats:
                call.in_rms = first_stats[1]
                call.in_scale = _group_scale(mod, floats[0])
                call.in_features = int(floats[0].shape[-1]) if floats[0].ndim else 1
            call.in_nodes = {t.grad_fn for t in ins if t.grad_fn is not None}
            first = floats[0] if floats else None
            ptr = first.data_ptr() if first is not None else 0
            if first is not None and (src := producers.get((ptr, tuple(first.shape)))) is not None:
                src.consumers.append(path)
            if first is not None and (fed := acts_out.get((ptr, tuple(first.shape)))) is not None and not fed.feeds:
                fed.feeds = path
            version = first._version if first is not None else -1
            pending.setdefault(id(mod), []).append((call, len(acts), ptr, version))
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
            call, n_acts, ptr, version = pending[id(mod)].pop()
            call.order = counter[0]
            if is_weight_layer(mod):
                last_weight[0] = path
            outs = list(iter_floats(out))
            first_in = next(iter_floats((args, kwargs)), None)
            unchanged = first_in is not None and first_in.data_ptr() == ptr and first_in._version == version
            if path in composite and len(acts) > n_acts and unchanged and outs and first_in is not None:
                _fold_composite(mod, path, first_in, outs[0], acts, n_acts, ptr)
            call.out_nodes = [t.grad_fn for t in outs if t.grad_fn is not None]
            if outs:
                o = outs[0]
                call.out = o
                producers[(o.data_ptr(), tuple(o.shape))] = call
                call.out_dtype = o.dtype
                call.out_rms, call.out_absmax, finite = _stats(o)
                seen[(o.data_ptr(), tuple(o.shape), o._version)] = (call.out_absmax if finite else math.inf, call.out_rms)
                if path in blocks and unchanged and first_in is not None and first_in.shape == o.shape:
                    with torch.no_grad():
                        call.delta_rms = float((o.detach().float() - first_in.detach().float()).pow(2).mean().sqrt())
                if o.requires_grad and (_recorded_module(mod) or path in blocks):

                    def grad_hook(g: Tensor, call: Call = call) -> None:
                        call.grad_norm, call.grad_finite = _norm(g)

                    o.register_hook(grad_hook)
            call.out_finite = all(math.isfinite(peak_rms(t, False)[0]) for t in outs if t.numel())
            calls.append(call)

        return hook

    def _fold_composite(mod: nn.Module, path: str, x: Tensor, y: Tensor, acts: list[Act], start: int, ptr: int) -> None:
        """Replace the activation calls inside a parameter-free module that reads ``x`` only
        through intermediate tensors by one measurement of the whole module."""
        if y.shape != x.shape or any(a.src == ptr for a in acts[start:]):
            return  # not elementwise, or the module's own input went to an activation (nn.ReLU)
        mode.suspended = True
        try:
            act = measure(type(mod).__name__, mod.forward, x, path, acts[start].order, (), {})
        except (RuntimeError, TypeError, ValueError, IndexError):
            return  # not an elementwise function of its input after all: keep the inner calls
        finally:
            mode.suspended = False
        act.after = acts[start].after
        del acts[start:]
        acts.append(act)
        acts_out[(y.data_ptr(), tuple(y.shape))] = act

    try:
        for path, mod in modules.items():
            handles.append(mod.register_forward_pre_hook(pre(path), with_kwargs=True))
            handles.append(mod.register_forward_hook(post(path), with_kwargs=True))
        with mode:
            yield mode.attention
    finally:
        for h in handles:
            h.remove()


def run_capture(
    model: nn.Module,
    call_model: Callable[[], Any],
    compute_loss: Callable[[Any], Tensor],
    blocks: set[str] | None = None,
) -> Capture:
    """Forward, loss and ``autograd.grad`` with every probe hook in place. ``blocks``: module
    paths whose output gradient and residual change are recorded too."""
    calls: list[Call] = []
    acts: list[Act] = []
    counter = [0]
    with _hooks(model, calls, acts, counter, blocks or set()) as attention:
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
        c.time_grad = g
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
        attention=[(w, h) for w, h in attention if math.isfinite(h)],
        output_shapes=[tuple(t.shape) for t in iter_tensors(out)],
    )
