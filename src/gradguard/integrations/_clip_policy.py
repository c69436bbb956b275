"""The clip policy of a guard under ``gradguard run``: the script's own clip calls
(deferred by :mod:`._clip_intercept`), composed with or replaced by ``--clip``.

With ``--clip``, the user's policy *composes* with the script's clip by default (total
norms: the smallest coefficient wins, applied once, as :func:`gradguard.chain`) or
*replaces* it (``script_clip="replace"``: the script's calls only measure).
"""

from __future__ import annotations

import copy
from collections import Counter
from typing import Any, Literal

import torch
from torch import Tensor

from ..clipping.base import NORM_EPS, Policy, ratio_coef, scale_grads_
from ..telemetry import StepStats, measure_grads
from ._clip_intercept import ClipInterceptor, ClipKind, ClipRequest, total_norm

ScriptClipMode = Literal["compose", "replace"]
SCRIPT_CLIP_MODES: tuple[str, ...] = ("compose", "replace")


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
        #: a clip call's words -> the trainer setting that makes it (the Hugging Face
        #: Trainer's clip_grad_norm_ is its TrainingArguments' max_grad_norm)
        self.aliases: dict[str, str] = {}
        self._one: Tensor | None = None

    def with_foreseen(self, foreseen: tuple[tuple[ClipKind, float], ...]) -> InterceptedClip:
        """This policy, also recording the trainer's own clip (see ``foreseen``)."""
        out = InterceptedClip(self.interceptor, self.user, self.mode, foreseen)
        out.aliases = dict(self.aliases)
        return out

    @property
    def replaces(self) -> bool:
        """The script's clipping is replaced by the user's policy."""
        return self.user is not None and self.mode == "replace"

    def void(self, stats: StepStats) -> None:
        """The guard voids this step (its gradients are those of weights a restore
        replaced): the script's clip requests on them are this step's, carried out by no
        one, and no step the script skipped (found by a stranger: after the LR probe
        voided a step, its pending ``clip_grad_norm_`` was read at the next ``zero_grad``
        as "the script skipped the step itself")."""
        self.interceptor.claim(_grad_ids(stats))

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
        out = InterceptedClip(self.interceptor, copy.deepcopy(self.user, memo), self.mode,
                              self.foreseen)
        out.aliases = dict(self.aliases)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"user": None if self.user is None else self.user.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.user is not None and state_dict.get("user") is not None:
            self.user.load_state_dict(state_dict["user"])

    def describe(self) -> str:
        """What this guard clips with, in words (for ``guard.json`` and the summary)."""
        user = "none" if self.user is None else repr(self.user)
        said = (k.rsplit(" ", 1)[0] for k in self.counts)
        script = sorted({self.aliases.get(k, k) for k in said}
                        | {_describe_trainer(k, v) for k, v in self.foreseen})
        if not script:
            return user
        if self.user is None:
            return f"the script's {', '.join(script)}"
        how = "replaced by" if self.replaces else "composed with"
        return f"the script's {', '.join(script)} {how} {user}"

    def __repr__(self) -> str:
        return f"InterceptedClip(user={self.user!r}, mode={self.mode!r})"


def _describe_trainer(kind: str, limit: float) -> str:
    alg = "" if kind == "norm" else ", gradient_clip_algorithm='value'"
    return f"Trainer(gradient_clip_val={limit:g}{alg})"


def _remeasure(stats: StepStats) -> StepStats:
    return measure_grads(stats.params, norm_type=stats.norm_type,
                         device=stats.total_norm.device, names=stats.names)
