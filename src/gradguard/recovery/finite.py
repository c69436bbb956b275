"""Is the training state finite? The checks the recovery makes before it keeps a snapshot
(:func:`all_finite`, judging what training does not write, :func:`untrained_keys`, for NaN
only: a causal mask of -inf registered as a buffer is no corruption) and of weights an
optimizer step made NaN/Inf from finite gradients (:func:`weights_flag` on the device,
:func:`nonfinite_weights` on the host; :mod:`.ladder_weights`)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from .. import distributed
from ..measure import stored
from ..naming import layer_of

if TYPE_CHECKING:
    from ..guard import Guard


def untrained_keys(model: torch.nn.Module) -> set[str]:
    """The model's state-dict keys that training does not write: buffers and parameters
    that require no gradient (host attributes only)."""
    return {k for k, v in model.state_dict(keep_vars=True).items()
            if not (isinstance(v, torch.nn.Parameter) and v.requires_grad)}


def all_finite(obj: Any, nan_only: Any = ()) -> bool:
    """True when every floating tensor (and float) in ``obj`` is finite and none in
    ``nan_only`` holds NaN (±Inf allowed there: a mask, see :func:`snapshot_state`), on
    every rank: one host read per device, and under torch.distributed one all-reduce, so
    that every rank keeps (or drops) the same snapshot. DTensors are judged by their local
    shards, sparse tensors by their values."""
    groups: dict[tuple[torch.device, torch.dtype, bool], list[Tensor]] = {}

    def walk(x: Any, nan: bool = False) -> bool:
        if isinstance(x, Tensor):
            x = stored(x)
            if (x.is_floating_point() or x.is_complex()) and x.numel():
                groups.setdefault((x.device, x.dtype, nan), []).append(x.detach())
            return True
        if isinstance(x, dict):
            return all(walk(v, nan) for v in x.values())
        if isinstance(x, (list, tuple)):
            return all(walk(v, nan) for v in x)
        return not isinstance(x, float) or (math.isfinite(x) or (nan and not math.isnan(x)))

    # one kernel per (device, dtype), one host read per device
    flags: dict[torch.device, list[Tensor]] = {}
    ok = walk(obj) and walk(nan_only, True)
    for (device, _, nan), ts in groups.items():
        top = _max_abs(ts)
        flags.setdefault(device, []).append(
            (~torch.isnan(top) if nan else torch.isfinite(top)).all())
    ok = ok and all(bool(torch.stack(f).all()) for f in flags.values())
    if distributed.is_distributed():
        # on the parameters' device: NCCL reduces CUDA tensors only
        flag = torch.tensor([float(ok)], device=next(iter(flags), torch.device("cpu")))
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        ok = bool(flag.item())
    return ok


def weights_flag(guard: Guard) -> torch.Tensor | None:
    """1 (a uint8 on the device) when the weights (the parameters the guard measures) hold
    NaN/Inf, else 0: one reduction per (device, dtype), no host read. None under
    ``torch.distributed``: each rank holds its own shards, and a rollback must be decided
    alike everywhere."""
    if distributed.world_size() > 1:
        return None
    params, device = guard.telemetry.params, guard.telemetry.device
    flags = [torch.isfinite(_max_abs([params[i] for i in idx])).all().to(device)
             for idx in _trained(guard)]
    if not flags:
        return None
    return (~torch.stack(flags).all()).to(torch.uint8)


def nonfinite_weights(guard: Guard) -> list[str]:
    """The layers whose weights hold NaN/Inf: a host read, on the path of a rollback or an
    abort only (:mod:`.ladder_weights`); none under ``torch.distributed``."""
    if distributed.world_size() > 1:
        return []
    params, bad = guard.telemetry.params, []
    for idx in _trained(guard):
        ok = torch.isfinite(_max_abs([params[i] for i in idx])).tolist()
        bad += [i for i, fine in zip(idx, ok) if not fine]
    return list(dict.fromkeys(layer_of(guard.names[i]) for i in sorted(bad)))


def _trained(guard: Guard) -> list[list[int]]:
    """The positions of the guard's floating parameters that train (not a frozen one: it
    may hold a mask's -inf by design), one list per (device, dtype): one kernel each."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, p in enumerate(guard.telemetry.params):
        if p.is_floating_point() and p.numel() and p.requires_grad:
            groups.setdefault((p.device, p.dtype), []).append(i)
    return list(groups.values())


def _max_abs(ts: list[Tensor]) -> Tensor:
    """max |x| of each tensor (NaN propagates, Inf is Inf), stacked: one foreach kernel and
    no temporary the size of a tensor."""
    return torch.stack(torch._foreach_norm([t.detach() for t in ts], math.inf))
