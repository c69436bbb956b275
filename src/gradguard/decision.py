"""The step decision: how a guarded optimizer step is carried out, as a pure table.

One place decides (:func:`decide`), executors act (:mod:`gradguard.executors`). The plan
says whether the host reads the step's *bad* flag (the one host sync a guarded step may
cost), whether the flag is handed to the optimizer on the device as ``found_inf`` (fused
optimizers and ``GradScaler`` skip on the device, no sync), and what a bad step does.

The one rule that is not obvious: a fused optimizer must never get ``found_inf`` on a step
that would *create* its state. Fused SGD with momentum allocates its momentum buffers
uninitialised (``torch.empty_like``) on its first step and relies on that step to fill
them; skipping it on the device leaves garbage that turns the weights NaN one step later.
So the first step of a fresh optimizer state is decided on the host.

Example:
    >>> from gradguard.decision import decide, resolve
    >>> plan = decide(on_nonfinite="skip", kind="fused", scaler=False, fresh=False)
    >>> plan.read_host, plan.found_inf
    (False, True)
    >>> plan = decide(on_nonfinite="skip", kind="fused", scaler=False, fresh=True)
    >>> plan.read_host, resolve(plan, bad=True)
    (True, 'skip')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

OnNonfinite = Literal["skip", "raise", "warn", "off"]
ON_NONFINITE: tuple[str, ...] = ("skip", "raise", "warn", "off")
OptimizerKind = Literal["plain", "foreach", "fused"]
OPTIMIZER_KINDS: tuple[str, ...] = ("plain", "foreach", "fused")
Action = Literal["step", "skip", "raise"]


@dataclass(frozen=True)
class Plan:
    """How one guarded step is carried out.

    Attributes:
        read_host: the host reads the bad flag (one sync) and acts on it.
        found_inf: the bad flag goes to the optimizer (fused) or the scaler on the device;
            the optimizer skips by itself (no sync).
        on_bad: what a bad step does once the host knows it: ``"step"`` anyway, ``"skip"``
            the optimizer, or ``"raise"`` :class:`~gradguard.NonFiniteGradientError`.
        warn: warn (``GradGuardWarning``) about a bad step.
    """

    read_host: bool
    found_inf: bool
    on_bad: Action
    warn: bool = False


def decide(*, on_nonfinite: OnNonfinite, kind: OptimizerKind, scaler: bool, fresh: bool) -> Plan:
    """The plan for one step (pure; ``tests/test_decision.py`` checks every row).

    Args:
        on_nonfinite: the guard's option.
        kind: ``"fused"`` (takes ``found_inf``), ``"foreach"`` or ``"plain"``.
        scaler: a ``GradScaler`` steps this optimizer (it skips its own overflows on the
            device, passing ``found_inf`` to a fused optimizer itself).
        fresh: this step would create optimizer state (its first step, or the first after
            a reset): a device-side skip is not safe for a fused optimizer.
    """
    if on_nonfinite not in ON_NONFINITE:
        raise ValueError(f"on_nonfinite={on_nonfinite!r}: allowed values are {ON_NONFINITE}")
    if kind not in OPTIMIZER_KINDS:
        raise ValueError(f"kind={kind!r}: allowed values are {OPTIMIZER_KINDS}")
    unsafe_device_skip = kind == "fused" and fresh
    if on_nonfinite == "off":
        # a scaler still skips its own overflows; on a fresh fused state only a host-side
        # skip is safe, so read the (scaler's) flag then
        return Plan(read_host=scaler and unsafe_device_skip, found_inf=False, on_bad="step")
    if on_nonfinite in ("raise", "warn"):
        return Plan(
            read_host=True, found_inf=scaler, on_bad="raise" if on_nonfinite == "raise" else "skip",
            warn=on_nonfinite == "warn",
        )
    # "skip"
    if unsafe_device_skip:
        return Plan(read_host=True, found_inf=scaler, on_bad="skip")
    if scaler or kind == "fused":
        return Plan(read_host=False, found_inf=True, on_bad="skip")
    return Plan(read_host=True, found_inf=False, on_bad="skip")


def resolve(plan: Plan, *, bad: bool, overflow: bool = False, spike: bool = False) -> Action:
    """What the step does once the host has read the flags (``plan.read_host``).

    Args:
        bad: a non-finite gradient norm (not a routine loss-scale overflow).
        overflow: the ``GradScaler`` found Inf/NaN: a scaler always skips such a step,
            whatever ``on_nonfinite`` says (that is its contract with the loss scale).
        spike: the recovery ladder's per-step verdict: a loss or gradient-norm spike,
            skipped (never raised: it is finite).
    """
    if bad and plan.on_bad != "step":
        return plan.on_bad
    return "skip" if overflow or spike else "step"
