"""Detectors: pure functions over a host-side telemetry window that return Events.

The guard runs :func:`detect` at every flush. Detectors never touch the device and never
act; recovery decides what to do with their events.
"""

from __future__ import annotations

import math

import torch

from .events import Event
from .telemetry import Window


def nonfinite_origin(
    layer_norms_row: torch.Tensor, layers: list[str]
) -> tuple[list[str], str | None]:
    """Layers with non-finite gradient norm in one step, and the *origin*: the non-finite
    layer nearest the loss (last in module order) with every layer after it finite.

    When every layer after the last non-finite one is finite, the gradient first went bad
    there during backward; when the last layer itself is non-finite the trouble came from
    the loss or the forward pass, and the origin is that last layer.
    """
    bad = [i for i, x in enumerate(layer_norms_row.tolist()) if not math.isfinite(x)]
    if not bad:
        return [], None
    return [layers[i] for i in bad], layers[bad[-1]]


def detect_nonfinite(window: Window) -> list[Event]:
    """A ``nonfinite_grad`` event per non-finite step, plus ``skip`` when it was skipped."""
    events: list[Event] = []
    total = window.total_norm.tolist()
    ln = None
    for i, step in enumerate(window.steps):
        if math.isfinite(total[i]):
            continue
        if ln is None:
            ln = window.layer_norms()
        bad, origin = nonfinite_origin(ln[i], window.layers)
        kind = "NaN" if math.isnan(total[i]) else "Inf"
        events.append(
            Event(
                kind="nonfinite_grad",
                step=step,
                severity="error",
                message=(
                    f"step {step}: gradient norm is {kind}; origin `{origin}`"
                    f" ({len(bad)} of {len(window.layers)} layers non-finite)"
                ),
                layer=origin,
                value=total[i],
                remedy=(
                    "Check the inputs and loss of this step for NaN/Inf, lower the learning "
                    "rate, and run gg.doctor(model, batch, loss_fn) to find the cause."
                ),
                data={"layers": bad},
            )
        )
        if bool(window.skipped[i]):
            events.append(
                Event(
                    kind="skip",
                    step=step,
                    severity="warning",
                    message=f"step {step}: optimizer step skipped (non-finite gradients)",
                    layer=origin,
                    value=total[i],
                )
            )
    return events


def detect(window: Window) -> list[Event]:
    """Run every detector over a window, in step order."""
    events = detect_nonfinite(window)
    events.sort(key=lambda e: e.step)
    return events
