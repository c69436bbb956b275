"""The signals of one flush for :mod:`gradguard.precursors`: one robust point per signal
from a flushed window (host tensors: the window is the flush's one host copy)."""

from __future__ import annotations

import torch

from .window import Window


def _median(t: torch.Tensor) -> float | None:
    t = t[torch.isfinite(t)]
    return float(t.median()) if t.numel() else None


def window_signals(window: Window) -> dict[str, float | None]:
    """One robust point per signal from a flushed window (None where not measurable)."""
    loss = window.loss[torch.isfinite(window.loss)]
    out: dict[str, float | None] = {"loss": None, "loss_spread": None,
                                    "grad_norm": _median(window.total_norm)}
    if loss.numel() and bool((loss > 0).all()):
        out["loss"] = float(loss.median())
        if loss.numel() >= 5:  # a spread of fewer points is noise
            lg = loss.double().log()
            out["loss_spread"] = float((lg - lg.median()).abs().median())
    if window.weight_norms is not None:
        w = window.weight_norms[torch.isfinite(window.weight_norms)]
        out["weight_norm"] = float(w.double().norm()) if w.numel() else None
    return out


def layer_medians(window: Window) -> list[float]:
    """Each layer's median gradient norm over the window (NaN where never positive)."""
    ln = window.layer_norms()
    ln = torch.where(torch.isfinite(ln) & (ln > 0), ln, torch.nan)
    return ln.nanmedian(dim=0).values.tolist()


def loss_level(window: Window) -> tuple[float, float] | None:
    """The median of the window's finite losses and their median absolute deviation."""
    loss = window.loss[torch.isfinite(window.loss)].double()
    if not loss.numel():
        return None
    med = float(loss.median())
    return med, float((loss - med).abs().median())
