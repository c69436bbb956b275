"""Gradient norms without a host sync: what every step measures.

Gradients are grouped by (device, dtype, layout) and measured with one
``torch._foreach_norm`` per group, in at least float32 (float64 stays float64; complex
gradients give real norms). Sparse COO gradients are coalesced and measured on their
values. The result, :class:`StepStats`, is all device tensors: nothing here asks the host
for a value.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils._foreach_utils import _device_has_foreach_support, _has_foreach_support

from . import distributed


@dataclass
class GradGroup:
    """Gradients (and their parameters) sharing one device, dtype and layout.

    ``sparse``: the gradients are sparse COO tensors, coalesced by :func:`group_grads`
    (``p.grad`` is replaced by its coalesced equivalent, so duplicate indices are summed
    before anything measures or clips them).
    """

    device: torch.device
    dtype: torch.dtype
    index: list[int]  # positions in the parameter list
    params: list[Tensor]
    grads: list[Tensor]
    sparse: bool = False

    def data(self) -> list[Tensor]:
        """The dense tensors that hold the gradient values: a sparse gradient's values,
        a DTensor's local shard, the gradient itself otherwise. Scaling or clamping them
        in place changes the gradients."""
        if self.sparse:
            return [g._values() for g in self.grads]
        return [_local(g) for g in self.grads]


@dataclass
class StepStats:
    """Gradient statistics of one step, all device tensors (nothing synced).

    Attributes:
        param_norms: ``[n_params]`` norm of each parameter's gradient (0 without a grad).
        total_norm: scalar norm of all gradients together (pre-clip).
        finite: scalar bool, ``isfinite(total_norm)``.
        groups: the gradients grouped by (device, dtype), for in-place clipping.
        norm_type: the norm order used.
        local_finite: under FSDP2, ``isfinite`` of this rank's own shards before the
            all-reduce (None: same as ``finite``).
        names: the parameters' names (module paths), parallel to ``params``.
        loss: this step's loss, where the caller has one (a guard outside torch.distributed
            sets it; :class:`gradguard.ZClip` reads it); None otherwise.
        calm: False while a recovery holds the LR below the user's (a guard sets it):
            :class:`gradguard.ZClip` then lets no rise through its clip.
        skipped: a device bool, True when the guard's verdict skips this step (a guard sets
            it; None: unknown): :class:`gradguard.ZClip`'s "gradual" rule does not see it.
    """

    param_norms: Tensor
    total_norm: Tensor
    finite: Tensor
    groups: list[GradGroup]
    norm_type: float
    params: Sequence[Tensor] = field(default_factory=list)
    local_finite: Tensor | None = None
    names: Sequence[str] = field(default_factory=list)
    loss: Tensor | float | None = None
    calm: bool = True
    skipped: Tensor | None = None


def group_grads(params: Sequence[Tensor]) -> list[GradGroup]:
    """Group the parameters that have a gradient by (device, dtype, layout), keeping their
    order. Sparse COO gradients are coalesced in place (``p.grad`` becomes the coalesced
    tensor); other sparse layouts are refused."""
    groups: dict[tuple[torch.device, torch.dtype, bool], GradGroup] = {}
    for i, p in enumerate(params):
        g = p.grad
        if g is None:
            continue
        if g.layout not in (torch.strided, torch.sparse_coo):
            raise TypeError(
                f"parameter {i} has a {g.layout} gradient; gradguard supports dense "
                "(torch.strided) and sparse COO (torch.sparse_coo) gradients"
            )
        if g.is_sparse and not g.is_coalesced():
            # duplicate indices (nn.Embedding(sparse=True)) must be summed before a norm
            # or a clamp means anything; the optimizer would coalesce them anyway
            g = p.grad = g.coalesce()
        key = (g.device, g.dtype, g.is_sparse)
        grp = groups.get(key)
        if grp is None:
            grp = groups[key] = GradGroup(g.device, g.dtype, [], [], [], g.is_sparse)
        grp.index.append(i)
        grp.params.append(p)
        grp.grads.append(g)
    return list(groups.values())


def norm_dtype(dtype: torch.dtype, accumulate: torch.dtype | None) -> torch.dtype | None:
    """The ``dtype=`` to pass ``torch._foreach_norm`` for tensors of ``dtype`` so that the
    norm is computed in at least ``accumulate`` (None: in the tensor's own dtype).

    float64 stays float64 (never narrowed to float32); complex tensors take the complex
    counterpart (their norm comes out real): ``complex64 -> complex64`` gives a float32
    norm, ``complex128 -> complex128`` a float64 one.
    """
    if accumulate is None:
        return None
    if dtype.is_complex:
        return torch.promote_types(dtype, accumulate.to_complex())
    return torch.promote_types(dtype, accumulate)


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor, the tensor itself otherwise."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def stored(t: Tensor) -> Tensor:
    """The dense tensor holding ``t``'s values: a sparse COO tensor's values (an
    ``nn.Embedding(sparse=True)`` under SGD with momentum keeps a sparse momentum buffer),
    a DTensor's local shard, ``t`` itself otherwise."""
    t = _local(t)
    return t._values() if t.is_sparse else t


def use_foreach(foreach: bool | None, tensors: list[Tensor], device: torch.device) -> bool:
    """torch's rule for ``foreach=`` (as in ``clip_grad_norm_``): None uses the foreach
    kernels where the device has them, True insists (an error where it has not), False
    never."""
    if foreach is None:
        return _has_foreach_support(tensors, device)
    if foreach and not _device_has_foreach_support(device):
        raise RuntimeError(
            f"foreach=True was passed, but can't use the foreach API on {device.type} tensors"
        )
    return foreach


#: Read per-step scalars that live on the CPU on the host: a CPU tensor is host memory,
#: reading it waits for no device. Used for two things only: to leave out the pass over the
#: gradients when a clip coefficient is 1 (no clipping this step; ``is_unit_on_cpu``), and
#: to run ZClip's scalar update in Python numbers instead of ~60 one-element tensor ops
#: (``host_scalars``). A GPU scalar is never read (the multiply by 1 stays on the device,
#: or goes into a fused optimizer's ``grad_scale`` for free). The host-sync tests turn it
#: off (tests/conftest.py) so that, on CPU, they check the path a GPU takes.
READ_CPU_COEFFICIENT = True


def host_scalars(*tensors: Tensor) -> bool:
    """True when every one of ``tensors`` can be read on the host for free: on the CPU,
    outside autograd, with ``READ_CPU_COEFFICIENT`` on."""
    return READ_CPU_COEFFICIENT and all(
        t.device.type == "cpu" and not t.requires_grad for t in tensors)


def is_unit_on_cpu(coef: Tensor, devices: Iterable[torch.device] = ()) -> bool:
    """True when ``coef`` and every one of ``devices`` are on the CPU and ``coef >= 1``:
    multiplying the gradients by it would change nothing (x * 1.0 == x, bit for bit)."""
    if not host_scalars(coef):
        return False
    if any(d.type != "cpu" for d in devices):
        return False
    return bool(coef.reshape(()) >= 1.0)


def _foreach_norm_any(
    tensors: list[Tensor], norm_type: float, dtype: torch.dtype | None, *, foreach: bool = True
) -> list[Tensor]:
    """Norms of ``tensors`` computed in at least ``dtype`` (see :func:`norm_dtype`): one
    ``torch._foreach_norm``, or a loop of ``vector_norm`` without ``foreach``. Empty
    tensors (uneven FSDP2 shards, an all-zero sparse gradient) have norm 0 (torch refuses
    their inf-norm)."""
    if not tensors:
        return []
    acc = norm_dtype(tensors[0].dtype, dtype)
    kw = {} if acc is None else {"dtype": acc}
    full = [i for i, t in enumerate(tensors) if t.numel() or not math.isinf(norm_type)]
    some = [tensors[i] for i in full]
    if not some:
        norms: list[Tensor] = []
    elif foreach:
        norms = list(torch._foreach_norm(some, norm_type, **kw))
    else:
        norms = [torch.linalg.vector_norm(t, norm_type, **kw) for t in some]
    if len(full) == len(tensors):
        return norms
    out_dtype = (acc or tensors[0].dtype).to_real()
    out = [torch.zeros((), device=t.device, dtype=out_dtype) for t in tensors]
    for i, n in zip(full, norms):
        out[i] = n
    return out


def measure_grads(
    params: Sequence[Tensor],
    *,
    norm_type: float = 2.0,
    accumulate_dtype: torch.dtype | None = torch.float32,
    device: torch.device | None = None,
    names: Sequence[str] | None = None,
    scale: Tensor | None = None,
    foreach: bool | None = None,
    pipeline_group: object = None,
) -> StepStats:
    """Norms of the gradients of ``params`` without any host synchronisation.

    Every dtype ``clip_grad_norm_`` accepts works: float64 is measured in float64, complex
    gradients give real norms, and mixed lists promote as ``torch.stack`` does. Sparse COO
    gradients are coalesced (see :func:`group_grads`) and measured on their values.

    Under torch.distributed, DTensor gradients (FSDP2, tensor parallel, HSDP, any mesh)
    are measured on their local shards and turned into global norms with one all-reduce
    of the local p-th powers (see :mod:`gradguard.distributed`); plain (DDP) gradients need
    no collective.

    Args:
        params: parameters (their ``.grad`` is read; ``None`` grads count as 0).
        norm_type: order of the norm (``2.0``, ``math.inf``, any p > 0).
        accumulate_dtype: the least precise dtype the norms are computed in. ``float32``
            (telemetry) keeps bfloat16/float16 layers exact; ``None`` computes in each
            gradient's own dtype, exactly like ``torch.nn.utils.clip_grad_norm_``.
        device: where the result lives (default: the first parameter's device).
        names: the parameters' names (default: their positions, ``"0"``, ``"1"``, ...).
        scale: a device scalar every norm is multiplied by: ``1 / loss_scale`` when the
            gradients are still scaled by a ``GradScaler`` (None: 1). Norms are linear in
            the gradients, so this equals measuring the unscaled gradients.
        foreach: as in ``clip_grad_norm_``: None uses ``torch._foreach_norm`` where the
            device supports it, True insists, False measures one tensor at a time.
        pipeline_group: pipeline stages: the group of ranks holding the other stages
            (``mesh["pp"]``); the total norm is then the whole model's. Each call with a
            group costs one extra ``all_gather_object``: a :class:`Telemetry` pays it once.

    Example:
        >>> import torch
        >>> from gradguard.telemetry import measure_grads
        >>> w = torch.nn.Parameter(torch.zeros(2, dtype=torch.complex128))
        >>> w.grad = torch.tensor([3 + 4j, 0j], dtype=torch.complex128)
        >>> measure_grads([w]).total_norm
        tensor(5., dtype=torch.float64)
    """
    reducer = None
    if pipeline_group is not None or (dist.is_available() and dist.is_initialized()):
        reducer = distributed.NormReducer(len(params), pipeline_group)
    if names is None:
        names = [str(i) for i in range(len(params))]
    return measure(params, float(norm_type), accumulate_dtype, device, reducer, names,
                   scale=scale, foreach=foreach)


def measure(
    params: Sequence[Tensor],
    norm_type: float,
    accumulate_dtype: torch.dtype | None,
    device: torch.device | None,
    reducer: distributed.NormReducer | None,
    names: Sequence[str],
    *,
    scale: Tensor | None = None,
    foreach: bool | None = None,
) -> StepStats:
    """:func:`measure_grads` with a ready ``reducer`` (None: no collective)."""
    groups = group_grads(params)
    if device is None:
        device = params[0].device if len(params) else torch.device("cpu")
    out_dtype = accumulate_dtype or torch.float32
    per_param: list[Tensor | None] = [None] * len(params)
    for grp in groups:
        data = grp.data()
        norms = _foreach_norm_any(
            data, norm_type, accumulate_dtype, foreach=use_foreach(foreach, data, grp.device)
        )
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
    if len(present) == len(params):
        param_norms = torch.stack(present)  # type: ignore[arg-type]
    else:
        zero = torch.zeros((), device=device, dtype=present[0].dtype)
        param_norms = torch.stack([zero if n is None else n for n in per_param])
    if total is None:
        total = torch.linalg.vector_norm(param_norms, norm_type)
    if scale is not None:
        factor = scale.to(device, param_norms.dtype, non_blocking=True)
        param_norms = param_norms * factor
        total = total * factor.to(total.dtype)
    return StepStats(
        param_norms, total, torch.isfinite(total), groups, norm_type, params, local_ok, names
    )
