"""Weights: fan-in/fan-out as the layer actually uses them, the init a layer should have, and
the parameters a library zero-initialises (or sets to a tiny constant) on purpose.

Fans are read from shapes, not layer types: a 2-D weight is ``[out, in]`` (``nn.Linear``)
unless the layer's input says it is ``[in, out]`` (GPT-2's ``Conv1D``); a conv kernel
``[out, in/groups, *k]`` reaches ``out/groups`` outputs per input channel (a depthwise conv
has ``groups == channels``).

Example:
    >>> import torch
    >>> from gradguard.doctor._weights import weight_stats
    >>> dw = torch.nn.Conv2d(32, 32, 3, groups=32)
    >>> weight_stats(dw)[1:]          # fan-in, fan-out: 3x3 each, not 32x3x3
    (9, 9)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

#: a constant multiplicative parameter (layer scale, ReZero gate, a BN gain) at or below
#: this magnitude is a deliberate "start as identity" init, not a too-small init
CONSTANT_GATE_MAX = 0.1


def weight_stats(m: nn.Module, in_features: int = 0) -> tuple[float, int, int]:
    """(std, fan_in, fan_out) of a weight layer; ``in_features``: the last dim of the
    input it was called with (tells ``[in, out]`` from ``[out, in]`` matrices)."""
    w = m._parameters["weight"]
    assert w is not None
    wd = w.detach().float()
    std = float(wd.std()) if wd.numel() > 1 else float(wd.abs().mean())
    if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
        return std, 1, int(wd.shape[1])
    if wd.ndim == 2:
        out_f, in_f = int(wd.shape[0]), int(wd.shape[1])
        if in_features == out_f and in_features != in_f:
            out_f, in_f = in_f, out_f
        return std, in_f, out_f
    groups = int(getattr(m, "groups", 1) or 1)
    rf = int(wd[0][0].numel())
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        return std, int(wd.shape[0]) // groups * rf, int(wd.shape[1]) * rf
    return std, int(wd.shape[1]) * rf, int(wd.shape[0]) // groups * rf


def recommended_std(fan_in: int, fan_out: int, family: str | None, kind: str | None = None) -> tuple[str, float]:
    """The init a layer followed by an activation of ``family`` should have: He for the
    ReLU family (ReLU, GELU, SiLU, Hardswish ...), Xavier otherwise (gain 5/3 before tanh)."""
    if family == "relu":
        return "He (kaiming_normal_, fan_in)", math.sqrt(2.0 / fan_in)
    gain = 5.0 / 3.0 if kind == "tanh" else 1.0
    return "Xavier (xavier_normal_)", gain * math.sqrt(2.0 / (fan_in + fan_out))


def constant_gates(model: nn.Module) -> dict[str, float]:
    """Parameters set to one small constant (zero heads, zero-init BN gains, layer scale
    1e-6, ReZero's 0): name -> the constant. Biases are additive and never gate a path."""
    out: dict[str, float] = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.rpartition(".")[2].startswith("bias") or p.numel() == 0:
                continue
            lo, hi = float(p.min()), float(p.max())
            if lo != hi:
                continue
            if (p.ndim >= 2 and lo == 0.0) or (p.ndim < 2 and abs(lo) <= CONSTANT_GATE_MAX):
                out[name] = lo
    return out


def is_zero(t: Tensor | None) -> bool:
    return t is not None and not bool(t.detach().any())
