"""The snapshots a rollback restores from: a ring in host memory, copied to
``snapshot_dir`` by a background writer, each with the loss level it was taken at."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

from ..errors import GradGuardWarning
from . import actions
from .snapshots import DiskSnapshotStore, MemorySnapshotStore, SnapshotWriter

if TYPE_CHECKING:
    from ..guard import Guard


class SnapshotRing:
    """``keep`` snapshots in memory (``max_bytes`` bounds them), and on disk when a
    directory is given; :class:`~gradguard.recovery.Recovery` owns one."""

    def __init__(self, keep: int, max_bytes: int | None, directory: Any = None) -> None:
        self.keep_n = keep
        #: the snapshots rollbacks restore from (host memory, pinned from CUDA)
        self.store = MemorySnapshotStore(keep=keep, max_bytes=max_bytes)
        #: their copies on disk, when a directory is set
        self.disk = None if directory is None else DiskSnapshotStore(directory, keep=keep)
        #: snapshot step -> the loss level it was taken at (the newest ``keep``)
        self.levels: dict[int, float | None] = {}
        self._writer: SnapshotWriter | None = None
        self._write_warned = False

    def keep(self, guard: Guard, step: int, *, disk: bool = True) -> bool:
        """Snapshot the guard's model, optimizer and clip policy at ``step`` (False, keeping
        nothing, when a value is NaN/Inf)."""
        state = actions.snapshot_state(guard, step)
        if state is None:
            return False
        busy = self._writer.busy if self._writer is not None else set()
        self.store.save(step, state, busy=busy)
        if self.disk is not None and disk:
            if self._writer is None:
                self._writer = SnapshotWriter(self.disk)
            self._warn_write_error()
            self._writer.submit(step, self.store.load(-1))
        return True

    def remember(self, step: int, level: float | None) -> None:
        """The loss level the snapshot of ``step`` was taken at (the newest ``keep`` kept:
        no store holds more)."""
        self.levels = dict(sorted({**self.levels, step: level}.items())[-self.keep_n:])

    def level(self, initial: float | None) -> float | None:
        """The loss level the snapshot a rollback would load was taken at (the newest in
        memory, else on disk after a resume; None: unknown). The weights before the first
        step are at the fresh model's level, ``initial``."""
        steps = self.store.steps()
        if not steps and self.disk is not None:
            steps = self.disk.steps()
        if not steps:
            return None
        return initial if steps[-1] == -1 else self.levels.get(steps[-1])

    def load(self, back: int) -> dict[str, Any] | None:
        """A copy of a good snapshot: from memory, else (after a resume) from disk."""
        snap = self.store.load_good(back=back)
        if snap is None and self.disk is not None:
            self.wait()
            snap = self.disk.load_good(back=back)
        return snap

    def clear(self) -> None:
        """Drop every snapshot (the optimizer's parameter groups changed)."""
        self.store.clear()
        if self.disk is not None:
            self.wait()
            self.disk.clear()

    def wait(self) -> None:
        """Block until the snapshots handed to the writer are on disk."""
        if self._writer is not None:
            self._writer.wait()
            self._warn_write_error()

    def close(self) -> None:
        """Finish the disk writes and stop the writer."""
        if self._writer is not None:
            self._writer.close()
            self._warn_write_error()  # a write that failed last: warned before it goes
            self._writer = None

    def _warn_write_error(self) -> None:
        err = self._writer.error if self._writer is not None else None
        if err is not None and not self._write_warned and self.disk is not None:
            self._write_warned = True
            warnings.warn(
                f"gradguard: writing a snapshot to {self.disk.directory} failed ({err}); the "
                "previous snapshot files are intact and rollbacks use the in-memory "
                "snapshots; training goes on", GradGuardWarning, stacklevel=5)
