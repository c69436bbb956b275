"""Per step: global gradient norms on any device mesh with one all-reduce.

Each rank raises its local shard norms to the p-th power and weights each by
``shards / R`` (``R``: the ranks that hold the model; ``shards``: the product of the
sizes of the mesh dimensions that shard it), so that one SUM over the ``R`` ranks counts
every shard once, however many ranks replicate it (``MAX`` plus a NaN flag for the
inf-norm). Pipeline stages put their slots side by side in the same buffer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .world import is_dtensor

__all__ = ["NormReducer", "Reduced", "reduce_partial_grads_", "shard_count"]


_ALLOWED = "Shard, _StridedShard or Replicate"


def _dim_name(mesh: Any, dim: int) -> str:
    names = getattr(mesh, "mesh_dim_names", None)
    return repr(names[dim]) if names else str(dim)


def shard_count(t: Any, what: str = "gradient") -> int:
    """Number of distinct shards of a DTensor: the product of the sizes of the mesh
    dimensions that shard it (``Shard`` or ``_StridedShard``, which FSDP puts on the dp
    dimension of a tensor-parallel weight); ``Replicate`` dimensions hold copies.

    Raises:
        TypeError: for ``Partial`` (or any other) placements, naming ``what``, the mesh
            dimension and what is allowed.
    """
    mesh, n = t.device_mesh, 1
    for dim, pl in enumerate(t.placements):
        if pl.is_shard() or hasattr(pl, "split_factor"):  # _StridedShard is not a Shard
            n *= mesh.size(dim)
        elif not pl.is_replicate():
            hint = (
                " Partial gradients are unreduced sums (tensor parallel without FSDP gives "
                "them to replicated parameters such as SequenceParallel norms): call "
                "gradguard.distributed.reduce_partial_grads_(params) after backward()."
                if pl.is_partial()
                else ""
            )
            raise TypeError(
                f"{what}: placement {pl!r} on mesh dimension {_dim_name(mesh, dim)} of "
                f"{mesh}: gradguard measures DTensors placed {_ALLOWED}.{hint}"
            )
    return n


def reduce_partial_grads_(params: Iterable[Tensor]) -> int:
    """Reduce ``Partial`` DTensor gradients to ``Replicate`` in place, with one all-reduce
    per (mesh dimension, reduce op) for all of them; the optimizer would do the same
    reduction implicitly, so this moves a cost rather than adding one.

    Returns:
        the number of gradients reduced (0 outside torch.distributed).
    """
    from torch.distributed.tensor import DTensor, Replicate

    todo: dict[tuple[Any, ...], list[Tensor]] = {}
    for p in params:
        g = p.grad
        if not is_dtensor(g) or not any(pl.is_partial() for pl in g.placements):  # type: ignore[union-attr]
            continue
        partial = tuple((d, pl.reduce_op) for d, pl in enumerate(g.placements) if pl.is_partial())  # type: ignore[union-attr]
        todo.setdefault((g.device_mesh, partial, g.dtype), []).append(p)  # type: ignore[union-attr]
    for (mesh, partial, _), ps in todo.items():
        grads: list[Any] = [p.grad for p in ps]
        flat = torch.cat([g.to_local().reshape(-1) for g in grads])
        for dim, op in partial:
            if op not in ("sum", "avg", "max", "min"):
                raise TypeError(f"reduce_partial_grads_: Partial({op!r}) cannot be reduced")
            red = {"max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}.get(op, dist.ReduceOp.SUM)
            dist.all_reduce(flat, op=red, group=mesh.get_group(dim))
            if op == "avg":
                flat /= mesh.size(dim)
        for p, g, part in zip(ps, grads, flat.split([g.to_local().numel() for g in grads])):
            places = [Replicate() if pl.is_partial() else pl for pl in g.placements]
            local = part.view_as(g.to_local())
            p.grad = DTensor.from_local(
                local, mesh, places, run_check=False, shape=g.shape, stride=g.stride()
            )
    return sum(len(ps) for ps in todo.values())


# ---- per step: one all-reduce for every parameter on every mesh -------------------------


@dataclass
class Reduced:
    """Global norms out of one all-reduce (float64 device tensors, nothing synced).

    Attributes:
        norms: ``[k, n]`` global norm of each of this rank's parameters.
        total: ``[k]`` global norm over all parameters (every stage's, under pipelining).
        local_ok: scalar bool, ``isfinite`` of this rank's own local norms.
    """

    norms: Tensor
    total: Tensor
    local_ok: Tensor


def _as_group(group: Any) -> Any:
    """A ProcessGroup from a ProcessGroup or a 1-D DeviceMesh (``mesh["pp"]``)."""
    if hasattr(group, "get_group") and hasattr(group, "ndim"):
        if group.ndim != 1:
            raise ValueError(f"pipeline_group={group!r}: a DeviceMesh must be 1-D (mesh['pp'])")
        return group.get_group()
    return group


class NormReducer:
    """How this rank's local gradient norms become global ones in one all-reduce.

    Without pipeline stages every rank holds a shard or a replica of every parameter and
    the buffer holds one slot per parameter. With stages (``pipeline_group``: the group of
    ranks holding the *other* stages, one rank per stage, e.g. ``mesh["pp"]``), each stage
    writes its parameters' slots side by side in one buffer all-reduced over the world:
    per-parameter norms stay the stage's own and the total is the whole model's. Building
    it with a group costs one ``all_gather_object`` (the stages' parameter counts).

    Args:
        n_params: number of parameters this rank measures.
        pipeline_group: None, or a ProcessGroup / 1-D DeviceMesh over the pipeline stages.
        names: the parameters' names, for errors (their positions otherwise).

    Example:
        >>> import torch, gradguard.distributed as ggd
        >>> reducer = ggd.NormReducer(2)
        >>> ps = [torch.nn.Parameter(torch.ones(3)) for _ in range(2)]
        >>> print(reducer.reduce(torch.ones(1, 2), ps, 2.0))   # one process: nothing to do
        None
    """

    def __init__(
        self, n_params: int, pipeline_group: Any = None, names: Sequence[str] | None = None
    ) -> None:
        self.n_params = n_params
        self.names = list(names) if names is not None else [str(i) for i in range(n_params)]
        self.stages, self.offset, self.length = 1, 0, n_params
        self._inv_cache: dict[tuple[Any, ...], Tensor] = {}
        self._rank_cache: dict[int, tuple[Any, frozenset[int]]] = {}
        if pipeline_group is None:
            return
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("pipeline_group=...: torch.distributed is not initialised")
        group = _as_group(pipeline_group)
        sizes: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(sizes, n_params, group=group)  # once, at construction
        me = dist.get_rank(group)
        self.stages, self.offset, self.length = len(sizes), sum(sizes[:me]), sum(sizes)
        if dist.get_world_size() % self.stages:
            raise ValueError(
                f"pipeline_group of {self.stages} ranks: the world of {dist.get_world_size()} "
                "ranks must split into that many equal stages"
            )

    def _group(self, meshes: dict[int, Any]) -> tuple[Any, int]:
        """(process group, its size): every rank holding a copy of this rank's parameters."""
        world = dist.get_world_size()
        if self.stages > 1:
            return None, world // self.stages  # the stages share one world-wide buffer
        big = max(meshes.values(), key=lambda m: m.size())
        outside = [m for m in meshes.values() if not self._ranks(m) <= self._ranks(big)]
        if outside:
            raise NotImplementedError(
                f"parameters on {outside[0]} and on {big}: gradguard combines norms over "
                "meshes that lie inside one mesh (sub-meshes of init_device_mesh)"
            )
        if big.size() == world:
            return None, world
        if big.ndim == 1:
            return big.get_group(), big.size()
        raise NotImplementedError(
            f"a {big.ndim}-D device mesh of {big.size()} ranks inside a world of {world}: "
            "if the other ranks hold pipeline stages, pass pipeline_group=mesh['pp']"
        )

    def _ranks(self, mesh: Any) -> frozenset[int]:
        key = id(mesh)
        if key not in self._rank_cache:  # once per mesh object: meshes outlive the steps
            self._rank_cache[key] = (mesh, frozenset(mesh.mesh.flatten().tolist()))
        return self._rank_cache[key][1]

    def _inv_replicas(self, placed: Sequence[Any], size: int, device: torch.device) -> Tensor:
        reps: list[float] = []
        for i, t in enumerate(placed):
            n = 1
            if is_dtensor(t):
                n = shard_count(t, f"parameter {self.names[i]!r} of shape {tuple(t.shape)}")
                if size % t.device_mesh.size():
                    raise NotImplementedError(
                        f"parameter {self.names[i]!r}: its mesh {t.device_mesh} does not "
                        f"tile the {size} ranks that hold the model"
                    )
            reps.append(n / size)  # shards are held by size / n ranks each
        key = (device, *reps)
        if key not in self._inv_cache:  # one host->device copy per placement layout
            self._inv_cache[key] = torch.tensor(reps, dtype=torch.float64, device=device)
        return self._inv_cache[key]

    def reduce(self, local: Tensor, placed: Sequence[Any], norm_type: float) -> Reduced | None:
        """Global norms from ``local`` (``[k, n]`` local norms, 0 where no gradient) with
        one all-reduce, or None when the local norms are global already (no DTensor, no
        pipeline stages). ``placed[i]`` is the tensor whose placement counts (parameter
        ``i``'s gradient, or the parameter itself when it has none). Squares are summed in
        float64 so that norms of 1e20 and up do not overflow; NaN is kept (for the
        inf-norm a NaN flag travels with the values, because ``MAX`` may drop a NaN)."""
        meshes = {id(t.device_mesh): t.device_mesh for t in placed if is_dtensor(t)}
        if not meshes and self.stages == 1:
            return None
        if len(placed) != self.n_params:
            raise ValueError(f"NormReducer: built for {self.n_params} parameters, got {len(placed)}")
        group, size = self._group(meshes)
        x = local.to(torch.float64)
        k, mine = x.shape[0], slice(self.offset, self.offset + self.n_params)
        ok = torch.isfinite(x).all()
        inv = self._inv_replicas(placed, size, x.device)  # also refuses Partial placements
        if math.isinf(norm_type):
            buf = x.new_zeros(k, 2, self.length)
            nan = torch.isnan(x)
            buf[:, 0, mine] = torch.where(nan, math.inf, x)
            buf[:, 1, mine] = nan.double()
            dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=group)
            vals, flags = buf[:, 0], buf[:, 1] > 0
            norms = torch.where(flags, math.nan, vals)
            total = torch.where(flags.any(dim=1), math.nan, vals.max(dim=1).values)
            return Reduced(norms[:, mine], total, ok)
        buf = x.new_zeros(k, self.length)
        buf[:, mine] = x.pow(norm_type) * inv
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
        return Reduced(buf[:, mine].pow(1.0 / norm_type), buf.sum(dim=1).pow(1.0 / norm_type), ok)

    def reduce_grad_norms_(
        self, per_param: list[Tensor | None], params: Sequence[Tensor], norm_type: float
    ) -> tuple[Tensor | None, Tensor | None]:
        """Replace the local gradient norms in ``per_param`` (None: no gradient) by global
        ones. Returns ``(global total, isfinite of this rank's own norms)``, both None when
        no collective was needed. Every rank must call it at every step."""
        placed = [p if p.grad is None else p.grad for p in params]
        if self.stages == 1 and not any(is_dtensor(t) for t in placed):
            return None, None
        dev = next((n.device for n in per_param if n is not None), None)
        dev = dev or (params[0].device if params else torch.device("cpu"))
        zero = torch.zeros((), device=dev, dtype=torch.float64)
        local = torch.stack([zero if n is None else n.to(torch.float64) for n in per_param])
        out = self.reduce(local[None], placed, norm_type)
        assert out is not None
        dtypes = [n.dtype for n in per_param if n is not None]
        total_dtype = dtypes[0] if dtypes else torch.float32
        for d in dtypes:  # as torch.stack promotes the local norms in one process
            total_dtype = torch.promote_types(total_dtype, d)
        for i, (old, g) in enumerate(zip(per_param, out.norms[0].unbind())):
            per_param[i] = g.to(total_dtype if old is None else old.dtype)
        return out.total[0].to(total_dtype), out.local_ok
