"""The script's own gradient clipping, under ``gradguard run``.

A training script clips before ``optimizer.step()`` (``torch.nn.utils.clip_grad_norm_``,
``clip_grad_value_``, ``clip_grads_with_norm_``; the Hugging Face Trainer and accelerate
call the same functions). A guard that measured after that would record post-clip norms:
every spike hidden under the cap. So while a session is installed these functions are
replaced by versions that

* compute and return exactly what torch returns (the pre-clip total norm, with torch's own
  ``get_total_norm``: same value, same ``error_if_nonfinite`` error), and
* *defer* the clip itself: it is recorded as a :class:`ClipRequest` and carried out by the
  guard of the optimizer that owns the parameters (:class:`InterceptedClip`, the guard's
  clip policy) right after the guard has measured the true pre-clip norms, with torch's
  own ``clip_grads_with_norm_`` / ``clip_grad_value_``: the update is bit-identical to
  the unguarded script's, and the recorded clip coefficient is the script's.

A deferred clip is applied at once instead (plain torch semantics, and noted) whenever
deferring could change what the script computes: no ``torch.optim`` optimizer holds the
parameters (a hand-written update, another library's optimizer), the guard of those
parameters has already measured this step (Lightning clips after its
``on_before_optimizer_step``), a new ``backward`` arrives first (clipping per
micro-batch), or the optimizer steps unguarded (``step(closure)``). What the script
cannot see: gradients read between its clip call and ``optimizer.step()`` are not yet
clipped.

The guard carries the requests out through its clip policy,
:class:`~gradguard.integrations._clip_policy.InterceptedClip`.
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor
from torch.nn.utils import clip_grad as _torch_clip

from ..clipping.base import NORM_EPS
from ..distributed.world import is_dtensor
from ..telemetry import measure_grads

ClipKind = Literal["norm", "value"]

# torch's own implementation, kept before anything is patched (torch >= 2.6 splits
# clip_grad_norm_ into these two; older torch falls back to gradguard's equivalents)
_TOTAL_NORM: Callable[..., Tensor] | None = getattr(_torch_clip, "_get_total_norm", None)
_WITH_NORM: Callable[..., None] | None = getattr(_torch_clip, "_clip_grads_with_norm_", None)
_VALUE: Callable[..., None] = _torch_clip.clip_grad_value_


def _params(parameters: Any) -> list[Tensor]:
    return [parameters] if isinstance(parameters, Tensor) else list(parameters)


def total_norm(params: list[Tensor], norm_type: float, error_if_nonfinite: bool,
               foreach: bool | None) -> Tensor:
    """What ``clip_grad_norm_`` returns: torch's total norm of the gradients of ``params``."""
    grads = [p.grad for p in params if p.grad is not None]
    if _TOTAL_NORM is not None:
        return _TOTAL_NORM(grads, norm_type, error_if_nonfinite, foreach)
    stats = measure_grads(params, norm_type=norm_type, accumulate_dtype=None)  # torch < 2.6
    if error_if_nonfinite and not bool(stats.finite):
        raise RuntimeError(f"The total norm of order {norm_type} for gradients from "
                           "`parameters` is non-finite, so it cannot be clipped.")
    return stats.total_norm


def _scale_with_norm(params: list[Tensor], max_norm: float, total: Tensor,
                     foreach: bool | None) -> None:
    if _WITH_NORM is not None:
        _WITH_NORM(params, max_norm, total, foreach)
        return
    coef = torch.clamp(max_norm / (total + NORM_EPS), max=1.0)
    for p in params:
        if p.grad is not None:
            p.grad.mul_(coef.to(p.grad.device))


@dataclass
class ClipRequest:
    """One clip call of the script, not yet carried out.

    Attributes:
        kind: ``"norm"`` (``clip_grad_norm_``/``clip_grads_with_norm_``) or ``"value"``.
        params: the parameters the script passed.
        ids: ids of those of them that had a gradient at the call.
        limit: ``max_norm`` or ``clip_value``.
        total: the pre-clip total norm the script got back (norm requests).
        foreach: the script's ``foreach`` argument.
    """

    kind: ClipKind
    params: list[Tensor]
    ids: frozenset[int]
    limit: float
    total: Tensor | None = None
    foreach: bool | None = None

    def __post_init__(self) -> None:
        # the norm as a plain tensor: under FSDP2 torch returns a DTensor, which scales no
        # local shard (found by a stranger: every FSDP2 script that called clip_grad_norm_
        # died at its first step under gradguard run, "got mixed torch.Tensor and
        # DTensor"); made here, in the script's call, which every rank makes (a partial
        # norm is reduced by a collective)
        total = self.total
        self._plain = total.full_tensor() if is_dtensor(total) else total  # type: ignore[union-attr]

    def coefficient(self) -> Tensor:
        """The multiplier torch applies (a device scalar; norm requests only)."""
        assert self._plain is not None
        return torch.clamp(self.limit / (self._plain + NORM_EPS), max=1.0)

    def apply(self) -> None:
        """Carry the clip out exactly as torch would have at the call."""
        with torch.no_grad():
            if self.kind == "norm":
                assert self.total is not None
                _scale_with_norm(self.params, self.limit, self.total, self.foreach)
            else:
                _VALUE(self.params, self.limit, self.foreach)

    def describe(self) -> str:
        return describe_clip(self.kind, self.limit)


@dataclass
class ClipInterceptor:
    """Pending clip requests of one session, and the patched torch functions.

    Attributes:
        pending: requests waiting for their optimizer's guard.
        optimizers: every ``torch.optim`` optimizer seen (a request is deferred only when
            these hold all its parameters).
        measured: ids of parameters a guard has measured this step, until the update.
        immediate: why requests were applied at once instead (reason -> count).
    """

    pending: list[ClipRequest] = field(default_factory=list)
    optimizers: weakref.WeakSet[torch.optim.Optimizer] = field(default_factory=weakref.WeakSet)
    measured: set[int] = field(default_factory=set)
    immediate: Counter[str] = field(default_factory=Counter)
    _saved: list[tuple[Any, str, Any]] = field(default_factory=list)

    # ---- install / uninstall ----------------------------------------------------------
    def install(self) -> None:
        """Replace torch's clip functions (both where torch defines and re-exports them)."""
        utils = torch.nn.utils
        patches = {
            "clip_grad_norm_": self.clip_grad_norm_,
            "clip_grad_value_": self.clip_grad_value_,
            "clip_grads_with_norm_": self.clip_grads_with_norm_,
            "_clip_grads_with_norm_": self.clip_grads_with_norm_,
        }
        for mod in (utils, _torch_clip):
            for name, fn in patches.items():
                if hasattr(mod, name):
                    self._saved.append((mod, name, getattr(mod, name)))
                    setattr(mod, name, fn)

    def uninstall(self) -> None:
        self.flush("uninstall")
        for mod, name, orig in reversed(self._saved):
            setattr(mod, name, orig)
        self._saved = []

    # ---- the script's calls -----------------------------------------------------------
    def clip_grad_norm_(self, parameters: Any, max_norm: float, norm_type: float = 2.0,
                        error_if_nonfinite: bool = False, foreach: bool | None = None) -> Tensor:
        """``torch.nn.utils.clip_grad_norm_``, deferred to the guard (see the module doc)."""
        params = _params(parameters)
        with torch.no_grad():
            total = total_norm(params, float(norm_type), error_if_nonfinite, foreach)
        self._request(ClipRequest("norm", params, self._ids(params), float(max_norm), total,
                                  foreach))
        return total

    def clip_grads_with_norm_(self, parameters: Any, max_norm: float, total_norm: Tensor,
                              foreach: bool | None = None) -> None:
        """``torch.nn.utils.clip_grads_with_norm_``, deferred to the guard."""
        params = _params(parameters)
        self._request(ClipRequest("norm", params, self._ids(params), float(max_norm),
                                  total_norm, foreach))

    def clip_grad_value_(self, parameters: Any, clip_value: float,
                         foreach: bool | None = None) -> None:
        """``torch.nn.utils.clip_grad_value_``, deferred to the guard."""
        params = _params(parameters)
        self._request(ClipRequest("value", params, self._ids(params), float(clip_value),
                                  None, foreach))

    @staticmethod
    def _ids(params: Iterable[Tensor]) -> frozenset[int]:
        return frozenset(id(p) for p in params if p.grad is not None)

    def _request(self, req: ClipRequest) -> None:
        if not req.ids:
            return  # no gradient: torch would change nothing
        owned = {id(p) for opt in list(self.optimizers) for g in opt.param_groups
                 for p in g["params"]}
        if not req.ids <= owned:
            self._now(req, "parameters no torch.optim optimizer holds")
        elif req.ids & self.measured:
            self._now(req, "clipped after the guard measured (a trainer's late clip)")
        else:
            # the same parameters clipped again before a step: torch's second clip of
            # unchanged gradients changes nothing, so the newer request stands for both
            self.pending = [r for r in self.pending if r.ids != req.ids]
            self.pending.append(req)

    def _now(self, req: ClipRequest, reason: str) -> None:
        req.apply()
        self.immediate[reason] += 1

    # ---- the session's events ---------------------------------------------------------
    def flush(self, reason: str, ids: set[int] | None = None) -> None:
        """Apply pending requests now (those touching ``ids``; all when None): new
        gradients are coming, or their optimizer steps unguarded."""
        keep: list[ClipRequest] = []
        for r in self.pending:
            if ids is None or r.ids & ids:
                self._now(r, reason)
            else:
                keep.append(r)
        self.pending = keep

    def drop(self, ids: set[int]) -> list[ClipRequest]:
        """Take the requests whose parameters are all in ``ids`` without carrying them
        out: their gradients are being zeroed, never stepped (the script skipped the step).
        A request only partly zeroed stays: its guard carries it out on the rest."""
        mine = [r for r in self.pending if r.ids <= ids]
        self.pending = [r for r in self.pending if not r.ids <= ids]
        return mine

    def claim(self, ids: set[int]) -> list[ClipRequest]:
        """Take the requests that touch ``ids`` (a guard's parameters) and mark those
        parameters measured until :meth:`stepped`."""
        mine = [r for r in self.pending if r.ids & ids]
        self.pending = [r for r in self.pending if not r.ids & ids]
        self.measured |= ids
        return mine

    def stepped(self) -> None:
        """An optimizer step ended (or was skipped by a GradScaler): measure afresh."""
        self.measured.clear()


def describe_clip(kind: str, limit: float) -> str:
    if kind == "norm":
        return f"clip_grad_norm_(max_norm={limit:g})"
    return f"clip_grad_value_(clip_value={limit:g})"
