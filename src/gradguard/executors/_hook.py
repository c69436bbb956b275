"""The :class:`Hook` executor, for optimizer steps that someone else calls, and the choice of
the executor of one ``guard.step`` call (see :mod:`gradguard.executors`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.amp.grad_scaler import GradScaler

from ..decision import Plan
from ._amp import Scaler, _read_flags, _skip_code, merge_into_scaler
from ._base import STALE, Closure, Direct, Outcome, _resolve_code


class Hook:
    """Driven just before an optimizer step someone else calls (see :mod:`gradguard.executors`).

    Args:
        optimizer: the optimizer the trainer steps.
        scaler: the trainer's ``GradScaler`` when it steps this optimizer (its gradients
            must already be unscaled when the guard runs).
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, scaler: GradScaler | None = None
    ) -> None:
        self.optimizer = optimizer
        self.scaler = scaler
        self._stash: list[tuple[Tensor, Tensor]] = []
        self._attrs_set = False
        self._handle = optimizer.register_step_post_hook(self._after_step)
        self._unmerge: Callable[[], None] | None = None
        if scaler is not None:
            _attach(scaler, self)

    def give_back(self) -> None:
        """Give ``found_inf`` its own value back (see :func:`merge_into_scaler`), once."""
        if self._unmerge is not None:
            self._unmerge()
            self._unmerge = None

    #: The clip is applied to the gradients before the trainer's step (no ``run(clip=)``).
    takes_grad_scale = False
    norm_scale: Tensor | None = None

    def prepare(self, *, in_step: bool = False) -> None:
        # A stash still here means the optimizer never ran (a GradScaler skip): the
        # gradients now on the parameters are newer than the stashed ones; drop those.
        self._stash = []
        self._clear_attrs()
        self._unmerge = None  # a trainer that did not call scaler.update(): nothing to give back

    def run(
        self, plan: Plan, code: Tensor, loss_ok: Tensor | bool = True, closure: Closure = None,
        clip: Tensor | None = None,
    ) -> Outcome:
        if self.scaler is not None and self.scaler.is_enabled():
            skip, genuine, row, self._unmerge = merge_into_scaler(
                self.scaler, self.optimizer, plan, code, loss_ok)
            if not plan.read_host:
                return Outcome(skipped=_skip_code(skip, code), trouble=genuine, amp_row=row)
            action, trouble, c = _read_flags(plan, code, genuine, skip)
            if action == "skip":
                self._take_grads()
            return Outcome(
                skipped=max(c, 1) if action != "step" else 0,
                trouble=action != "step" and trouble, action=action, amp_row=row, code=c,
            )
        if plan.found_inf:
            bad = code != 0
            opt: Any = self.optimizer
            opt.grad_scale = None
            opt.found_inf = bad.to(torch.float32)
            self._attrs_set = True
            return Outcome(skipped=code, trouble=bad)
        if not plan.read_host:
            return Outcome(skipped=False, trouble=False)
        c = int(code)  # the one host sync of this step
        action = _resolve_code(plan, c)
        if action == "skip":
            self._take_grads()
        return Outcome(skipped=c if action != "step" else 0, trouble=action != "step",
                       action=action, code=c)

    def void(self, out: Outcome) -> Outcome:
        """The weights were restored (rolled back, or forked by the LR probe) after this
        step's backward: take its gradients off (the trainer's update that follows changes
        nothing; the post-hook puts them back) and record the step as skipped (``STALE``),
        not as trouble: what was wrong with those gradients was wrong with the weights
        that are gone."""
        self._take_grads()
        return Outcome(skipped=STALE, trouble=False, action="skip", amp_row=out.amp_row, code=STALE)

    def _take_grads(self) -> None:
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._stash.append((p, p.grad))
                    p.grad = None

    def _clear_attrs(self) -> None:
        if self._attrs_set:
            self.optimizer.__dict__.pop("grad_scale", None)
            self.optimizer.__dict__.pop("found_inf", None)
            self._attrs_set = False

    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._clear_attrs()
        for p, g in self._stash:  # the trainer's zero_grad sees what it expects
            p.grad = g
        self._stash = []

    def detach(self) -> None:
        """Put back what a skip took and remove the post-hook."""
        self._after_step(self.optimizer, (), {})
        self._handle.remove()
        self._unmerge = None
        if self.scaler is not None:
            _detach(self.scaler, self)


#: Where a trainer scaler keeps the hooks whose flags it carries, the ``update`` it had (an
#: instance attribute, or None: the class's), and the wrapper put in its place. On the
#: scaler itself: nothing global keeps a scaler (or its guards) alive.
_WRAP_KEY = "_gradguard_update"


def _attach(scaler: GradScaler, hook: Hook) -> None:
    """The trainer calls ``scaler.step`` and ``scaler.update()`` back to back after the
    guards' hooks: ``update`` is wrapped (once per scaler, whatever the number of guards:
    two optimizers, one scaler) to give each hook's ``found_inf`` its own value back first,
    so that a step skipped for the guard's reasons alone does not back the loss scale off
    (:func:`merge_into_scaler`). Undone by :func:`_detach` when the last guard closes."""
    entry = scaler.__dict__.get(_WRAP_KEY)
    if entry is None:
        hooks: list[Hook] = []
        prior, inner = scaler.__dict__.get("update"), scaler.update

        def update(*args: Any, **kwargs: Any) -> Any:
            for h in hooks:
                h.give_back()
            return inner(*args, **kwargs)

        entry = scaler.__dict__[_WRAP_KEY] = (hooks, prior, update)
        scaler.update = update  # type: ignore[method-assign]
    entry[0].append(hook)


def _detach(scaler: GradScaler, hook: Hook) -> None:
    entry = scaler.__dict__.get(_WRAP_KEY)
    if entry is None or hook not in entry[0]:
        return
    entry[0].remove(hook)
    if entry[0]:
        return
    del scaler.__dict__[_WRAP_KEY]
    if scaler.__dict__.get("update") is entry[2]:  # not wrapped again by someone else since
        if entry[1] is None:
            del scaler.update  # the class's own again
        else:
            scaler.update = entry[1]  # type: ignore[method-assign]


def executor_for(
    default: Direct | Hook, scaler: Any, cached: Direct | Hook | None
) -> Direct | Hook:
    """The executor of one ``guard.step(scaler=...)`` call: the guard's own (a Hook always
    is), or a :class:`Scaler` for an enabled ``GradScaler`` (``cached`` when it is for the
    same scaler)."""
    if scaler is None or isinstance(default, Hook):
        return default
    if not isinstance(scaler, GradScaler):
        raise TypeError(
            f"guard.step(scaler=...): expected a torch.amp.GradScaler or None, got {type(scaler).__name__}"
        )
    if not scaler.is_enabled():
        return default
    if isinstance(cached, Scaler) and cached.scaler is scaler:
        return cached
    return Scaler(default.optimizer, scaler)
