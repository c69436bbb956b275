"""Gradients clipped before the guard saw them: a ``clip_grad_norm_`` of the user's own.

The common way to adopt the guard is to replace ``optimizer.step()`` with
``guard.step(loss)`` and keep the lines above it, ``clip_grad_norm_(model.parameters(), 1.0)``
among them. The guard then measures gradients already scaled down to ``max_norm``: every
norm it records is at most the cap, a bad batch's x100 gradient arrives as 1.0, and the
per-step verdict has no spike to skip (docs/guard.md, "Loops"). Nothing fails; the guard
is blind, and its report would say the norm "stayed between 0.2 and 1".

The trace of such a clip is exact: ``clip_grad_norm_`` scales the gradients to
``max_norm / (total + 1e-6)`` of their norm, so every clipped step's norm is the cap to
about 1e-6 of it, whatever the batch. A window in which at least ``CAP_STEPS`` (5) norms
tie with its largest within ``CAP_TIE`` (1e-4, relative) has been capped, when the norms
show the cap is a ceiling (some sit ``CAP_BELOW``, 1%, under it) or when it is a value a
person chose (two significant digits: 1, 0.5, 0.25, 5; every norm at it when the cap is
under all of the run's: a clip at 0.1 on a network whose norms are 0.2-2). Natural norms
never tie like that: the norms of a window of 50 healthy steps spread over tens of
percent, and five of them within 1e-4 of the largest is a chance of about 1e-9; a
gradient whose norm is the same on every step by construction (a linear model's ``sum()``
over the same inputs: 1.7320508...) is no ceiling and rarely a round number.

Reported once per run, as a ``clip`` event (``data["cap"]``) and a ``GradGuardWarning`` on
the console. An info, as the setup warnings at construction are no event at all: it says
how the guard is used, not that training is in trouble (a healthy run that clips its own
gradients is healthy). A clip the guard does itself (its ``clip=`` policy, the Trainer's
clip under the callbacks and ``gradguard run``) comes after the measurement and leaves no
trace.
"""

from __future__ import annotations

import math

from ..events import Event
from ..telemetry import Window
from .config import DetectorState

#: Steps of a window whose norm ties with the window's largest, for a cap.
CAP_STEPS = 5
#: Relative tie: ``clip_grad_norm_`` leaves a norm of ``max_norm * total / (total + 1e-6)``.
CAP_TIE = 1e-4
#: A norm this far under the cap (relative) shows the cap is a ceiling.
CAP_BELOW = 1e-2


def detect_capped(window: Window, state: DetectorState) -> list[Event]:
    """A ``clip`` info (with a console warning), once per run, when the window's gradient
    norms were capped before the guard measured them (see the module docstring)."""
    if state.capped:
        return []
    norms = [x for x in window.total_norm.tolist() if math.isfinite(x) and x > 0]
    if len(norms) < CAP_STEPS:
        return []
    cap = max(norms)
    at_cap = sum(1 for x in norms if x >= cap * (1 - CAP_TIE))
    if at_cap < CAP_STEPS or (min(norms) > cap * (1 - CAP_BELOW) and not chosen(cap)):
        return []
    state.capped = True
    step = window.steps[-1]
    return [Event(
        kind="clip", step=step, severity="info", value=cap,
        message=(f"steps {window.steps[0]}-{step}: the gradient norm that reached the guard "
                 f"was {cap:.4g} on {at_cap} of {len(norms)} steps and never above: the "
                 "gradients were clipped before the guard saw them (a clip_grad_norm_("
                 f"max_norm={cap:.3g}) of your own before guard.step?). The guard measures "
                 "and judges the clipped norms: a gradient spike arrives capped and is not "
                 "skipped, and the report cannot show it"),
        remedy=(f"Remove your own clip_grad_norm_ and pass clip=gg.NormClip(max_norm={cap:.3g})"
                " to the Guard (the same clip, applied after it measures), or run the script "
                "under `gradguard run`."),
        data={"cap": cap, "steps_at_cap": at_cap, "steps": len(norms)},
    )]


def chosen(x: float) -> bool:
    """Whether ``x`` is, within ``CAP_TIE``, a number of two significant digits (1, 0.5, 0.25,
    5, 10): a ``max_norm`` a person typed."""
    if not (x > 0 and math.isfinite(x)):
        return False
    mantissa = x / 10 ** math.floor(math.log10(x))
    return abs(mantissa - round(mantissa, 1)) <= CAP_TIE * mantissa
