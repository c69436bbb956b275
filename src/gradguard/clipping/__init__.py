"""Gradient clipping policies: norm, value, AutoClip, ZClip, AGC, and ``chain``.

See :mod:`gradguard.clipping.base` for the protocol every policy follows.
"""

from __future__ import annotations

from .adaptive import AUTOCLIP_PERCENTILE, AutoClip
from .agc import AGC, AGC_CLIPPING, AGC_EPS, unitwise_norm
from .base import (
    NORM_EPS,
    ClipPolicy,
    NormClip,
    ParamsArg,
    Policy,
    ValueClip,
    apply_policy,
    as_named_params,
    deferrable,
    norm_coef,
    policy_coefficient,
    scale_grads_,
)
from .chain import Chain, chain
from .zclip import ZCLIP_ALPHA, ZCLIP_EPS, ZCLIP_WARMUP, ZCLIP_Z_THRESH, ZClip

POLICIES: tuple[type, ...] = (NormClip, ValueClip, AutoClip, ZClip, AGC, Chain)

__all__ = [
    "AGC",
    "AGC_CLIPPING",
    "AGC_EPS",
    "AUTOCLIP_PERCENTILE",
    "NORM_EPS",
    "POLICIES",
    "ZCLIP_ALPHA",
    "ZCLIP_EPS",
    "ZCLIP_WARMUP",
    "ZCLIP_Z_THRESH",
    "AutoClip",
    "Chain",
    "ClipPolicy",
    "NormClip",
    "ParamsArg",
    "Policy",
    "ValueClip",
    "ZClip",
    "apply_policy",
    "as_named_params",
    "chain",
    "deferrable",
    "norm_coef",
    "policy_coefficient",
    "scale_grads_",
    "unitwise_norm",
]
