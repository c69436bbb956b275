"""ZClip's constants, and its rule in Python numbers for CPU scalars
(:func:`host_coefficient`): the same rule as :meth:`gradguard.ZClip.coefficient`'s tensor
ops, bit for bit, without ~80 one-element tensor ops a step (a CPU tensor is host memory)."""

from __future__ import annotations

import math
import struct
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .base import NORM_EPS

if TYPE_CHECKING:
    from .zclip import ZClip

# ZClip defaults (Kumar et al. 2025, "ZClip: Adaptive Spike Mitigation for LLM
# Pre-Training", Sec. 3 and the reference implementation).
ZCLIP_ALPHA = 0.97
ZCLIP_Z_THRESH = 2.5
ZCLIP_WARMUP = 25
ZCLIP_EPS = 1e-6
#: gradguard's addition to ZClip's warm-up: a norm above this many times the median of the
#: first ``ZCLIP_WARMUP_ANCHOR`` finite norms is an explosion, not the run's normal scale
#: (healthy warm-ups stay well within 10x of their first norms; an IRNN or an LR 10x too
#: high grows geometrically): it is clipped to that bound and enters the statistics
#: clipped, so the EMA starts from the healthy scale.
ZCLIP_WARMUP_CAP = 10.0
ZCLIP_WARMUP_ANCHOR = 5
#: In ``space="log"`` a norm of 0 has no log: a norm at or below this floor neither clips
#: nor enters the statistics (like a non-finite one).
ZCLIP_LOG_FLOOR = 1e-30

#: gradguard's addition: a norm within this factor of the previous step's, in a run of such
#: steps that began at a step ZClip did not flag, while the loss falls (below its EMA), is
#: a rise the model learns through, not a spike: it is not clipped (``gradual=None``: the
#: paper's algorithm). A healthy VGG-11-BN on SGD momentum has its norm rise 3.4x over 30
#: steps while its loss falls fastest, 14-27% a step; a spike jumps many times at once.
ZCLIP_GRADUAL = 1.5
#: The weight of the newest loss in the EMA the "loss falls" test compares it with.
ZCLIP_LOSS_EMA = 0.1

_F32 = struct.Struct("f")

#: The "gradual" rule's state (see :class:`ZClip`), one float32 tensor ``state["rise"]``
#: (one read and one write a step): the previous finite step's norm (or its log); 1 when
#: a rise may continue from it (it continued one, or the z-test did not flag it); the
#: loss's EMA; 1 once a finite loss is in it. All finite: a recovery refuses a snapshot
#: with a NaN/Inf in it (the first step's test is moot: it is in warm-up).
RISE_PREV, RISE_OPEN, RISE_LOSS, RISE_SEEN = range(4)


def _f32(x: float) -> float:
    """``x`` rounded to float32, as a float32 tensor op rounds its result (+-inf beyond)."""
    try:
        return float(_F32.unpack(_F32.pack(x))[0])
    except OverflowError:
        return math.copysign(math.inf, x)


def host_coefficient(policy: ZClip, g_t: Tensor, fin_t: Tensor, s: dict[str, Tensor],
                     loss: Tensor | float | None = None, calm: bool = True, *,
                     learn: bool = True) -> Tensor:
    """:meth:`ZClip.coefficient` for CPU scalars, in Python numbers: the same rule, the same
    state read and written in place, and the same float32 results bit for bit (each
    step rounded as the tensor op rounds it; ``tests/test_clipping.py``), instead of
    ~80 one-element tensor ops (a CPU tensor is host memory; see
    ``measure.READ_CPU_COEFFICIENT``). ``log``/``exp``/``sqrt`` are torch's, whose
    float32 results are not always the correctly rounded ones. ``learn`` False (a step the
    guard skips): the "gradual" rule's state (the chain, the last norm, the loss's EMA)
    is left as it is."""
    g, fin, count = g_t.item(), bool(fin_t), int(s["count"])
    gradual = policy.gradual
    rise = s["rise"].tolist() if gradual is not None else None
    if not learn:  # the "gradual" state is written in place below: into a copy
        s = {**s, "rise": s["rise"].clone()}
    falling = False
    if rise is not None and loss is not None:  # the loss's EMA (``_rise``)
        lt = _f32(float(loss))
        if math.isfinite(lt):
            ema, seen = rise[RISE_LOSS], rise[RISE_SEEN] > 0.5
            falling = seen and lt < ema
            rise[RISE_LOSS] = _f32(ema + _f32(ZCLIP_LOSS_EMA) * _f32(lt - ema)) if seen else lt
            rise[RISE_SEEN] = 1.0
    eps = _f32(NORM_EPS)
    coef = 1.0
    log = policy.space == "log"
    if not fin or (log and not g > _f32(ZCLIP_LOG_FLOOR)):
        if rise is not None:
            s["rise"].copy_(torch.tensor(rise))  # the loss's EMA alone
        return torch.tensor(coef, dtype=torch.float32)  # never enters the statistics
    x = g_t.log().item() if log else g
    chain = relax = fired = False
    if rise is not None and gradual is not None:  # (one test: the second is for mypy)
        prev = rise[RISE_PREV]
        smooth = (_f32(x - prev) <= _f32(math.log(gradual)) if log
                  else x <= _f32(prev * _f32(gradual)))
        chain = smooth and rise[RISE_OPEN] > 0.5
        relax = chain and falling and calm

    def norm_of(v: float) -> float:  # a threshold on x, as a norm
        return torch.tensor(v, dtype=torch.float32).exp().item() if log else v

    if count < policy.warmup_steps:
        x_in = x
        anchor = min(ZCLIP_WARMUP_ANCHOR, policy.warmup_steps)
        if policy.warmup_cap is not None and count >= anchor:
            first = sorted(s["buffer"][:anchor].tolist())[(anchor - 1) // 2]  # torch.median
            cap = (_f32(first + _f32(math.log(policy.warmup_cap))) if log
                   else _f32(_f32(policy.warmup_cap) * first))
            if x > cap:
                coef, x_in, fired = _f32(norm_of(cap) / _f32(g + eps)), cap, True
        buf = s["buffer"]
        buf[count] = x_in
        s["count"].fill_(count + 1)
        if count + 1 == policy.warmup_steps:
            s["mean"].copy_(buf.mean())
            s["var"].copy_(buf.var(unbiased=False))
    else:
        mean, var = s["mean"].item(), s["var"].item()
        std = s["var"].sqrt().item()
        den = _f32(std + _f32(policy.eps))
        diff = _f32(x - mean)
        z = _f32(diff / den) if den else (math.copysign(math.inf, diff) if diff else math.nan)
        x_c = x
        fired = z > _f32(policy.z_thresh)
        if fired:
            if policy.mode == "reciprocal":
                thr = _f32(mean + _f32(_f32(_f32(policy.z_thresh**2) * std) / z))
            elif policy.mode == "percentile":
                thr = _f32(mean + _f32(_f32(policy.z_thresh) * std))
            else:
                thr = mean
            if thr < x and not relax:
                coef, x_c = _f32(norm_of(thr) / _f32(g + eps)), thr
        w = _f32(1 - policy.alpha)
        new_mean = _f32(mean + w * _f32(x_c - mean))  # torch.lerp: a fused multiply-add
        d = _f32(x_c - new_mean)
        s["mean"].fill_(new_mean)
        s["var"].fill_(_f32(var + w * _f32(_f32(d * d) - var)))
    if rise is not None:
        rise[RISE_PREV], rise[RISE_OPEN] = x, float(chain or not fired)
        s["rise"].copy_(torch.tensor(rise))
    if policy.max_norm is not None:  # norm_coef: max_norm / t is reciprocal(t) * max_norm
        coef = min(coef, _f32(_f32(1.0 / _f32(g + eps)) * _f32(policy.max_norm)))
    return torch.tensor(coef, dtype=torch.float32)
