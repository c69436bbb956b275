"""The ladder's LR factor, applied inside each optimizer step.

The LR belongs to the user's scheduler. :class:`LrMultiplier` multiplies each param
group's LR by the ladder's factor in an optimizer step *pre*-hook and puts the original
value back in the step *post*-hook, so whatever a scheduler (or a person) writes into
``group["lr"]`` between steps is what gets multiplied: the LR actually used is the
schedule's LR times the factor, by construction, for any scheduler and for tensor LRs,
without a host sync. Rprop takes its LR as the *initial* step size only and then adapts
a step size per element: there the multiplier scales those step sizes (its state) for the
step in the same way, so a back-off slows Rprop too. A param group whose LR is no number
(``None``: Adafactor with ``relative_step=True`` computes its own step size from the step
count and ignores ``group["lr"]``) has its *update* scaled instead: its parameters are
copied before the step and moved back to ``before + factor * (after - before)`` after it,
the same step ``factor`` times as long. That copy is made only on steps the factor is not
1 (a back-off and its restore), one parameter-sized buffer for those groups.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .._tensors import numeric_lr


class LrMultiplier:
    """Scales every param group's LR by ``factor()`` for the duration of each optimizer
    step (see the module docstring).

    Example:
        >>> import torch
        >>> from gradguard.recovery.multiplier import LrMultiplier
        >>> w = torch.nn.Parameter(torch.ones(1)); opt = torch.optim.SGD([w], lr=1.0)
        >>> mult = LrMultiplier(opt, lambda: 0.1)
        >>> w.grad = torch.ones(1); opt.step()
        >>> round(w.item(), 4), opt.param_groups[0]["lr"]     # stepped with lr 0.1
        (0.9, 1.0)
        >>> mult.remove()
    """

    def __init__(self, optimizer: torch.optim.Optimizer, factor: Callable[[], float]) -> None:
        self.optimizer = optimizer
        self.factor = factor
        self._saved: list[tuple[dict[str, Any], Any]] = []
        self._rprop_factor: float | None = None  # Rprop's step sizes are multiplied by it
        # groups with no numeric LR: their parameters before the step, and the factor
        self._before: tuple[list[Tensor], list[Tensor], float] | None = None
        self._handles = [
            optimizer.register_step_pre_hook(self._pre),
            optimizer.register_step_post_hook(self._post),
        ]

    def _pre(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._restore()  # a step that raised never reached its post-hook
        f = self.factor()
        if f == 1.0:
            return
        seen: set[int] = set()
        unscalable: list[Tensor] = []
        for g in self.optimizer.param_groups:
            lr: Any = g.get("lr")
            if not numeric_lr(lr):
                unscalable += [p for p in g["params"] if p.grad is not None]
                continue
            if isinstance(lr, Tensor):
                if id(lr) in seen:  # one tensor shared by several groups: scale it once
                    continue
                seen.add(id(lr))
                self._saved.append((g, lr.detach().clone()))
                lr.mul_(f)
            else:
                self._saved.append((g, lr))
                g["lr"] = lr * f
        if isinstance(self.optimizer, torch.optim.Rprop):
            # an Rprop step moves by its per-element step sizes, started at the (scaled) LR
            # at a parameter's first step and adapted since
            if steps := self._step_sizes():
                torch._foreach_mul_(steps, f)
            self._rprop_factor = f
        if unscalable:
            self._before = (unscalable, [p.detach().clone() for p in unscalable], f)

    def _post(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._before is not None:  # after = before + f * (after - before)
            params, before, f = self._before
            with torch.no_grad():
                torch._foreach_lerp_(params, before, 1.0 - f)
        self._restore()

    def _restore(self) -> None:
        self._before = None  # a step that raised moved nothing worth scaling
        if self._rprop_factor is not None:
            # all of them, the ones this step created from the scaled LR too
            if steps := self._step_sizes():
                torch._foreach_div_(steps, self._rprop_factor)
            self._rprop_factor = None
        for g, lr in self._saved:
            if isinstance(lr, Tensor):
                g["lr"].copy_(lr)
            else:
                g["lr"] = lr
        self._saved = []

    def unscaled(self, group: dict[str, Any]) -> Any:
        """``group``'s LR without this step's factor: inside an optimizer step the group
        holds the scaled one (a trainer calls the guard from within the step, after these
        pre-hooks ran: Lightning)."""
        now = group.get("lr")
        return next((lr for g, lr in self._saved  # a tensor LR shared by groups: saved once
                     if g is group or (isinstance(lr, Tensor) and g.get("lr") is now)), now)

    def _step_sizes(self) -> list[Tensor]:
        return [s["step_size"] for s in self.optimizer.state.values() if "step_size" in s]

    def remove(self) -> None:
        self._restore()
        for h in self._handles:
            h.remove()
        self._handles = []
