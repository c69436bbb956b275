"""The per-step spike verdict: is this step's gradient norm or loss a spike?

The robust test the flush-time detectors use (a z-score against the median and MAD of
recent finite values, in log space, plus a minimum ratio to the median: x50 for the
gradient norm, above the detectors' x10), computed on the device at every step, so that its verdict joins the non-finite flag in the guard's one
host read (zero with fused optimizers: it travels as ``found_inf``). A spiking step can
then be skipped at the step itself, before it damages the weights, instead of being
noticed at the next flush.

The loss is judged at its step only during the first ``warmup`` values (x100 the median
so far, or x10 two steps in a row: a first update that wrecks the weights). Afterwards a
loss alone is no reason to skip a step: late in healthy training losses are heavy-tailed
(x10-x40 the median for a batch with one misclassified sample at a loss of 0.002), a loss
spike from a bad batch comes with a gradient spike, and a spike of the loss alone is left
to the flush-time detectors, which confirm it over the window.

Every finite value enters the history, spikes included (robust statistics shrug off a few;
a lasting new level becomes the normal one instead of being skipped for ever), except the
high values of the first ``warmup`` (x10 the median so far), which a short history could
not shrug off: each waits out of it, and joins it only when the next value is not high
too (an isolated one, another task's loss; not a run of them, wrecked weights). Nothing
is read by the host.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..detectors.config import (
    MAD_TO_SIGMA,
    MIN_LOG_SCALE,
    SPIKE_WARMUP,
    SPIKE_Z,
)

#: A gradient norm is a spike at its step only this far above the median (and past the
#: z-score): late in healthy training the norms are heavy-tailed (a batch with one
#: misclassified sample: x5-x11 the median on a digits MLP), while the steps worth
#: skipping rather than clipping are bad batches (x100 gradients, x1e4 inputs).
STEP_GRAD_RATIO = 50.0
#: Recent finite values the per-step median/MAD are computed over: long enough for a
#: stable median, short enough that the sort per step costs nothing.
VERDICT_HISTORY = 64
#: Bits of a step's verdict code (also recorded as the step's ``skipped`` value).
NONFINITE, GRAD_SPIKE, LOSS_SPIKE = 1, 2, 4  # 8: gradguard.executors.STALE (not a verdict)
#: The step's forward moved a batch norm layer's running variance by a batch on another
#: scale (:meth:`gradguard._running.RunningStats.offscale`; judged by the Recovery).
OFFSCALE = 16
#: ... with it, when a running variance turned NaN/Inf since the step before (a forward the
#: guard never saw, whose loss the loop skipped before backward)
RUNNING_NAN = 32
#: Before ``warmup`` values are in, the z-score has no scale to stand on: a value is a
#: spike only when it is this many times the median of the (few) values so far, for the
#: gradient norm and the loss. A run whose first update wrecks its weights (an IRNN at an
#: LR its gradients cannot take: loss x1e7 at step 1) is caught at step 1, not step 20;
#: healthy runs move their first norms and losses by far less.
WARMUP_SPIKE_RATIO = (1000.0, 100.0)
#: In the warm-up a value this many times the median so far, when the step before was as
#: far above it too, is a spike (the loss's bar: x10). A GELU MLP on Adam at 100x has its
#: loss lifted from 2.3 to 20-50 by its first updates, back under 2.3 within ten steps,
#: its weights wrecked for good (docs/recovery.md); every step on wrecked weights is high,
#: while two tasks taking turns step by step, their losses 10-100x apart, never are twice
#: in a row. Such a value waits out of the history, and joins it when the next is not.
WARMUP_TWICE_RATIO = (1000.0, 10.0)
#: A loss this many times the median of the recent ones (and ``OVERFLOW_LOSS_Z`` robust
#: standard deviations above it, after the warm-up) is far off on its own: under a
#: ``GradScaler`` the step's overflow is then no routine one (:attr:`SpikeVerdict.loss_far`).
#: The loss does not depend on the loss scale; an fp16 step whose loss is 500x the run's
#: overflows because its batch (x1e4 inputs) or the weights went wrong, and such steps
#: classed routine halved the scale for each and hid a stretch of bad batches from the
#: ladder (which then took them for a change of data and trained on them).
OVERFLOW_LOSS_RATIO = 10.0
#: Half the spike test's z: a loss whose healthy spread is wide (late in training, single
#: misclassified samples at 10-40x a median near 0.002) does not pass it; a digits MLP's
#: loss at 0.3 with a batch of x100 inputs at 19x its median is z=4.
OVERFLOW_LOSS_Z = 3.0


#: The loss's count of values once a loss at or below zero was seen: never judged again.
NEVER_JUDGED = -(2 ** 62)


class SpikeVerdict:
    """Per-step spike test of the total gradient norm and the loss (see the module
    docstring), one device ring ``[2, history]`` for both, so the test costs a couple of
    dozen tiny device ops and no host read. The z threshold is the flush-time
    detectors' (:mod:`gradguard.detectors`); ``grad_ratio``/``loss_ratio`` are the least
    ratios to the median past the warm-up (``math.inf``: never).

    Example:
        >>> import torch
        >>> from gradguard.recovery.verdict import SpikeVerdict, GRAD_SPIKE
        >>> v = SpikeVerdict(warmup=5)
        >>> codes = [int(v(torch.tensor(g), None)) for g in [1.0, 1.1, 0.9, 1.0, 1.05, 1.0, 60.0]]
        >>> codes[-1] == GRAD_SPIKE, codes[:-1] == [0] * 6
        (True, True)
    """

    def __init__(
        self, *, history: int = VERDICT_HISTORY, warmup: int = SPIKE_WARMUP,
        z: float = SPIKE_Z, grad_ratio: float = STEP_GRAD_RATIO,
        loss_ratio: float = math.inf,
    ) -> None:
        self.history, self.warmup, self.z = history, warmup, z
        self.log_ratio = (math.log(grad_ratio), math.log(loss_ratio))
        self.log_warm = tuple(math.log(r) for r in WARMUP_SPIKE_RATIO)
        self.log_twice = tuple(math.log(r) for r in WARMUP_TWICE_RATIO)
        self._log_far = math.log(OVERFLOW_LOSS_RATIO)
        self.high: Tensor | None = None  # [2] bool: the last value was WARMUP_TWICE_RATIO high
        #: the last loss judged was far above the recent ones (a device bool; see
        #: :data:`OVERFLOW_LOSS_RATIO`), whatever the step's code
        self.loss_far: Tensor | None = None
        #: the last gradient norm judged was ``WARMUP_SPIKE_RATIO[0]`` times the median of
        #: those before it or more (a device bool): the batch's, whatever the ladder just did
        #: (:func:`gradguard.recovery._steps.verdict` skips it through the grace)
        self.grad_far: Tensor | None = None
        self.pending: Tensor | None = None  # [2] that value (log; NaN: none), not in the ring yet
        self.ring: Tensor | None = None  # [2, history] log values (NaN: empty)
        self.count: Tensor | None = None  # [2] finite values seen
        self._consts: tuple[Tensor, Tensor, Tensor] | None = None

    def _ensure(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        if self.ring is None or self.ring.device != device or self._consts is None:
            if self.ring is not None and self.count is not None:  # loaded from a checkpoint
                self.ring, self.count = self.ring.to(device), self.count.to(device)
            else:
                self.ring = torch.full((2, self.history), math.nan, device=device)
                self.count = torch.zeros(2, dtype=torch.long, device=device)
            self.high = (torch.zeros(2, dtype=torch.bool, device=device) if self.high is None
                         else self.high.to(device))
            self.pending = (torch.full((2,), math.nan, device=device) if self.pending is None
                            else self.pending.to(device))
            # the warm-up bars [2, 2]: a spike at once (row 0), twice in a row (row 1)
            self._consts = (torch.tensor(self.log_ratio, device=device),
                            torch.stack([torch.tensor(self.log_warm, device=device),
                                         torch.tensor(self.log_twice, device=device)]),
                            torch.tensor([GRAD_SPIKE, LOSS_SPIKE], dtype=torch.uint8, device=device))
        assert self.count is not None and self._consts is not None
        return self.ring, self.count, *self._consts

    def __call__(self, total_norm: Tensor, loss: Tensor | float | None) -> Tensor:
        """The step's code, a device uint8: ``GRAD_SPIKE`` | ``LOSS_SPIKE`` bits (0: none).
        Then the finite values join the history."""
        ring, count, log_ratio, log_bars, bits = self._ensure(total_norm.device)
        if loss is None:
            lv = torch.full((), math.nan, device=total_norm.device)
        elif isinstance(loss, Tensor):
            lv = loss.detach().reshape(()).to(total_norm.device, torch.float32)
        else:
            lv = torch.tensor(float(loss), device=total_norm.device)
        # a loss at or below zero has no ratio scale (a WGAN's critic score, a Gaussian
        # NLL): the loss is judged no more, for good (its count held below zero). Found by
        # a stranger: a WGAN-GP generator's loss at -0.7 for 30 steps, then 0.05, 0.5, 0.7
        # as it crossed zero, was "x10 the median twice in a row" over its first positive
        # values, three steps skipped and the weights rolled back to the fresh ones
        count[1] = torch.where(torch.isfinite(lv) & (lv <= 0), NEVER_JUDGED, count[1])
        x = torch.stack([total_norm.detach().reshape(()).float(), lv])
        ok = torch.isfinite(x) & (x > 0)
        lx = torch.log(torch.where(ok, x, 1.0))
        med = torch.nanmedian(ring, dim=1).values
        scale = (MAD_TO_SIGMA * torch.nanmedian((ring - med[:, None]).abs(), dim=1).values)
        d = lx - med
        robust = (count >= self.warmup) & (d > self.z * scale.clamp_min(MIN_LOG_SCALE)) & (
            d > log_ratio)
        warm = (count >= 1) & (count < self.warmup)
        early = warm & (d > log_bars[0])
        high = ok & warm & (d > log_bars[1])
        assert self.high is not None and self.pending is not None
        spike = ok & (robust | early | (high & self.high))
        self.grad_far = spike[0] & (count[0] >= 1) & (d[0] > log_bars[0][0])
        self.loss_far = ok[1] & (count[1] >= self.warmup) & (
            d[1] > OVERFLOW_LOSS_Z * scale[1].clamp_min(MIN_LOG_SCALE)) & (d[1] > self._log_far)
        # a handful of values cannot shrug off an early spike: a high value waits out of the
        # history; it joins it when the next value is not high (an isolated one: another
        # task's loss, a hard batch), not while they stay high (wrecked weights)
        self._push(ring, count, self.high & ~high & torch.isfinite(self.pending), self.pending)
        self._push(ring, count, ok & ~high, lx)
        self.high.copy_(high)
        self.pending.copy_(torch.where(high, lx, math.nan))
        return (spike.to(torch.uint8) * bits).sum(dtype=torch.uint8)

    def loss_ok(self, finite: Tensor | bool) -> Tensor | bool:
        """Whether the step just judged may be a routine loss-scale overflow for its loss:
        ``finite`` and not far above the recent losses (:attr:`loss_far`, see
        :data:`OVERFLOW_LOSS_RATIO`). No host read."""
        far = self.loss_far
        if far is None:
            return finite
        ok = finite if isinstance(finite, Tensor) else torch.tensor(finite, device=far.device)
        return ok.to(far.device) & ~far

    def _push(self, ring: Tensor, count: Tensor, where: Tensor, values: Tensor) -> None:
        """Append ``values`` to the history rows ``where`` says (device ops only)."""
        slot = (count % self.history)[:, None]
        ring.scatter_(1, slot, torch.where(where, values, ring.gather(1, slot).squeeze(1))[:, None])
        count += where.long()

    def forget_norm(self) -> None:
        """Forget the gradient norm's history (a new set of parameters: its scale changed
        for good) and keep the loss's (the same model's loss, on the same scale). Device
        ops only."""
        if self.ring is not None and self.count is not None:
            self.ring[0].fill_(math.nan)
            self.count[0] = 0
        if self.high is not None:
            self.high[0] = False
        if self.pending is not None:
            self.pending[0] = math.nan

    def live_state(self, device: torch.device) -> dict[str, Tensor]:
        """The statistics as live device tensors (created empty before the first step), for
        a snapshot to copy: restored with the weights they describe."""
        ring, count, *_ = self._ensure(device)
        assert self.high is not None and self.pending is not None
        return {"ring": ring, "count": count, "high": self.high, "pending": self.pending}

    def state_dict(self) -> dict[str, Any]:
        return {"ring": None if self.ring is None else self.ring.detach().cpu().clone(),
                "count": None if self.count is None else self.count.detach().cpu().clone(),
                "high": None if self.high is None else self.high.detach().cpu().clone(),
                "pending": None if self.pending is None else self.pending.detach().cpu().clone()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.ring, self.count = sd["ring"], sd["count"]  # moved to the device at first use
        self.high, self.pending = sd.get("high"), sd.get("pending")  # older checkpoints: none
        if self.high is None or self.pending is None:
            self.high = self.pending = None
        self._consts = None
