"""Per flush: identical windows on every rank, events gathered, origin ranks named."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..events import Event
from .world import is_distributed

__all__ = ["DistContext", "agree_window_", "context", "merge_events", "nonfinite_ranks"]


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
    loss: Sequence[Sequence[float]], local_ok: Sequence[Sequence[float]],
    gave: Sequence[Sequence[bool]] | None = None,
) -> list[list[int]]:
    """For each step of a window, the ranks where the trouble started.

    The ranks whose own loss is non-finite are the origin (their NaN reached every rank
    through the gradient all-reduce), unless every rank's loss is (or none was given);
    then the ranks whose own gradient shards were non-finite; then, on a finite step, the
    ranks whose own positive loss is over :data:`OUTLIER_LOSS` times the median of the
    other ranks' (a spike in one rank's batch reaches every rank's gradients alike); otherwise
    every rank.

    Example:
        >>> nan = float("nan")
        >>> nonfinite_ranks([[1.0, 1.0], [1.0, nan]], [[1.0, 0.0], [1.0, 0.0]])
        [[0, 1], [1]]
        >>> nonfinite_ranks([[1.0, 0.9, 1.1], [1.2, 1.0, 900.0], [0.8, 1.1, 1.0]], [[1.0] * 3] * 3)
        [[0, 1, 2], [0, 1, 2], [1]]

    Args:
        loss: ``[world][n]`` each rank's own loss per step (NaN when not given).
        local_ok: ``[world][n]`` 1.0 where that rank's own gradients were finite.
        gave: ``[world][n]`` whether that rank gave a loss (default: every rank did);
            a rank without one (a pipeline stage before the last) is no spike's origin.
    """
    world = len(loss)
    n = len(loss[0]) if world else 0
    out: list[list[int]] = []
    for i in range(n):
        bad_loss = [r for r in range(world) if not math.isfinite(loss[r][i])]
        if len(bad_loss) == world:
            bad_loss = []
        bad_grad = [r for r in range(world) if local_ok[r][i] < 0.5]
        out.append(bad_loss or bad_grad or _outliers(
            [loss[r][i] for r in range(world) if gave is None or gave[r][i]],
            [r for r in range(world) if gave is None or gave[r][i]]) or list(range(world)))
    return out


#: A rank whose own loss is over this many times the median of the other ranks' losses
#: (all positive) is where a finite step's spike came from.
OUTLIER_LOSS = 10.0


def _outliers(losses: Sequence[float], ranks: Sequence[int]) -> list[int]:
    if len(losses) < 2 or not all(math.isfinite(x) and x > 0 for x in losses):
        return []  # a loss that may be negative (a log-likelihood, a return) has no ratio
    out = [r for i, (r, x) in enumerate(zip(ranks, losses))
           if x > OUTLIER_LOSS * statistics.median([*losses[:i], *losses[i + 1:]])]
    return out if len(out) < len(ranks) else []


def agree_window_(
    rows: Tensor, local_events: Sequence[Event], ctx: DistContext,
    absent: list[frozenset[int] | None] | None = None,
) -> tuple[list[list[int]], list[Event], list[tuple[int, list[int]]]]:
    """Make a flush window identical on every rank (called by the Guard at flush).

    One ``all_gather_object`` exchanges each rank's own loss, its local-finite flags and
    the events it added since the last flush; the loss column becomes the mean over the
    ranks that gave a loss (NaN when one of them was NaN; under pipelining only the last
    stage has one), then rank 0's rows are broadcast so that detectors and recovery see
    the same numbers everywhere.

    Args:
        rows: the live ``[n, 6 + n_params]`` telemetry rows (``Telemetry.pending_rows()``;
            the first 6 columns only under pipeline stages).
        local_events: events this rank added since the last flush.
        ctx: the run's :class:`DistContext`.
        absent: per pending step, the parameters (by index) without a gradient tensor on
            this rank (None: all had one); replaced in place, per step, by those without
            one on every rank (under DDP a parameter keeps none only when no rank's graph
            reached it; a rank that did not gather it makes no difference elsewhere).

    Returns:
        ``(origin ranks per step, merged events, split steps)``; see
        :func:`nonfinite_ranks` and :func:`merge_events`. Split steps: ``(index in the
        window, the ranks that skipped it)`` for the steps some ranks skipped and others
        took (their replicas differ from there on).
    """
    own: list[list[int] | None] | None = (
        None if absent is None else [None if a is None else sorted(a) for a in absent])
    mine: tuple[list[list[float]], list[Event], Any] = ([], list(local_events), own)
    if rows.shape[0]:
        mine = (rows[:, (0, 4, 5, 3)].T.cpu().tolist(), mine[1], own)  # off the hot path: per flush
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, mine, group=ctx.group)
    events = merge_events([g[1] for g in gathered])
    if absent is not None:
        absent[:] = _absent_everywhere([g[2] for g in gathered], len(absent))
    if not rows.shape[0]:
        return [], events, []
    loss, local_ok, given, skipped = (torch.tensor([g[0][c] for g in gathered]) for c in range(4))
    # every rank decides its skip alike (one norm, all-reduced or of identical gradients):
    # ranks that did not were given different gradients after the all-reduce, and their
    # replicas differ from that step on (found by a stranger: a NaN written into one rank's
    # gradient after DDP's all-reduce, skipped there alone, reported nowhere)
    took = skipped < 0.5
    split = [(i, [r for r in range(took.shape[0]) if not took[r, i]])
             for i in range(took.shape[1]) if 0 < int(took[:, i].sum()) < took.shape[0]]
    gave = given > 0.5
    mean = torch.where(gave, loss, 0.0).sum(dim=0) / gave.sum(dim=0)  # none gave: NaN
    rows[:, 0].copy_(mean.to(rows.device))
    buf = rows.contiguous()  # under pipeline stages a column slice of the ring buffer
    src = dist.get_global_rank(ctx.group, 0) if ctx.group is not None else 0
    dist.broadcast(buf, src=src, group=ctx.group)
    if buf.data_ptr() != rows.data_ptr():
        rows.copy_(buf)
    # a rank without a loss is no origin of a non-finite one
    own_loss = torch.where(gave, loss, 0.0).tolist()
    return nonfinite_ranks(own_loss, local_ok.tolist(), gave.tolist()), events, split


def _absent_everywhere(ranks: Sequence[Any], n: int) -> list[frozenset[int] | None]:
    """Per step, the parameters without a gradient tensor on every rank (None: none such,
    or a rank that does not know)."""
    out: list[frozenset[int] | None] = []
    for i in range(n):
        sets = [frozenset(r[i]) for r in ranks
                if isinstance(r, list) and len(r) == n and r[i] is not None]
        common = frozenset.intersection(*sets) if sets and len(sets) == len(ranks) else None
        out.append(common or None)
    return out


def name_ranks(ev: Event, steps: Sequence[int], origins: Sequence[Sequence[int]], world: int) -> None:
    """Name, on a ``nonfinite_grad``/``skip``/``grad_spike``/``loss_spike`` event, the
    rank(s) its step came from
    (``origins[i]``: the origin ranks of ``steps[i]``, from :func:`agree_window_`)."""
    if ev.kind not in ("nonfinite_grad", "skip", "grad_spike", "loss_spike") \
            or ev.step not in steps or "ranks" in ev.data:  # named already
        return
    ranks = list(origins[list(steps).index(ev.step)])
    ev.data["ranks"] = ranks
    if len(ranks) < world:
        ev.rank = ranks[0]
        ev.message += f" (from rank {', '.join(map(str, ranks))})"
