"""Running statistics that a skipped step's forward already wrote.

A batch norm layer updates its running mean and variance in the forward pass, before the
guard sees the step: one NaN batch makes them NaN for good (``(1 - m) * NaN + m * x`` stays
NaN), the model in ``eval()`` answers NaN to everything while training in ``train()``
goes on with batch statistics and looks healthy, and no snapshot can be taken again
(a snapshot must be finite). A x1e4 input batch skipped as a spike leaves a running
variance 1e8 times too large. So the guard keeps a device copy of the running statistics
of the model's normalisation layers (``_NormBase``: BatchNorm*, InstanceNorm* and
SyncBatchNorm tracking running stats: mean, variance and the count of batches, which
``momentum=None`` averages by) as they were before the step's forward, and puts
them back when the step was skipped for trouble (a non-finite or spiking step; not a
routine loss-scale overflow, nor an update voided by a rollback, whose restore brought
its own). One copy of these small tensors per step on the device, no host read: on the
zero-sync paths (a fused optimizer) the choice is a ``torch.where`` on the device flag.

A batch on another scale need not spike anything but those statistics: behind a batch norm
layer the forward is the same for ``x`` and ``1e4 * x`` (the layer divides the scale out),
so the loss and the gradients of a x1e4 batch are those of a sound one, and only the
running variance learns the scale, 1e7 times too large for the ``eval()`` model
(a digits CNN with 5% of its batches x1e4: held-out loss 230 times the clean run's).
:meth:`RunningStats.offscale` tells such a step by the statistics alone: its forward
multiplied a layer's running variance (the sum over its channels, plus ``eps`` for each)
by more than ``OFFSCALE_RATIO`` (x3: a batch variance about 20 times the running one, at
the default momentum; a batch x5 in scale, or x16 while the variance still comes down
from its initial 1), where healthy steps move it by x1.2 at most once the layer has seen
``OFFSCALE_AFTER`` batches (measured on CNNs, BatchNorm MLPs with batches of 4 to 64 and
a ResNet; the first batches move it from its initial 1 by up to x300 on unnormalised
pixels). A layer whose momentum is near 1 keeps the last batch's statistics and takes a
batch off-scale at ``OFFSCALE_BATCH`` times its running variance instead. The Recovery
skips such a step (:meth:`gradguard.recovery.Recovery.verdict`), and the skip puts the
statistics back.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.parameter import is_lazy

#: A step whose forward multiplied a running variance (plus ``eps``) by more than this
#: moved the statistics with a batch on another scale (see the module docstring).
OFFSCALE_RATIO = 3.0
#: ... that is, at the default momentum (0.1), a batch variance this many times the running
#: one; a layer whose momentum is near 1 (running statistics that are the last batch's,
#: as in ``transformers``' MobileNetV2, 0.997) takes a batch off-scale at that, not at
#: ``OFFSCALE_RATIO`` (its small batches' variances differ by x2.5 from one to the next)
OFFSCALE_BATCH = (OFFSCALE_RATIO - 0.9) / 0.1
#: Batches a layer must have seen before the test applies (its initial variance is 1).
OFFSCALE_AFTER = 5


class RunningStats:
    """The running statistics of ``model``'s normalisation layers and their copy from
    before the current step's forward (see the module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.buffers: list[Tensor] | None = None
        self.saved: list[Tensor] = []
        self._vars: list[tuple[int, int, float, float]] = []
        # the segment of each channel (the live variances, then their copies), each
        # layer's channels x eps and its limit, on the device
        self._segments: tuple[Tensor, Tensor, Tensor] | None = None
        self._mixed = False
        self._scale_inputs: tuple[list[Tensor], list[Tensor], list[Tensor]] = ([], [], [])
        #: the last :meth:`offscale` found a running variance turned non-finite (device bool)
        self.lost: Tensor | None = None
        self._first: tuple[nn.Module, Tensor | None] | None = None
        self._left: set[int] = set()  # buffers another guard puts back (gradguard._owners)
        self._collect()

    def leave(self, ids: set[int]) -> None:
        """Leave the statistics among ``ids`` to the guard that steps their layers."""
        if ids != self._left:
            self._left = set(ids)
            self._collect()

    def _collect(self) -> None:
        mods = [m for m in self.model.modules()
                if isinstance(m, _NormBase) and m.track_running_stats
                and id(m.running_mean) not in self._left]
        found = [b for m in mods for b in (m.running_mean, m.running_var, m.num_batches_tracked)
                 if isinstance(b, Tensor)]
        if any(is_lazy(b) for b in found):
            return  # a lazy layer has no statistics before its first forward
        self.buffers = found
        self.saved = [b.detach().clone() for b in self.buffers]
        # (index of running_var, of num_batches_tracked, eps, the ratio it may move by) per
        # layer, for the scale test
        self._vars, self._segments = [], None
        for m in mods:
            if isinstance(m.running_var, Tensor) and isinstance(m.num_batches_tracked, Tensor):
                mom = m.momentum  # None: a cumulative average, moved less and less
                limit = OFFSCALE_RATIO if mom is None else max(
                    OFFSCALE_RATIO, 1 - mom + mom * OFFSCALE_BATCH)
                self._vars.append((_index(found, m.running_var),
                                   _index(found, m.num_batches_tracked), float(m.eps), limit))
        # the live variances, their copies from before the forward (refreshed in place),
        # and the copies' batch counts
        self._mixed = len({(found[v].device, found[v].dtype) for v, *_ in self._vars}) > 1
        self._scale_inputs = ([self.buffers[v] for v, *_ in self._vars],
                              [self.saved[v] for v, *_ in self._vars],
                              [self.saved[n] for _, n, *_ in self._vars])
        # ``model.to(device)``/``.half()`` after the guard was built replaces the buffers
        # (not the parameters): the first one tells, and the statistics are collected anew
        self._first = (mods[0], mods[0].running_mean) if found else None

    def _moved(self) -> bool:
        return self._first is not None and self._first[0].running_mean is not self._first[1]

    def offscale(self, device: torch.device) -> Tensor | None:
        """A device bool: this step's forward moved a running variance by more than
        ``OFFSCALE_RATIO`` (a layer of momentum near 1: by a batch ``OFFSCALE_BATCH`` times
        the running one) in a layer that had seen ``OFFSCALE_AFTER`` batches (see the
        module docstring); None when the model has no such statistics. Sets :attr:`lost`
        (a device bool: a running variance turned NaN/Inf since the step before). No host
        read."""
        if not self.buffers or not self._vars or self._moved():
            return None
        new, old, seen = self._scale_inputs
        with torch.no_grad():
            # per layer, the sum over its channels (a dead channel coming back to life
            # moves its own variance by any factor, not the layer's): one concatenation
            # and one segment sum, not an op per layer
            if self._segments is None or self._segments[0].device != device:
                counts = [self.buffers[v].numel() for v, *_ in self._vars]
                index = torch.repeat_interleave(
                    torch.arange(2 * len(counts)), torch.tensor(counts * 2)).to(device)
                eps = torch.tensor([c * e for c, (_, _, e, _) in zip(counts, self._vars)],
                                   device=device)
                limit = torch.tensor([lim for *_, lim in self._vars], device=device)
                self._segments = (index, eps, limit)
            index, eps, limit = self._segments
            both = new + old
            if self._mixed:  # a model split over devices, or with mixed dtypes
                both = [t.to(device, torch.float32) for t in both]
            flat = torch.cat(both).to(device, torch.float32)
            var = torch.zeros(2 * len(new), device=device).index_add_(0, index, flat)
            var = var.view(2, -1) + eps
            ratio = var[0] / var[1]
            # a variance that turned non-finite since the last step, whatever the layer has
            # seen (found by a stranger: a script that skips a NaN loss before backward, as
            # many do, had its batch norm statistics already NaN from that forward; the
            # model gave NaN in eval() and the run read "healthy")
            self.lost = (~torch.isfinite(var[0]) & torch.isfinite(var[1])).any()
            return ((ratio > limit) & (torch.stack(seen).to(device) >= OFFSCALE_AFTER)).any()

    def settle(self, trouble: Tensor | bool) -> None:
        """After the step: put the statistics back when it was skipped for ``trouble``
        (a device bool, or a host bool when the host read the flags); then remember them
        for the next step."""
        if self.buffers is None or self._moved():
            self._collect()  # lazy layers now materialised, or moved: from the next step on
            return
        if not self.buffers:
            return
        with torch.no_grad():
            if isinstance(trouble, Tensor):
                for b, s in zip(self.buffers, self.saved):
                    b.copy_(torch.where(trouble, s, b))
            elif trouble:
                torch._foreach_copy_(self.buffers, self.saved)
            self.refresh()

    def refresh(self) -> None:
        """Remember the statistics as they are now (after a restore of the weights)."""
        if self.buffers:
            with torch.no_grad():
                torch._foreach_copy_(self.saved, self.buffers)


def _index(tensors: list[Tensor], t: Tensor) -> int:
    return next(i for i, x in enumerate(tensors) if x is t)
