"""The run directory on disk: the append-only JSONL writer (:class:`JsonlSink`), files that
are replaced whole (:func:`write_atomic`), and the check that a directory can hold a run
(:func:`dir_problem`).

Nothing written here is ever half a record to a reader: JSONL lines are appended, flushed
and fsynced, and a line torn by a kill or a full disk is ended and marked
(:data:`gradguard.events.TORN_LINE_MARK`) before the next append; whole files go through a
temp file, fsync and ``os.replace``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

from .events import SCHEMA_VERSION, START_TYPE, TORN_LINE_MARK, Flush


def temp_file(directory: str | os.PathLike[str], prefix: str) -> tuple[int, str]:
    """``tempfile.mkstemp`` in ``directory``, its mode set as ``open`` would set it (0666
    less the umask): a file that replaces another must not be private for being atomic
    (found as a stranger: ``report.html``, the page to share, was written 0600)."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=prefix, suffix=".tmp")
    if hasattr(os, "fchmod"):
        mask = os.umask(0)
        os.umask(mask)
        os.fchmod(fd, 0o666 & ~mask)
    return fd, tmp


def write_atomic(path: str | os.PathLike[str], data: str | bytes) -> Path:
    """Write ``data`` to ``path`` through a temp file in the same directory that is
    flushed, fsynced and then ``os.replace``d into place.

    A failure (a full disk, a kill before the replace) leaves the previous file intact,
    and no temp file behind unless the process itself dies mid-write.

    Raises:
        OSError: the directory cannot be written (the temp file is removed first).

    Example:
        >>> import pathlib, tempfile
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "run.json"
        >>> write_atomic(p, '{"v": 1}').read_text()
        '{"v": 1}'
        >>> sorted(x.name for x in p.parent.iterdir())
        ['run.json']
    """
    p = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = temp_file(p.parent, f".{p.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def dir_problem(d: str | os.PathLike[str]) -> str | None:
    """Why ``d`` cannot hold a run directory, or None: it is created, and a probe byte is
    written, fsynced and removed in it (a full disk fails at the byte, not at the name).

    Example:
        >>> import pathlib, tempfile
        >>> f = pathlib.Path(tempfile.mkdtemp()) / "a_file"
        >>> _ = f.write_text("")
        >>> dir_problem(f / "run")
        'cannot be created: Not a directory'
        >>> dir_problem(f.parent / "run") is None
        True
    """
    p = Path(d)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"cannot be created: {e.strerror or e}"
    probe = None
    try:
        fd, probe = tempfile.mkstemp(dir=p, prefix=".gradguard-probe-", suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            fh.write(b"\n")
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as e:
        return f"cannot be written: {e.strerror or e}"
    finally:
        if probe is not None:
            Path(probe).unlink(missing_ok=True)
    return None


#: The run directories an open JsonlSink of this process writes (resolved path -> sink).
_OPEN: dict[str, weakref.ref[JsonlSink]] = {}


def dir_arg(value: Any, what: str) -> Path:
    """``value`` as a path, or an error naming ``what`` (the owner and argument, e.g.
    ``"JsonlSink run_dir"``): not a str or os.PathLike, or empty (the current directory,
    by accident)."""
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{what} must be a directory path (str or os.PathLike), got "
                        f"{type(value).__name__}: {value!r}")
    if not os.fspath(value).strip():  # "" is the current directory, by accident
        raise ValueError(f"{what}={os.fspath(value)!r}: give a directory (e.g. 'runs/exp1')")
    return Path(value)


def guard_info(clip: Any, config: Any, *, zero_code: bool) -> dict[str, Any]:
    """What ``guard.json`` holds: the guard's options the report judges a run with, and
    what it clipped with (``clip``: the policy, which may describe itself, as ``gradguard
    run``'s does with the script's own clip calls)."""
    describe = getattr(clip, "describe", None)
    return {
        "v": 1, "zero_code": zero_code,
        "clip": describe() if callable(describe) else repr(clip) if clip is not None else "none",
        "user_clip": None if config.clip is None else repr(config.clip),
        "script_clip": getattr(clip, "mode", None),
        "script_clip_calls": dict(getattr(clip, "counts", {})),
        "recovery": config.recovery is not None,
        "loss_rise": bool(getattr(config.recovery, "loss_rise", False)),
        "on_nonfinite": config.on_nonfinite, "every": config.every,
    }


class JsonlSink:
    """Append-only JSONL files in a run directory.

    Writes ``events.jsonl`` (one event per line) and ``metrics.jsonl`` (one line per step
    plus one ``"type": "layers"`` line per flush). Every line carries ``"v": 1``; every write
    is flushed and fsynced so that a killed process loses at most the line being written
    (and the steps its guard had not flushed yet). A directory is written by one open sink
    of the process at a time: a second is refused (two guards' records merged); a sink of
    another process fails its first write (an advisory lock, where the platform has one).

    Appending to a run directory that already holds files (a resumed run) is the intended
    use. A file that ends in a partial line (the process was killed mid-write, or the disk
    filled up) is first ended with a newline and :data:`gradguard.events.TORN_LINE_MARK`,
    so the reader skips exactly that line, with a warning naming it, and keeps the rest. A
    write that fails part-way raises (the guard then reports the sink once and stops
    feeding it); a later write, or the next sink on the file, ends the torn line first.

    Raises:
        ValueError: ``run_dir`` or a file in it cannot be created or written (naming it).

    Example:
        >>> import tempfile, gradguard as gg
        >>> sink = gg.JsonlSink(tempfile.mkdtemp())
        >>> sink.close()
        >>> sink.closed
        True
    """

    def __init__(self, run_dir: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.run_dir = dir_arg(run_dir, "JsonlSink run_dir")
        if not isinstance(fsync, bool):
            raise TypeError(f"JsonlSink(fsync={fsync!r}): must be True or False")
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"JsonlSink run_dir={str(run_dir)!r} cannot be created: {e}") from e
        if not os.access(self.run_dir, os.W_OK):
            raise ValueError(f"JsonlSink run_dir={str(run_dir)!r} is not writable")
        key = str(self.run_dir.resolve())
        other = _OPEN.get(key)
        if other is not None and (live := other()) is not None and not live.closed:
            # two guards' records in one pair of files: the report took them for a resume
            # ("60 steps were recorded twice") and kept the second guard's alone
            raise ValueError(
                f"JsonlSink run_dir={str(run_dir)!r} is written by another open JsonlSink "
                "(another guard's?): give each guard its own directory (e.g. "
                f"{str(Path(run_dir) / 'optimizer1')!r}), or close the first guard")
        self._key = key
        self.fsync = fsync
        #: written by ``gradguard run``, which writes ``guard.json`` again at the run's end
        #: (``finished``): a directory whose end never came is told so in its report
        self.zero_code = False
        #: its first write found the directory locked by another process's sink
        self.locked_out = False
        self.events_path = self.run_dir / "events.jsonl"
        self.metrics_path = self.run_dir / "metrics.jsonl"
        files: list[BinaryIO] = []
        try:
            for path in (self.events_path, self.metrics_path):
                # unbuffered: a failed write leaves nothing queued to fail again at close
                files.append(open(path, "ab", buffering=0))
                self._end_torn_line(files[-1])
        except OSError as e:
            for fh in files:
                fh.close()
            raise ValueError(f"JsonlSink run_dir={str(run_dir)!r}: cannot write "
                             f"{path.name}: {e}") from e
        self._events, self._metrics = files
        # appending to an earlier run's records: the first write says where this run starts
        self._appending = any(os.path.getsize(fh.name) > 0 for fh in files)
        self._maybe_torn: set[BinaryIO] = set()  # files whose last write failed part-way
        self._claimed = False  # see _claim
        self._guard: weakref.ref[Any] | None = None  # see attach
        _OPEN[key] = weakref.ref(self)

    def _end_torn_line(self, fh: BinaryIO) -> None:
        """End a partial last line and mark it for the reader (see :data:`TORN_LINE_MARK`)."""
        with open(fh.name, "rb") as r:
            if r.seek(0, os.SEEK_END) == 0:
                return
            r.seek(-1, os.SEEK_END)
            if r.read(1) == b"\n":
                return
        self._write_all(fh, b"\n" + _jsonl([TORN_LINE_MARK]))

    def _write_all(self, fh: BinaryIO, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[fh.write(view):]  # a short write (a disk filling up) goes on
        if self.fsync:
            os.fsync(fh.fileno())

    def _append(self, fh: BinaryIO, lines: Sequence[dict[str, Any]]) -> None:
        if not lines:
            return
        if fh in self._maybe_torn:
            self._end_torn_line(fh)
            self._maybe_torn.discard(fh)
        try:
            self._write_all(fh, _jsonl(lines))
        except OSError:
            self._maybe_torn.add(fh)  # part of a line may be on disk
            raise

    def attach(self, guard: Any) -> None:
        """Called by the :class:`~gradguard.Guard` built with this sink: one open sink
        writes one guard's records (found by a stranger: one sink object given to the two
        guards of a model with two optimizers merged their records, and the report, taking
        them for a resume, hid the skip one of them made).

        Raises:
            ValueError: another guard that is still alive writes through this sink.
        """
        other = None if self._guard is None else self._guard()
        # a closed guard writes no more (nor one retired for a successor: `gradguard run`
        # hands a script's run on to the guard of the optimizer it builds each epoch)
        if other is not None and other is not guard and not self.closed and \
                not getattr(other, "_closed", False):
            raise ValueError(
                f"JsonlSink run_dir={str(self.run_dir)!r} is given to a second guard while "
                "another guard writes through it: give each guard its own JsonlSink and "
                f"directory (e.g. {str(self.run_dir / 'optimizer1')!r}), or close the first "
                "guard (guard.close()) before building the next")
        self._guard = weakref.ref(guard)

    def _claim(self) -> None:
        """At the first write: an advisory lock on ``metrics.jsonl``, held while the sink is
        open (the OS drops it when the process dies), so that a second process writing the
        same run directory fails its first write, and its guard stops feeding this sink
        with a warning, instead of merging two runs' records (found by a stranger: a job
        relaunched while its old process still ran, reported as one run "resumed"). A
        process whose sink never writes (a rank other than 0) never takes it."""
        self._claimed = True
        try:
            import fcntl
        except ImportError:  # not on this platform: the in-process check alone
            return
        try:
            fcntl.flock(self._metrics.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.locked_out = True  # another process's run (gradguard run: not judged on it)
            raise ValueError(
                f"JsonlSink run_dir={str(self.run_dir)!r} is written by another process "
                "(its metrics.jsonl is locked): give each run its own directory") from None
        except OSError:
            return  # a file system without locks: the in-process check alone

    def write(self, flush: Flush) -> None:
        start: list[dict[str, Any]] = []
        if not self._claimed:
            self._claim()
            if self._appending:
                # found by a stranger: the README's loop run twice into runs/exp1 was reported
                # as one run "resumed" (the second, healthy run shown with the first's NaN);
                # a start at step 0 tells the reader an earlier run's records end here
                # a loop that raised before its first step: the step it was to run (found
                # by a stranger: a re-run that crashed at once wrote "step": null, and was
                # reported as the earlier run's, "stopped at step 0")
                first = flush.steps[0]["step"] if flush.steps else flush.next_step
                start = [{"v": SCHEMA_VERSION, "type": START_TYPE, "step": first,
                          "time": round(time.time(), 3)}]
            self._write_guard_config()
        metrics = [*start, *({"v": SCHEMA_VERSION, "type": "step", **r} for r in flush.steps)]
        if flush.layers:
            metrics.append({"v": SCHEMA_VERSION, "type": "layers", **flush.layers})
        self._append(self._metrics, metrics)
        self._append(self._events, [*start, *(e.to_json() for e in flush.events)])

    def _write_guard_config(self) -> None:
        """``guard.json``: the options of the guard that writes here, which the report
        judges the run with (found by a stranger: ``gg.report`` of a run guarded with
        ``Recovery(loss_rise=False)``, a WGAN's generator, judged its loss level and said
        "training diverged ... the learning rate is too high"; ``gradguard run`` wrote the
        file, a loop of one's own did not). Written once, atomically; ``gradguard run``
        writes its own at the end. Bookkeeping: a failure costs a warning."""
        guard = None if self._guard is None else self._guard()
        config = getattr(guard, "config", None)
        if config is None:
            return
        try:
            write_atomic(self.run_dir / "guard.json",
                         json.dumps(guard_info(config.clip, config, zero_code=self.zero_code)))
        except OSError as e:
            warnings.warn(f"gradguard: {self.run_dir / 'guard.json'} not written ({e})",
                          RuntimeWarning, stacklevel=3)

    @property
    def closed(self) -> bool:
        return self._events.closed and self._metrics.closed

    def close(self) -> None:
        for fh in (self._events, self._metrics):
            fh.close()
        if (ref := _OPEN.get(self._key)) is not None and ref() in (self, None):
            del _OPEN[self._key]

    def on_abort(self, error: BaseException) -> str | None:
        """Training was given up: close the files and render the run's HTML incident report
        (when the ``report`` extra is installed), so the error can point at it. Returns
        the report's path, or None (a warning says why)."""
        self.close()
        try:
            from .report import report as render
        except ImportError as e:
            warnings.warn(f"gradguard: no report written ({e})", RuntimeWarning, stacklevel=2)
            return None
        try:
            return str(render(self.run_dir))
        except Exception as e:  # the abort is the error to raise, not this one
            warnings.warn(f"gradguard: writing the report of {self.run_dir} failed: "
                          f"{type(e).__name__}: {e}", RuntimeWarning, stacklevel=2)
            return None


def _jsonl(records: Sequence[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(x, allow_nan=False) + "\n" for x in records).encode("utf-8")
