"""torch.distributed support: global norms on any device mesh, identical windows.

Two rules make a guarded run behave the same on every rank:

* **per step** (hot path): DDP gradients are already averaged, so their norms are global as
  they are. DTensor gradients (FSDP2, tensor parallel, HSDP, 2-D meshes, several meshes
  at once) are shards: each rank raises its local norms to the p-th power, divides each by
  the number of ranks holding an identical copy of that shard, and **one** all-reduce over
  every rank that holds the model sums them (``MAX`` with a NaN flag for the inf-norm).
  A parameter sharded over a 2-D mesh is thus summed over exactly the dimensions that
  shard it, and a dp-only norm weight has its tensor-parallel replicas counted once. Every
  per-parameter norm, the total, the finite flag and the clip coefficient come out of that
  one buffer, so a NaN in any rank's shard makes every rank skip the same step.
  Pipeline stages put their norms side by side in the same buffer (:class:`NormReducer`).
* **per flush** (off the hot path): the ranks exchange their local losses and local
  finite flags in one ``all_gather_object`` (which also carries events a rank added on its
  own), and rank 0's telemetry window is broadcast, so detectors and recovery decide from
  identical numbers. Sinks write on rank 0 only by default.

Nothing here runs outside ``torch.distributed`` (one process: every helper is a no-op).
Modules: ``world`` (ranks, wrapper-free names), ``norms`` (the per-step reduction),
``agree`` (the per-flush agreement).
"""

from __future__ import annotations

from .agree import DistContext, agree_window_, context, merge_events, name_ranks, nonfinite_ranks
from .norms import NormReducer, Reduced, reduce_partial_grads_, shard_count
from .world import (
    WRAPPER_ATTRS,
    clean_name,
    is_distributed,
    is_dtensor,
    rank,
    unwrap,
    world_size,
)

__all__ = [
    "WRAPPER_ATTRS",
    "DistContext",
    "NormReducer",
    "Reduced",
    "agree_window_",
    "clean_name",
    "context",
    "is_distributed",
    "is_dtensor",
    "merge_events",
    "name_ranks",
    "nonfinite_ranks",
    "rank",
    "reduce_partial_grads_",
    "shard_count",
    "unwrap",
    "world_size",
]
