"""Dying units: the share of a layer's units that stopped getting any gradient.

A ReLU unit whose input is negative on every sample of a batch passes no gradient back: the
row of its layer's weight gradient is exactly zero (a channel of a convolution: its slice of
the kernel's gradient). Once a large update has pushed its input below zero for good, it
never comes back, and neither does what it had learnt. An LR too high kills them by the
dozen within its first tens of steps, with no NaN, no spike and no rise of the loss to
tell: the loss goes on falling, more slowly and more noisily, towards a floor the dead
units set (benchmarks/rescue.py's held-out cases: the regression MLP on SGD at 10x, 80%
of its second layer's units dead by step 10 and all of them by step 70; the digits CNN on
fused Adam at 10x, 75% of a convolution's channels by step 10). A healthy run loses a few
(0-3% of a layer in the rescue suite's digits MLPs and CNNs, up to 23% in its narrow
regression MLP on AdamW) and none of a GELU, tanh or attention layer's (their gradients are
never exactly zero).

:class:`UnitWatch` measures it on the device, every ``SAMPLE`` (10) steps from the first:
for each watched weight (of an ``nn.Linear`` or a convolution, with at least ``MIN_UNITS``
output units), the largest gradient magnitude of each output unit's row. A unit is *dead*
when that was exactly zero on the last ``SILENT`` (3) samples in a row (a sparse unit is
silent on one batch by chance, seldom on three batches twenty steps apart) and it had a
gradient on an earlier sample (a unit that was dead when the watch began, a pretrained
model's, is not this run's doing); a unit that has come back from ``s`` silent samples
before needs ``2 s + 1`` (on batches of one sample a unit firing on a fifth of the inputs is
silent on three samples half the time: such units, up to 45% of a healthy layer of a
digits MLP on Adam, come back and so raise their own bar); it is *dying* while it died within the last ``RECENT``
(10) samples: what is measured is how many units died within a hundred steps, not how
many a long run has lost. A sample on which a weight had no gradient at all (an
expert no token was routed to, a frozen layer) tells nothing about its units. The share
of a weight's units dying, the largest over the watched weights and which weight it is, goes into the telemetry row of the sampled step (two device values, no host read) and
reaches the recovery with the window (:mod:`gradguard.recovery._flush`: ``DYING``). The
counters start again whenever the weights are restored (a rollback, the LR probe): the
units that are dead in the restored weights died before them.

Cost: one extra read of the watched gradients every ``SAMPLE`` steps (a tenth of the read
the per-step norm already does) and three small counters per output unit (two 32-bit counts and a flag).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .measure import _local

#: Steps between two samples (the first at step 0).
SAMPLE = 10
#: Samples in a row with an exactly zero gradient row after which a unit is dead.
SILENT = 3
#: A unit counts as dying while it has been silent at most this many samples (it died
#: within the last ``RECENT * SAMPLE`` steps): the share is of units killed within a
#: hundred steps, the work of updates too large, not of a slow attrition over a long run
#: (a sparse autoencoder's latents, a large language model's ReLUs).
RECENT = 10
#: Weights with fewer output units are not watched: two units of four dying by chance is
#: no evidence.
MIN_UNITS = 16
#: The share of a weight's units whose death the recovery acts on (a rollback to weights
#: from before it, at a lower LR: :mod:`gradguard.recovery._flush`); a rollback goes to no
#: snapshot taken with half this share dead while an older one is kept.
DYING = 0.5


def watched(model: nn.Module, params: Sequence[Tensor]) -> list[int]:
    """The positions in ``params`` of the weights whose output units :class:`UnitWatch`
    watches: those of an ``nn.Linear`` or a (not transposed) ``nn.Conv1d/2d/3d`` with at
    least ``MIN_UNITS`` output units. An embedding's rows are tokens (a token absent from a
    batch has a zero row), a transposed convolution's are its inputs: neither is watched.
    Read from the modules' own parameters, never through ``m.weight``: a parametrized
    weight (``spectral_norm``) is computed on access, and spectral norm's power iteration
    moves its vectors each time, so one read changed the run."""
    weights = {id(w) for m in model.modules()
               if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))
               and not getattr(m, "transposed", False)
               and isinstance(w := m._parameters.get("weight"), Tensor)}
    return [i for i, p in enumerate(params)
            if id(p) in weights and p.dim() >= 2 and _local(p).shape[0] >= MIN_UNITS]


class UnitWatch:
    """Counts, on the device, the output units of the watched weights that stopped getting
    any gradient (see the module docstring).

    Args:
        params: the guarded parameters (the telemetry's, in its order).
        index: the positions in ``params`` of the weights to watch (:func:`watched`).
        device: where the counters and the result live (the telemetry's device).

    Example:
        >>> import torch, gradguard as gg
        >>> from gradguard.units import UnitWatch, watched
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
        >>> params = list(net.parameters())
        >>> watch = UnitWatch(params, watched(net, params), torch.device("cpu"))
        >>> net[0].weight.grad = torch.ones(32, 4)
        >>> watch.sample().tolist()  # every unit has a gradient
        [0.0, 0.0]
        >>> for _ in range(3):  # then a quarter of them none, three samples in a row
        ...     net[0].weight.grad[:8] = 0.0
        ...     share, at = watch.sample().tolist()
        >>> share, int(at)  # a quarter of the units of parameter 0 (net[0].weight) died
        (0.25, 0)
    """

    def __init__(self, params: Sequence[Tensor], index: Sequence[int], device: torch.device) -> None:
        self.index = list(index)
        self.params = [params[i] for i in self.index]
        self.device = device
        #: output units of each watched weight (this rank's rows under sharding)
        self.units = [_local(p).shape[0] for p in self.params]
        n = sum(self.units)
        # built on the host and copied (a repeat_interleave on a GPU reads its output size)
        self._seg = torch.repeat_interleave(
            torch.arange(len(self.units)), torch.tensor(self.units, dtype=torch.long)).to(device)
        self._units = torch.tensor(self.units, device=device, dtype=torch.float32)
        self._at = torch.tensor(self.index, device=device, dtype=torch.float32)
        #: per unit: samples in a row with a zero gradient row; whether it had a gradient;
        #: the longest such silence it came back from
        self.silent = torch.zeros(n, dtype=torch.int32, device=device)
        self.alive = torch.zeros(n, dtype=torch.bool, device=device)
        self.longest = torch.zeros(n, dtype=torch.int32, device=device)

    def __len__(self) -> int:
        return len(self.index)

    @staticmethod
    def due(step: int) -> bool:
        """Whether step ``step`` is sampled."""
        return step % SAMPLE == 0

    def sample(self) -> Tensor:
        """Take this step's gradients in (before the optimizer step) and return ``[share,
        position]`` on the device: the largest share of a watched weight's units that died
        within the last ``RECENT`` samples, and that weight's position in the guarded
        parameters."""
        rows: list[Tensor] = []
        for p, n in zip(self.params, self.units):
            g = p.grad
            if g is None or g.is_sparse or _local(g).shape[0] != n:
                rows.append(torch.full((n,), math.nan, device=self.device))  # tells nothing
                continue
            g = _local(g).detach().reshape(n, -1)
            if g.is_complex():
                g = g.abs()
            # each row's largest magnitude, exactly (no square to underflow), as the larger of
            # -min and max: a fourth of vector_norm(ord=inf)'s time on a CPU; NaN propagates
            top = torch.maximum(g.amax(1), g.amin(1).neg())
            rows.append(top.to(self.device, torch.float32, non_blocking=True))
        grad = torch.cat(rows)
        unknown = grad.isnan()  # no gradient measured (a NaN row): no evidence either way
        live = (grad != 0) & ~unknown
        # a weight without any gradient on this sample tells nothing about its units
        told = torch.zeros(len(self.units), device=self.device).index_add_(
            0, self._seg, live.float()) > 0
        self.longest = torch.where(live, torch.maximum(self.longest, self.silent), self.longest)
        self.silent = torch.where(live, 0, self.silent + (told[self._seg] & ~unknown).int())
        self.alive |= live
        # a unit that came back from s silent samples is dead after 2s + 1 (SILENT at least)
        bar = torch.clamp(2 * self.longest + 1, min=SILENT)
        dead = ((self.silent >= bar) & (self.silent <= RECENT) & self.alive).float()
        share = torch.zeros(len(self.units), device=self.device).index_add_(
            0, self._seg, dead) / self._units
        top, at = share.max(0)
        return torch.stack([top, self._at[at]])

    def reset(self) -> None:
        """The weights were restored: their units are counted afresh."""
        self.silent.zero_()
        self.alive.zero_()
        self.longest.zero_()

    def state_dict(self) -> dict[str, object]:
        return {"index": list(self.index), "silent": self.silent.clone(),
                "alive": self.alive.clone(), "longest": self.longest.clone()}

    def load_state_dict(self, sd: dict[str, object]) -> None:
        silent, alive = sd.get("silent"), sd.get("alive")
        if (sd.get("index") != self.index or not isinstance(silent, Tensor)
                or not isinstance(alive, Tensor) or silent.shape != self.silent.shape):
            return  # saved for other weights (or shards): counted afresh
        self.silent.copy_(silent)
        self.alive.copy_(alive)
        longest = sd.get("longest")  # absent from a checkpoint of the first form
        self.longest.copy_(longest if isinstance(longest, Tensor) else torch.zeros_like(silent))
