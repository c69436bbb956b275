"""Non-finite steps: which layer, which forward output, and which cause."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..events import WEIGHTS_REMEDY, Event, listed
from ..telemetry import Window
from .config import INPUT_ORIGIN, LOSS_ORIGIN


# ---- non-finite localisation ------------------------------------------------------------
def nonfinite_origin(
    layer_norms_row: torch.Tensor, layers: list[str], after: list[list[int]] | None = None,
) -> tuple[list[str], str | None]:
    """Layers with non-finite gradient norm in one step, and the *origin*: the non-finite
    layer nearest the loss, every layer after it finite.

    Backward runs from the loss to the inputs, so the gradient first went bad at a
    non-finite layer none of whose later layers is non-finite; when the layer nearest the
    loss is non-finite itself, the trouble came from the loss or the forward pass, and the
    origin is that layer. "After" is the autograd graph's order where the telemetry read it
    (``after``: per layer, the layers its output flows through to the loss;
    ``Window.after``, :mod:`gradguard.graph_order`), else registration order: a pre-norm
    block registers its norm after the projections it feeds, and two networks side by side
    are not after each other. Among several such layers (both towers went bad) the last
    registered is named.

    Example:
        >>> import math, torch
        >>> from gradguard.detectors import nonfinite_origin
        >>> nonfinite_origin(torch.tensor([math.nan, math.inf, 1.0]), ["a", "b", "c"])
        (['a', 'b'], 'b')
        >>> # "b" feeds "a" (a norm registered after the projection it feeds)
        >>> nonfinite_origin(torch.tensor([math.nan, math.inf, 1.0]), ["a", "b", "c"],
        ...                  after=[[2], [0, 2], []])
        (['a', 'b'], 'a')
    """
    bad = [i for i, x in enumerate(layer_norms_row.tolist()) if not math.isfinite(x)]
    if not bad:
        return [], None
    names = [layers[i] for i in bad]
    if after is None:
        return names, layers[bad[-1]]
    worse = set(bad)
    first = [i for i in bad if not worse.intersection(after[i])]
    return names, layers[(first or bad)[-1]]


@dataclass(frozen=True)
class ForwardOrigin:
    """The first thing whose forward output went non-finite in one step.

    Attributes:
        module: module path, or ``"(input)"`` when the batch itself held NaN/Inf.
        dtype: dtype of that output (``"torch.float16"`` points to a half overflow).
    """

    module: str
    dtype: str = ""


#: Every layer's gradient NaN under a finite loss given to the step.
UNSEEN = ("every layer's gradient is NaN under a finite loss: the NaN came in at the loss "
          "end, from a loss guard.step was not given (a micro-batch before the last, under "
          "gradient accumulation; a loss term left out) or the loss's own backward")
UNSEEN_REMEDY = ("Check this step's micro-batches for NaN/Inf (pass guard.step the sum of the "
                 "accumulated losses and it names them), and the loss for an op whose "
                 "gradient is undefined at its input (sqrt or norm at 0, log at 0).")


def _nonfinite_cause(
    loss: float, fwd: ForwardOrigin | None, watched: bool = True
) -> tuple[str | None, str | None, str]:
    """(cause, origin override, remedy) from the forward origin and the loss.

    ``watched`` says whether forward outputs were watched: only then does "no forward
    origin" prove that the activations were finite."""
    if fwd is not None and fwd.module == INPUT_ORIGIN:
        return "nonfinite_input", INPUT_ORIGIN, (
            "The batch contains NaN/Inf: clean or filter the data (torch.isfinite on inputs)."
        )
    if fwd is not None and fwd.dtype in ("torch.float16", "torch.bfloat16"):
        return "half_precision_overflow", fwd.module, (
            f"`{fwd.module}` overflows in {fwd.dtype.split('.')[-1]}: run it in float32, "
            "use bfloat16, or use torch.amp.GradScaler."
        )
    if fwd is not None:
        return None, fwd.module, (
            f"`{fwd.module}` produced NaN/Inf in the forward pass: guard its inputs "
            "(e.g. log(x.clamp_min(eps)), x / (y + eps)) or lower the learning rate."
        )
    if not math.isfinite(loss) and not watched:
        return None, LOSS_ORIGIN, (
            "The loss is NaN/Inf: check this step's batch for NaN/Inf and the loss for "
            "log(0) or x/0; Guard(watch_activations=True) names the first module that "
            "went non-finite."
        )
    if not math.isfinite(loss):
        return "nonfinite_loss", LOSS_ORIGIN, (
            "The loss is NaN/Inf on finite activations: guard log/div in the loss "
            "(clamp_min(eps)) or lower the learning rate."
        )
    return None, None, (
        "Check the inputs and loss of this step for NaN/Inf, lower the learning rate, and "
        "run gg.doctor(model, batch, loss_fn) to find the cause."
    )


def detect_nonfinite(
    window: Window,
    forward_origins: Mapping[int, ForwardOrigin] | None = None,
    amp_overflows: Mapping[int, float] | None = None,
    bad_weights: Mapping[int, Sequence[str]] | None = None,
) -> list[Event]:
    """A ``nonfinite_grad`` event per non-finite step, plus ``skip`` when it was skipped.

    Steps in ``amp_overflows`` (step -> loss scale; routine ``GradScaler`` overflows, see
    ``gradguard.executors.AMP_OVERFLOW_MIN_SCALE``) get one ``info`` ``skip`` event with
    ``data["reason"] == "loss_scale_overflow"`` instead.

    The event's ``layer`` is the origin: the first module whose forward output went
    NaN/Inf when ``forward_origins`` knows it (``Guard(watch_activations=True)``),
    ``"(input)"`` for a bad batch, ``"(loss)"`` for a non-finite loss on finite
    activations, else the gradient origin (:func:`nonfinite_origin`). A step in
    ``bad_weights`` (step -> the layers whose weights were NaN/Inf then) ran on weights an
    update had made non-finite: its cause is ``nonfinite_weights``, its origin the first of
    those layers.
    """
    events: list[Event] = []
    total = window.total_norm.tolist()
    losses = window.loss.tolist()
    if window.loss_given is not None:  # no loss given is no NaN loss (a step's NaN placeholder:
        # a script under `gradguard run` whose gradients come from torch.autograd.grad was
        # told "The loss was NaN at step 50", no loss ever seen)
        losses = [v if g else 0.0 for v, g in zip(losses, window.loss_given.tolist())]
    ln = None
    for i, step in enumerate(window.steps):
        if math.isfinite(total[i]):
            continue
        if amp_overflows and step in amp_overflows:
            scale = amp_overflows[step]
            events.append(Event(
                kind="skip", step=step, severity="info", value=scale,
                message=(f"step {step}: loss-scale overflow at scale {scale:g}; the GradScaler "
                         "skipped the step and lowers its scale (routine in mixed precision)"),
                data={"reason": "loss_scale_overflow", "scale": scale},
            ))
            continue
        if ln is None:
            ln = window.layer_norms()
        bad, grad_origin = nonfinite_origin(ln[i], window.layers, window.after)
        fwd = (forward_origins or {}).get(step)
        cause, origin, remedy = _nonfinite_cause(losses[i], fwd, forward_origins is not None)
        weights = (bad_weights or {}).get(step)
        if weights:
            cause, origin, remedy = "nonfinite_weights", weights[0], WEIGHTS_REMEDY
        origin = origin or grad_origin
        kind = "NaN" if math.isnan(total[i]) else "Inf"
        unseen = (cause is None and fwd is None and kind == "NaN" and math.isfinite(losses[i])
                  and window.loss_given is not None and bool(window.loss_given[i])
                  and len(window.layers) >= 2 and len(bad) == len(window.layers))
        if unseen:  # NaN in every layer under a finite loss: it came in at the loss end,
            # from a loss the guard was not given (found by a stranger: a NaN micro-batch
            # under gradient accumulation, the last micro-batch's loss passed, was "Gradients
            # exploded at step 150 in `4`", told to lower the learning rate)
            cause, remedy = "nonfinite_loss", UNSEEN_REMEDY
        where = {
            "nonfinite_input": "the input batch holds NaN/Inf",
            "nonfinite_loss": "the loss is non-finite",
            "half_precision_overflow": f"`{origin}` overflowed in half precision",
            "nonfinite_weights": f"the weights of {listed(list(weights or ()))} are NaN/Inf",
        }.get(cause or "", f"origin `{origin}`")
        if unseen:
            where = UNSEEN
        if origin is None and not bad and window.layers:
            # every layer's norm finite, their total not: it overflowed summing them (found
            # by a stranger: "origin `None` (0 of 2 layers non-finite)")
            norms = ln[i].tolist()
            origin = grad_origin = window.layers[max(range(len(norms)), key=norms.__getitem__)]
            where = (f"the layers' norms are finite, their total overflowed (the largest in "
                     f"`{origin}`)")
        data: dict[str, Any] = {"layers": bad, "grad_origin": grad_origin}
        if cause is not None:
            data["cause"] = cause
        if fwd is not None:
            data["forward_origin"] = fwd.module
        if not math.isfinite(losses[i]):  # the loss's own kind: an Inf loss has NaN gradients
            data["loss"] = "NaN" if math.isnan(losses[i]) else "Inf"
        if unseen:
            data["unseen_loss"] = True
        events.append(
            Event(
                kind="nonfinite_grad",
                step=step,
                severity="error",
                message=(
                    f"step {step}: gradient norm is {kind}; {where}"
                    f" ({len(bad)} of {len(window.layers)} layers non-finite)"
                ),
                layer=origin,
                value=total[i],
                remedy=remedy,
                data=data,
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


def detect_untrained_loss(window: Window) -> list[Event]:
    """``nonfinite_loss`` warnings for steps whose given loss is NaN/Inf while every
    gradient is finite, one per window and cause, at its first such step (its steps in
    ``data["steps"]``). The step is taken, as its gradients are sound; the non-finite loss
    is left out of every loss test, so nothing else would say so (it was silent). Two
    causes are told apart by the gradient norm:

    * exactly zero: a batch with nothing to learn from, e.g. every label masked
      (``ignore_index``), whose mean loss is 0/0 (a Trainer's batch of padding only);
    * otherwise: the loss passed to ``guard.step`` is not the one that was
      backpropagated, or a term of it was computed without gradient (under ``no_grad``,
      or detached)."""
    if window.loss_given is None:
        return []
    total, losses = window.total_norm.tolist(), window.loss.tolist()
    given = window.loss_given.tolist()
    empty: list[int] = []
    untrained: list[int] = []
    for i, step in enumerate(window.steps):
        if given[i] and math.isfinite(total[i]) and not math.isfinite(losses[i]):
            (empty if total[i] == 0.0 else untrained).append(step)
    events = []
    for steps, why, remedy in (
        (empty, "every gradient is zero: a batch with nothing to learn from (every target "
                "masked, a mean over no elements is 0/0); the step was taken",
         "Drop batches whose targets are all masked, or divide the summed loss by "
         "max(count, 1)."),
        (untrained, "every gradient is finite: it is not the loss that was backpropagated, "
                    "or a term of it was computed without gradient; the step was taken",
         "Pass guard.step the loss you called backward() on, and check the terms of it "
         "computed under torch.no_grad() or detached."),
    ):
        if not steps:
            continue
        i = window.steps.index(steps[0])
        kind = "NaN" if math.isnan(losses[i]) else "Inf"
        more = (f" ({len(steps)} such steps in steps {steps[0]}-{window.steps[-1]})"
                if len(steps) > 1 else "")
        events.append(Event(
            kind="nonfinite_loss", step=steps[0], severity="warning", layer=LOSS_ORIGIN,
            value=losses[i], remedy=remedy, data={"steps": steps},
            message=f"step {steps[0]}: the loss given to guard.step is {kind} while {why}{more}",
        ))
    return events
