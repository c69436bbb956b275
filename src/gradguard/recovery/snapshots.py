"""Snapshot stores: model, optimizer and policy state kept in memory or on disk.

Snapshots own their memory: :func:`copy_state` makes deep, detached copies on the way in
and on the way out, so a restored optimizer never shares a tensor with a stored snapshot
(``Optimizer.load_state_dict`` keeps tensors that are already on the right device as they
are: without the copy, the live optimizer state *would be* the snapshot, and every later
step would rewrite it). Disk snapshots are written to a temp file, fsynced, and
``os.replace``d into place, so a killed process never leaves a half file.
"""

from __future__ import annotations

import os
import queue
import tempfile
import threading
import warnings
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import GradGuardWarning, caller_stacklevel
from ..rundir import dir_arg, temp_file

#: Snapshots kept (a second rollback in a row goes one snapshot further back).
KEEP = 2
SNAPSHOT_PREFIX = "snapshot-"
SNAPSHOT_SUFFIX = ".pt"


class SnapshotError(ValueError):
    """A snapshot file cannot be read (truncated, corrupt, or not a gradguard snapshot)."""


def copy_state(obj: Any, device: torch.device | str = "cpu", into: Any = None) -> Any:
    """A deep copy of a (nested) state dict with every tensor detached and copied to
    ``device``: the copy shares no storage with ``obj``. ``into``: an earlier copy of the
    same structure whose tensors are reused as destinations where shape and dtype match
    (no new allocation for a ring of snapshots). Copies from a CUDA device go into pinned
    host memory without blocking; :func:`wait_copies` makes them safe to read."""
    if isinstance(obj, Tensor):
        src = obj.detach()
        if (isinstance(into, Tensor) and into.shape == src.shape and into.dtype == src.dtype
                and into.layout == src.layout
                and into.device == torch.device(device)):
            return into.copy_(src, non_blocking=src.is_cuda)
        if src.is_cuda and not src.is_sparse and torch.device(device).type == "cpu":
            dst = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
            return dst.copy_(src, non_blocking=True)
        return src.to(device, copy=True)
    if isinstance(obj, dict):
        old: dict[Any, Any] = into if isinstance(into, dict) else {}
        return {k: copy_state(v, device, old.get(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        seq = into if isinstance(into, (list, tuple)) and len(into) == len(obj) else [None] * len(obj)
        return type(obj)(copy_state(v, device, w) for v, w in zip(obj, seq))
    return obj


def wait_copies() -> None:
    """Wait for non-blocking device-to-host snapshot copies (a no-op without CUDA)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.current_stream().synchronize()


def state_bytes(obj: Any) -> int:
    """Bytes held by the tensors of a (nested) state."""
    if isinstance(obj, Tensor):
        if obj.is_sparse:  # what it stores, not its dense size
            return (obj._values().numel() * obj.element_size()
                    + obj._indices().numel() * obj._indices().element_size())
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(v) for v in obj)
    return 0


class MemorySnapshotStore:
    """Keeps the last ``keep`` snapshots in CPU memory (pinned when taken from CUDA).

    A new snapshot reuses the tensors of the one it evicts, so a running ring allocates
    nothing. ``max_bytes`` bounds the ring: the oldest snapshots go first, the newest one is
    always kept.

    Example:
        >>> from gradguard.recovery import MemorySnapshotStore
        >>> store = MemorySnapshotStore(keep=2)
        >>> for step in (10, 20, 30):
        ...     store.save(step, {"step": step})
        >>> store.steps(), store.load(-1)["step"]
        ([20, 30], 30)
    """

    def __init__(self, *, keep: int = KEEP, max_bytes: int | None = None) -> None:
        self.keep = check_int("keep", keep, 1, "MemorySnapshotStore")
        self.max_bytes = None if max_bytes is None else check_int(
            "max_bytes", max_bytes, 1, "MemorySnapshotStore")
        self._snaps: list[tuple[int, dict[str, Any]]] = []

    def save(self, step: int, state: dict[str, Any], *, busy: Collection[int] = ()) -> None:
        """Keep a copy of ``state``; ``busy``: steps whose copies are still being read
        elsewhere (a disk write) and must not be reused as buffers."""
        evicted = self._snaps.pop(0) if len(self._snaps) >= self.keep else None
        reuse = evicted[1] if evicted is not None and evicted[0] not in busy else None
        self._snaps.append((step, copy_state(state, "cpu", reuse)))
        while self.max_bytes is not None and len(self._snaps) > 1 and self.nbytes() > self.max_bytes:
            del self._snaps[0]

    def nbytes(self) -> int:
        """Bytes the kept snapshots hold."""
        return sum(state_bytes(s) for _, s in self._snaps)

    def steps(self) -> list[int]:
        return [s for s, _ in self._snaps]

    def clear(self) -> None:
        self._snaps = []

    def remap(self, change: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        """Replace each snapshot by ``change`` of it."""
        wait_copies()
        self._snaps = [(s, change(state)) for s, state in self._snaps]

    def __len__(self) -> int:
        return len(self._snaps)

    def load(self, index: int = -1) -> dict[str, Any]:
        """The snapshot at ``index`` (``-1``: newest), as stored (do not modify it)."""
        wait_copies()
        return self._snaps[index][1]

    def load_good(self, back: int = 0) -> dict[str, Any] | None:
        """A copy of the newest snapshot, or of ``back`` snapshots before it (clamped);
        None if empty."""
        if not self._snaps:
            return None
        wait_copies()
        return copy_state(self._snaps[max(-len(self._snaps), -1 - back)][1])


class DiskSnapshotStore:
    """Snapshots as ``snapshot-<step>.pt`` files in ``directory``, written atomically.

    Each save writes a temp file in the same directory, flushes and fsyncs it, then
    ``os.replace``s it into place (and fsyncs the directory), so a process killed mid-write
    leaves the previous snapshot intact and at most a stray ``.tmp`` file.

    Raises:
        ValueError: at construction when ``directory`` cannot be created or written.

    Example:
        >>> import tempfile
        >>> from gradguard.recovery import DiskSnapshotStore
        >>> store = DiskSnapshotStore(tempfile.mkdtemp(), keep=2)
        >>> store.save(5, {"step": 5, "x": [1.0]})
        >>> store.load_good()["x"]
        [1.0]
    """

    def __init__(
        self, directory: str | os.PathLike[str], *, keep: int = KEEP, rank: int | None = None,
        run: bool = False,
    ) -> None:
        self.keep = check_int("keep", keep, 1, "DiskSnapshotStore")
        dir_arg(directory, "DiskSnapshotStore directory")
        #: under torch.distributed each rank keeps its own files (``...-rank<r>.pt``), so
        #: ranks sharing a directory never overwrite or restore each other's shards
        self.rank = rank
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(
                f"snapshot_dir={str(directory)!r} cannot be created: {e}"
            ) from e
        if not self.directory.is_dir() or not os.access(self.directory, os.W_OK | os.X_OK):
            raise ValueError(f"snapshot_dir={str(directory)!r} is not a writable directory")
        try:  # os.access says yes to root even on read-only mounts: really try
            with tempfile.NamedTemporaryFile(dir=self.directory, prefix=".probe-"):
                pass
        except OSError as e:
            raise ValueError(f"snapshot_dir={str(directory)!r} is not writable: {e}") from e
        #: ``run``: the store of a run's recovery, where the snapshot files already there
        #: are another run's (an experiment run again into the same directory), never
        #: restored nor pruned, unless this run resumes one (:meth:`resumed`): then those up
        #: to its checkpoint's step are its own. A store opened to read a directory sees all.
        #: Found at the first use, once the rank (its files' tag) is set.
        self._foreign_found: dict[Path, int] | None = None if run else {}
        self._said_foreign = False

    @property
    def _tag(self) -> str:
        return "" if self.rank is None else f"-rank{self.rank}"

    def path(self, step: int) -> Path:
        return self.directory / f"{SNAPSHOT_PREFIX}{step:010d}{self._tag}{SNAPSHOT_SUFFIX}"

    def _step_of(self, p: Path) -> int | None:
        core = p.name[len(SNAPSHOT_PREFIX):-len(SNAPSHOT_SUFFIX)]
        if self._tag:
            if not core.endswith(self._tag):
                return None
            core = core[: -len(self._tag)]
        # the weights before the first step are step -1 ("snapshot--000000001.pt")
        return int(core) if core.removeprefix("-").isdigit() else None

    @property
    def _foreign(self) -> dict[Path, int]:
        if self._foreign_found is None:
            self._foreign_found = {p: s for p in self._files()
                                   if (s := self._step_of(p)) is not None}
        return self._foreign_found

    def _files(self) -> list[Path]:
        return sorted(
            p for p in self.directory.glob(f"{SNAPSHOT_PREFIX}*{SNAPSHOT_SUFFIX}")
            if self._step_of(p) is not None
        )

    def paths(self) -> list[Path]:
        """This run's (and rank's) snapshot files, oldest first (temp files, and the files of
        another run found in the directory, are ignored)."""
        return [p for p in self._files() if p not in self._foreign]

    def resumed(self, step: int) -> None:
        """This run resumed from a checkpoint taken after ``step``: the snapshot files from
        before this store up to that step are the run's own (a later one is from the future
        of another run: a resumed run rolled back "to the snapshot of step 349" at step
        249, another experiment's weights, or stopped on their shapes)."""
        self._foreign_found = {p: s for p, s in self._foreign.items() if s > step}

    def foreign_note(self) -> str | None:
        """Once, when the directory held another run's snapshots: what was left alone."""
        if not self._foreign or self._said_foreign:
            return None
        self._said_foreign = True
        steps = ", ".join(str(s) for s in sorted(self._foreign.values())[:5])
        return (f"snapshot_dir={str(self.directory)!r} holds {len(self._foreign)} snapshot "
                f"file(s) of another run (steps {steps}{', ...' if len(self._foreign) > 5 else ''}): "
                "they are never restored nor deleted; give each run a directory of its own")

    def steps(self) -> list[int]:
        return [s for p in self.paths() if (s := self._step_of(p)) is not None]

    def clear(self) -> None:
        for p in self.paths():
            p.unlink(missing_ok=True)

    def __len__(self) -> int:
        return len(self.paths())

    def save(self, step: int, state: dict[str, Any]) -> None:
        fd, tmp = temp_file(self.directory, f".{SNAPSHOT_PREFIX}")
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save(state, fh)
                fh.flush()
                os.fsync(fh.fileno())
            self._foreign  # noqa: B018  (found before this run's first file lands)
            os.replace(tmp, self.path(step))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._foreign.pop(self.path(step), None)  # replaced: this run's now
        _fsync_dir(self.directory)
        for old in self.paths()[: -self.keep]:  # this run's own only
            old.unlink(missing_ok=True)

    def load_path(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        """Load one snapshot file.

        Raises:
            SnapshotError: naming the file, when it is truncated or not a snapshot.
        """
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch.load raises many types for a damaged file
            raise SnapshotError(
                f"snapshot file {str(path)!r} is corrupt or truncated: {type(e).__name__}: {e}"
            ) from e
        if not isinstance(state, dict):
            raise SnapshotError(f"snapshot file {str(path)!r} does not hold a snapshot dict")
        return state

    def load(self, index: int = -1) -> dict[str, Any]:
        """The snapshot at ``index`` of :meth:`paths` (``-1``: newest); raises SnapshotError."""
        return self.load_path(self.paths()[index])

    def load_good(self, back: int = 0) -> dict[str, Any] | None:
        """The newest loadable snapshot at least ``back`` snapshots back: a corrupt file is
        reported (a warning naming it) and the one before it is tried. None if none loads."""
        paths = self.paths()
        start = max(0, len(paths) - 1 - back)
        for p in reversed(paths[: start + 1]):
            try:
                return self.load_path(p)
            except SnapshotError as e:
                warnings.warn(f"{e}; falling back to the previous snapshot", GradGuardWarning,
                              stacklevel=caller_stacklevel())
        return None


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return  # not supported on this platform
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the file itself is synced
    finally:
        os.close(fd)


SnapshotStore = MemorySnapshotStore | DiskSnapshotStore


def check_int(name: str, value: Any, low: int, owner: str = "Recovery") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{owner}({name}={value!r}): must be an int >= {low}")
    return value


class SnapshotWriter:
    """Writes snapshots to a :class:`DiskSnapshotStore` on a background thread, so the
    training thread never waits on the disk. A failed write (a full or unwritable disk)
    is kept as :attr:`error`; the previous files stay as they were (writes are atomic).

    Example:
        >>> import tempfile
        >>> from gradguard.recovery.snapshots import DiskSnapshotStore, SnapshotWriter
        >>> writer = SnapshotWriter(DiskSnapshotStore(tempfile.mkdtemp()))
        >>> writer.submit(3, {"step": 3})
        >>> writer.wait(); writer.store.steps(), writer.error
        ([3], None)
        >>> writer.close()
    """

    def __init__(self, store: DiskSnapshotStore) -> None:
        self.store = store
        self.error: OSError | None = None
        self._busy: set[int] = set()  # steps queued or being written
        self._lock = threading.Lock()
        self._queue: queue.Queue[tuple[int, dict[str, Any]] | None] = queue.Queue(maxsize=1)
        self._thread = threading.Thread(target=self._run, name="gradguard-snapshots", daemon=True)
        self._thread.start()

    def submit(self, step: int, state: dict[str, Any]) -> None:
        """Queue ``state`` (a host copy the writer may keep) for writing. At most one write
        waits: a newer snapshot replaces one not yet started."""
        try:
            old = self._queue.get_nowait()  # a newer snapshot supersedes it
            self._queue.task_done()
            with self._lock:
                self._busy.discard(old[0] if old is not None else -1)
        except queue.Empty:
            pass
        with self._lock:
            self._busy.add(step)
        self._queue.put((step, state))

    @property
    def busy(self) -> set[int]:
        """Steps whose host copies the writer still reads."""
        with self._lock:
            return set(self._busy)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                wait_copies()
                self.store.save(*item)
                self.error = None
            except OSError as e:
                self.error = e
            except Exception as e:  # the thread must live: wait() joins its queue
                # found by a stranger: a disk that filled up inside torch.save's zip writer
                # raised RuntimeError ("unexpected pos"), which killed this thread, and the
                # next wait() (guard.close()) blocked for ever on a queue no one read
                err = OSError(f"{type(e).__name__}: {e}")
                err.__cause__ = e
                self.error = err
            finally:
                if item is not None:
                    with self._lock:
                        self._busy.discard(item[0])
                self._queue.task_done()

    def wait(self) -> None:
        """Block until every submitted snapshot is written (or has failed)."""
        self._queue.join()

    def close(self) -> None:
        self.wait()
        self._queue.put(None)
        self._thread.join(timeout=60)
