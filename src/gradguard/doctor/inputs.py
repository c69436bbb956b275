"""Probe: the batch itself (NaN/Inf, feature scale)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from ..events import Severity
from ._report import Finding

#: He/Xavier assume unit-scale inputs; beyond this rms (or per-feature rms) the first layer's
#: pre-activations and weight gradients scale up by the same factor.
UNSCALED_RMS_WARNING = 25.0
UNSCALED_RMS_ERROR = 1000.0


def named_tensors(x: Any, prefix: str) -> Iterator[tuple[str, Tensor]]:
    if isinstance(x, Tensor):
        yield prefix, x
    elif isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            yield from named_tensors(v, f"{prefix}[{i}]")
    elif isinstance(x, dict):
        for k, v in x.items():
            yield from named_tensors(v, f"{prefix}[{k!r}]")


def probe_nonfinite_input(inputs: Any, targets: Any) -> list[Finding]:
    """NaN/Inf anywhere in the inputs or targets: an ``error`` naming the tensor and count."""
    out: list[Finding] = []
    for name, t in [*named_tensors(inputs, "inputs"), *named_tensors(targets, "targets")]:
        if not t.is_floating_point() and not t.is_complex():
            continue
        bad = ~torch.isfinite(t)
        n_bad = int(bad.sum())
        if n_bad == 0:
            continue
        first = [int(i) for i in bad.nonzero()[0]]
        out.append(
            Finding(
                "nonfinite_input",
                "error",
                name,
                {
                    "n_nonfinite": n_bad,
                    "n_nan": int(torch.isnan(t).sum()),
                    "n_inf": int(torch.isinf(t).sum()),
                    "numel": t.numel(),
                    "first_index": first,
                },
                f"{name} holds {n_bad} NaN/Inf values (first at index {first}): clean the "
                f"data pipeline (impute or drop those rows) or filter batches with "
                f"torch.isfinite(x).all() before the forward pass.",
                1.0,
            )
        )
    return out


def _feature_rms(t: Tensor) -> Tensor:
    x = t.detach().float()
    if x.ndim >= 4:  # channels of an image batch
        return x.transpose(0, 1).reshape(x.shape[1], -1).pow(2).mean(1).sqrt()
    if x.ndim <= 1:
        return x.pow(2).mean().sqrt().reshape(1)
    return x.reshape(-1, x.shape[-1]).pow(2).mean(0).sqrt()


def _graded(rms: float) -> tuple[Severity, float]:
    """The severity and confidence of a scale ``rms`` over ``UNSCALED_RMS_WARNING``."""
    sev: Severity = "error" if rms >= UNSCALED_RMS_ERROR else "warning"
    return sev, min(1.0, 0.6 + 0.1 * (rms / UNSCALED_RMS_WARNING) ** 0.25)


def probe_input_scale(
    inputs: Any, first_layer: str | None, first_layer_in_absmax: float | None = None
) -> list[Finding]:
    """Floating inputs whose features are far from unit scale.

    ``first_layer_in_absmax``: the largest |value| that reached the first weight layer. When
    the model normalises its input before that layer (``x / 255``, a BatchNorm/LayerNorm
    first), it is small and the raw scale does no harm.
    """
    out: list[Finding] = []
    if first_layer_in_absmax is not None and first_layer_in_absmax < UNSCALED_RMS_WARNING:
        return out
    for name, t in named_tensors(inputs, "inputs"):
        if not t.is_floating_point() or t.numel() == 0:
            continue
        feat = _feature_rms(t)
        worst = float(feat.max())
        if worst < UNSCALED_RMS_WARNING:
            continue
        idx = int(feat.argmax())
        sev, confidence = _graded(worst)
        n_big = int((feat >= UNSCALED_RMS_WARNING).sum())
        ev = {
            "input_rms": float(t.detach().float().pow(2).mean().sqrt()),
            "max_feature_rms": worst,
            "worst_feature": idx,
            "n_features_over": n_big,
            "n_features": int(feat.numel()),
            "threshold_rms": UNSCALED_RMS_WARNING,
        }
        target = f" before `{first_layer}`" if first_layer else ""
        out.append(
            Finding(
                "unscaled_input",
                sev,
                name,
                ev,
                f"{n_big} of {feat.numel()} features of {name} have rms up to {worst:.3g} "
                f"(feature {idx}), {worst:.0f}x the unit scale the init assumes: standardise "
                f"them ((x - mean) / std per feature, fitted on the training set){target}.",
                confidence,
            )
        )
    return out


def probe_target_scale(targets: Any, output_shapes: list[tuple[int, ...]]) -> list[Finding]:
    """Floating targets of the model's output's shape (regressed on) far from unit scale: the
    loss's gradient scales with them (MSE: ``2 (prediction - target)``), and so does every
    layer's through the output layer, as for an input far from unit scale. Found as a
    stranger: a ReLU MLP on ``load_diabetes`` with the raw targets (mean 152, std 77) on
    SGD momentum goes NaN at lr 1e-3, 1e-2 and 1e-1 (two seeds of three at each; the LR
    probe advised 1e-3); with the targets standardised it trains at all three (held-out
    MSE 2531-2845 at 1e-3)."""
    out: list[Finding] = []
    shapes = set(output_shapes)
    for name, t in named_tensors(targets, "targets"):
        if not t.is_floating_point() or t.numel() == 0 or tuple(t.shape) not in shapes:
            continue
        feat = _feature_rms(t)
        worst = float(feat.max())
        if worst < UNSCALED_RMS_WARNING:
            continue
        x = t.detach().float()
        mean, std = float(x.mean()), float(x.std()) if x.numel() > 1 else 0.0
        sev, confidence = _graded(worst)
        out.append(
            Finding(
                "unscaled_input",
                sev,
                name,
                {"target_rms": worst, "target_mean": mean, "target_std": std,
                 "threshold_rms": UNSCALED_RMS_WARNING},
                f"{name} have rms up to {worst:.3g} (mean {mean:.3g}, std {std:.3g}), "
                f"{worst:.0f}x the unit scale of a fresh model's output: the loss's gradient "
                "and every layer's grow with them. Standardise the targets ((y - mean) / std, "
                "fitted on the training set) and map predictions back (pred * std + mean).",
                confidence,
            )
        )
    return out
