"""Snapshot stores: model, optimizer and policy state kept in memory or on disk.

Snapshots own their memory: :func:`copy_state` makes deep, detached copies on the way in
and on the way out, so a restored optimizer never shares a tensor with a stored snapshot
(``Optimizer.load_state_dict`` keeps tensors that are already on the right device as they
are: without the copy, the live optimizer state *would be* the snapshot, and every later
step would rewrite it). Disk snapshots are written to a temp file, fsynced, and
``os.replace``d into place, so a killed process never leaves a half file.
"""

from __future__ import annotations

import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import GradGuardWarning

#: Snapshots kept (a second rollback in a row goes one snapshot further back).
KEEP = 2
SNAPSHOT_PREFIX = "snapshot-"
SNAPSHOT_SUFFIX = ".pt"


class SnapshotError(ValueError):
    """A snapshot file cannot be read (truncated, corrupt, or not a gradguard snapshot)."""


def copy_state(obj: Any, device: torch.device | str = "cpu") -> Any:
    """A deep copy of a (nested) state dict with every tensor detached and copied to
    ``device``: the copy shares no storage with ``obj``."""
    if isinstance(obj, Tensor):
        return obj.detach().to(device, copy=True)
    if isinstance(obj, dict):
        return {k: copy_state(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(copy_state(v, device) for v in obj)
    return obj


def _all_finite(obj: Any) -> bool:
    """True when every floating tensor in ``obj`` (host tensors) is finite."""
    if isinstance(obj, Tensor):
        return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
    if isinstance(obj, dict):
        return all(_all_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(_all_finite(v) for v in obj)
    if isinstance(obj, float):
        return math.isfinite(obj)
    return True


class MemorySnapshotStore:
    """Keeps the last ``keep`` snapshots in CPU memory.

    Example:
        >>> from gradguard.recovery import MemorySnapshotStore
        >>> store = MemorySnapshotStore(keep=2)
        >>> for step in (10, 20, 30):
        ...     store.save(step, {"step": step})
        >>> store.steps(), store.load(-1)["step"]
        ([20, 30], 30)
    """

    def __init__(self, *, keep: int = KEEP) -> None:
        self.keep = check_int("keep", keep, 1, "MemorySnapshotStore")
        self._snaps: list[tuple[int, dict[str, Any]]] = []

    def save(self, step: int, state: dict[str, Any]) -> None:
        self._snaps.append((step, copy_state(state)))
        del self._snaps[: -self.keep]

    def steps(self) -> list[int]:
        return [s for s, _ in self._snaps]

    def clear(self) -> None:
        self._snaps = []

    def __len__(self) -> int:
        return len(self._snaps)

    def load(self, index: int = -1) -> dict[str, Any]:
        """The snapshot at ``index`` (``-1``: newest)."""
        return self._snaps[index][1]

    def load_good(self, back: int = 0) -> dict[str, Any] | None:
        """A copy of the newest snapshot, or of ``back`` snapshots before it (clamped);
        None if empty."""
        if not self._snaps:
            return None
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

    def __init__(self, directory: str | os.PathLike[str], *, keep: int = KEEP) -> None:
        self.keep = check_int("keep", keep, 1, "DiskSnapshotStore")
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

    def path(self, step: int) -> Path:
        return self.directory / f"{SNAPSHOT_PREFIX}{step:010d}{SNAPSHOT_SUFFIX}"

    def paths(self) -> list[Path]:
        """Snapshot files, oldest first (temp files are ignored)."""
        return sorted(
            p for p in self.directory.glob(f"{SNAPSHOT_PREFIX}*{SNAPSHOT_SUFFIX}")
            if p.name[len(SNAPSHOT_PREFIX):-len(SNAPSHOT_SUFFIX)].isdigit()
        )

    def steps(self) -> list[int]:
        return [int(p.name[len(SNAPSHOT_PREFIX):-len(SNAPSHOT_SUFFIX)]) for p in self.paths()]

    def clear(self) -> None:
        for p in self.paths():
            p.unlink(missing_ok=True)

    def __len__(self) -> int:
        return len(self.paths())

    def save(self, step: int, state: dict[str, Any]) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{SNAPSHOT_PREFIX}",
                                   suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save(state, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path(step))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(self.directory)
        for old in self.paths()[: -self.keep]:
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
                              stacklevel=2)
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
