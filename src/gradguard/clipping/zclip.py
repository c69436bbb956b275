"""ZClip: total-norm clipping at a z-score of an EMA of the norm (Kumar et al. 2025), by
default of the log of the norm (``space="log"``; ``"linear"`` is the paper's). Its
statistics stay on the device; on CPU scalars the same rule runs in Python numbers, bit
for bit (:func:`._zclip_host.host_coefficient`).
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import torch
from torch import Tensor

from ..events import Event
from ..measure import StepStats, host_scalars
from ._level import SHIFT_STEPS, Row, settled
from ._zclip_host import (
    ZCLIP_ALPHA,
    ZCLIP_EPS,
    ZCLIP_GRADUAL,
    ZCLIP_LOG_FLOOR,
    ZCLIP_LOSS_EMA,
    ZCLIP_WARMUP,
    ZCLIP_WARMUP_ANCHOR,
    ZCLIP_WARMUP_CAP,
    ZCLIP_Z_THRESH,
    host_coefficient,
)
from .base import NORM_EPS, Policy, check_positive, norm_coef, to_device

__all__ = ["ZCLIP_ALPHA", "ZCLIP_EPS", "ZCLIP_GRADUAL", "ZCLIP_LOG_FLOOR", "ZCLIP_LOSS_EMA",
           "ZCLIP_WARMUP", "ZCLIP_WARMUP_ANCHOR", "ZCLIP_WARMUP_CAP", "ZCLIP_Z_THRESH", "ZClip"]


def _loss_on(loss: Tensor | float, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The step's loss as a scalar on ``device``, with no host sync: a number, or a CPU
    tensor read in host memory, is written there by a fill (not a copy from pageable host
    memory); a tensor on another device is copied device to device."""
    if isinstance(loss, Tensor) and loss.device.type != "cpu":
        return loss.detach().to(device=device, dtype=dtype).reshape(())
    if isinstance(loss, Tensor) and loss.device == device:
        return loss.detach().to(dtype=dtype).reshape(())
    return torch.full((), float(loss), dtype=dtype, device=device)


class ZClip(Policy):
    """ZClip: z-score based adaptive clipping with EMA statistics of the gradient norm.

    Warm-up: the first ``warmup_steps`` *finite* norms are collected; their plain mean and
    (population) variance initialise the EMA. No clipping happens during warm-up unless
    ``max_norm`` is given. Afterwards, with ``z = (g - mu) / (sigma + eps)``:

    * if ``z > z_thresh`` the norm is clipped to ``mu + z_thresh**2 / z * sigma``
      (``mode="reciprocal"``, the paper's default) or ``mu + z_thresh * sigma``
      (``mode="percentile"``) or ``mu`` (``mode="mean"``);
    * the EMA is updated with the *clipped* norm:
      ``mu <- a mu + (1-a) g_c``, ``var <- a var + (1-a) (g_c - mu)**2`` (new ``mu``).

    Log space (gradguard's default; ``space="linear"`` is the paper's algorithm): the same
    equations on ``x = log(g)``, and the clipped norm is ``exp`` of the threshold. Healthy
    gradient norms are heavy-tailed, their noise multiplicative: on the norm itself a
    z-score of 2.5 clips 4-10% of a healthy run's steps (measured on the MLP, CNN, LSTM and
    transformer of ``gradguard.testing``: 5-9%), each clip a step that learns less; an Adam
    MLP ended 5% above its unguarded loss over 8 seeds. On the log it clips 0.3-3%, about
    a Gaussian tail's rate, and a x100 spike is still clipped to ``exp(mean + z_thresh**2 /
    z * std)``, within ``exp(z_thresh * std)`` of the geometric mean. A zero norm has no
    log: it is left out like a non-finite one. A checkpoint keeps the space its statistics
    were gathered in (one from before ``space`` existed: linear).

    Non-finite norms never enter the statistics, so a NaN during warm-up does not disable
    clipping. No absolute cap is applied unless ``max_norm`` is set (a shorthand for
    ``gg.chain(gg.ZClip(), gg.NormClip(max_norm))``).

    Explosion during warm-up (gradguard's addition; ``warmup_cap=None`` is the paper's
    algorithm): once the first ``ZCLIP_WARMUP_ANCHOR`` finite norms are in, a warm-up norm
    above ``warmup_cap`` times their median is clipped to that bound, and enters the
    warm-up statistics clipped. A run whose norm grows geometrically from step 0 is then
    clipped relative to its first healthy norms instead of teaching ZClip that the
    explosion is its normal scale.

    A norm that settles at a new level (gradguard's addition; ``reanchor=False`` is the
    paper's algorithm): the statistics learn from the *clipped* norm, and the reciprocal
    mode clips the harder the higher the z-score, so a norm that settles a few times higher
    after warm-up would stay clipped for good (a ViT from config, as its LR warmed up: 451
    of 600 steps). Under a guard, :meth:`observe` re-anchors the statistics at the flush of
    a window that was mostly clipped while its norm held level and its loss did not rise;
    a norm that keeps growing (an explosion) stays clipped.

    A norm that rises gradually while the loss falls (gradguard's addition;
    ``gradual=None`` is the paper's algorithm; a step the guard's verdict skips,
    ``StepStats.skipped``, neither opens nor closes a run of such steps, nor moves the
    loss's EMA: one skipped x1e4 batch right after warm-up had closed the chain, and the
    healthy rise after it was clipped for 100 steps): under a guard (which passes the step's
    loss; not under torch.distributed, where each rank's loss is its own), a step whose
    norm is within ``gradual`` (1.5x) of the previous finite step's, in a run of such steps
    that began at a step the z-test did not flag, is not clipped while the loss is below
    its EMA (weight ``ZCLIP_LOSS_EMA`` on the newest). The statistics then learn from it
    unclipped. A spike jumps many times at once and breaks the run (it and the steps after
    it at its level are clipped as before); a norm that grows while the loss rises is
    clipped as before, and so is every step while a recovery holds the LR below the user's
    (``StepStats.calm`` False: the clip is then holding trouble back; a 10-layer tanh MLP
    at 100x its LR, rolled back to its fresh weights, had its norm rise as the LR was
    restored, and the rise let through ended it at 3.0x its twin instead of 2.0x).
    Without the rule a VGG-11-BN on SGD momentum, whose norm rises 3.4x over 30 steps as
    its loss falls fastest, was clipped by about half on 44 of 50 steps and ended 1.14x
    its unguarded loss.

    Args:
        alpha: EMA factor in (0, 1); paper default 0.97.
        z_thresh: z-score threshold > 0; paper default 2.5.
        warmup_steps: finite steps before clipping starts (>= 1); paper default 25.
        mode: ``"reciprocal"`` | ``"percentile"`` | ``"mean"``.
        max_norm: optional absolute cap, applied always (None: none).
        eps: added to sigma in the z-score.
        warmup_cap: during warm-up, clip norms above this many times the median of the
            first finite norms (> 1; None: no clipping during warm-up, as in the paper).
        space: ``"log"`` (default) | ``"linear"``: the statistics of the log of the norm,
            or of the norm itself (the paper's).
        reanchor: under a guard, re-anchor the statistics on a norm that settled at a new
            level (:meth:`observe`; False: the paper's algorithm, which keeps clipping it).
        gradual: do not clip a norm that rises by at most this factor a step, from an
            unflagged step, while the loss falls (> 1; None: the paper's algorithm). Needs
            the step's loss (``StepStats.loss``: a guard passes it).

    References:
        Kumar, Owen, Ashraf, Ahmed, Rehman, Pettersson. "ZClip: Adaptive Spike Mitigation
        for LLM Pre-Training." 2025. arXiv:2504.02507.

    Example:
        >>> import torch, gradguard as gg
        >>> policy = gg.ZClip(warmup_steps=3)
        >>> w = torch.nn.Parameter(torch.zeros(1))
        >>> for g in [1.0, 1.1, 0.9, 50.0]:
        ...     w.grad = torch.tensor([g]); _ = policy.clip_([w])
        >>> bool(w.grad.item() < 2.0)
        True
    """

    MODES = ("reciprocal", "percentile", "mean")
    SPACES = ("linear", "log")

    def __init__(
        self,
        alpha: float = ZCLIP_ALPHA,
        z_thresh: float = ZCLIP_Z_THRESH,
        warmup_steps: int = ZCLIP_WARMUP,
        *,
        mode: str = "reciprocal",
        max_norm: float | None = None,
        eps: float = ZCLIP_EPS,
        warmup_cap: float | None = ZCLIP_WARMUP_CAP,
        space: str = "log",
        reanchor: bool = True,
        gradual: float | None = ZCLIP_GRADUAL,
    ) -> None:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise TypeError(f"ZClip(alpha={alpha!r}): expected a number in (0, 1)")
        if not (0.0 < float(alpha) < 1.0):
            raise ValueError(f"ZClip(alpha={alpha!r}): must be in (0, 1)")
        self.alpha = float(alpha)
        self.z_thresh = check_positive("z_thresh", z_thresh, "ZClip")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"ZClip(warmup_steps={warmup_steps!r}): must be an int >= 1")
        self.warmup_steps = warmup_steps
        if mode not in self.MODES:
            raise ValueError(f"ZClip(mode={mode!r}): allowed values are {self.MODES}")
        self.mode = mode
        self.max_norm = None if max_norm is None else check_positive("max_norm", max_norm, "ZClip")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps < 0:
            raise ValueError(f"ZClip(eps={eps!r}): must be a number >= 0")
        self.eps = float(eps)
        if warmup_cap is not None and (isinstance(warmup_cap, bool)
                                       or not isinstance(warmup_cap, (int, float))
                                       or not warmup_cap > 1):
            raise ValueError(f"ZClip(warmup_cap={warmup_cap!r}): must be a number > 1 or None")
        self.warmup_cap = None if warmup_cap is None else float(warmup_cap)
        if space not in self.SPACES:
            raise ValueError(f"ZClip(space={space!r}): allowed values are {self.SPACES}")
        self.space = space
        if not isinstance(reanchor, bool):
            raise TypeError(f"ZClip(reanchor={reanchor!r}): expected True or False")
        self.reanchor = reanchor
        if gradual is not None and (isinstance(gradual, bool)
                                    or not isinstance(gradual, (int, float))
                                    or not gradual > 1):
            raise ValueError(f"ZClip(gradual={gradual!r}): must be a number > 1 or None")
        self.gradual = None if gradual is None else float(gradual)
        self._state: dict[str, Tensor] | None = None
        #: the step of the last re-anchor (:meth:`observe`; in the state dict); ``_held``:
        #: a restore of statistics from before it came after it (a rollback undid it), so
        #: the clipping was holding trouble back and is not let go of again
        self._anchored_at: int | None = None
        self._held = False
        self._recent: list[Row] = []  # the last flushed steps

    def _ensure(self, device: torch.device) -> dict[str, Tensor]:
        if self._state is not None and self._state["mean"].device != device:
            # loaded from a checkpoint mapped elsewhere (e.g. map_location="cpu")
            self._state = to_device(self._state, device)
        if self._state is None:
            self._state = {
                "mean": torch.zeros((), device=device),
                "var": torch.zeros((), device=device),
                "count": torch.zeros((), dtype=torch.long, device=device),
                "buffer": torch.zeros(self.warmup_steps, device=device),
            }
        if "rise" not in self._state:  # a checkpoint from before ``gradual`` lacks it
            self._state["rise"] = torch.zeros(4, dtype=torch.float32, device=device)
        return self._state

    def reset(self) -> None:
        """Warm up again (see :meth:`Policy.reset`)."""
        self._state, self._recent = None, []

    @property
    def mean(self) -> Tensor | None:
        return None if self._state is None else self._state["mean"]

    @property
    def var(self) -> Tensor | None:
        return None if self._state is None else self._state["var"]

    def coefficient(self, stats: StepStats) -> Tensor:
        g = stats.total_norm.float()
        fin = stats.finite
        s = self._ensure(g.device)
        # a step the guard skips is clipped as any, and the "gradual" rule does not see it
        kept = None if stats.skipped is None else ~stats.skipped.to(g.device)
        if host_scalars(g, fin):
            return host_coefficient(self, g, fin, s, stats.loss, stats.calm,
                                    learn=kept is None or bool(kept))
        # the statistics' variable: the norm, or its log (then thresholds go back by exp)
        log = self.space == "log"
        x = g
        if log:
            x, fin = g.clamp_min(ZCLIP_LOG_FLOOR).log(), fin & (g > ZCLIP_LOG_FLOOR)
        mean, var, count, buf = s["mean"], s["var"], s["count"], s["buffer"]
        # Few, fused-friendly ops: this runs every step, one small kernel each on a GPU.
        warm = count < self.warmup_steps
        active = ~warm & fin
        std = var.sqrt()
        z = (x - mean) / (std + self.eps)
        if self.mode == "reciprocal":
            # only used where z > z_thresh > 0; elsewhere masked out by `clip`
            thr = mean + (self.z_thresh**2) * std / z
        elif self.mode == "percentile":
            thr = mean + self.z_thresh * std
        else:
            thr = mean
        fired = active & (z > self.z_thresh)
        clip = fired & (thr < x)
        if self.gradual is not None:
            relax, chain, ema, lfin = self._rise(s["rise"], x, fin, stats.loss)
            if stats.calm:  # not while a recovery holds the LR down
                clip = clip & ~relax
        # == norm_coef(g, fin, thr if clip else inf): clip implies a finite g above thr
        coef = torch.where(clip, (thr.exp() if log else thr) / (g + NORM_EPS), 1.0)
        if self.warmup_cap is not None:
            anchor = min(ZCLIP_WARMUP_ANCHOR, self.warmup_steps)
            first = buf[:anchor].median()
            cap = first + math.log(self.warmup_cap) if log else self.warmup_cap * first
            capping = warm & (count >= anchor) & fin & (x > cap)
            coef = torch.where(capping, (cap.exp() if log else cap) / (g + NORM_EPS), coef)
            x_in = torch.where(capping, cap, x)  # the warm-up statistics see it clipped
            fired = fired | capping
        else:
            x_in = x
        if self.max_norm is not None:
            coef = torch.minimum(coef, norm_coef(g, fin, self.max_norm))
        # EMA update with the clipped norm (finite steps after warm-up only)
        x_c = torch.where(clip, thr, x)
        new_mean = torch.lerp(mean, x_c, 1 - self.alpha)  # alpha mean + (1 - alpha) x_c
        new_var = torch.lerp(var, (x_c - new_mean) ** 2, 1 - self.alpha)
        # warm-up: collect finite norms, initialise mean/var from them when complete
        take = warm & fin
        idx = count.clamp(max=self.warmup_steps - 1).reshape(1)
        buf.index_copy_(0, idx, torch.where(take, x_in, buf.index_select(0, idx)[0]).reshape(1))
        new_count = count + take.long()
        done = warm & (new_count == self.warmup_steps)
        mean.copy_(torch.where(active, new_mean, torch.where(done, buf.mean(), mean)))
        var.copy_(torch.where(active, new_var, torch.where(done, buf.var(unbiased=False), var)))
        count.copy_(new_count)
        if self.gradual is not None:  # this step, for the next one's "gradual" test
            r = s["rise"]
            # (stack promotes the flags to float: 1 where written)
            new = torch.stack([x, chain | ~fired, ema, lfin])
            fin_r = fin if kept is None else fin & kept
            lfin = lfin if kept is None else lfin & kept
            r.copy_(torch.where(torch.stack([fin_r, fin_r, lfin, lfin]), new, r))
        return coef

    def _rise(self, r: Tensor, x: Tensor, fin: Tensor, loss: Tensor | float | None
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The "gradual" rule on the device (see the class docstring), from its state ``r``
        (``state["rise"]``): (this step is not clipped, it continues a rise, the loss's new
        EMA, the loss is finite)."""
        assert self.gradual is not None
        prev, open_, ema, seen = r.unbind()
        smooth = (x - prev <= math.log(self.gradual) if self.space == "log"
                  else x <= prev * self.gradual)
        chain = fin & smooth & (open_ > 0.5)
        if loss is None:
            no = torch.zeros_like(chain)
            return no, chain, ema, no
        lt = _loss_on(loss, x.device, r.dtype)
        lfin = lt.isfinite()
        seen_ = seen > 0.5
        falling = seen_ & lfin & (lt < ema)
        new_ema = torch.where(seen_, torch.lerp(ema, lt, ZCLIP_LOSS_EMA), lt)
        return chain & falling, chain, new_ema, lfin

    def observe(self, window: Any) -> Event | None:
        """At a guard's flush: re-anchor the statistics on a norm that settled at a new
        level (gradguard's addition; the test: :mod:`gradguard.clipping._level`, and a level
        within ``warmup_cap`` (10x) of the one learnt). The statistics learn from the
        clipped norm and the reciprocal mode clips the harder the higher the z-score, so a
        norm that settles a few times higher after warm-up (a ViT's as its LR warms up)
        would be clipped for as long as it stays there. Judged over the last 50 flushed
        steps (one window at the default ``every``; several short ones otherwise). A norm
        that keeps growing, a loss that rises, a skipped or non-finite step among them, or
        a restore of earlier statistics after a re-anchor (a rollback: the clip was holding
        an explosion back) leaves the statistics as they are. Returns the info event, or
        None."""
        if not self.reanchor or self._held or self._state is None:
            return None
        # host numbers only: the policy's statistics are read for steps that pass the test
        rows = zip(window.steps, window.total_norm.tolist(), window.loss.tolist(),
                   window.clip_coef.tolist(), window.skipped.tolist())
        self._recent = (self._recent + list(rows))[-SHIFT_STEPS:]
        found = settled(self._recent, ZCLIP_LOG_FLOOR)
        if found is None:
            return None
        s = self._state
        if int(s["count"]) < self.warmup_steps:  # clipped by max_norm or the warm-up cap
            return None
        old = float(s["mean"].exp() if self.space == "log" else s["mean"])
        level = found.level
        if level > (self.warmup_cap or ZCLIP_WARMUP_CAP) * old:
            return None  # as during warm-up: 10x the scale it knows is an explosion
        x = [math.log(v) if self.space == "log" else v for v in found.norms]
        s["mean"].fill_(statistics.fmean(x))
        s["var"].fill_(statistics.pvariance(x))
        self._anchored_at, self._recent = found.step, []
        return Event(
            kind="clip", step=found.step, severity="info", value=level, threshold=old,
            message=(f"ZClip clipped {found.clipped} of the last {found.steps} steps while the "
                     f"gradient norm held at ~{level:.3g} ({level / old:.3g}x the level it had "
                     "learnt) and the loss did not rise: the norm settled at a new level, and "
                     "ZClip now clips relative to it"),
            data={"clipped": found.clipped, "steps": found.steps, "level": level,
                  "previous_level": old})

    def state_dict(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "z_thresh": self.z_thresh,
            "warmup_steps": self.warmup_steps,
            "mode": self.mode,
            "max_norm": self.max_norm,
            "warmup_cap": self.warmup_cap,
            "space": self.space,
            "reanchor": self.reanchor,
            "gradual": self.gradual,
            "anchored_at": self._anchored_at,
            "state": None
            if self._state is None
            else {k: v.clone() for k, v in self._state.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._check_keys(state_dict, ("state",))
        st = state_dict["state"]
        if st is not None and st["buffer"].numel() != state_dict.get(
            "warmup_steps", self.warmup_steps
        ):
            raise ValueError("ZClip.load_state_dict: warm-up buffer does not match warmup_steps")
        self.warmup_steps = int(state_dict.get("warmup_steps", self.warmup_steps))
        if st is not None:  # the statistics are of the norm or of its log: keep them so
            # (a checkpoint from before ``space`` existed holds norms)
            self.space = state_dict.get("space", "linear")
        # copies: the live statistics must not alias the checkpoint's tensors
        self._state = None if st is None else to_device(st, st["mean"].device)
        restored = state_dict.get("anchored_at")
        if self._anchored_at is not None and restored != self._anchored_at:
            self._held = True  # statistics from before a re-anchor: a rollback undid it
        self._anchored_at, self._recent = restored, []

    def __repr__(self) -> str:
        return (
            f"ZClip(alpha={self.alpha}, z_thresh={self.z_thresh}, warmup_steps={self.warmup_steps}, "
            f"mode={self.mode!r}, max_norm={self.max_norm}, warmup_cap={self.warmup_cap}, "
            f"space={self.space!r}, reanchor={self.reanchor}, gradual={self.gradual})"
        )
