"""What every executor shares: the :class:`Outcome` it reports, the plain :class:`Direct`
executor, fused-optimizer stepping, and the checks of ``guard.step``'s loss and closure
(see :mod:`gradguard.executors`)."""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.amp.grad_scaler import GradScaler

from ..decision import Action, OptimizerKind, Plan, resolve
from ..measure import is_unit_on_cpu

#: The verdict bit of a non-finite gradient norm (the spike bits are
#: :data:`gradguard.recovery.verdict.GRAD_SPIKE` and ``LOSS_SPIKE``).
NONFINITE = 1
#: The bit of a step whose update was not applied because the recovery ladder rolled the
#: weights back after its backward (a trainer's step, heard in its pre-step hook): its
#: gradients belong to weights no longer in place. Not trouble: the ladder does not count it.
STALE = 8


@dataclass
class Outcome:
    """What an executor did with one step.

    Attributes:
        skipped: the optimizer did not update (device tensor, or a host bool when known).
        trouble: skipped for a reason the recovery ladder counts (routine loss-scale
            overflows excluded); device tensor or host bool.
        action: the host-side action, when the host read the flags (else None).
        amp_row: ``[routine overflow (0/1), loss scale]`` on the device, under a scaler.
        code: the step's verdict bits (``NONFINITE``, ``GRAD_SPIKE``, ``LOSS_SPIKE``) when
            the host read them (else None); ``skipped`` records them for the flush.
    """

    skipped: Tensor | bool | int
    trouble: Tensor | bool
    action: Action | None = None
    amp_row: Tensor | None = None
    code: int | None = None


def optimizer_kind(optimizer: torch.optim.Optimizer) -> OptimizerKind:
    """``"fused"`` when the optimizer takes ``found_inf`` (every group fused),
    ``"foreach"`` when a group asks for foreach, ``"plain"`` otherwise."""
    groups = optimizer.param_groups
    if getattr(optimizer, "_step_supports_amp_scaling", False) and all(
        g.get("fused", False) for g in groups
    ):
        return "fused"
    return "foreach" if any(g.get("foreach", False) for g in groups) else "plain"


class FreshState:
    """Whether the next step of ``optimizer`` would create optimizer state for a parameter
    that has a gradient (its first step, or the first after a reset). Re-checked only when
    the number of state entries changes, so the steady state costs one ``len()``."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self._seen = -1
        self._fresh = True

    def __call__(self, params: list[Tensor]) -> bool:
        state = self.optimizer.state
        if len(state) != self._seen or self._fresh:
            self._seen = len(state)
            self._fresh = any(p.grad is not None and not state.get(p) for p in params)
        return self._fresh

    def reset(self) -> None:
        """Parameters were added (``add_param_group``) or the state was replaced."""
        self._seen = -1
        self._fresh = True


Closure = Callable[[], Any] | None


def grad_scale_of(coef: Tensor | None) -> Tensor | None:
    """What a fused optimizer divides the gradients by to multiply them by ``coef``:
    ``1 / coef`` as a float32 scalar (None without a coefficient, or for a CPU coefficient
    of 1: on the CPU a fused optimizer's ``grad_scale`` costs a pass over the gradients of
    its own, as much as the multiply it replaces; see ``measure.READ_CPU_COEFFICIENT``)."""
    if coef is None or is_unit_on_cpu(coef):
        return None
    return coef.detach().float().reshape(()).reciprocal()


def fused_step(
    optimizer: torch.optim.Optimizer, *, found_inf: Tensor | None = None,
    grad_scale: Tensor | None = None, closure: Closure = None,
) -> None:
    """``optimizer.step(closure)`` with GradScaler's attributes set for the one step: a
    fused optimizer skips on ``found_inf`` and divides every gradient by ``grad_scale``
    inside its update (either may be None)."""
    if found_inf is None and grad_scale is None:
        optimizer.step(closure)
        return
    opt: Any = optimizer
    opt.grad_scale = grad_scale
    opt.found_inf = found_inf
    try:
        optimizer.step(closure)
    finally:
        del opt.grad_scale
        del opt.found_inf


class Direct:
    """The guard calls the optimizer itself (see :mod:`gradguard.executors`)."""

    scaler: GradScaler | None = None
    #: Takes the clip coefficient into a fused optimizer's update (``run(clip=...)``).
    takes_grad_scale = True

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        #: Multiplier of the measured norms (1 / loss scale while the gradients are still
        #: scaled, see :class:`Scaler`); None: the gradients are the true ones.
        self.norm_scale: Tensor | None = None

    def prepare(self, *, in_step: bool = False) -> None:
        """Before the gradients are measured. ``in_step``: the clip will go into a fused
        optimizer's update (``run(clip=...)``), nothing touches the gradients before."""

    def run(
        self, plan: Plan, code: Tensor, loss_ok: Tensor | bool = True, closure: Closure = None,
        clip: Tensor | None = None,
    ) -> Outcome:
        """Carry out ``plan`` for a step whose verdict is ``code`` (a device uint8 of
        :data:`NONFINITE`/spike bits); ``closure`` goes to ``optimizer.step`` (LBFGS).
        ``clip``: a coefficient for the fused optimizer to apply inside its update
        (``grad_scale = 1 / clip``); None: the gradients are final."""
        scale = grad_scale_of(clip)
        if plan.found_inf:
            bad = code != 0
            fused_step(self.optimizer, found_inf=bad.to(torch.float32), grad_scale=scale,
                       closure=closure)
            return Outcome(skipped=code, trouble=bad)
        if not plan.read_host:
            fused_step(self.optimizer, grad_scale=scale, closure=closure)
            return Outcome(skipped=False, trouble=False)
        c = int(code)  # the one host sync of this step
        action = _resolve_code(plan, c)
        if action == "step":
            fused_step(self.optimizer, grad_scale=scale, closure=closure)
        return Outcome(skipped=c if action != "step" else 0, trouble=action != "step",
                       action=action, code=c)

    def detach(self) -> None:
        """Nothing to undo: the plain loop installs no hooks."""


def _resolve_code(plan: Plan, code: int, overflow: bool = False) -> Action:
    return resolve(plan, bad=bool(code & NONFINITE), overflow=overflow,
                   spike=bool(code & ~NONFINITE))


def loss_finite(loss: Tensor | float | None) -> Tensor | bool:
    """``isfinite(loss)`` without a host sync (a device bool, or a host bool for floats)."""
    if isinstance(loss, Tensor):
        return torch.isfinite(loss.detach()).reshape(())
    return loss is None or math.isfinite(loss)


def check_loss(loss: Any) -> Tensor | float | None:
    if loss is None:
        return None
    if isinstance(loss, Tensor):
        if loss.numel() != 1:
            raise ValueError(
                f"guard.step(loss=...): loss must be a scalar, got a tensor of shape "
                f"{tuple(loss.shape)} (reduce it, e.g. loss.mean())"
            )
        return loss
    if isinstance(loss, numbers.Real) and not isinstance(loss, bool):
        return float(loss)  # Python and numpy scalars
    if getattr(loss, "size", None) == 1 and callable(getattr(loss, "item", None)):
        return float(loss.item())  # a one-element numpy array
    raise TypeError(
        f"guard.step(loss=...): expected a scalar Tensor, a number or None, got {type(loss).__name__}"
    )


def maximizing(optimizer: torch.optim.Optimizer) -> bool | None:
    """Whether the optimizer ascends its objective (``maximize=True`` on every param group):
    ``None`` when its groups disagree (no one sign makes the value passed a loss)."""
    signs = {bool(g.get("maximize", False)) for g in optimizer.param_groups}
    return None if len(signs) > 1 else signs.pop() if signs else False


def needs_closure(optimizer: torch.optim.Optimizer) -> bool:
    """True for optimizers whose ``step`` requires a closure (``LBFGS``)."""
    try:
        param = inspect.signature(type(optimizer).step).parameters.get("closure")
    except (TypeError, ValueError):
        return False
    return param is not None and param.default is inspect.Parameter.empty


def first_then(loss: Any, closure: Callable[[], Any]) -> Callable[[], Any]:
    """A closure whose first call returns ``loss`` (the evaluation the guard already made,
    measured and clipped) and whose later calls evaluate ``closure`` again (LBFGS's line
    search)."""
    calls = 0

    def wrapped() -> Any:
        nonlocal calls
        calls += 1
        return loss if calls == 1 else closure()

    return wrapped


def evaluate_closure(
    optimizer: torch.optim.Optimizer, loss: Any, closure: Closure
) -> tuple[Any, Closure]:
    """``guard.step(closure=...)``: evaluate the closure once (with grad enabled) for the
    loss and gradients the guard measures; the optimizer's later evaluations call it
    again (:func:`first_then`)."""
    if closure is None:
        raise TypeError(
            f"{type(optimizer).__name__}.step needs a closure: call "
            "guard.step(closure=closure) (see Guard.step)")
    if loss is not None:
        raise TypeError("guard.step(): pass loss or closure, not both")
    with torch.enable_grad():
        loss = closure()
    return loss, first_then(loss, closure)
