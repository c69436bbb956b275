"""torch.distributed support: global norms from sharded gradients, identical windows.

Two rules make a guarded run behave the same on every rank:

* **per step** (hot path): DDP gradients are already averaged, so their norms are global as
  they are. FSDP2 (``fully_shard``) gradients are DTensor shards: the local norms are
  raised to the p-th power, weighted by the number of replicas of each shard, and summed
  with **one** all-reduce per device mesh for all parameters (``MAX`` for the inf-norm).
  The total norm, the finite flag and the clip coefficient are then global, so a NaN on
  any rank makes every rank skip the same step with no extra collective.
* **per flush** (off the hot path): the ranks exchange their local losses and local
  finite flags in one ``all_gather_object`` (which also carries events a rank added on its
  own), and rank 0's telemetry window is broadcast, so detectors and recovery decide from
  identical numbers. Sinks write on rank 0 only by default.

Nothing here runs outside ``torch.distributed`` (one process: every helper is a no-op).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .events import Event

__all__ = [
    "DistContext",
    "agree_window_",
    "allreduce_norms",
    "context",
    "is_distributed",
    "is_dtensor",
    "merge_events",
    "name_ranks",
    "nonfinite_ranks",
    "rank",
    "reduce_sharded_norms_",
    "unwrap",
    "world_size",
]


def is_distributed() -> bool:
    """True inside an initialised ``torch.distributed`` process group of 2+ ranks.

    Example:
        >>> import gradguard.distributed as ggd
        >>> ggd.is_distributed(), ggd.rank(), ggd.world_size()
        (False, 0, 1)
    """
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 outside torch.distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of ranks (1 outside torch.distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_dtensor(t: object) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (checked without importing it)."""
    return t is not None and hasattr(t, "device_mesh") and hasattr(t, "placements")


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside ``DistributedDataParallel`` / ``DataParallel`` (their
    parameter names carry a ``module.`` prefix), the model itself otherwise.

    Example:
        >>> import torch, gradguard.distributed as ggd
        >>> net = torch.nn.Linear(2, 1)
        >>> ggd.unwrap(torch.nn.DataParallel(net)) is net
        True
    """
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        inner = model.module
        assert isinstance(inner, nn.Module)
        return inner
    return model


# ---- per step: global norms of sharded gradients ---------------------------------------


def _mesh_info(t: Any) -> tuple[Any, float]:
    """(device mesh, replicas): how many ranks hold an identical copy of each local shard.

    Summing ``local**p / replicas`` over every rank of the mesh gives ``global**p``.
    """
    mesh = t.device_mesh
    replicas = 1
    for dim, placement in enumerate(t.placements):
        if placement.is_shard():
            continue
        if placement.is_replicate():
            replicas *= mesh.size(dim)
            continue
        raise TypeError(
            f"gradient placement {placement!r} is not supported: gradguard measures Shard or "
            "Replicate DTensor gradients (reduce Partial gradients before guard.step())"
        )
    return mesh, float(replicas)


def _mesh_group(mesh: Any) -> Any:
    if mesh.ndim == 1:
        return mesh.get_group()
    if mesh.size() == world_size():
        return None  # the default group spans the whole mesh
    raise NotImplementedError(
        f"a {mesh.ndim}-D device mesh of {mesh.size()} ranks inside a world of "
        f"{world_size()} ranks: gradguard sums sharded norms over 1-D meshes or meshes that "
        "span every rank"
    )


def allreduce_norms(local: Tensor, replicas: Tensor, norm_type: float, group: Any = None) -> Tensor:
    """Global norms from local norms of shards: ``(sum_r local_r**p / replicas)**(1/p)``,
    or ``max_r local_r`` for the inf-norm, with **one** all-reduce.

    Works in float64 so that squares of large norms (1e20 and up) do not overflow. NaN is
    kept: a NaN local norm on any rank gives a NaN global norm on every rank (for the
    inf-norm a NaN flag travels with the values, because ``MAX`` may drop a NaN).

    Args:
        local: ``[..., n]`` local norms (any float dtype).
        replicas: ``[n]`` number of ranks holding each shard identically.
        norm_type: p (> 0, or ``math.inf``).
        group: the process group of the mesh (None: the default group).

    Returns:
        float64 tensor of the shape of ``local``.
    """
    x = local.to(torch.float64)
    if math.isinf(norm_type):
        nan = torch.isnan(x)
        buf = torch.cat([torch.where(nan, math.inf, x).reshape(-1), nan.double().reshape(-1)])
        dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=group)
        vals, flags = buf.split(x.numel())
        return torch.where(flags > 0, math.nan, vals).reshape(x.shape)
    buf = x.pow(norm_type) / replicas.to(x.device, torch.float64)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    return buf.pow(1.0 / norm_type)


def reduce_sharded_norms_(
    per_param: list[Tensor | None], params: Sequence[Tensor], norm_type: float
) -> Tensor | None:
    """Replace the local norms of DTensor parameters in ``per_param`` by global norms.

    ``per_param[i]`` is the norm of parameter ``i``'s *local* gradient shard (None without
    a gradient, counted as 0). Every DTensor parameter takes part whether or not it has a
    gradient on this rank, so every rank issues the same collectives: one all-reduce per
    device mesh (one in total for FSDP2). Plain tensors (DDP, replicated) are left alone.

    Returns:
        ``isfinite`` of this rank's own contribution (before the all-reduce), a device bool
        scalar, or None when no parameter is a DTensor.
    """
    # keyed by the mesh itself: fully_shard on each submodule makes equal, distinct meshes
    meshes: dict[Any, tuple[list[int], list[float]]] = {}
    for i, p in enumerate(params):
        ref = p if is_dtensor(p) else p.grad
        if not is_dtensor(ref):
            continue
        mesh, reps = _mesh_info(ref if p.grad is None else p.grad)
        entry = meshes.setdefault(mesh, ([], []))
        entry[0].append(i)
        entry[1].append(reps)
    if not meshes:
        return None
    local_ok: Tensor | None = None
    for mesh, (idx, replicas) in meshes.items():
        dev = next((per_param[i] for i in idx if per_param[i] is not None), None)
        device = dev.device if dev is not None else torch.device(mesh.device_type)
        zero = torch.zeros((), device=device, dtype=torch.float64)
        local = torch.stack(
            [zero if per_param[i] is None else per_param[i].to(torch.float64) for i in idx]  # type: ignore[union-attr]
        )
        ok = torch.isfinite(local).all()
        local_ok = ok if local_ok is None else local_ok & ok
        glob = allreduce_norms(
            local, torch.tensor(replicas, dtype=torch.float64), norm_type, _mesh_group(mesh)
        )
        for j, i in enumerate(idx):
            old = per_param[i]
            per_param[i] = glob[j].to(torch.float32 if old is None else old.dtype)
    return local_ok


# ---- per flush: identical windows, gathered events -----------------------------------


@dataclass
class DistContext:
    """The rank and world of a guarded run (``None`` context outside torch.distributed)."""

    rank: int
    world_size: int
    group: Any = None


def context() -> DistContext | None:
    """The current :class:`DistContext`, or None in a single process."""
    if not is_distributed():
        return None
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size())


def _event_key(e: Event) -> tuple[Any, ...]:
    return (e.kind, e.step, e.layer, e.message)


def merge_events(per_rank: Sequence[Sequence[Event]]) -> list[Event]:
    """Merge events gathered from every rank: an event every rank produced (an identical
    decision) appears once with ``rank=None``; one seen on some ranks only appears once,
    naming the first rank that saw it (unless it already names one). Step order is kept.
    """
    n = len(per_rank)
    seen: dict[tuple[Any, ...], list[Any]] = {}
    for r, events in enumerate(per_rank):
        for e in events:
            entry = seen.setdefault(_event_key(e), [e, set()])
            entry[1].add(r)
    out: list[Event] = []
    for e, ranks in seen.values():
        if e.rank is None and len(ranks) < n:
            e.rank = min(ranks)
        out.append(e)
    out.sort(key=lambda e: e.step)
    return out


def nonfinite_ranks(
    loss: Sequence[Sequence[float]], local_ok: Sequence[Sequence[float]]
) -> list[list[int]]:
    """For each step of a window, the ranks where the trouble started.

    The ranks whose own loss is non-finite are the origin (their NaN reached every rank
    through the gradient all-reduce), unless every rank's loss is (or none was given);
    then the ranks whose own gradient shards were non-finite; otherwise every rank.

    Example:
        >>> nan = float("nan")
        >>> nonfinite_ranks([[1.0, 1.0], [1.0, nan]], [[1.0, 0.0], [1.0, 0.0]])
        [[0, 1], [1]]

    Args:
        loss: ``[world][n]`` each rank's own loss per step (NaN when not given).
        local_ok: ``[world][n]`` 1.0 where that rank's own gradients were finite.
    """
    world = len(loss)
    n = len(loss[0]) if world else 0
    out: list[list[int]] = []
    for i in range(n):
        bad_loss = [r for r in range(world) if not math.isfinite(loss[r][i])]
        if len(bad_loss) == world:
            bad_loss = []
        bad_grad = [r for r in range(world) if local_ok[r][i] < 0.5]
        out.append(bad_loss or bad_grad or list(range(world)))
    return out


def agree_window_(
    rows: Tensor, local_events: Sequence[Event], ctx: DistContext
) -> tuple[list[list[int]], list[Event]]:
    """Make a flush window identical on every rank (called by the Guard at flush).

    One ``all_gather_object`` exchanges each rank's own loss, its local-finite flags and
    the events it added since the last flush; the loss column becomes the mean over ranks
    (NaN when any rank's loss was), then rank 0's rows are broadcast so that detectors and
    recovery see the same numbers everywhere.

    Args:
        rows: the live ``[n, 5 + n_params]`` telemetry rows (``Telemetry.pending_rows()``).
        local_events: events this rank added since the last flush.
        ctx: the run's :class:`DistContext`.

    Returns:
        ``(origin ranks per step, merged events)``; see :func:`nonfinite_ranks` and
        :func:`merge_events`.
    """
    mine: tuple[list[float], list[float], list[Event]]
    if rows.shape[0]:
        host = rows[:, (0, 4)].cpu()  # off the hot path: once per flush
        mine = (host[:, 0].tolist(), host[:, 1].tolist(), list(local_events))
    else:
        mine = ([], [], list(local_events))
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, mine, group=ctx.group)
    losses = [g[0] for g in gathered]
    local_ok = [g[1] for g in gathered]
    events = merge_events([g[2] for g in gathered])
    if rows.shape[0]:
        mean = torch.tensor(losses, dtype=torch.float32).mean(dim=0)
        rows[:, 0].copy_(mean.to(rows.device))
        src = dist.get_global_rank(ctx.group, 0) if ctx.group is not None else 0
        dist.broadcast(rows, src=src, group=ctx.group)
    return nonfinite_ranks(losses, local_ok), events


def name_ranks(ev: Event, steps: Sequence[int], origins: Sequence[Sequence[int]], world: int) -> None:
    """Name, on a ``nonfinite_grad``/``skip`` event, the rank(s) its step came from
    (``origins[i]``: the origin ranks of ``steps[i]``, from :func:`agree_window_`)."""
    if ev.kind not in ("nonfinite_grad", "skip") or ev.step not in steps:
        return
    ranks = list(origins[list(steps).index(ev.step)])
    ev.data["ranks"] = ranks
    if len(ranks) < world:
        ev.rank = ranks[0]
        ev.message += f" (from rank {', '.join(map(str, ranks))})"
