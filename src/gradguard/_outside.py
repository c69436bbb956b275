"""``optimizer.step()`` called by the script besides ``guard.step()``.

``guard.step()`` replaces ``optimizer.step()``: it measures, clips, then steps or skips.
A loop that keeps its own ``optimizer.step()`` after it (reading the guard as a monitor)
steps every batch twice, and a NaN batch the guard skipped goes into the weights through
the second call: a digits MLP so trained had NaN weights at the first NaN batch, and the
guard's three rollbacks each met the same NaN gradients in the next ``optimizer.step()``,
then stopped the run, blaming the optimizer's update.

:class:`OutsideSteps` watches the optimizer with a step pre-hook (a host check, no device
access) when the guard calls the optimizer itself (not under a trainer's hook, where the
trainer's ``optimizer.step()`` is what runs the guard). A step outside ``guard.step()`` on
the gradients ``guard.step()`` already stepped or skipped (the same gradient tensor, not
modified since: no backward in between) is made a no-op: for that step the optimizer's
parameters get ``grad = None``, which every ``torch.optim`` optimizer steps over (no
update, no state change), and their gradients are put back after it (code that reads
``p.grad`` after ``optimizer.step()`` finds them). A step on gradients the guard never saw
runs as the script asked, unguarded. The
first of either is said once, a ``GradGuardWarning`` and an ``unguarded_step`` warning
event, with the remedy: remove the ``optimizer.step()`` call.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor

from .errors import GradGuardWarning, caller_stacklevel
from .events import Event

if TYPE_CHECKING:
    from .guard import Guard


#: Set on an optimizer while a guard steps it: no step of any guard's is the script's own
#: (a notebook cell run twice leaves the first guard's hook on the optimizer).
INSIDE = "_gradguard_inside"
#: Set on an optimizer when a guard is done with a step's gradients: ``(the OutsideSteps,
#: the probe parameter, its gradient, the gradient's version)``. A second guard over the
#: same optimizer stepped on the same gradients would step the batch twice (found by a
#: stranger: two guards over one Adam, both stepped, took two updates per batch unsaid).
HANDLED = "_gradguard_handled"


def stepping(optimizer: Any, on: bool) -> None:
    """Mark ``optimizer`` as stepped by a guard (``on``) or no longer."""
    setattr(optimizer, INSIDE, getattr(optimizer, INSIDE, 0) + (1 if on else -1))


class OutsideSteps:
    """See the module docstring."""

    def __init__(self, guard: Guard) -> None:
        self._guard = weakref.ref(guard)
        self._me = weakref.ref(self)  # the HANDLED mark's owner
        self.said = False
        self.said_twice = False
        #: the smallest handled gradient and its version when ``guard.step()`` returned
        self._handled: tuple[Tensor, int] | None = None
        self._probe: Tensor | None = None  # the parameter whose gradient marks a step
        #: the gradients taken away for a step made a no-op, put back after it
        self._away: list[tuple[Tensor, Tensor | None]] = []
        self._handles = [guard.optimizer.register_step_pre_hook(self._pre),
                         guard.optimizer.register_step_post_hook(self._post)]

    def handled(self, params: Sequence[Tensor]) -> None:
        """``guard.step()`` is done with this step's gradients (stepped or skipped). One
        attribute read per step: the gradient of the smallest parameter (held, so its
        identity is not reused), or the smallest of those present when it has none."""
        if self._probe is None or self._probe.grad is None or not self._probe.requires_grad:
            # a frozen parameter's gradient may be stale for good (its zero_grad skipped):
            # every step would look like the last one again (found by a regression hunt)
            with_grad = [p for p in params if p.grad is not None and p.requires_grad]
            self._probe = min(with_grad, key=lambda t: t.numel(), default=None)
        g = None if self._probe is None else self._probe.grad
        self._handled = None if g is None else (g, g._version)
        guard = self._guard()
        if guard is not None:
            setattr(guard.optimizer, HANDLED, None if g is None else (
                self._me, self._probe, g, g._version))

    def again(self) -> bool:
        """Whether this step's gradients are those ``guard.step()`` (this guard's, or
        another's over the same optimizer) just stepped or skipped (no backward since): a
        second ``guard.step()`` on the same batch."""
        held, probe = self._handled, self._probe
        if held is not None and probe is not None and probe.requires_grad and (
                probe.grad is held[0] and held[0]._version == held[1]):
            return True
        return self.other() is not None

    def other(self) -> Any:
        """The other guard that just stepped or skipped this step's gradients over the same
        optimizer, or None."""
        guard = self._guard()
        mark = None if guard is None else getattr(guard.optimizer, HANDLED, None)
        if mark is None:
            return None
        ref, probe, g, version = mark
        owner = ref()
        if owner is None or owner is self:
            return None
        same = probe.requires_grad and probe.grad is g and g._version == version
        return owner._guard() if same else None

    def twice(self, guard: Guard) -> None:
        """Say once that ``guard.step()`` was called again on the gradients it had just
        stepped or skipped (found by a stranger: it stepped the optimizer twice per batch,
        silently, and the run ended elsewhere)."""
        if self.said_twice:
            return
        self.said_twice = True
        step = max(guard.step_count - 1, 0)
        if (other := self.other()) is not None:
            text = (f"step {step}: another guard over the same optimizer had just stepped or "
                    f"skipped these gradients (at its step {max(other.step_count - 1, 0)}): "
                    "ignored, as a second update would have stepped the batch twice")
            remedy = ("Keep one guard per optimizer: close the other (guard.close()) or "
                      "step only one of them.")
        else:
            text = (f"step {step}: guard.step() was called again on the gradients it had "
                    "just stepped or skipped (no backward since): ignored, as a second "
                    "optimizer.step() on them would have stepped the batch twice")
            remedy = "Call guard.step() once per backward (it replaces optimizer.step())."
        warnings.warn(f"gradguard: {text}. {remedy}", GradGuardWarning,
                      stacklevel=caller_stacklevel())
        guard.add_event(Event(kind="unguarded_step", step=step, severity="warning",
                              message=text, remedy=remedy, data={"ignored": True, "twice": True}))

    def _pre(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        guard = self._guard()
        if getattr(optimizer, INSIDE, 0) > 0 or guard is None:
            return
        held = self._handled
        params = [p for grp in optimizer.param_groups for p in grp["params"]]
        again = held is not None and any(
            p.grad is held[0] and held[0]._version == held[1] for p in params)
        if again:  # the gradients guard.step() already stepped or skipped: no update
            self._away = [(p, p.grad) for p in params]
            for p in params:
                p.grad = None
        if not self.said:
            self.said = True
            self._say(guard, again)

    def _post(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        away, self._away = self._away, []
        for p, g in away:
            p.grad = g

    def _say(self, guard: Guard, again: bool) -> None:
        step = max(guard.step_count - 1, 0)
        what = ("on the gradients guard.step() had just stepped or skipped: ignored (no "
                "update), so a batch the guard skipped stays skipped" if again else
                "on gradients guard.step() never saw: it ran unguarded (not measured, "
                "clipped or skipped)")
        text = f"step {step}: optimizer.step() was called besides guard.step(), {what}"
        remedy = ("Remove the optimizer.step() call: guard.step() replaces it (it steps the "
                  "optimizer, or skips the step).")
        warnings.warn(f"gradguard: {text}. {remedy}", GradGuardWarning,
                      stacklevel=caller_stacklevel())
        guard.add_event(Event(kind="unguarded_step", step=step, severity="warning",
                              message=text, remedy=remedy, data={"ignored": again}))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._handled = self._probe = None
