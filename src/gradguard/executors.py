"""Executors: carry out a :class:`~gradguard.decision.Plan` on the optimizer.

* :class:`Direct` — the plain loop: ``guard.step()`` calls ``optimizer.step()`` itself, or
  hands the bad flag to a fused optimizer as ``found_inf`` (no host sync).
* :class:`Scaler` — ``guard.step(loss, scaler=GradScaler)``: unscales once, merges the
  guard's flag into the scaler's ``found_inf``, keeps the routine-overflow accounting, and
  lets ``scaler.step`` step the optimizer.

On a fused optimizer (Adam, AdamW, SGD, Adagrad with ``fused=True``) both take the clip
coefficient of a total-norm policy *into* the update: fused optimizers divide each
gradient by ``optimizer.grad_scale`` inside their kernel (``GradScaler``'s contract), so
``grad_scale = 1 / coef`` clips with no pass over the gradients of its own. Under a
``GradScaler`` the gradients are not even unscaled first: the guard measures the scaled
gradients (norms times ``1 / scale``: exact, the scale is a power of two), hands the
scaler its own ``found_inf`` from those norms, and the optimizer divides by
``scale / coef`` — one pass over the gradients (the measurement) besides the update,
where torch's recipe (``unscale_``, ``clip_grad_norm_``, ``step``) makes three. Fused
optimizers also write the unscaled, clipped gradient back to ``.grad``.
* :class:`Hook` — driven from just before (or inside) an optimizer step that someone else
  calls: a trainer's ``on_before_optimizer_step`` or a global step pre-hook. It never
  steps; a skip takes the gradients off the parameters for that one update (torch
  optimizers leave parameters without a gradient alone) and a step post-hook puts them
  back. When the step never runs (a ``GradScaler`` skipped it), the stash is *discarded*
  at the next step: by then the trainer has zeroed the gradients and backward has
  produced new ones, which must not be overwritten by the stale, bad ones.

Every executor reports an :class:`Outcome`; none of them decides anything.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.amp.grad_scaler import GradScaler, OptState

from .decision import Action, OptimizerKind, Plan, resolve

#: The verdict bit of a non-finite gradient norm (the spike bits are
#: :data:`gradguard.recovery.verdict.GRAD_SPIKE` and ``LOSS_SPIKE``).
NONFINITE = 1

#: Under a GradScaler, a non-finite step is a routine loss-scale overflow (an ``info``
#: ``skip`` event, no recovery) when its loss is finite and the scale it ran with was
#: above this: only then can the scale explain the overflow. Backed-off down to here
#: (16 consecutive overflows from torch's default 2**16), it no longer amplifies anything,
#: so what still overflows is reported as a real non-finite step.
AMP_OVERFLOW_MIN_SCALE = 1.0


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
    ``1 / coef`` as a float32 scalar (None without a coefficient)."""
    return None if coef is None else coef.detach().float().reshape(()).reciprocal()


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
    """The guard calls the optimizer itself (see the module docstring)."""

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


def scaler_state(scaler: GradScaler, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """GradScaler's own per-optimizer bookkeeping (``stage``, ``found_inf_per_device``)."""
    return scaler._per_optimizer_states[id(optimizer)]


def merge_into_scaler(
    scaler: GradScaler, optimizer: torch.optim.Optimizer, plan: Plan, code: Tensor,
    loss_ok: Tensor | bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Add the guard's flags to the scaler's ``found_inf`` (when the plan says so: a spike
    skip then also backs the loss scale off, as any skip under a scaler does) and split
    what the scaler will skip into routine overflows and genuine trouble.

    Returns device tensors ``(skip, genuine, amp_row)``; ``amp_row`` is ``[routine, scale]``.
    """
    bad = code != 0
    dev = bad.device
    found = list(scaler_state(scaler, optimizer)["found_inf_per_device"].values())
    if found and plan.found_inf:
        # every element finite but the float32 norm overflows: skip it like a NaN.
        # Kept 0/1: fused optimizers subtract found_inf from their step counts.
        found[0].add_(bad.to(found[0])).clamp_(max=1.0)
    if found:
        skip = torch.stack([f.to(dev, non_blocking=True) for f in found]).sum() > 0
    else:  # no gradients: scaler.step raises its own error
        skip = torch.zeros((), dtype=torch.bool, device=dev)
    scale_t = scaler._get_scale_async()
    scale = (
        torch.ones((), device=dev)
        if scale_t is None
        else scale_t.detach().to(dev, torch.float32, non_blocking=True).reshape(())
    )
    ok = loss_ok.to(dev) if isinstance(loss_ok, Tensor) else torch.tensor(loss_ok, device=dev)
    routine = skip & (scale > AMP_OVERFLOW_MIN_SCALE) & ok & (code < 2)  # a spike is no overflow
    genuine = (skip | (bad if plan.found_inf else torch.zeros_like(skip))) & ~routine
    return skip, genuine, torch.stack([routine.float(), scale])


def _read_flags(plan: Plan, code: Tensor, genuine: Tensor, skip: Tensor) -> tuple[Action, bool, int]:
    """(action, genuine trouble, verdict code) from one host read of all the flags."""
    both = int(code.to(torch.int32) * 4 + genuine.to(torch.int32) * 2 + skip.to(torch.int32))
    c, bad, overflow = both >> 2, bool(both & 2), bool(both & 1)  # the one host sync
    spike = bool(c & ~NONFINITE)
    action = resolve(plan, bad=bad and not spike, overflow=overflow, spike=spike)
    return action, bad, c


class Scaler(Direct):
    """``guard.step(loss, scaler=...)``: the scaler unscales, skips and steps (on a fused
    optimizer with ``in_step``, the unscale goes into the update, see the module
    docstring)."""

    def __init__(self, optimizer: torch.optim.Optimizer, scaler: GradScaler) -> None:
        super().__init__(optimizer)
        self.scaler = scaler
        self._loss_scale: Tensor | None = None

    def prepare(self, *, in_step: bool = False) -> None:
        assert self.scaler is not None
        stage = scaler_state(self.scaler, self.optimizer)["stage"]
        if stage is OptState.STEPPED:
            raise RuntimeError(
                "guard.step(scaler=...): scaler.step(optimizer) already ran since the last "
                "scaler.update(); let guard.step step the optimizer and call scaler.update() "
                "once per iteration"
            )
        self._loss_scale = self.norm_scale = None
        if stage is not OptState.READY:  # the user already called scaler.unscale_
            return
        scale = self.scaler._get_scale_async()
        if in_step and scale is not None:
            # leave the gradients scaled: the fused update divides by the scale
            self._loss_scale = scale.detach().float().reshape(())
            self.norm_scale = self._loss_scale.reciprocal()
        else:
            self.scaler.unscale_(self.optimizer)

    def _deferred_unscale(self, code: Tensor, clip: Tensor | None) -> None:
        """Stand in for ``scaler.unscale_``: its ``found_inf`` is the guard's non-finite
        flag (the norms of the scaled gradients are non-finite exactly when an element is,
        or when their float32 norm overflows), and the optimizer divides by
        ``scale / clip``."""
        assert self.scaler is not None and self._loss_scale is not None
        state = scaler_state(self.scaler, self.optimizer)
        dev = self._loss_scale.device
        nonfinite = (code & NONFINITE).to(dev, torch.float32, non_blocking=True)
        state["found_inf_per_device"] = {dev: nonfinite}
        state["stage"] = OptState.UNSCALED  # scaler.step takes optimizer.grad_scale as is
        scale = self._loss_scale
        if clip is not None:
            scale = scale / clip.detach().float().reshape(())
        self.optimizer.grad_scale = scale  # type: ignore[attr-defined]

    def run(
        self, plan: Plan, code: Tensor, loss_ok: Tensor | bool = True, closure: Closure = None,
        clip: Tensor | None = None,
    ) -> Outcome:
        assert self.scaler is not None
        try:
            if self._loss_scale is not None:
                self._deferred_unscale(code, clip)
            elif clip is not None:
                self.optimizer.grad_scale = grad_scale_of(clip)  # type: ignore[attr-defined]
            skip, genuine, row = merge_into_scaler(
                self.scaler, self.optimizer, plan, code, loss_ok
            )
            if not plan.read_host:
                self.scaler.step(self.optimizer)  # skips on found_inf, on the device
                return Outcome(skipped=_skip_code(skip, code), trouble=genuine, amp_row=row)
            action, trouble, c = _read_flags(plan, code, genuine, skip)
            if action == "step":
                self.scaler.step(self.optimizer)
            # a host-side skip leaves the scaler's found_inf in place: scaler.update()
            # still backs the scale off as usual
            return Outcome(
                skipped=max(c, 1) if action != "step" else 0,
                trouble=action != "step" and trouble, action=action, amp_row=row, code=c,
            )
        finally:
            # scaler.step removes it after stepping; a skip on the host never stepped
            self.optimizer.__dict__.pop("grad_scale", None)
            self._loss_scale = self.norm_scale = None


class Hook:
    """Driven just before an optimizer step someone else calls (see the module docstring).

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

    #: The clip is applied to the gradients before the trainer's step (no ``run(clip=)``).
    takes_grad_scale = False
    norm_scale: Tensor | None = None

    def prepare(self, *, in_step: bool = False) -> None:
        # A stash still here means the optimizer never ran (a GradScaler skip): the
        # gradients now on the parameters are newer than the stashed ones; drop those.
        self._stash = []
        self._clear_attrs()

    def run(
        self, plan: Plan, code: Tensor, loss_ok: Tensor | bool = True, closure: Closure = None,
        clip: Tensor | None = None,
    ) -> Outcome:
        if self.scaler is not None and self.scaler.is_enabled():
            skip, genuine, row = merge_into_scaler(self.scaler, self.optimizer, plan, code, loss_ok)
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


def _skip_code(skip: Tensor, code: Tensor) -> Tensor:
    """What a scaler-driven step records as skipped: the verdict bits, at least 1."""
    return torch.where(skip, code.clamp_min(1), torch.zeros_like(code))


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
