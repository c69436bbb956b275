"""Adaptive total-norm clipping: AutoClip (percentile of the history) here, ZClip (z-score
of an EMA) in :mod:`.zclip`. Both keep their statistics on the device and never let a
non-finite norm in.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..measure import StepStats
from .base import Policy, norm_coef, to_device
from .zclip import (  # noqa: F401  (its home before the split)
    ZCLIP_ALPHA,
    ZCLIP_EPS,
    ZCLIP_WARMUP,
    ZCLIP_WARMUP_ANCHOR,
    ZCLIP_WARMUP_CAP,
    ZCLIP_Z_THRESH,
    ZClip,
)

# AutoClip default (Seetharaman et al. 2020, "AutoClip: Adaptive Gradient Clipping for
# Source Separation Networks": the 10th percentile worked best across their tasks).
AUTOCLIP_PERCENTILE = 10.0


#: AutoClip's whole-run history is a histogram over the bfloat16 bins of float32 (sign,
#: exponent and 7 leading mantissa bits: the float32 bit pattern >> 16). Finite norms are
#: >= 0, so their bins are 0 .. 0x7F7F; a bin spans 2**-7 of its lower edge.
_AUTOCLIP_BINS = 0x7F80


def _bin_of(x: Tensor) -> Tensor:
    """The histogram bin of each float32 value >= 0 (an int64 tensor)."""
    bits = x.float().contiguous().view(torch.int32).long() >> 16
    return bits.clamp(0, _AUTOCLIP_BINS - 1)


class AutoClip(Policy):
    """AutoClip: clip to the p-th percentile of the history of total gradient norms.

    At each step the current norm is appended to the history (finite norms only), the
    threshold is the ``percentile``-th percentile (linear interpolation, as
    ``numpy.percentile``) of the history *including* the current norm, and gradients are
    scaled by ``min(1, threshold / (norm + 1e-6))``.

    Cost per step, never a host read:

    * ``history_size=N``: the last N finite norms are kept and the percentile is exact
      (a sort of N values per step).
    * ``history_size=None`` (the paper's whole-run history): the history is a fixed-size
      histogram (32,640 bins, 0.4 MB), so the cost per step is constant however long the
      run. **Approximation:** each order statistic is replaced by the mean of the norms
      that share its bin (bins are the bfloat16 values: a bin spans less than 2**-7 of
      its values), so the threshold is within 2**-7 (0.79%) of ``numpy.percentile`` of
      the whole history, and exact when the norms it interpolates between share a bin
      with no different norm.

    Args:
        percentile: in (0, 100]; the paper's default is 10.
        history_size: keep only the last N finite norms (None: the whole run, as in the
            paper).

    References:
        Seetharaman, Wichern, Pardo, Le Roux. "AutoClip: Adaptive Gradient Clipping for
        Source Separation Networks." MLSP 2020. arXiv:2007.14469.

    Example:
        >>> import torch, gradguard as gg
        >>> policy = gg.AutoClip(percentile=10.0)
        >>> w = torch.nn.Parameter(torch.zeros(3)); w.grad = torch.ones(3)
        >>> policy.clip_([w]).round(decimals=4)
        tensor(1.7321)
    """

    def __init__(
        self, percentile: float = AUTOCLIP_PERCENTILE, *, history_size: int | None = None
    ) -> None:
        if isinstance(percentile, bool) or not isinstance(percentile, (int, float)):
            raise TypeError(f"AutoClip(percentile={percentile!r}): expected a number in (0, 100]")
        if not (0.0 < float(percentile) <= 100.0):
            raise ValueError(f"AutoClip(percentile={percentile!r}): must be in (0, 100]")
        if history_size is not None and (
            isinstance(history_size, bool) or not isinstance(history_size, int) or history_size < 1
        ):
            raise ValueError(
                f"AutoClip(history_size={history_size!r}): must be None or an int >= 1"
            )
        self.percentile = float(percentile)
        self.history_size = history_size
        # windowed: NaN-padded ring of the last N finite norms; whole run: the histogram's
        # counts (int64) and sums (float64) per bin. Plus the finite norms seen (int64).
        self._state: dict[str, Tensor] | None = None

    def _ensure(self, device: torch.device) -> dict[str, Tensor]:
        if self._state is not None and self._state["count"].device != device:
            # loaded from a checkpoint mapped elsewhere (e.g. map_location="cpu")
            self._state = to_device(self._state, device)
        if self._state is None:
            count = torch.zeros((), dtype=torch.long, device=device)
            if self.history_size:
                self._state = {"ring": torch.full((self.history_size,), math.nan, device=device),
                               "count": count}
            else:
                self._state = {
                    "bin_count": torch.zeros(_AUTOCLIP_BINS, dtype=torch.long, device=device),
                    "bin_sum": torch.zeros(_AUTOCLIP_BINS, dtype=torch.float64, device=device),
                    "count": count,
                }
        return self._state

    def reset(self) -> None:
        """Forget the norm history (see :meth:`Policy.reset`)."""
        self._state = None

    def _add(self, s: dict[str, Tensor], total: Tensor, finite: Tensor) -> None:
        if "ring" in s:
            ring = s["ring"]
            idx = (s["count"] % ring.numel()).reshape(1)
            ring.index_copy_(0, idx, torch.where(finite, total, ring.index_select(0, idx)[0]).reshape(1))
        else:
            b = _bin_of(torch.where(finite, total, torch.zeros_like(total))).reshape(1)
            s["bin_count"].index_add_(0, b, finite.long().reshape(1))
            s["bin_sum"].index_add_(0, b, torch.where(finite, total, 0.0).double().reshape(1))
        s["count"] += finite.long()

    def _threshold(self, s: dict[str, Tensor]) -> Tensor:
        """The percentile of the history (NaN while it is empty)."""
        q = self.percentile / 100.0
        if "ring" in s:
            return torch.nanquantile(s["ring"], q)
        n = s["count"]
        pos = q * (n - 1).clamp_min(0).double()  # numpy's "linear" interpolation
        k = pos.floor().long()
        k1 = torch.minimum(k + 1, (n - 1).clamp_min(0))
        cum = s["bin_count"].cumsum(0)
        # the bin of the j-th smallest norm (0-based): the first bin whose cumsum exceeds j
        bins = torch.searchsorted(cum, torch.stack([k, k1]), right=True).clamp(max=_AUTOCLIP_BINS - 1)
        mean = s["bin_sum"].index_select(0, bins) / s["bin_count"].index_select(0, bins).clamp_min(1)
        lo, hi = mean[0], mean[1]
        thr = (lo + (pos - k.double()) * (hi - lo)).float()
        return torch.where(n > 0, thr, torch.full_like(thr, math.nan))

    def threshold(self) -> Tensor | None:
        """The current clipping threshold (a device tensor; NaN before any finite norm)."""
        return None if self._state is None else self._threshold(self._state)

    def coefficient(self, stats: StepStats) -> Tensor:
        total = stats.total_norm.float()
        s = self._ensure(total.device)
        self._add(s, total, stats.finite)
        thr = self._threshold(s)
        return norm_coef(total, stats.finite & ~torch.isnan(thr), torch.nan_to_num(thr, nan=1.0))

    def state_dict(self) -> dict[str, Any]:
        return {
            "percentile": self.percentile,
            "history_size": self.history_size,
            "state": None if self._state is None else {k: v.clone() for k, v in self._state.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.percentile = float(state_dict.get("percentile", self.percentile))
        self.history_size = state_dict.get("history_size", self.history_size)
        if "state" not in state_dict and "history" in state_dict:
            self._state = self._from_history(state_dict["history"], state_dict["count"])
            return
        self._check_keys(state_dict, ("state",))
        st = state_dict["state"]
        self._state = None if st is None else to_device(st, st["count"].device)

    def _from_history(self, hist: Tensor | None, count: Tensor | None) -> dict[str, Tensor] | None:
        """The state from a checkpoint that kept the history itself (a NaN-padded buffer of
        finite norms, gradguard before the histogram)."""
        if hist is None or count is None:
            return None
        self._state = None
        s = self._ensure(hist.device)
        if "ring" in s:
            n = min(hist.numel(), s["ring"].numel())
            s["ring"][:n] = hist[:n]
            s["count"].copy_(count)
            return s
        xs = hist[~torch.isnan(hist)].float()
        s["bin_count"].index_add_(0, _bin_of(xs), torch.ones_like(xs, dtype=torch.long))
        s["bin_sum"].index_add_(0, _bin_of(xs), xs.double())
        s["count"].fill_(xs.numel())
        return s

    def __repr__(self) -> str:
        return f"AutoClip(percentile={self.percentile}, history_size={self.history_size})"
