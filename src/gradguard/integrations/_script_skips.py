"""Steps the script skipped itself, under ``gradguard run``.

A script that guards itself clips, reads the norm ``clip_grad_norm_`` returned, and on a
non-finite (or too large) one zeroes the gradients without ``optimizer.step()``
(nanoGPT-style loops, ``if not torch.isfinite(norm): optimizer.zero_grad(); continue``).
The guard measures at the step, so it never saw that step: a run with NaN gradients on
two iterations was reported "HEALTHY: No gradient trouble in 78 steps".

Such a step leaves the script's clip request pending (the guard carries a clip out at
its step) when the gradients are zeroed. :func:`note_script_skips` takes those requests
and records an event on the guard of the optimizer holding their parameters: a
``nonfinite_grad`` error ("... the script skipped the step itself") for a non-finite
norm, an info ``skip`` for a finite one. The norm is read on the host then, one sync on
a path only a skipped step takes (the script has just read it itself).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from ..events import Event

if TYPE_CHECKING:
    from ._clip_intercept import ClipInterceptor
    from ._takeover import Unit

SCRIPT_SKIP_REMEDY = (
    "nothing was lost: the script skipped the step itself. If it recurs, the report of a "
    "run without the script's own skip shows which layer goes non-finite first")


def _owner_ids(owner: Any) -> set[int]:
    if isinstance(owner, torch.optim.Optimizer):
        return {id(p) for g in owner.param_groups for p in g["params"]}
    if isinstance(owner, torch.nn.Module):
        return {id(p) for p in owner.parameters()}
    return set()


def note_script_skips(interceptor: ClipInterceptor, units: list[Unit], owner: Any) -> None:
    """``owner`` (an optimizer or a module) is zeroing its gradients: record each clip
    request on them still pending (never stepped) on the guard of their optimizer."""
    if not interceptor.pending:
        return
    dropped = interceptor.drop(_owner_ids(owner))
    for req in dropped:
        if req.total is None:  # clip_grad_value_: no norm to judge the step by
            continue
        guard = next((u.guard for u in units if u.guard is not None and not u.guard._closed
                      and u.optimizer is not None and req.ids <= _owner_ids(u.optimizer)),
                     None)
        if guard is None:
            continue  # before the optimizer's first step: no guard yet
        norm = float(req.total)  # the sync of a skipped step only
        step = guard.step_count
        said = f"{norm:.4g}" if math.isfinite(norm) else ("NaN" if math.isnan(norm) else "Inf")
        skipped = ("the script then zeroed the gradients without optimizer.step(): it skipped "
                   f"the step itself, before step {step} (gradguard saw no step)")
        if math.isfinite(norm):
            guard.add_event(Event(
                kind="skip", step=step, severity="info", value=norm,
                message=f"the script's {req.describe()} measured a gradient norm of {said}; "
                        + skipped,
                data={"reason": "script", "norm": norm}))
        else:
            guard.add_event(Event(
                kind="nonfinite_grad", step=step, severity="error", value=None,
                message=f"gradient norm is {said} (measured by the script's "
                        f"{req.describe()}); " + skipped,
                remedy=SCRIPT_SKIP_REMEDY,
                data={"script_skipped": True, "norm": said}))


def note_stopped_on_nonfinite(loss: torch.Tensor | None, units: list[Unit]) -> None:
    """The script's last backward gave a NaN/Inf ``loss`` (the one no optimizer step took)
    and it ended: it stopped on it (``if not math.isfinite(loss): sys.exit(3)``). The
    guard of each optimizer whose parameters hold its gradients records it as a stop (found
    by a stranger: such a run was "HEALTHY: No gradient trouble", ``"ok": true``). One host
    read, at the end."""
    if loss is None or math.isfinite(float(loss)):
        return
    said = "NaN" if math.isnan(float(loss)) else "Inf"
    for u in units:
        g = u.guard
        if g is None or g._closed or u.optimizer is None or not any(
                p.grad is not None for grp in u.optimizer.param_groups for p in grp["params"]):
            continue
        g.add_event(Event(
            kind="abort", step=g.step_count, severity="error",
            message=(f"step {g.step_count}: the script stopped after a backward whose loss "
                     f"was {said}, before any optimizer step took it (gradguard saw no step)"),
            remedy=("Under the guard a NaN/Inf step is skipped and training goes on; to find "
                    "its origin, see which layer goes non-finite first in a run that does not "
                    "stop on it."),
            data={"script_stopped": True, "loss": said}))
