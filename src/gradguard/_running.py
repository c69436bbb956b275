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
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.parameter import is_lazy


class RunningStats:
    """The running statistics of ``model``'s normalisation layers and their copy from
    before the current step's forward (see the module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.buffers: list[Tensor] | None = None
        self.saved: list[Tensor] = []
        self._first: tuple[nn.Module, Tensor | None] | None = None
        self._collect()

    def _collect(self) -> None:
        mods = [m for m in self.model.modules()
                if isinstance(m, _NormBase) and m.track_running_stats]
        found = [b for m in mods for b in (m.running_mean, m.running_var, m.num_batches_tracked)
                 if isinstance(b, Tensor)]
        if any(is_lazy(b) for b in found):
            return  # a lazy layer has no statistics before its first forward
        self.buffers = found
        self.saved = [b.detach().clone() for b in self.buffers]
        # ``model.to(device)``/``.half()`` after the guard was built replaces the buffers
        # (not the parameters): the first one tells, and the statistics are collected anew
        self._first = (mods[0], mods[0].running_mean) if found else None

    def _moved(self) -> bool:
        return self._first is not None and self._first[0].running_mean is not self._first[1]

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
