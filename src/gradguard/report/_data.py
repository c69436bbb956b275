"""Load a run directory into arrays and downsample them (:mod:`._summary` says in one
sentence what happened)."""

from __future__ import annotations

import json
import math
import os
import warnings
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..events import SCHEMA_VERSION, START_TYPE, iter_jsonl, version_problem

#: Line plots keep at most this many points: the min and the max of each bucket of steps,
#: so a one-step spike survives any amount of downsampling.
MAX_LINE_POINTS = 4000
#: The heatmap keeps at most this many columns (flushes) and rows (layers); columns and
#: rows are merged by taking the max, so a hot column or a hot layer is never averaged away.
MAX_HEATMAP_COLS = 1000
MAX_HEATMAP_ROWS = 500
#: Events shown in the table (all are counted in the summary).
MAX_EVENT_ROWS = 300

#: The per-step numbers of ``metrics.jsonl`` the report plots (NaN where missing).
STEP_COLUMNS = ("loss", "grad_norm", "clip_coef")

#: Event kinds that mean the gradients went wrong (vs. what gradguard did about it).
TROUBLE_KINDS = ("nonfinite_grad", "grad_spike", "loss_spike", "vanishing_grad")


class ReportError(ValueError):
    """The run directory cannot be reported on (missing, empty, corrupt, newer schema)."""


@dataclass
class RunData:
    """A run directory loaded for the report (numpy arrays; NaN where a value is missing).

    Attributes:
        run_dir: the directory.
        step, loss, grad_norm, clip_coef, skipped: per-step arrays.
        layers: layer names, input to output (module order).
        layer_step: ``[F]`` the last step of each flush window.
        layer_mean, layer_max: ``[F, L]`` per-layer gradient norm (mean / max over a window).
        events: event records (dicts, as in ``events.jsonl``).
        diagnosis: the doctor's ``diagnosis.json`` if present.
        warnings: problems that were tolerated (e.g. a truncated last line).
        update_ratio: ``[F]`` the median over the layers of the update/weight ratio in each
            flush window (NaN where not recorded); None when not loaded.
        update_max: ``[F]`` the largest layer's update/weight ratio in each flush window.
    """

    run_dir: Path
    step: Any
    loss: Any
    grad_norm: Any
    clip_coef: Any
    skipped: Any
    layers: list[str]
    layer_step: Any
    layer_mean: Any
    layer_max: Any
    events: list[dict[str, Any]]
    diagnosis: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    update_ratio: Any = None
    update_max: Any = None

    @property
    def n_steps(self) -> int:
        return len(self.step)


def _records(path: Path, notes: list[str]) -> Iterator[dict[str, Any]]:
    """The records of one file, streamed; skipped lines noted, problems as ReportError."""
    try:
        yield from iter_jsonl(path, warn=notes.append, starts=True)
    except ValueError as e:
        raise ReportError(str(e)) from e
    except OSError as e:
        raise ReportError(f"{path}: cannot be read: {e}") from e


def _fresh_start(r: dict[str, Any]) -> bool:
    """A JsonlSink's start record at step 0: a run started afresh in a directory that held
    an earlier run's records (:data:`gradguard.events.START_TYPE`)."""
    return r.get("type") == START_TYPE and r.get("step") == 0


def _resumed_at(r: dict[str, Any]) -> int | None:
    """The step a JsonlSink's start record after a resume says the run went on from (its
    first step, after 0); None for any other record."""
    step = r.get("step")
    if r.get("type") == START_TYPE and isinstance(step, int) and step > 0:
        return step
    return None


def _num(x: Any) -> float:
    if type(x) is float:  # the common case first: a report reads millions of these
        return x
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else math.nan


def _nums(xs: list[Any]) -> array[float]:
    """A packed array of numbers, NaN for null or anything else that is not a number."""
    if set(map(type, xs)) <= {float, int}:
        return array("d", xs)
    return array("d", [_num(x) for x in xs])


class _Metrics:
    """``metrics.jsonl`` accumulated into packed arrays (8 bytes a number, not a dict a
    record), so the memory a report needs grows with the numbers, not with the JSON."""

    def __init__(self) -> None:
        self.step, self.skipped = array("q"), array("b")
        self.cols = {k: array("d") for k in STEP_COLUMNS}
        self.names: list[str] = []
        self.index: dict[str, int] = {}
        self.layer_step = array("q")
        self.update = array("d")  # per flush: the median layer's update/weight ratio
        self.update_max = array("d")  # ... and the largest
        # per flush: the columns of its layers, its mean and its max norms
        self.flushes: list[tuple[array[int], array[float], array[float]]] = []
        self._last: tuple[list[str], array[int]] | None = None

    def drop_from(self, step: int) -> int:
        """Drop the records of ``step`` and after (a stretch a resume from ``step``
        abandoned); returns how many step records went."""
        keep = [i for i, s in enumerate(self.step) if s < step]
        gone = len(self.step) - len(keep)
        if gone:
            self.step = array("q", [self.step[i] for i in keep])
            self.skipped = array("b", [self.skipped[i] for i in keep])
            self.cols = {k: array("d", [c[i] for i in keep]) for k, c in self.cols.items()}
        rows = [i for i, s in enumerate(self.layer_step) if s < step]
        if len(rows) < len(self.layer_step):
            self.layer_step = array("q", [self.layer_step[i] for i in rows])
            self.update = array("d", [self.update[i] for i in rows])
            self.update_max = array("d", [self.update_max[i] for i in rows])
            self.flushes = [self.flushes[i] for i in rows]
        return gone

    def add(self, r: dict[str, Any]) -> None:
        kind = r.get("type")
        if kind == "step":
            self.step.append(r["step"])
            self.skipped.append(bool(r.get("skipped")))
            for k, col in self.cols.items():
                col.append(_num(r.get(k)))
        elif kind == "layers":
            names = r["layers"]
            if self._last is None or self._last[0] != names:  # most flushes repeat the names
                for n in names:
                    if n not in self.index:
                        self.index[n] = len(self.names)
                        self.names.append(n)
                self._last = (names, array("q", [self.index[n] for n in names]))
            mean = r["grad_norm"]
            self.layer_step.append(r["step"])
            ratios = sorted(x for x in _nums(r.get("update_ratio") or []) if x > 0)
            self.update.append(ratios[len(ratios) // 2] if ratios else math.nan)
            self.update_max.append(ratios[-1] if ratios else math.nan)
            self.flushes.append((self._last[1], _nums(mean), _nums(r.get("grad_norm_max", mean))))


def _latest_per_step(steps: Any) -> Any:
    """Indices that sort ``steps`` and keep, of a step written twice, the later record: a
    run resumed from a checkpoint rewrites the steps after it, and those are the ones the
    final model went through."""
    import numpy as np

    order = np.argsort(steps, kind="stable")  # stable: equal steps stay in write order
    s = steps[order]
    last = np.ones(len(s), dtype=bool)
    last[:-1] = s[1:] != s[:-1]
    return order[last]


def _diagnosis(path: Path) -> dict[str, Any]:
    try:
        diagnosis = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReportError(f"{path}: corrupt JSON: {e}") from e
    except OSError as e:
        raise ReportError(f"{path}: cannot be read: {e}") from e
    if not isinstance(diagnosis, dict) or not isinstance(diagnosis.get("findings", []), list):
        raise ReportError(f"{path}: expected an object with a 'findings' list")
    problem = version_problem(diagnosis.get("v", SCHEMA_VERSION))
    if problem is not None:
        raise ReportError(f"{path}: {problem}")
    return diagnosis


def _unfinished(d: Path, last: int | None) -> str | None:
    """A note for a directory ``gradguard run`` wrote (its ``guard.json`` says
    ``zero_code``) whose end it never reached: ``guard.json`` is written again there, with
    ``finished`` (found by a stranger: a run killed with SIGKILL at step 1419 of 4000 was
    reported "training recovered", with no word that it never finished)."""
    try:
        meta = json.loads((d / "guard.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("zero_code") is not True or meta.get("finished"):
        return None
    return (f"{d}: the `gradguard run` that wrote it did not finish (killed, or still "
            f"running?); its records end at step {last}")


def load_run(run_dir: str | os.PathLike[str]) -> RunData:
    """Read ``metrics.jsonl``, ``events.jsonl`` and (if present) ``diagnosis.json``.

    The JSONL files are streamed (:func:`gradguard.events.iter_jsonl`) into packed arrays:
    memory grows with the number of values, never with the size of the JSON text. A step
    recorded twice (a run resumed from an earlier checkpoint) is shown once, with its later
    record, and noted in ``RunData.warnings``; so is an event recorded twice (the same step,
    kind and message: the resumed run replayed the step that raised it).

    Raises:
        ReportError: the directory is missing or holds no gradguard files, or a file
            cannot be read, is corrupt, or is from a newer schema (the message names the
            file and line). A truncated *last* line (a killed run), or a partial line that a
            resumed run ended, is skipped and noted in ``RunData.warnings`` instead.

    Example:
        >>> import tempfile
        >>> try:
        ...     load_run(tempfile.mkdtemp())
        ... except ReportError as e:
        ...     print(str(e)[:30])
        no gradguard files in run_dir=
    """
    import numpy as np

    if not isinstance(run_dir, (str, os.PathLike)):
        raise TypeError(f"run_dir must be a directory path (str or os.PathLike), got "
                        f"{type(run_dir).__name__}: {run_dir!r}")
    d = Path(run_dir)
    if not d.exists():
        raise ReportError(f"run_dir={str(run_dir)!r} does not exist")
    if not d.is_dir():
        raise ReportError(f"run_dir={str(run_dir)!r} is not a directory")
    mpath, epath, dpath = d / "metrics.jsonl", d / "events.jsonl", d / "diagnosis.json"
    if not mpath.exists() and not epath.exists():
        raise ReportError(
            f"no gradguard files in run_dir={str(run_dir)!r}: expected metrics.jsonl and "
            "events.jsonl (written by gg.JsonlSink)"
        )
    notes: list[str] = []
    m = _Metrics()
    earlier = 0  # earlier runs started afresh in this directory (events.START_TYPE)
    abandoned = 0  # step records of stretches a resume from an earlier step replayed
    for r in _records(mpath, notes) if mpath.exists() else ():
        if _fresh_start(r):
            earlier += bool(len(m.step) or len(m.layer_step))
            m = _Metrics()
        elif (at := _resumed_at(r)) is not None:
            abandoned += m.drop_from(at)
        m.add(r)
    events: list[dict[str, Any]] = []
    for r in _records(epath, notes) if epath.exists() else ():
        if _fresh_start(r):
            events = []
        elif (at := _resumed_at(r)) is not None:
            # found by a stranger: a run killed at step 73 after NaN steps at 60-62,
            # resumed from step 40 on clean data, was told of 3 non-finite steps that no
            # step of the run shown had
            # and a run stopped (an abort) that a resume went on from was not stopped
            # there (found by a stranger: Ctrl-C at step 40, resumed from its checkpoint
            # to step 99, was "stopped at step 39 by KeyboardInterrupt")
            events = [e for e in events if e.get("step", -1) < at and e.get("kind") != "abort"]
        elif r.get("type") == "event":
            events.append(r)
    if abandoned:
        notes.append(f"{mpath}: {abandoned} step records from before a resume, of steps "
                     "that resume ran again, are not shown with their events: the resumed "
                     "run's records of those steps are shown instead")
    if earlier:
        notes.append(f"{d} holds the records of {earlier} earlier run"
                     f"{'s' if earlier > 1 else ''} (a later one started again at step 0): "
                     "only the latest run is shown")
    if not len(m.step):
        stop = next((e for e in events if e.get("kind") == "abort"), None)
        why = "" if stop is None else (
            f": the run stopped before its first step ({(stop.get('data') or {}).get('exception')})")
        raise ReportError(f"{mpath}: no step records{why}; nothing to report")

    keep = _latest_per_step(np.frombuffer(m.step, dtype=np.int64))
    if len(keep) < len(m.step):
        notes.append(f"{mpath}: {len(m.step) - len(keep)} steps were recorded twice (a run "
                     "resumed from an earlier checkpoint); the later records are shown")
    step = np.frombuffer(m.step, dtype=np.int64)[keep]
    if len(step) and (missing := int(step.max() - step.min() + 1 - len(step))) > 0:
        # steps no record reached (a full disk, a sink that failed, a resume from a later
        # checkpoint): said, not shown as if the run had no such steps (found by a
        # stranger: 102 of 400 missing, and the report said nothing of it)
        ordered = np.sort(step)
        gaps = np.flatnonzero(np.diff(ordered) > 1)
        first = int(ordered[gaps[0]] + 1) if len(gaps) else int(step.min())
        notes.append(f"{mpath}: {missing} steps between {int(step.min())} and "
                     f"{int(step.max())} have no record (the first from step {first}): a "
                     "full disk, a failed sink, or a resume from a later checkpoint?")
    cols = {k: np.frombuffer(c, dtype=np.float64)[keep] for k, c in m.cols.items()}
    skipped = np.frombuffer(m.skipped, dtype=np.int8)[keep].astype(bool)

    rows = _latest_per_step(np.frombuffer(m.layer_step, dtype=np.int64))
    mean = np.full((len(rows), len(m.names)), np.nan)
    mx = np.full((len(rows), len(m.names)), np.nan)
    for i, f in enumerate(rows.tolist()):
        idx, fmean, fmax = (np.frombuffer(a, dtype=a.typecode) for a in m.flushes[f])
        mean[i, idx] = fmean
        mx[i, idx] = fmax
    layer_step = np.frombuffer(m.layer_step, dtype=np.int64)[rows]

    if (note := _unfinished(d, int(step.max()) if len(step) else None)) is not None:
        notes.append(note)
    diagnosis = _diagnosis(dpath) if dpath.exists() else None
    seen: dict[tuple[Any, ...], int] = {}
    for i, e in enumerate(events):  # the later record of one recorded again is kept
        seen[(e.get("step"), e.get("kind"), e.get("message"), e.get("rank"))] = i
    if len(seen) < len(events):
        notes.append(f"{epath}: {len(events) - len(seen)} events were recorded twice (a run "
                     "resumed from an earlier checkpoint replayed their steps); each is "
                     "shown once")
        events = [events[i] for i in sorted(seen.values())]
    events.sort(key=lambda e: e["step"])
    return RunData(
        d, step, cols["loss"], cols["grad_norm"], cols["clip_coef"], skipped,
        m.names, layer_step, mean, mx, events, diagnosis, notes,
        np.frombuffer(m.update, dtype=np.float64)[rows],
        np.frombuffer(m.update_max, dtype=np.float64)[rows],
    )


def minmax_downsample(x: Any, y: Any, max_points: int = MAX_LINE_POINTS) -> tuple[Any, Any]:
    """Keep the min and max of each bucket of consecutive points (NaNs ignored).

    Example:
        >>> import numpy as np
        >>> x, y = minmax_downsample(np.arange(10), np.array([0, 9, 1, 1, 1, 1, 1, 1, 1, -5.0]), 4)
        >>> y.tolist()
        [0.0, 9.0, 1.0, -5.0]
    """
    import numpy as np

    n = len(y)
    if n <= max_points:
        return np.asarray(x), np.asarray(y, dtype=np.float64)
    buckets = max(max_points // 2, 1)
    k = -(-n // buckets)
    pad = buckets * k - n
    yy = np.concatenate([np.asarray(y, dtype=np.float64), np.full(pad, np.nan)]).reshape(buckets, k)
    allnan = np.isnan(yy).all(axis=1)
    lo = np.argmin(np.where(np.isnan(yy), np.inf, yy), axis=1)
    hi = np.argmax(np.where(np.isnan(yy), -np.inf, yy), axis=1)
    base = np.arange(buckets) * k
    keep = np.unique(np.concatenate([(base + lo)[~allnan], (base + hi)[~allnan]]))
    keep = keep[keep < n]
    return np.asarray(x)[keep], yy.reshape(-1)[keep]


def max_pool(a: Any, max_rows: int, max_cols: int) -> tuple[Any, int, int]:
    """Shrink a 2-D array to at most ``max_rows x max_cols`` by taking the max of blocks
    (NaN-aware). Returns the array and the block sizes (rows, cols)."""
    import numpy as np

    r, c = a.shape
    kr, kc = max(1, -(-r // max_rows)), max(1, -(-c // max_cols))
    if kr == 1 and kc == 1:
        return a, 1, 1
    pr, pc = (-r) % kr, (-c) % kc
    b = np.pad(a, ((0, pr), (0, pc)), constant_values=np.nan)
    b = b.reshape(b.shape[0] // kr, kr, b.shape[1] // kc, kc)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN blocks stay NaN
        return np.nanmax(b, axis=(1, 3)), kr, kc
