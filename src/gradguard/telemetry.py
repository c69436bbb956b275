"""Sync-free gradient telemetry.

Per-parameter gradient norms are computed with ``torch._foreach_norm`` grouped by
(device, dtype) and accumulated in float32, written into a ring buffer on the device, and
copied to the host once per flush. Nothing here asks the host for a value per step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from . import distributed
from .naming import layer_of

# Columns of the ring buffer before the per-parameter norms. LOCAL_OK: this rank's own
# gradients were finite (before any all-reduce); it tells which rank a NaN came from.
# LOSS_GIVEN: a loss was passed (pipeline stages: only the last stage has one).
_COL_LOSS, _COL_TOTAL, _COL_COEF, _COL_SKIPPED, _COL_LOCAL_OK, _COL_LOSS_GIVEN = range(6)
_N_SCALARS = 6


@dataclass
class GradGroup:
    """Gradients (and their parameters) sharing one device and dtype."""

    device: torch.device
    dtype: torch.dtype
    index: list[int]  # positions in the parameter list
    params: list[Tensor]
    grads: list[Tensor]


@dataclass
class StepStats:
    """Gradient statistics of one step, all device tensors (nothing synced).

    Attributes:
        param_norms: ``[n_params]`` norm of each parameter's gradient (0 without a grad).
        total_norm: scalar norm of all gradients together (pre-clip).
        finite: scalar bool, ``isfinite(total_norm)``.
        groups: the gradients grouped by (device, dtype), for in-place clipping.
        norm_type: the norm order used.
        local_finite: with DTensor gradients or pipeline stages, ``isfinite`` of this
            rank's own norms before the all-reduce (None: same as ``finite``).
        names: the parameters' names (module paths), parallel to ``params``.
    """

    param_norms: Tensor
    total_norm: Tensor
    finite: Tensor
    groups: list[GradGroup]
    norm_type: float
    params: Sequence[Tensor] = field(default_factory=list)
    local_finite: Tensor | None = None
    names: Sequence[str] = field(default_factory=list)


def group_grads(params: Sequence[Tensor]) -> list[GradGroup]:
    """Group the parameters that have a gradient by (device, dtype), keeping their order."""
    groups: dict[tuple[torch.device, torch.dtype], GradGroup] = {}
    for i, p in enumerate(params):
        g = p.grad
        if g is None:
            continue
        if g.is_sparse:
            raise TypeError(
                f"parameter {i} has a sparse gradient; gradguard supports dense gradients only"
            )
        key = (g.device, g.dtype)
        grp = groups.get(key)
        if grp is None:
            grp = groups[key] = GradGroup(g.device, g.dtype, [], [], [])
        grp.index.append(i)
        grp.params.append(p)
        grp.grads.append(g)
    return list(groups.values())


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor, the tensor itself otherwise."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _foreach_norm_any(
    tensors: list[Tensor], norm_type: float, dtype: torch.dtype | None
) -> list[Tensor]:
    """``torch._foreach_norm``, also for the empty shards that uneven FSDP2 sharding
    leaves on some ranks (their inf-norm is 0 here; torch refuses it)."""
    kw = {} if dtype is None else {"dtype": dtype}
    if not (math.isinf(norm_type) and any(t.numel() == 0 for t in tensors)):
        return list(torch._foreach_norm(tensors, norm_type, **kw))
    full = [i for i, t in enumerate(tensors) if t.numel()]
    out = [torch.zeros((), device=t.device, dtype=dtype or t.dtype) for t in tensors]
    if full:
        for i, n in zip(full, torch._foreach_norm([tensors[i] for i in full], norm_type, **kw)):
            out[i] = n
    return out


def measure_grads(
    params: Sequence[Tensor],
    *,
    norm_type: float = 2.0,
    accumulate_dtype: torch.dtype | None = torch.float32,
    device: torch.device | None = None,
    names: Sequence[str] | None = None,
    pipeline_group: object = None,
) -> StepStats:
    """Norms of the gradients of ``params`` without any host synchronisation.

    Under torch.distributed, DTensor gradients (FSDP2, tensor parallel, HSDP, any mesh)
    are measured on their local shards and turned into global norms with one all-reduce
    of the local p-th powers (see :mod:`gradguard.distributed`); plain (DDP) gradients need
    no collective.

    Args:
        params: parameters (their ``.grad`` is read; ``None`` grads count as 0).
        norm_type: order of the norm (``2.0``, ``math.inf``, any p > 0).
        accumulate_dtype: dtype the norms are computed in. ``float32`` (telemetry) keeps
            bfloat16/float16 layers exact; ``None`` computes in each gradient's own dtype,
            exactly like ``torch.nn.utils.clip_grad_norm_``.
        device: where the result lives (default: the first parameter's device).
        names: the parameters' names (default: their positions, ``"0"``, ``"1"``, ...).
        pipeline_group: pipeline stages: the group of ranks holding the other stages
            (``mesh["pp"]``); the total norm is then the whole model's. Each call with a
            group costs one extra ``all_gather_object``: a :class:`Telemetry` pays it once.
    """
    reducer = None
    if pipeline_group is not None or (dist.is_available() and dist.is_initialized()):
        reducer = distributed.NormReducer(len(params), pipeline_group)
    if names is None:
        names = [str(i) for i in range(len(params))]
    return _measure(params, float(norm_type), accumulate_dtype, device, reducer, names)


def _measure(
    params: Sequence[Tensor],
    norm_type: float,
    accumulate_dtype: torch.dtype | None,
    device: torch.device | None,
    reducer: distributed.NormReducer | None,
    names: Sequence[str],
) -> StepStats:
    groups = group_grads(params)
    if device is None:
        device = params[0].device if len(params) else torch.device("cpu")
    out_dtype = accumulate_dtype or torch.float32
    per_param: list[Tensor | None] = [None] * len(params)
    for grp in groups:
        grads = [_local(g) for g in grp.grads]
        norms = _foreach_norm_any(grads, norm_type, accumulate_dtype)
        for i, n in zip(grp.index, norms):
            per_param[i] = n if n.device == device else n.to(device, non_blocking=True)
    total = local_ok = None
    if reducer is not None:
        # before any early return: every rank must issue the same collective
        total, local_ok = reducer.reduce_grad_norms_(per_param, params, norm_type)
    present = [n for n in per_param if n is not None]
    if not present:
        zero = torch.zeros((), device=device, dtype=out_dtype)
        return StepStats(
            torch.zeros(len(params), device=device, dtype=out_dtype),
            zero,
            torch.ones((), device=device, dtype=torch.bool),
            groups,
            norm_type,
            params,
            local_ok,
            names,
        )
    # torch.stack promotes mixed dtypes exactly as clip_grad_norm_ does.
    if total is None:
        total = torch.linalg.vector_norm(torch.stack(present), norm_type)
    if len(present) == len(params):
        param_norms = torch.stack(present)  # type: ignore[arg-type]
    else:
        zero = torch.zeros((), device=device, dtype=present[0].dtype)
        param_norms = torch.stack([zero if n is None else n for n in per_param])
    return StepStats(
        param_norms, total, torch.isfinite(total), groups, norm_type, params, local_ok, names
    )


@dataclass
class Window:
    """The telemetry of a flush window, on the host (CPU tensors).

    Attributes:
        steps: the step index of each row.
        loss, total_norm, clip_coef: ``[n]`` float tensors (NaN where unknown/non-finite).
        skipped: ``[n]`` bool.
        param_norms: ``[n, n_params]`` per-parameter gradient norms.
        names: parameter names; ``layers`` their unique module paths in order;
            ``layer_index[i]`` is the layer of parameter ``i``.
        weight_norms, update_norms: ``[n_params]`` sampled at the last step of the window
            (None when not sampled).
        skip_codes: ``[n]`` why each step was skipped: the verdict bits of
            :mod:`gradguard.executors` (1 non-finite, 2 gradient spike, 4 loss spike; 0 not
            skipped), None when unknown.
    """

    steps: list[int]
    loss: Tensor
    total_norm: Tensor
    clip_coef: Tensor
    skipped: Tensor
    param_norms: Tensor
    names: list[str]
    layers: list[str]
    layer_index: list[int]
    weight_norms: Tensor | None = None
    update_norms: Tensor | None = None
    skip_codes: Tensor | None = None

    def __len__(self) -> int:
        return len(self.steps)

    def _by_layer(self, per_param: Tensor) -> Tensor:
        """Combine per-parameter 2-norms (last dim) into per-layer 2-norms."""
        idx = torch.tensor(self.layer_index, dtype=torch.long)
        shape = (*per_param.shape[:-1], len(self.layers))
        sq = torch.zeros(shape, dtype=torch.float64)
        sq.index_add_(sq.dim() - 1, idx, per_param.double() ** 2)
        return sq.sqrt().float()

    def layer_norms(self) -> Tensor:
        """``[n, n_layers]`` gradient norm of each layer (its parameters together)."""
        return self._by_layer(self.param_norms)

    def layer_weight_norms(self) -> Tensor | None:
        return None if self.weight_norms is None else self._by_layer(self.weight_norms)

    def layer_update_norms(self) -> Tensor | None:
        return None if self.update_norms is None else self._by_layer(self.update_norms)


class Telemetry:
    """Per-step gradient telemetry kept on the device, flushed to the host in one copy.

    Args:
        named_params: ``(name, parameter)`` pairs; names are module paths
            (``"encoder.layers.3.attn.q_proj.weight"``).
        every: rows in the ring buffer; a flush happens when it is full.
        norm_type: order of the gradient norms (2 by default).
        pipeline_group: pipeline parallel only: the group of ranks that hold the other
            stages (a ProcessGroup or ``mesh["pp"]``). Per-layer norms stay this stage's;
            the total norm, the skip and the clip coefficient are the whole model's, still
            with one all-reduce per step. See docs/distributed.md.

    Example:
        >>> import torch, gradguard as gg
        >>> net = torch.nn.Linear(3, 2)
        >>> tel = gg.Telemetry(list(net.named_parameters()), every=4)
        >>> net(torch.ones(1, 3)).sum().backward()
        >>> stats = tel.measure()
        >>> tel.record(stats, loss=None, clip_coef=None, skipped=None)
        >>> window = tel.flush()
        >>> window.layers, window.steps
        (['(root)'], [0])
    """

    def __init__(
        self,
        named_params: Iterable[tuple[str, Tensor]],
        *,
        every: int = 50,
        norm_type: float = 2.0,
        pipeline_group: object = None,
    ) -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every={every!r} must be an int >= 1")
        named = list(named_params)
        if not named:
            raise ValueError("named_params is empty: there is nothing to measure")
        self.names = [n for n, _ in named]
        self.params: list[Tensor] = [p for _, p in named]
        self.every = every
        self.norm_type = float(norm_type)
        layers: list[str] = []
        seen: dict[str, int] = {}
        self.layer_index: list[int] = []
        for n in self.names:
            lay = layer_of(n)
            if lay not in seen:
                seen[lay] = len(layers)
                layers.append(lay)
            self.layer_index.append(seen[lay])
        self.layers = layers
        self.device = self.params[0].device
        n_cols = _N_SCALARS + len(self.params)
        self._buf = torch.full((every, n_cols), math.nan, device=self.device)
        self._steps: list[int] = []
        self._extra: Tensor | None = None  # [2, n_params] weight and update norms
        self._before: list[Tensor] | None = None
        self._next_step = 0
        self._reducer = (
            None
            if pipeline_group is None
            else distributed.NormReducer(len(named), pipeline_group, self.names)
        )

    # ---- per step (no host sync) ------------------------------------------------------
    def measure(self) -> StepStats:
        """Gradient norms of this step (device tensors)."""
        return _measure(
            self.params, self.norm_type, torch.float32, self.device, self._dist(), self.names)

    def _dist(self) -> distributed.NormReducer | None:
        """The reducer, built at the first step under torch.distributed (a Telemetry may be
        made before ``init_process_group``)."""
        if self._reducer is None and dist.is_available() and dist.is_initialized():
            self._reducer = distributed.NormReducer(len(self.params), names=self.names)
        return self._reducer

    def _scalar(self, x: Tensor | float | None, default: float) -> Tensor:
        if x is None:
            return torch.full((1,), default, device=self.device)
        if isinstance(x, Tensor):
            return x.detach().reshape(1).to(self.device, torch.float32, non_blocking=True)
        return torch.full((1,), float(x), device=self.device)

    def record(
        self,
        stats: StepStats,
        *,
        loss: Tensor | float | None,
        clip_coef: Tensor | float | None,
        skipped: Tensor | float | None,
        step: int | None = None,
    ) -> None:
        """Write one step into the ring buffer (a device copy, no sync). ``skipped``: 0 for a
        step taken, else why it was skipped (the verdict bits, see ``Window.skip_codes``)."""
        pos = len(self._steps)
        if pos >= self.every:
            raise RuntimeError("telemetry ring buffer is full: call flush() first")
        sk: Tensor | float | None
        sk = (
            skipped.float()
            if isinstance(skipped, Tensor)
            else (None if skipped is None else float(skipped))
        )
        row = torch.cat(
            [
                self._scalar(loss, math.nan),
                self._scalar(stats.total_norm, math.nan),
                self._scalar(clip_coef, 1.0),
                self._scalar(sk, 0.0),
                self._scalar(
                    stats.finite if stats.local_finite is None else stats.local_finite, 1.0
                ),
                self._scalar(0.0 if loss is None else 1.0, 1.0),
                stats.param_norms.to(self.device, torch.float32, non_blocking=True),
            ]
        )
        self._buf[pos].copy_(row)
        self._steps.append(self._next_step if step is None else step)
        self._next_step = self._steps[-1] + 1

    def pending_rows(self) -> Tensor:
        """The rows written since the last flush: a live ``[pending, 6 + n_params]`` view of
        the device ring buffer (columns: loss, total norm, clip coefficient, skipped, local
        finite flag, loss given, then the per-parameter norms). Used to agree on a window
        across ranks; under pipeline stages, whose parameters differ, the first 6 columns
        only."""
        rows = self._buf[: len(self._steps)]
        staged = self._reducer is not None and self._reducer.stages > 1
        return rows[:, :_N_SCALARS] if staged else rows

    @property
    def pending(self) -> int:
        """Rows written since the last flush."""
        return len(self._steps)

    @property
    def flush_due(self) -> bool:
        """True when the next recorded step fills the buffer (sample updates then)."""
        return len(self._steps) == self.every - 1

    def begin_update_sample(self) -> None:
        """Keep a copy of the parameters so the coming update can be measured."""
        with torch.no_grad():
            self._before = [_local(p).detach().clone() for p in self.params]

    def end_update_sample(self) -> None:
        """Measure weight norms and the update just applied (device ops only)."""
        if self._before is None:
            return
        with torch.no_grad():
            now = [_local(p).detach() for p in self.params]
            w = torch.stack([n.to(self.device) for n in _foreach_norm_f32(now)])
            diff = torch._foreach_sub(now, self._before)
            u = torch.stack([n.to(self.device) for n in _foreach_norm_f32(diff)])
            reducer = self._dist()
            # DTensor shards: local norms -> global ones, one all-reduce (flush steps only)
            out = None if reducer is None else reducer.reduce(torch.stack([w, u]), self.params, 2.0)
            if out is not None:
                w, u = out.norms.float().unbind()
        self._before = None
        self._extra = torch.stack([w, u])

    # ---- per flush (one host copy) -----------------------------------------------------
    def flush(self) -> Window | None:
        """Copy the window to the host (exactly one device-to-host copy) and reset it."""
        n = len(self._steps)
        if n == 0:
            return None
        p = len(self.params)
        flat = self._buf[:n].reshape(-1)
        if self._extra is not None:
            flat = torch.cat([flat, self._extra.reshape(-1)])
        host = flat.cpu()  # the one device->host copy of this flush
        if host.data_ptr() == self._buf.data_ptr():
            host = host.clone()  # on a CPU device .cpu() aliases the ring buffer
        rows = host[: n * (p + _N_SCALARS)].reshape(n, p + _N_SCALARS)
        w = u = None
        if self._extra is not None:
            extra = host[n * (p + _N_SCALARS) :].reshape(2, p)
            w, u = extra[0], extra[1]
        window = Window(
            steps=list(self._steps),
            loss=rows[:, _COL_LOSS],
            total_norm=rows[:, _COL_TOTAL],
            clip_coef=rows[:, _COL_COEF],
            skipped=rows[:, _COL_SKIPPED] > 0.5,
            param_norms=rows[:, _N_SCALARS:],
            names=self.names,
            layers=self.layers,
            layer_index=self.layer_index,
            weight_norms=w,
            update_norms=u,
            skip_codes=rows[:, _COL_SKIPPED],
        )
        self._steps = []
        self._extra = None
        self._buf.fill_(math.nan)
        return window

    # ---- checkpointing ---------------------------------------------------------------
    def state_dict(self) -> dict[str, object]:
        return {
            "steps": list(self._steps),
            "buf": self._buf.clone(),
            "next_step": self._next_step,
            "names": list(self.names),
        }

    def load_state_dict(self, sd: dict[str, object]) -> None:
        if sd.get("names") != self.names:
            raise ValueError("telemetry state_dict was saved for different parameters")
        buf = sd["buf"]
        assert isinstance(buf, Tensor)
        if buf.shape[1] == self._buf.shape[1] - 1:  # saved before the loss-given column
            ones = torch.ones_like(buf[:, :1])
            buf = torch.cat([buf[:, :_COL_LOSS_GIVEN], ones, buf[:, _COL_LOSS_GIVEN:]], dim=1)
        if buf.shape != self._buf.shape:
            raise ValueError(
                f"telemetry state_dict buffer shape {tuple(buf.shape)} != {tuple(self._buf.shape)}"
            )
        self._buf.copy_(buf)
        self._steps = list(sd["steps"])  # type: ignore[call-overload]
        self._next_step = int(sd["next_step"])  # type: ignore[call-overload]


class UpdateSampler:
    """Weight norms and update norms of one optimizer step, measured around the step
    itself (optimizer step pre/post hooks), so that it works the same whether the guard
    calls ``optimizer.step()`` or a trainer does. The guard arms it for flush steps; a
    step that never runs leaves nothing behind (the guard disarms it at the next step).
    """

    def __init__(self, telemetry: Telemetry, optimizer: torch.optim.Optimizer) -> None:
        self.telemetry = telemetry
        self.armed = False
        self._active = False
        self._handles = [
            optimizer.register_step_pre_hook(self._pre),
            optimizer.register_step_post_hook(self._post),
        ]

    def _pre(self, optimizer: object, args: object, kwargs: object) -> None:
        if self.armed:
            self.armed, self._active = False, True
            self.telemetry.begin_update_sample()

    def _post(self, optimizer: object, args: object, kwargs: object) -> None:
        if self._active:
            self._active = False
            self.telemetry.end_update_sample()

    def detach(self) -> None:
        """Remove the hooks (the guard's ``close`` calls it)."""
        for h in self._handles:
            h.remove()
        self._handles = []


def _foreach_norm_f32(tensors: Sequence[Tensor]) -> tuple[Tensor, ...]:
    return tuple(torch._foreach_norm(list(tensors), 2.0, dtype=torch.float32)) if tensors else ()
