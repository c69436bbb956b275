"""``chain``: compose clip policies, as optax's ``chain`` composes transforms."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..measure import StepStats, measure_grads
from .base import Policy, deferrable, ratio_coef, scale_grads_


class Chain(Policy):
    """Several policies acting as one; build it with :func:`chain`."""

    def __init__(self, *policies: Any) -> None:
        if not policies:
            raise ValueError("chain(): pass at least one clip policy, e.g. chain(ZClip(), NormClip(10.0))")
        for i, p in enumerate(policies):
            if isinstance(p, type) or not callable(getattr(p, "apply_", None)):
                raise TypeError(
                    f"chain(): argument {i} is {p!r}, not a gradguard clip policy instance "
                    "(NormClip(...), ValueClip(...), AutoClip(...), ZClip(...), AGC(...))"
                )
        self.policies: tuple[Any, ...] = tuple(policies)
        self.scalar = all(getattr(p, "scalar", False) for p in policies)

    @property
    def deferrable(self) -> bool:
        # a scalar chain's apply_ is exactly "scale by the smallest coefficient"
        return self.scalar and all(deferrable(p) for p in self.policies)

    def coefficient(self, stats: StepStats) -> Tensor:
        if not self.scalar:
            return super().coefficient(stats)
        coefs = [p.coefficient(stats) for p in self.policies]  # each advances its statistics
        return torch.stack([c.float().reshape(()) for c in coefs]).amin()

    def apply_(self, stats: StepStats) -> Tensor:
        if self.scalar:
            return super().apply_(stats)
        # Members act in order; a run of total-norm members combines into one multiplier
        # (the smallest wins); a member that follows an in-place change sees fresh norms.
        cur, changed, run = stats, False, []
        for p in [*self.policies, None]:
            if p is not None and p.scalar:
                run.append(p)
                continue
            if run:
                cur = _remeasured(cur) if changed else cur
                coef = torch.stack([q.coefficient(cur).float().reshape(()) for q in run]).amin()
                scale_grads_(cur, coef)
                changed, run = True, []
            if p is not None:
                p.apply_(_remeasured(cur) if changed else cur)
                changed = True
        return ratio_coef(_remeasured(stats).total_norm, stats)

    def attach_model(self, model: Any) -> None:
        for p in self.policies:
            if callable(getattr(p, "attach_model", None)):
                p.attach_model(model)

    def bind(self, owner: object) -> None:
        for p in self.policies:
            if callable(getattr(p, "bind", None)):
                p.bind(owner)

    def release(self, owner: object) -> None:
        for p in self.policies:
            if callable(getattr(p, "release", None)):
                p.release(owner)

    def observe(self, window: Any) -> Any:
        """At a guard's flush: each member that observes windows (:meth:`ZClip.observe`);
        the first event."""
        events = [p.observe(window) for p in self.policies if callable(getattr(p, "observe", None))]
        return next((e for e in events if e is not None), None)

    def reset(self) -> None:
        for p in self.policies:
            if callable(getattr(p, "reset", None)):
                p.reset()

    def state_dict(self) -> dict[str, Any]:
        return {"policies": [p.state_dict() for p in self.policies]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._check_keys(state_dict, ("policies",))
        states = state_dict["policies"]
        if len(states) != len(self.policies):
            raise ValueError(
                f"chain.load_state_dict: {len(states)} member states for "
                f"{len(self.policies)} policies"
            )
        for p, sd in zip(self.policies, states):
            p.load_state_dict(sd)

    def __repr__(self) -> str:
        return f"chain({', '.join(map(repr, self.policies))})"


def _remeasured(stats: StepStats) -> StepStats:
    out = measure_grads(
        stats.params, norm_type=stats.norm_type, device=stats.total_norm.device,
        names=stats.names,
    )
    out.loss, out.calm = stats.loss, stats.calm
    return out


def chain(*policies: Any) -> Chain:
    """Compose clip policies into one. Total-norm policies (NormClip, AutoClip, ZClip)
    each compute their coefficient from the same pre-clip norm (each keeps its own
    statistics) and the smallest coefficient wins: ``chain(ZClip(), NormClip(10.0))`` is
    ZClip with an absolute cap of 10. Element- and unit-wise policies (ValueClip, AGC) act
    in the order given, and a policy after them sees the norms they left.

    Example:
        >>> import torch, gradguard as gg
        >>> w = torch.nn.Parameter(torch.zeros(4)); w.grad = torch.full((4,), 10.0)
        >>> policy = gg.chain(gg.ZClip(warmup_steps=5), gg.NormClip(max_norm=1.0))
        >>> policy.clip_([w])                   # pre-clip norm; ZClip is still warming up
        tensor(20.)
        >>> round(w.grad.norm().item(), 4)      # ... so the cap of 1.0 is the smallest
        1.0
    """
    return Chain(*policies)
