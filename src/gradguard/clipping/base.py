"""The clip-policy protocol and the two policies torch has: norm and value clipping.

A policy is a small state machine. Guard measures the gradients once (a
:class:`~gradguard.telemetry.StepStats` of device tensors) and hands them to
``policy.apply_(stats)``, which scales the gradients in place and returns the effective
coefficient (post-clip norm / pre-clip norm, a device scalar). Policies that clip the
total norm also expose ``coefficient(stats)``: the multiplier they want, without touching
the gradients, so that :func:`~gradguard.clipping.chain` can take the smallest of several
and a fused optimizer can take it as its ``grad_scale``. ``clip_(params)`` is the
standalone form (measure, apply, return the pre-clip norm), a drop-in for
``torch.nn.utils.clip_grad_norm_``.

Statistics live on the device and are updated with ``torch.where`` so that a non-finite
norm never enters them and no value is ever read by the host.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from ..measure import StepStats, is_unit_on_cpu, measure_grads, use_foreach
from ._args import (  # re-exported: policies import them from here
    ParamsArg,
    as_named_params,
    check_foreach,
    check_norm_type,
    check_positive,
)

#: ``clip_grad_norm_`` adds this to the norm before dividing (kept for bit-equality).
NORM_EPS = 1e-6

__all__ = [
    "NORM_EPS", "ClipPolicy", "NormClip", "ParamsArg", "Policy", "ValueClip", "apply_policy",
    "as_named_params", "check_foreach", "check_norm_type", "check_positive", "deferrable",
    "norm_coef", "policy_coefficient", "ratio_coef", "scale_grads_", "to_device",
]


def scale_grads_(stats: StepStats, coef: Tensor, *, foreach: bool | None = None) -> None:
    """Multiply every gradient by ``coef`` in place, one ``_foreach_mul_`` per group
    (``foreach`` as in ``clip_grad_norm_``: None uses the foreach kernels where the device
    has them, False a loop of ``mul_``).

    DTensor (FSDP2) gradients are scaled through their local shards (the coefficient is
    already global, and plain tensors skip DTensor dispatch); sparse ones through their
    values. A CPU coefficient of 1 is read and nothing is multiplied (``is_unit_on_cpu``)."""
    if is_unit_on_cpu(coef, (grp.device for grp in stats.groups)):
        return
    for grp in stats.groups:
        data, c = grp.data(), coef.to(grp.device, non_blocking=True)
        if use_foreach(foreach, data, grp.device):
            torch._foreach_mul_(data, c)
        else:
            for t in data:
                t.mul_(c)


def norm_coef(total: Tensor, finite: Tensor, threshold: Tensor | float) -> Tensor:
    """``min(1, threshold / (total + 1e-6))``; 1 where the norm is not finite."""
    coef = torch.clamp(threshold / (total + NORM_EPS), max=1.0)
    return torch.where(finite, coef, torch.ones_like(coef))


def ratio_coef(after: Tensor, stats: StepStats) -> Tensor:
    """The effective coefficient of an element- or unit-wise clip: post-clip norm over
    pre-clip norm (at most 1; 1 where the pre-clip norm is not finite)."""
    coef = after.float() / stats.total_norm.float().clamp_min(1e-30)
    return torch.where(stats.finite, coef.clamp(max=1.0), torch.ones_like(coef))


@runtime_checkable
class ClipPolicy(Protocol):
    """What the Guard needs from a clipping policy.

    ``apply_(stats)`` clips in place from precomputed statistics and returns the effective
    coefficient; ``clip_(params)`` is the standalone form. Total-norm policies also have
    ``coefficient(stats)`` (see :class:`Policy`).
    """

    def clip_(self, params: ParamsArg) -> Tensor: ...

    def apply_(self, stats: StepStats) -> Tensor: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


class Policy:
    """Shared plumbing of gradguard's policies.

    Subclasses that clip the total norm implement :meth:`coefficient`; element- or
    unit-wise ones (:class:`ValueClip`, :class:`~gradguard.AGC`) override :meth:`apply_`
    and set ``scalar = False``.
    """

    norm_type: float = 2.0
    #: None: measure in each gradient's dtype (as torch does); at least float32 otherwise.
    measure_dtype: torch.dtype | None = torch.float32
    #: True when the whole clip is one multiplier of the total norm (see coefficient).
    scalar: bool = True
    #: As in ``clip_grad_norm_``: None uses the foreach kernels where the device has them.
    foreach: bool | None = None
    _owner: weakref.ref[Any] | None = None
    #: the parameters (weak) of the guard bound last, kept once it is closed
    _params: list[weakref.ref[Tensor]] | None = None

    def reset(self) -> None:
        """Forget what was learnt of the gradient norm. The guard calls it when the
        optimizer's parameters change (``add_param_group``): the total norm is then of
        another set of parameters, and statistics of the old one would clip the new one
        (an unfrozen backbone raises the norm for good). Stateless policies keep nothing."""

    @property
    def deferrable(self) -> bool:
        """True when this policy's whole clip is its :meth:`coefficient`, so that a fused
        optimizer can apply it inside its update (``grad_scale``) instead of a separate
        pass over the gradients. A subclass that overrides :meth:`apply_` keeps its own
        in-place path."""
        return self.scalar and type(self).apply_ is Policy.apply_

    def coefficient(self, stats: StepStats) -> Tensor:
        """The multiplier this policy applies to every gradient this step (a device
        scalar in (0, 1]; 1 when the norm is not finite), advancing its statistics by one
        step. Does not touch the gradients."""
        raise TypeError(
            f"{type(self).__name__} clips element- or unit-wise: it has no single "
            "coefficient; use apply_(stats)"
        )

    def apply_(self, stats: StepStats) -> Tensor:
        """Clip the gradients of ``stats`` in place; return the effective coefficient
        (post-clip norm / pre-clip norm, a device scalar)."""
        coef = self.coefficient(stats)
        scale_grads_(stats, coef, foreach=self.foreach)
        return coef

    def clip_(self, params: ParamsArg) -> Tensor:
        """Clip the gradients of ``params`` in place; return the pre-clip total norm."""
        if isinstance(params, nn.Module):
            self.attach_model(params)
        with torch.no_grad():
            stats = self.measure(params)
            self.apply_(stats)
        return stats.total_norm

    def measure(self, params: ParamsArg) -> StepStats:
        """The statistics ``clip_`` works from: the gradients of ``params`` measured in
        this policy's norm order and dtype."""
        named = as_named_params(params)
        return measure_grads(
            [p for _, p in named], norm_type=self.norm_type, accumulate_dtype=self.measure_dtype,
            names=[n for n, _ in named], foreach=self.foreach,
        )

    __call__ = clip_

    def attach_model(self, model: nn.Module) -> None:
        """Learn what the parameter names alone do not say (e.g. which axis of a weight
        holds the output units); called by ``clip_(module)``. Nothing by default."""

    def bind(self, owner: object) -> None:
        """Tie this policy's statistics to one guard: a second guard is refused, since two
        runs would silently share (and corrupt) one history of norms. After its guard was
        closed, a guard over the same parameters goes on with them (the same run); one over
        other parameters starts them afresh (:meth:`reset`) and says so: a sweep that built
        ``gg.ZClip()`` once clipped the next fold's healthy steps by the last fold's norms."""
        current = self._owner() if self._owner is not None else None
        if current is not None and current is not owner:
            raise ValueError(
                f"clip={self!r} is already used by another Guard: its statistics belong to "
                "that run; give each guard its own policy (e.g. copy.deepcopy(policy))"
            )
        params, done = _owner_params(owner), self._params if current is None else None
        if done is not None and params is not None and not (
                len(done) == len(params) and all(r() is p for r, p in zip(done, params))):
            import warnings

            from ..errors import GradGuardWarning
            warnings.warn(
                f"clip={self!r} was used by a Guard, now closed, over other parameters: its "
                "statistics were that run's, so this guard starts them afresh; give each "
                "guard its own policy (e.g. copy.deepcopy(policy)) to say so",
                GradGuardWarning, stacklevel=4)
            self.reset()
        self._owner = weakref.ref(owner)
        self._params = None if params is None else [weakref.ref(p) for p in params]

    def release(self, owner: object) -> None:
        """``owner`` is done with this policy (its guard was closed)."""
        if self._owner is not None and self._owner() is owner:
            self._owner = None

    def __getstate__(self) -> dict[str, Any]:
        # a copy (deepcopy, pickle) is a new, unbound policy with the same statistics
        state = dict(vars(self))
        for key in ("_owner", "_params"):
            state.pop(key, None)
        return state

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        return None

    def _check_keys(self, sd: dict[str, Any], keys: Iterable[str]) -> None:
        missing = [k for k in keys if k not in sd]
        if missing:
            raise ValueError(f"{type(self).__name__}.load_state_dict: missing keys {missing}")


def _owner_params(owner: object) -> list[Tensor] | None:
    """The parameters a guard's optimizer steps, in order (None: not a guard)."""
    opt = getattr(owner, "optimizer", None)
    groups = getattr(opt, "param_groups", None)
    if groups is None:
        return None
    return [p for g in groups for p in g["params"]]


def to_device(state: dict[str, Tensor] | None, device: torch.device) -> dict[str, Tensor] | None:
    """Copies of a policy's statistics on ``device`` (a checkpoint may come from another)."""
    if state is None:
        return None
    return {k: v.detach().to(device, copy=True) for k, v in state.items()}


class NormClip(Policy):
    """Clip the total gradient norm to ``max_norm`` (drop-in for ``clip_grad_norm_``).

    Standalone ``clip_`` gives the same results as ``torch.nn.utils.clip_grad_norm_(params,
    max_norm, norm_type, error_if_nonfinite, foreach)`` for finite gradients of every dtype
    torch supports (float32, float64, bfloat16, float16, complex, mixed lists): the norms
    are computed in each gradient's own dtype and promoted as torch promotes them, the
    coefficient is ``min(1, max_norm / (norm + 1e-6))``. Beyond torch:

    * sparse gradients (``nn.Embedding(sparse=True)``) are clipped too: they are coalesced
      and measured on their values (torch 2.13 raises);
    * a tensor ``max_norm`` is used on the device (torch reads it on the host).

    **The one documented difference:** a non-finite total norm leaves the gradients
    unscaled (torch multiplies them by NaN, or by 0 for an infinite norm); the returned
    norm is still the non-finite one, and ``error_if_nonfinite=True`` raises exactly as
    torch does.

    Args:
        max_norm: the largest allowed total norm: a number > 0, or a one-element real
            tensor (> 0 when constructed; it may be changed in place later, e.g. by a
            schedule).
        norm_type: the norm order: a number > 0, ``math.inf`` or ``"inf"``.
        error_if_nonfinite: raise ``RuntimeError`` when the total norm is NaN/Inf (one host
            read per call, only when True). Under a Guard prefer ``on_nonfinite``.
        foreach: None uses the foreach kernels where the device has them, True insists
            (``RuntimeError`` on a device without them), False loops over the tensors.

    Example:
        >>> import torch, gradguard as gg
        >>> w = torch.nn.Parameter(torch.ones(4)); w.grad = torch.full((4,), 3.0)
        >>> gg.NormClip(max_norm=1.0).clip_([w])
        tensor(6.)
        >>> round(w.grad.norm().item(), 4)
        1.0
        >>> z = torch.nn.Parameter(torch.zeros(1, dtype=torch.complex128))
        >>> z.grad = torch.tensor([3 + 4j], dtype=torch.complex128)
        >>> gg.NormClip(max_norm=1.0, norm_type="inf").clip_([z])
        tensor(5., dtype=torch.float64)
    """

    measure_dtype = None

    def __init__(
        self,
        max_norm: float | Tensor = 1.0,
        norm_type: float | str = 2.0,
        *,
        error_if_nonfinite: bool = False,
        foreach: bool | None = None,
    ) -> None:
        self.max_norm: float | Tensor
        if isinstance(max_norm, Tensor):
            if max_norm.numel() != 1 or max_norm.is_complex() or not max_norm.is_floating_point():
                raise TypeError(
                    f"NormClip(max_norm=tensor of shape {tuple(max_norm.shape)} and dtype "
                    f"{max_norm.dtype}): expected a number or a one-element real floating tensor"
                )
            if not bool(max_norm.detach().reshape(()) > 0):  # once, at construction
                raise ValueError(f"NormClip(max_norm={max_norm!r}): must be > 0")
            self.max_norm = max_norm
        else:
            self.max_norm = check_positive("max_norm", max_norm, "NormClip")
        self.norm_type = check_norm_type(norm_type, "NormClip")
        if not isinstance(error_if_nonfinite, bool):
            raise TypeError(
                f"NormClip(error_if_nonfinite={error_if_nonfinite!r}): must be True or False"
            )
        self.error_if_nonfinite = error_if_nonfinite
        self.foreach = check_foreach(foreach, "NormClip")

    def coefficient(self, stats: StepStats) -> Tensor:
        if stats.norm_type != self.norm_type:
            stats = measure_grads(
                stats.params, norm_type=self.norm_type, device=stats.total_norm.device
            )
        if self.error_if_nonfinite and not bool(stats.finite):  # asked for: one host read
            raise RuntimeError(
                f"The total norm of order {self.norm_type} for gradients from `parameters` "
                "is non-finite, so it cannot be clipped. To disable this error and leave "
                "the gradients unscaled, set `error_if_nonfinite=False`"
            )
        limit = self.max_norm
        if isinstance(limit, Tensor):
            limit = limit.detach().reshape(()).to(stats.total_norm.device, non_blocking=True)
        return norm_coef(stats.total_norm, stats.finite, limit)

    def __repr__(self) -> str:
        extra = "" if not self.error_if_nonfinite else ", error_if_nonfinite=True"
        extra += "" if self.foreach is None else f", foreach={self.foreach}"
        return f"NormClip(max_norm={self.max_norm}, norm_type={self.norm_type}{extra})"


class ValueClip(Policy):
    """Clamp every gradient element to ``[-clip_value, clip_value]`` (``clip_grad_value_``).

    Returns the pre-clip total 2-norm. The coefficient recorded by the Guard is the
    post-clip norm over the pre-clip norm (one extra norm pass). Sparse gradients are
    clamped on their coalesced values; complex ones on their real and imaginary parts
    (torch's ``clamp`` is undefined for complex numbers).

    Args:
        clip_value: the largest allowed absolute value (> 0).
        foreach: as in ``clip_grad_value_`` (None: the foreach kernels where the device
            has them).

    Example:
        >>> import torch, gradguard as gg
        >>> w = torch.nn.Parameter(torch.zeros(2)); w.grad = torch.tensor([3.0, -0.1])
        >>> _ = gg.ValueClip(0.5).clip_([w]); w.grad
        tensor([ 0.5000, -0.1000])
    """

    scalar = False

    def __init__(self, clip_value: float = 1.0, *, foreach: bool | None = None) -> None:
        self.clip_value = check_positive("clip_value", clip_value, "ValueClip")
        self.foreach = check_foreach(foreach, "ValueClip")

    def apply_(self, stats: StepStats) -> Tensor:
        for grp in stats.groups:
            # element-wise: shards clamp alone; complex as (real, imag) pairs
            data = [torch.view_as_real(t) if t.is_complex() else t for t in grp.data()]
            if use_foreach(self.foreach, data, grp.device):
                torch._foreach_clamp_min_(data, -self.clip_value)
                torch._foreach_clamp_max_(data, self.clip_value)
            else:
                for t in data:
                    t.clamp_(min=-self.clip_value, max=self.clip_value)
        after = measure_grads(stats.params, device=stats.total_norm.device).total_norm
        return ratio_coef(after, stats)

    def __repr__(self) -> str:
        return f"ValueClip(clip_value={self.clip_value})"


def deferrable(policy: Any) -> bool:
    """True when ``policy`` (or no policy) can be applied inside a fused optimizer's update
    as one multiplier (see :attr:`Policy.deferrable`); third-party policies cannot."""
    return policy is None or getattr(policy, "deferrable", False) is True


def policy_coefficient(policy: Any, stats: StepStats) -> Tensor | None:
    """The multiplier a :func:`deferrable` policy wants this step (float32 device scalar),
    advancing its statistics, without touching the gradients; None without a policy."""
    if policy is None:
        return None
    coef: Tensor = policy.coefficient(stats)
    return coef.float()


def apply_policy(policy: Any, stats: StepStats) -> Tensor | None:
    """What the Guard does with its clip policy each step: ``apply_`` it to the measured
    ``stats`` (the effective coefficient), or, for a third-party policy with only
    ``clip_``, let it measure by itself (no coefficient to record). None: no policy."""
    if policy is None:
        return None
    apply = getattr(policy, "apply_", None)
    if callable(apply):
        coef: Tensor = apply(stats)
        return coef
    policy.clip_(list(zip(stats.names, stats.params)))
    return None
