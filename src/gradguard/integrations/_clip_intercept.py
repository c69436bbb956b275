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

With ``--clip``, the user's policy *composes* with the script's clip by default (total
norms: the smallest coefficient wins, applied once, as :func:`gradguard.chain`) or
*replaces* it (``script_clip="replace"``: the script's calls only measure).
"""

from __future__ import annotations

import copy
import weakref
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor
from torch.nn.utils import clip_grad as _torch_clip

from ..clipping.base import NORM_EPS, Policy, ratio_coef, scale_grads_
from ..telemetry import StepStats, measure_grads

ScriptClipMode = Literal["compose", "replace"]
ClipKind = Literal["norm", "value"]
SCRIPT_CLIP_MODES: tuple[str, ...] = ("compose", "replace")

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

    def coefficient(self) -> Tensor:
        """The multiplier torch applies (a device scalar; norm requests only)."""
        assert self.total is not None
        return torch.clamp(self.limit / (self.total + NORM_EPS), max=1.0)

    def apply(self) -> None:
        """Carry the clip out exactly as torch would have at the call."""
        with torch.no_grad():
            if self.kind == "norm":
                assert self.total is not None
                _scale_with_norm(self.params, self.limit, self.total, self.foreach)
            else:
                _VALUE(self.params, self.limit, self.foreach)

    def describe(self) -> str:
        return _describe(self.kind, self.limit)


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


def _grad_ids(stats: StepStats) -> set[int]:
    return {id(p) for grp in stats.groups for p in grp.params}


class InterceptedClip(Policy):
    """The clip policy of a guard under ``gradguard run``: carries out the script's own
    (deferred) clip calls, composed with or replaced by the user's ``--clip`` policy.

    Args:
        interceptor: the session's :class:`ClipInterceptor`.
        user: the ``--clip`` policy, or None.
        mode: ``"compose"`` or ``"replace"`` (see the module docstring).
        foreseen: clips the trainer makes itself right after the guard's hook (Lightning's
            ``gradient_clip_val``), as ``("norm" | "value", limit)``: not applied here
            (the trainer does it, so the module's own hooks see what they always saw), but
            their coefficient is recorded as part of the clip that happened.

    Example:
        >>> import torch
        >>> from gradguard.telemetry import measure_grads
        >>> icpt = ClipInterceptor()
        >>> w = torch.nn.Parameter(torch.zeros(2)); w.grad = torch.tensor([3.0, 4.0])
        >>> opt = torch.optim.SGD([w], lr=0.1); icpt.optimizers.add(opt)  # it holds w
        >>> icpt.clip_grad_norm_([w], max_norm=1.0)      # what torch returns; not clipped yet
        tensor(5.)
        >>> policy = InterceptedClip(icpt)
        >>> policy.apply_(measure_grads([w]))           # the guard's step: clip and record
        tensor(0.2000)
        >>> w.grad
        tensor([0.6000, 0.8000])
    """

    scalar = False
    #: The trainer's own clip (``max_grad_norm``) is carried out here, after the guard's
    #: measurement: the Hugging Face callback must not switch it off.
    replays_trainer_clip = True

    def __init__(self, interceptor: ClipInterceptor, user: Any = None,
                 mode: ScriptClipMode = "compose",
                 foreseen: tuple[tuple[ClipKind, float], ...] = ()) -> None:
        if mode not in SCRIPT_CLIP_MODES:
            raise ValueError(f"script_clip={mode!r}: allowed values are {SCRIPT_CLIP_MODES}")
        self.interceptor = interceptor
        self.user = user
        self.mode: ScriptClipMode = mode
        self.foreseen = foreseen
        self.counts: Counter[str] = Counter()  # clip call -> steps it was applied/replaced
        self._one: Tensor | None = None

    def with_foreseen(self, foreseen: tuple[tuple[ClipKind, float], ...]) -> InterceptedClip:
        """This policy, also recording the trainer's own clip (see ``foreseen``)."""
        return InterceptedClip(self.interceptor, self.user, self.mode, foreseen)

    @property
    def replaces(self) -> bool:
        """The script's clipping is replaced by the user's policy."""
        return self.user is not None and self.mode == "replace"

    def apply_(self, stats: StepStats) -> Tensor:
        reqs = self.interceptor.claim(_grad_ids(stats))
        verb = "replaced" if self.replaces else "applied"
        for r in reqs:
            self.counts[f"{r.describe()} {verb}"] += 1
        coef = self._apply(stats, [] if self.replaces else reqs)
        for kind, limit in self.foreseen:
            self.counts[f"{_describe_trainer(kind, limit)} applied"] += 1
            coef = coef * self._foresee(stats, kind, limit)
        return coef

    def _apply(self, stats: StepStats, reqs: list[ClipRequest]) -> Tensor:
        user = self.user
        if not reqs:
            return user.apply_(stats) if user is not None else self._ones(stats)
        ids = _grad_ids(stats)
        whole = [r for r in reqs if r.kind == "norm" and r.ids >= ids]
        if len(whole) == len(reqs) and (user is None or getattr(user, "scalar", False)):
            # total-norm clips over all of this guard's gradients: one multiplier, the
            # smallest wins (as gg.chain); torch's own coefficient, from the script's norm
            coefs = [r.coefficient() for r in whole]
            if user is not None:
                coefs.append(user.coefficient(stats))
            coef = torch.stack([c.float().reshape(()) for c in coefs]).amin()
            scale_grads_(stats, coef.to(stats.total_norm.device))
            for r in reqs:
                self._outside(r, ids, r.coefficient())
            return coef
        user_coef = (user.coefficient(stats) if user is not None and getattr(user, "scalar", False)
                     else None)  # from the true norm, before the script's clip
        for r in reqs:
            r.apply()
        after = _remeasure(stats)
        if user_coef is not None:
            # the smallest wins: cap the norm the script left at the user's threshold
            cap = user_coef * stats.total_norm
            scale_grads_(after, torch.clamp(cap / (after.total_norm + NORM_EPS), max=1.0))
            after = _remeasure(stats)
        elif user is not None:
            user.apply_(after)
            after = _remeasure(stats)
        return ratio_coef(after.total_norm, stats)

    @staticmethod
    def _foresee(stats: StepStats, kind: ClipKind, limit: float) -> Tensor:
        """The coefficient the trainer's own clip will apply to the gradients as they are
        now (torch's formula on torch's norm; nothing is changed)."""
        params = list(stats.params)  # the optimizer's order, as the trainer passes them
        with torch.no_grad():
            total = total_norm(params, 2.0, False, None)
            if kind == "norm":
                return torch.clamp(limit / (total + NORM_EPS), max=1.0).float()
            grads = [p.grad for p in params if p.grad is not None]
            clamped = [g.clamp(-limit, limit) for g in grads]  # a copy: value clipping only
            after = torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(c).to(total.device) for c in clamped]))
            return torch.where(total > 0, after / total.clamp_min(1e-30), 1.0).float()

    @staticmethod
    def _outside(req: ClipRequest, ids: set[int], coef: Tensor) -> None:
        """A request that also covers another optimizer's parameters scales them too,
        with the same coefficient, as torch did at the call."""
        rest = [p.grad for p in req.params
                if id(p) in req.ids and id(p) not in ids and p.grad is not None]
        if rest:
            with torch.no_grad():
                torch._foreach_mul_(rest, coef.to(rest[0].device))

    def _ones(self, stats: StepStats) -> Tensor:
        if self._one is None or self._one.device != stats.total_norm.device:
            self._one = torch.ones((), device=stats.total_norm.device)
        return self._one

    # ---- the policy protocol ------------------------------------------------------------
    def bind(self, owner: object) -> None:
        if callable(getattr(self.user, "bind", None)):
            self.user.bind(owner)

    def release(self, owner: object) -> None:
        if callable(getattr(self.user, "release", None)):
            self.user.release(owner)

    def __deepcopy__(self, memo: dict[int, Any]) -> InterceptedClip:
        # a trainer callback copies its policy per optimizer: the copy shares the session's
        # interceptor and gets its own user policy (statistics belong to one guard)
        return InterceptedClip(self.interceptor, copy.deepcopy(self.user, memo), self.mode,
                               self.foreseen)

    def state_dict(self) -> dict[str, Any]:
        return {"user": None if self.user is None else self.user.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.user is not None and state_dict.get("user") is not None:
            self.user.load_state_dict(state_dict["user"])

    def describe(self) -> str:
        """What this guard clips with, in words (for ``guard.json`` and the summary)."""
        user = "none" if self.user is None else repr(self.user)
        script = sorted({k.rsplit(" ", 1)[0] for k in self.counts}
                        | {_describe_trainer(k, v) for k, v in self.foreseen})
        if not script:
            return user
        if self.user is None:
            return f"the script's {', '.join(script)}"
        how = "replaced by" if self.replaces else "composed with"
        return f"the script's {', '.join(script)} {how} {user}"

    def __repr__(self) -> str:
        return f"InterceptedClip(user={self.user!r}, mode={self.mode!r})"


def _describe(kind: str, limit: float) -> str:
    if kind == "norm":
        return f"clip_grad_norm_(max_norm={limit:g})"
    return f"clip_grad_value_(clip_value={limit:g})"


def _describe_trainer(kind: str, limit: float) -> str:
    alg = "" if kind == "norm" else ", gradient_clip_algorithm='value'"
    return f"Trainer(gradient_clip_val={limit:g}{alg})"


def _remeasure(stats: StepStats) -> StepStats:
    return measure_grads(stats.params, norm_type=stats.norm_type,
                         device=stats.total_norm.device, names=stats.names)
