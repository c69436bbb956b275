"""Weight norms and update norms of an optimizer step, in bounded extra memory.

The update of a step is ``p_after - p_before``; measuring it exactly needs a copy of every
parameter from before the step, i.e. a second copy of the model (a 7B-parameter bf16 model:
14 GB more at every flush). Instead, :class:`UpdateSampler` keeps a copy of a *strided
sample* of each parameter's elements: for a parameter of ``n`` elements and a sampling
share ``s``, every ``m = ceil(1/s)``-th element of its flattened storage, starting at an
offset that rotates by one each flush, so that ``m`` flushes visit every element once.

* Extra memory at a flush step: at most ``budget`` elements plus one per parameter, each in
  its parameter's dtype (default ``budget``: ``UPDATE_SAMPLE_FRACTION`` of the model's
  elements, but at least ``UPDATE_SAMPLE_MIN``; a model at or under the budget is copied
  whole and its update norms are exact).
* Weight norms are exact (a norm needs no copy).
* Update norms are estimated as ``||d_sample|| * sqrt(n / k)`` (``k`` sampled elements):
  the estimate of ``||d||**2`` is unbiased over the rotation (each element is sampled once
  per ``m`` flushes) and exact when the sample is the whole parameter. A stride spreads
  the sample over every row and column of a weight, so the per-layer update/weight ratio
  that the detectors judge (healthy ~1e-3, alarms at orders of magnitude away) is
  measured on ~``s`` of the layer's elements each flush.

The sample is taken by optimizer step pre/post hooks, so it measures the real update
whoever calls ``optimizer.step()`` (the guard, a ``GradScaler``, a trainer). Nothing is read
by the host.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from . import distributed
from .measure import _foreach_norm_any, _local
from .telemetry import Telemetry

#: Share of the model's elements copied at a flush step to measure update norms.
UPDATE_SAMPLE_FRACTION = 0.02
#: Below this many elements (4 MiB of float32) the whole model is copied: exact norms.
UPDATE_SAMPLE_MIN = 1 << 20


def flat_view(t: Tensor) -> Tensor | None:
    """A 1-D view of all of ``t``'s elements in storage order (no copy), or None when the
    elements do not fill their storage span densely (an overlapping or gapped view).
    Contiguous and channels-last tensors qualify; the order does not matter for norms."""
    if t.is_contiguous():
        return t.view(-1)
    dims = sorted(range(t.ndim), key=lambda d: t.stride(d))
    expect = 1
    for d in dims:
        if t.size(d) != 1 and t.stride(d) != expect:
            return None
        expect *= t.size(d)
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


class UpdateSampler:
    """Weight and update norms of one optimizer step, measured around the step itself
    (optimizer step pre/post hooks). The guard arms it for flush steps; a step that never
    runs leaves nothing behind (the guard disarms it at the next step). See the module
    docstring for the sampling and its memory bound.

    Args:
        telemetry: where the norms go (:meth:`Telemetry.set_update_sample`).
        optimizer: the optimizer whose step is measured.
        budget: elements copied per flush step (None: ``UPDATE_SAMPLE_FRACTION`` of the
            model, at least ``UPDATE_SAMPLE_MIN``); at least 1.

    Example:
        >>> import torch, gradguard as gg
        >>> from gradguard.updates import UpdateSampler
        >>> net = torch.nn.Linear(1000, 100)
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> tel = gg.Telemetry(list(net.named_parameters()), every=1)
        >>> sampler = UpdateSampler(tel, opt, budget=1000)   # 1% of the weight
        >>> sampler.armed = True
        >>> net(torch.ones(1, 1000)).sum().backward(); opt.step()
        >>> sampler.last_sampled <= 1000 + 2     # elements copied (+1 per parameter)
        True
        >>> tel.record(tel.measure(), loss=None, clip_coef=None, skipped=None)
        >>> tel.flush().update_norms.shape       # one estimate per parameter
        torch.Size([2])
        >>> sampler.detach()
    """

    def __init__(
        self, telemetry: Telemetry, optimizer: torch.optim.Optimizer, *, budget: int | None = None
    ) -> None:
        self.telemetry = telemetry
        self.armed = False
        #: measure the next step that runs as a *first* update (the run's first, or the
        #: first from weights a rollback restored): ``first`` keeps its squared norm. Not
        #: under torch.distributed, where no rollback weighs it (the loss is not judged per
        #: step) and a sharded norm would take a collective off the flush steps
        self.first_due = distributed.world_size() <= 1
        #: the squared 2-norm of that update (a 0-d float32 tensor on the telemetry's
        #: device, never read here) and the step count at which it was taken
        self.first: Tensor | None = None
        self.first_step: int | None = None
        #: the LR of that step as a share of the schedule's peak
        #: (:meth:`~gradguard.detectors.LrTracker.fraction`)
        self.first_share = 1.0
        self._first_active = False
        self._step, self._share = 0, 1.0
        self._active = False
        sizes = [_local(p).numel() for p in telemetry.params]
        total = sum(sizes)
        if budget is None:
            budget = max(UPDATE_SAMPLE_MIN, math.ceil(UPDATE_SAMPLE_FRACTION * total))
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise ValueError(f"UpdateSampler(budget={budget!r}): must be None or an int >= 1")
        self.budget = budget
        #: sampling stride (1: every element, exact norms). Odd, so that on the usual
        #: power-of-two widths the sample moves across columns from row to row.
        self.stride = 1 if budget >= total else math.ceil(total / budget) | 1
        self._offset = 0
        self._before: list[Tensor] | None = None
        self._views: list[Tensor] = []
        #: elements copied at the last sampled step (for benchmarks and tests)
        self.last_sampled = 0
        self._handles = [
            optimizer.register_step_pre_hook(self._pre),
            optimizer.register_step_post_hook(self._post),
        ]

    def _samples(self) -> list[Tensor]:
        """This flush's strided views, one per parameter (empty for an empty shard)."""
        views = []
        m, start = self.stride, self._offset % self.stride
        for p in self.telemetry.params:
            local = _local(p).detach()
            flat = flat_view(local)
            if flat is None:  # a gapped view: copy it (bounded by this one parameter)
                flat = local.reshape(-1)
            views.append(flat[start::m] if m > 1 else flat)
        return views

    def _pre(self, optimizer: object, args: object, kwargs: object) -> None:
        self.first_due = self.first_due and distributed.world_size() <= 1
        # a step at LR 0 (a warm-up's first: Hugging Face's linear one) moves nothing: the
        # first update is the next one
        first = self.first_due and self._share > 0
        if self.armed or first:
            self._first_active = first
            self.first_due = self.first_due and not first
            self._active, self.armed = self.armed, False
            with torch.no_grad():
                self._views = self._samples()
                self._before = [v.clone() for v in self._views]
            self.last_sampled = sum(v.numel() for v in self._before)

    def _post(self, optimizer: object, args: object, kwargs: object) -> None:
        if not (self._active or self._first_active):
            return
        assert self._before is not None
        with torch.no_grad():
            self._measure(self._views, self._before)
        self._before, self._views = None, []
        if self._active:
            self._offset += 1
        self._active = self._first_active = False

    def at_step(self, step: int, share: float = 1.0) -> None:
        """The guard's step count for the next step and its LR as a share of the schedule's
        peak (``first_step`` and ``first_share`` record them)."""
        self._step, self._share = step, share

    def _measure(self, now: Sequence[Tensor], before: list[Tensor]) -> None:
        tel = self.telemetry
        params = [_local(p).detach() for p in tel.params]
        w = _stack_norms(params, tel.device)
        # in place: the copy becomes the difference, so the bound stays one copy
        torch._foreach_sub_(before, list(now))
        # ||d||**2 ~ ||d_sample||**2 * n / k (host floats: no copy to the device)
        factors = [math.sqrt(p.numel() / d.numel()) if d.numel() else 0.0
                   for p, d in zip(params, before)]
        u = _stack_norms(before, tel.device, factors)
        reducer = tel.reducer()
        # DTensor shards: local norms -> global ones, one all-reduce (flush steps only)
        out = None if reducer is None else reducer.reduce(torch.stack([w, u]), tel.params, 2.0)
        if out is not None:
            w, u = out.norms.float().unbind()
        if self._first_active:
            self.first, self.first_step, self.first_share = u.square().sum(), self._step, self._share
        if self._active:
            tel.set_update_sample(w, u)

    def state_dict(self) -> dict[str, Any]:
        """The first update's record, for a checkpoint: a resumed run's first step is no
        first update (weighed as one, a rollback after a resume read an ordinary update
        as the first from the restored weights, and set no LR cap where the run it
        continues did)."""
        return {"first_due": self.first_due, "first_step": self.first_step,
                "first_share": self.first_share,
                "first": None if self.first is None else self.first.detach().clone()}

    def load_state_dict(self, sd: Mapping[str, Any] | None, step_count: int) -> None:
        """Restore :meth:`state_dict`; ``None`` (a checkpoint without it) at a step count
        past 0 leaves the first update unmeasured rather than misread."""
        if sd is None:
            self.first_due = self.first_due and step_count == 0
            return
        first = sd.get("first")
        self.first_due = bool(sd["first_due"]) and distributed.world_size() <= 1
        self.first_step = None if sd.get("first_step") is None else int(sd["first_step"])
        self.first_share = float(sd.get("first_share", 1.0))
        self.first = None if first is None else first.to(self.telemetry.device)

    def detach(self) -> None:
        """Remove the hooks (the guard's ``close`` calls it)."""
        for h in self._handles:
            h.remove()
        self._handles = []


def _stack_norms(
    tensors: Sequence[Tensor], device: torch.device, factors: Sequence[float] | None = None
) -> Tensor:
    """``[n]`` float32 2-norms (computed in at least float32) of tensors of any dtypes and
    devices, each times ``factors[i]`` when given."""
    out: list[Tensor | None] = [None] * len(tensors)
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    for idx in groups.values():
        norms = _foreach_norm_any([tensors[i] for i in idx], 2.0, torch.float32)
        if factors is not None:
            norms = list(torch._foreach_mul(norms, [factors[i] for i in idx]))
        for i, n in zip(idx, norms):
            out[i] = n.to(device, torch.float32, non_blocking=True)
    return torch.stack(out) if out else torch.zeros(0, device=device)  # type: ignore[arg-type]
