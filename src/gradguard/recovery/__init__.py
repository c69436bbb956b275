"""Recovery: skip -> LR back-off -> rollback -> abort.

:class:`Recovery` is the glue between a :class:`~gradguard.Guard` and the pure ladder
(:mod:`.ladder`): it turns what the guard saw (a skipped step, a flushed window, events)
into triggers, and hands the ladder's actions to :mod:`.actions`. Snapshots live in
:mod:`.snapshots`.

Decisions use host-known values only: the skip flag the guard already read (non-fused
optimizers: the one sync per step the guard pays anyway), a skip flag that stayed on the
device (fused optimizers, a ``GradScaler``) copied to the host without waiting and heard
once the copy completed (:mod:`.late`), or the flushed window (the flags not heard yet,
and every flag under ``torch.distributed``: ranks that see the same all-reduced window
take the same decisions).

Snapshots are taken at flush steps, every ``snapshot_every`` steps, only while healthy (no
skip, spike or back-off in the window), in CPU memory (default) or written atomically to
``snapshot_dir``. A snapshot containing NaN/Inf is never kept.
"""

from ._recovery import Recovery
from .defaults import (
    BACKOFF,
    MAX_ROLLBACKS,
    RELAPSE_BACKOFF,
    RELAPSE_WINDOW_FACTOR,
    RESET_MOMENTS,
    RESTORE_STEPS,
    SKIP_PATIENCE,
    SNAPSHOT_EVERY,
)

# named defaults outside __all__, importable from here as they were before the split
from .defaults import PROGRESS_STEPS as PROGRESS_STEPS
from .defaults import RECOVERY_WINDOW as RECOVERY_WINDOW
from .defaults import SPIKE_GRACE as SPIKE_GRACE
from .defaults import STALL_FACTOR as STALL_FACTOR
from .defaults import UNHEALTHY as UNHEALTHY
from .defaults import ResetMoments as ResetMoments
from .ladder import Action, LadderConfig, LadderState, Trigger, transition
from .snapshots import KEEP, DiskSnapshotStore, MemorySnapshotStore, SnapshotError

__all__ = [
    "BACKOFF", "KEEP", "MAX_ROLLBACKS", "RELAPSE_BACKOFF", "RELAPSE_WINDOW_FACTOR",
    "RESET_MOMENTS", "RESTORE_STEPS", "SKIP_PATIENCE", "SNAPSHOT_EVERY", "Action",
    "DiskSnapshotStore", "LadderConfig", "LadderState", "MemorySnapshotStore", "Recovery",
    "SnapshotError", "Trigger", "transition",
]
