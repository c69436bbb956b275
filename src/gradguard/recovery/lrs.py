"""The LRs an LR factor stands for, as the ladder's messages say them: the param groups'
LRs now under the factor, and the config's (the LR a schedule scales) for advice."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._tensors import numeric_lr, planned_lr

if TYPE_CHECKING:
    from ..guard import Guard


def group_lrs(guard: Guard, factor: float) -> tuple[list[float | None], str]:
    """Every param group's LR under ``factor`` (the schedule's value between steps; None
    for a group with no numeric LR, whose updates are scaled), and the distinct ones as
    text."""
    mult = getattr(guard.recovery, "_mult", None)
    lrs = [lr_number(g.get("lr") if mult is None else mult.unscaled(g))
           for g in guard.optimizer.param_groups]
    scaled = [lr * factor if lr is not None else None for lr in lrs]
    return scaled, ", ".join(f"{lr:.3g}" if lr is not None else f"its own step size x{factor:g}"
                             for lr in dict.fromkeys(scaled))


def config_lrs(guard: Guard, factor: float) -> tuple[list[float | None], str, str | None]:
    """What the advice of an LR under ``factor`` is in a config: ``factor`` times the LR a
    scheduler scales (``planned_lr``: the config's value, which a ``LambdaLR`` warm-up or
    cosine decay or a Hugging Face schedule scales; a one-cycle's peak; a cyclic schedule's
    ``max_lr``; the highest the group has had, :meth:`~gradguard.detectors.LrTracker.peaks`,
    where none is planned) for every param group, the distinct ones as text, and those
    bases as text when a schedule has moved the LR off them (a warm-up, a decay: the LR now
    is not what the config says), else None and the LRs now."""
    from torch.optim.lr_scheduler import CyclicLR

    from .plateau import schedulers

    groups = guard.optimizer.param_groups
    # a schedule that records no plan (ReduceLROnPlateau, an LR set by hand each step or
    # lowered by hand at an epoch): the highest LR the group has had stands for the config's
    # (the plateau had halved 0.03 when the advice was "x0.106" of the 0.015 then)
    peaks = guard.monitor.lr_tracker.peaks(len(groups))
    plans = [planned_lr(g) for g in groups]
    # a ``CyclicLR`` records its ``base_lr`` (the cycle's floor) as ``initial_lr`` and
    # keeps its ``max_lr`` to itself: the cycle's peak is the LR it scales (not the highest
    # LR the run had, which a ``LambdaLR`` whose factor goes over 1 sets too, found by a
    # regression hunt: the advice was the config's 0.01 that its x10 made the 0.1 that failed)
    for cyclic in schedulers(CyclicLR, guard.optimizer):
        plans = [float(m) for m in cyclic.max_lrs]
    bases = [plan if plan is not None else peak for plan, peak in zip(plans, peaks)]
    now, shown = group_lrs(guard, factor)
    moved = [b is not None and n is not None and abs(b * factor - n) > 1e-6 * abs(n)
             for b, n in zip(bases, now)]
    if not any(moved):
        return now, shown, None
    cfg = [b * factor if b is not None else n for b, n in zip(bases, now)]
    text = ", ".join(f"{lr:.3g}" if lr is not None else f"its own step size x{factor:g}"
                     for lr in dict.fromkeys(cfg))
    return cfg, text, ", ".join(f"{b:.3g}" for b in dict.fromkeys(b for b in bases if b is not None))


def lr_number(lr: Any) -> float | None:
    """A param group's LR as a number; None when it has none (Adafactor's relative step)."""
    return float(lr) if numeric_lr(lr) else None


def of_base(base: str | None) -> str:
    """`` of the 0.1 it has`` when the advice scales a schedule's base LR (see
    :func:`config_lrs`)."""
    return "" if base is None else f" of the {base} it has, which your schedule scales"


def based(base: str | None) -> dict[str, Any]:
    return {} if base is None else {"scheduled": True}
