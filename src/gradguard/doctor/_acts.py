"""Activations: which calls are activations, and what their derivative does on the batch.

Every elementwise activation, whatever the model's style (``nn.ReLU``, ``F.silu``,
``x.sigmoid_()``, ``torch.tanh_``, ``nn.ReLU6`` = ``F.hardtanh(x, 0, 6)``, a hand-written
``x * torch.sigmoid(x)`` module), is characterised the same way: its derivative ``f'`` is
taken by autograd at the pre-activations the batch produced, and its *profile* (where
``f'`` is flat) by probing ``f'`` on a grid once. No formula per function:

* ``relu`` family: ``f'`` is flat far below 0 (ReLU, ReLU6, GELU, SiLU, Hardswish, ELU,
  Mish, Softplus). A unit flat on every sample is dead; the share of positive inputs where
  ``f'`` is flat (ReLU6 at ≥ 6) is its saturation.
* ``bounded`` family: flat far from 0 on both sides but not just below 0 (sigmoid, tanh,
  hardtanh, hardsigmoid, softsign): elements in the flat tails are saturated.
* anything else (LeakyReLU, PReLU) is ``smooth``: never dead or saturated.

"Flat" is ``|f'| < 1 %`` of the function's peak derivative: the 6 of |x| > 6 for sigmoid
and 3 for tanh.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

#: |f'| below this share of the function's peak derivative counts as flat: 1 %, just under,
#: so that a LeakyReLU's default slope 0.01 is not flat
FLAT = 0.0099
#: grid on which a function's profile is probed
_GRID = (-10.0, -0.5, 10.0)

# function -> its out-of-place form (in-place variants are measured through it)
_OUT_OF_PLACE: dict[Any, Callable[..., Tensor]] = {
    F.relu: F.relu, F.relu_: F.relu, torch.relu: F.relu, torch.relu_: F.relu,
    Tensor.relu: F.relu, Tensor.relu_: F.relu, F.relu6: F.relu6,
    F.hardtanh: F.hardtanh, F.hardtanh_: F.hardtanh,
    F.silu: F.silu, F.gelu: F.gelu, F.mish: F.mish, F.hardswish: F.hardswish,
    F.elu: F.elu, F.elu_: F.elu, F.selu: F.selu, F.celu: F.celu, F.softplus: F.softplus,
    F.leaky_relu: F.leaky_relu, F.leaky_relu_: F.leaky_relu,
    torch.sigmoid: torch.sigmoid, torch.sigmoid_: torch.sigmoid, Tensor.sigmoid: torch.sigmoid,
    Tensor.sigmoid_: torch.sigmoid, F.sigmoid: torch.sigmoid, torch.special.expit: torch.sigmoid,
    F.hardsigmoid: F.hardsigmoid, F.softsign: F.softsign,
    torch.tanh: torch.tanh, torch.tanh_: torch.tanh, Tensor.tanh: torch.tanh,
    Tensor.tanh_: torch.tanh, F.tanh: torch.tanh,
}


def activation_fn(func: Any) -> Callable[..., Tensor] | None:
    """The out-of-place activation behind ``func`` (a torch function or method), or None."""
    try:
        return _OUT_OF_PLACE.get(func)
    except TypeError:  # an unhashable callable
        return None


def extra_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The arguments after the input, without ``inplace`` (a bool positional is always it)."""
    return tuple(a for a in args[1:] if not isinstance(a, bool)), {k: v for k, v in kwargs.items() if k != "inplace"}


@dataclass(frozen=True)
class Profile:
    family: str  # "relu" | "bounded" | "smooth"
    peak: float  # max |f'| on the grid


def _keep(t: Tensor) -> Tensor:
    return t


def derivative(fn: Callable[..., Tensor], x: Tensor, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Tensor:
    """``f'(x)`` elementwise, by autograd, in float32 (x is not touched). Its own
    saved tensors are kept from any hooks around the call: inside a non-reentrant
    ``torch.utils.checkpoint`` (transformers' ``gradient_checkpointing_enable()``) the
    checkpoint took them for the model's, and its recomputation failed ("Recomputed values
    ... have different metadata")."""
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
        xr = x.detach().float().requires_grad_(True)
        y = fn(xr, *args, **(kwargs or {}))
        (d,) = torch.autograd.grad(y.sum(), xr)
    return d


def _profile(fn: Callable[..., Tensor], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Profile:
    grid = torch.linspace(-10.0, 10.0, 2001)
    d = derivative(fn, grid, args, kwargs).abs()
    peak = float(d.max())
    if not peak > 0:
        return Profile("smooth", 1.0)
    at = {v: float(derivative(fn, torch.tensor([v]), args, kwargs).abs()) / peak for v in _GRID}
    lo_far, lo_near, hi_far = at[-10.0] < FLAT, at[-0.5] < FLAT, at[10.0] < FLAT
    if lo_far and hi_far and not lo_near:
        return Profile("bounded", peak)
    return Profile("relu" if lo_far else "smooth", peak)


@lru_cache(maxsize=256)
def _cached(fn: Callable[..., Tensor], args: tuple[Any, ...], kw: tuple[tuple[str, Any], ...]) -> Profile:
    return _profile(fn, args, dict(kw))


def profile(fn: Callable[..., Tensor], args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Profile:
    """Where ``fn``'s derivative is flat (cached per function and arguments)."""
    kw = tuple(sorted((kwargs or {}).items()))
    if inspect.ismethod(fn):  # a module's forward: caching it would keep the module alive
        return _profile(fn, args, dict(kw))
    try:
        return _cached(fn, args, kw)
    except TypeError:  # unhashable arguments: probe each time
        return _profile(fn, args, dict(kw))


def units_by_samples(x: Tensor) -> Tensor:
    """[units, samples]: channels of a conv map, the last dim of [B, D] and [B, T, D]."""
    if x.ndim >= 4:
        return x.transpose(0, 1).reshape(x.shape[1], -1)
    if x.ndim <= 1:
        return x.reshape(1, -1)
    return x.reshape(-1, x.shape[-1]).T


@dataclass
class Act:
    """One call of an activation, measured at its input."""

    kind: str  # the function's name: relu, sigmoid, tanh, relu6, silu, ...
    family: str  # "relu" | "bounded" | "smooth"
    where: str
    order: int
    n_units: int
    dead_frac: float  # relu family: units flat below 0 on every sample of the batch
    sat_frac: float  # bounded: share of inputs in a flat tail; relu family: of the inputs > 0
    deriv_rms: float  # rms of f' at the measured inputs
    active_frac: float  # share of inputs where f' is not flat
    off_frac: float  # relu family: share of inputs flat below 0 (zero gradient)
    pre_rms: float
    pre_absmax: float
    pre_mean: float = 0.0
    after: str = ""  # the weight layer that ran last before it (its likely input)
    src: int = 0  # data_ptr of the input tensor (tells a module's own call from an inner one)
    feeds: str = ""  # the module its output went into ("": a raw op, e.g. a gate's product)


def measure(
    kind: str,
    fn: Callable[..., Tensor],
    x: Tensor,
    where: str,
    order: int,
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
) -> Act:
    """Dead/saturated fractions and the derivative of ``fn`` at the inputs ``x``."""
    prof = profile(fn, args, kwargs)
    with torch.no_grad():
        xf = x.detach().float()
        n = xf.numel()
        d = derivative(fn, xf, args, kwargs).abs() if n else xf
        flat = d < FLAT * prof.peak
        dead = sat = off = 0.0
        u = units_by_samples(xf)
        if prof.family == "relu" and n:
            lo = units_by_samples(flat & (xf < 0))
            dead = float(lo.all(dim=1).float().mean()) if u.shape[1] > 1 else 0.0
            # the negative side is flat by design: saturation is judged on the positive side
            pos = xf > 0
            sat = float((flat & pos).sum() / pos.sum().clamp_min(1))
            off = float((flat & ~pos).float().mean())
        elif prof.family == "bounded" and n:
            sat = float(flat.float().mean())
        return Act(
            kind=kind,
            family=prof.family,
            where=where,
            order=order,
            n_units=int(u.shape[0]),
            dead_frac=dead,
            sat_frac=sat,
            deriv_rms=float(d.pow(2).mean().sqrt()) if n else math.nan,
            active_frac=1.0 - float(flat.float().mean()) if n else 0.0,
            off_frac=off,
            pre_rms=float(xf.pow(2).mean().sqrt()) if n else 0.0,
            pre_absmax=float(xf.abs().max()) if n else 0.0,
            pre_mean=float(xf.mean()) if n else 0.0,
            src=x.data_ptr() if n else 0,
        )


def fn_name(fn: Any) -> str:
    return str(getattr(fn, "__name__", type(fn).__name__)).rstrip("_").replace("special_expit", "sigmoid")
