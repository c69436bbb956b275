"""Events, the JSONL schema, and the sinks that receive them.

Sinks see data only at flush time (every ``Guard(every=N)`` steps and at close), never per
step, so no sink can stall training. A sink that raises is reported once and then skipped;
the run goes on.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

SCHEMA_VERSION = 1

Severity = Literal["info", "warning", "error"]
SEVERITIES: tuple[str, ...] = ("info", "warning", "error")

#: Event kinds. Diagnosis causes (DESIGN.md vocabulary) are valid kinds too.
EVENT_KINDS: tuple[str, ...] = (
    "nonfinite_grad",
    "loss_spike",
    "grad_spike",
    "vanishing_grad",
    "skip",
    "lr_backoff",
    "lr_settled",
    # the LR probe ran and found the LR in force not too high (gradguard.recovery.probe)
    "lr_probe",
    # the loss did not answer the weights the ladder restored: its loss-level tests are off
    "loss_level_off",
    # the weights a rollback restored gave the trouble's loss: the batches changed
    "data_shift",
    "rollback",
    "abort",
    "clip",
    "update_ratio",
    # a precursor of divergence seen before the loss spikes (gradguard.precursors)
    "divergence_risk",
    # parameters got their first gradient (an unfrozen layer): the norm's scale is learnt anew
    "new_gradients",
    # parameters get gradients that no optimizer steps (an unfrozen layer never added)
    "unstepped_params",
    # the script called optimizer.step() besides guard.step() (gradguard._outside)
    "unguarded_step",
    # under torch.distributed, ranks took different skip decisions: replicas now differ
    "ranks_diverged",
    # the LR fell below a ten-thousandth of its peak (gradguard.detectors.lr): a schedule
    # stepped per batch where it is meant per epoch leaves a run that no longer learns
    "lr_decayed",
)
CAUSES: tuple[str, ...] = (
    "init_too_large",
    "init_too_small",
    "saturating_activation",
    "dead_units",
    "lr_too_high",
    "recurrent_explosion",
    "recurrent_vanishing",
    "nonfinite_input",
    "nonfinite_loss",
    "half_precision_overflow",
    "unscaled_input",
    "wrong_gradient",
    "disconnected_layer",
)
#: What to check when an update turned finite gradients into NaN/Inf weights.
WEIGHTS_REMEDY = ("The optimizer's update wrote NaN/Inf into the weights from finite "
                  "gradients: check its eps against the weights' dtype (0 in float16 below "
                  "6e-8: use eps=1e-4, or float32 weights under torch.autocast), the LR the "
                  "schedule set at that step, and a custom step() for a division by zero.")
#: What to do when no gradient reached the optimizer (every gradient zero or missing).
NO_GRADIENT_REMEDY = ("Call loss.backward() before guard.step(), and optimizer.zero_grad() "
                      "after the step (not between backward() and the step); check that the "
                      "loss is not detached (no torch.no_grad(), no .detach()).")
#: What to check when the batches of a spiking streak were at fault (their gradients, not
#: the batch norm statistics, found them): inputs or targets.
SPIKE_DATA_REMEDY = ("Check the batches of the skipped steps for inputs or targets far off "
                     "their usual scale (a unit error, values not normalised, a corrupt "
                     "shard) or a loss scaled up on them.")
#: What to check when batches were on another scale (cause ``unscaled_input``, found by
#: the batch norm statistics: :meth:`gradguard._running.RunningStats.offscale`).
UNIT_ERROR_REMEDY = ("Check the inputs of the skipped steps for a unit error (raw 0-255 "
                     "pixels among normalised ones, a column in other units): the eval() "
                     "model would use statistics learnt on that scale.")


@dataclass
class Event:
    """Something a guard saw or did at a training step.

    Attributes:
        kind: one of :data:`EVENT_KINDS` or :data:`CAUSES`.
        step: the optimizer step (0-based count of ``guard.step`` calls) it refers to.
        severity: ``"info"``, ``"warning"`` or ``"error"``.
        message: one sentence a person understands.
        layer: module path the event is about, or None.
        value: the measured number that triggered it, if any.
        threshold: the threshold it was compared with, if any.
        remedy: one sentence the user can act on, if any.
        data: further measured numbers (JSON-serialisable).
        rank: the distributed rank that saw it (None outside torch.distributed).
    """

    kind: str
    step: int
    severity: Severity
    message: str
    layer: str | None = None
    value: float | None = None
    threshold: float | None = None
    remedy: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    rank: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in EVENT_KINDS and self.kind not in CAUSES:
            raise ValueError(
                f"Event kind={self.kind!r} is not known; allowed: {EVENT_KINDS + CAUSES}"
            )
        if self.severity not in SEVERITIES:
            raise ValueError(f"Event severity={self.severity!r}; allowed: {SEVERITIES}")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["value"] = json_float(self.value)
        d["threshold"] = json_float(self.threshold)
        return {"v": SCHEMA_VERSION, "type": "event", **d}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Event:
        fields = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**fields)


def json_float(x: float | None) -> float | None:
    """JSON has no NaN/Inf: non-finite numbers are written as ``null``."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


@dataclass
class Flush:
    """What a sink receives at each flush.

    Attributes:
        steps: one record per step in the window: ``step, loss, grad_norm, clip_coef,
            skipped, finite`` (floats, ``None`` where non-finite).
        layers: one record for the window: per-layer gradient norms (mean and max over the
            window's finite steps), weight norms and update/weight ratios at the flush step.
        events: events produced since the previous flush.
        window: the raw host-side :class:`gradguard.telemetry.Window` (CPU tensors).
        next_step: the guard's step count at the flush, the step it runs next (None where
            unknown): where a run's records begin when a flush holds no step record (a
            loop that raised before its first step).
    """

    steps: list[dict[str, Any]]
    layers: dict[str, Any]
    events: list[Event]
    window: Any = None
    next_step: int | None = None


@runtime_checkable
class Sink(Protocol):
    """Receives flushes. Implement ``write`` and ``close``."""

    def write(self, flush: Flush) -> None: ...

    def close(self) -> None: ...


#: The record a :class:`~gradguard.JsonlSink` writes right after ending a partial line (the
#: torn write of a killed process, or of a full disk) before it appends again. It tells the
#: reader that the line above was torn by an interrupted write, not damaged later: that one
#: line is skipped with a warning instead of refusing the file.
TORN_LINE_MARK: dict[str, Any] = {"v": SCHEMA_VERSION, "type": "torn_line_above"}

#: The ``type`` of the record a :class:`~gradguard.JsonlSink` writes, at its first write, in
#: both files of a run directory that already held records: ``{"type": "start", "step":
#: <its first step>, "time": <unix time>}``. One at step 0 is a run started afresh in an
#: earlier run's directory: the reader shows the records after the last such one (a
#: resumed run starts at a later step, and its earlier records stay).
START_TYPE = "start"

#: The longest line the reader accepts. Per-layer records of a 100k-layer model stay far
#: below; a longer "line" is a file that is not JSONL (a checkpoint passed by mistake), and
#: reading it whole would defeat the reader's bounded memory.
MAX_LINE_BYTES = 64 * 2**20

_BOM = b"\xef\xbb\xbf"

#: Fields a record of each ``type`` must carry, with their JSON type: what the readers
#: (``gg.report``, ``Event.from_json``) rely on. Other types are passed through unchecked.
REQUIRED_FIELDS: dict[str, tuple[tuple[str, type], ...]] = {
    "step": (("step", int),),
    "layers": (("step", int), ("layers", list), ("grad_norm", list)),
    "event": (("step", int), ("kind", str)),
}
_TYPE_NAMES = {int: "an integer", list: "a list", str: "a string"}


def version_problem(v: Any) -> str | None:
    """What is wrong with a schema version ``v``, or None if this gradguard reads it.

    Example:
        >>> version_problem("1")
        "schema version 'v' must be an integer, got '1'"
        >>> version_problem(1) is None
        True
    """
    if not isinstance(v, int) or isinstance(v, bool):
        return f"schema version 'v' must be an integer, got {v!r}"
    if v > SCHEMA_VERSION:
        return (f"schema version {v} is newer than this gradguard understands "
                f"({SCHEMA_VERSION}); upgrade gradguard")
    if v < 1:
        return f"schema version 'v' must be >= 1, got {v}"
    return None


def record_problem(rec: Any) -> str | None:
    """What is wrong with a parsed JSONL record, or None: the schema version, then the
    fields of :data:`REQUIRED_FIELDS` for its type (and, for ``layers``, one norm per layer).

    Example:
        >>> record_problem({"v": 1, "type": "step", "step": "3"})
        "'step' must be an integer, got '3'"
    """
    if not isinstance(rec, dict):
        return "not a gradguard record (not a JSON object)"
    if "v" not in rec:
        return "not a gradguard record (no schema version 'v')"
    problem = version_problem(rec["v"])
    if problem is not None:
        return problem
    kind = rec.get("type")
    for name, typ in REQUIRED_FIELDS.get(kind, ()) if isinstance(kind, str) else ():
        if name not in rec:
            return f"{name!r} is missing from a {kind!r} record"
        x = rec[name]
        if not isinstance(x, typ) or isinstance(x, bool):
            return f"{name!r} must be {_TYPE_NAMES[typ]}, got {x!r}"[:200]
        if name == "step" and isinstance(x, int) and not -2**63 <= x < 2**63:  # a traceback
            return f"'step' {str(x)[:40]} is out of range (a damaged record)"
    if kind == "event" and rec.get("data") is not None and not isinstance(rec["data"], dict):
        return f"'data' must be an object, got {rec['data']!r}"[:200]
    if kind == "step":
        for name in ("loss", "grad_norm", "clip_coef"):  # JSON has no NaN: missing is null
            x = rec.get(name)
            if x is not None and (not isinstance(x, (int, float)) or isinstance(x, bool)):
                return f"{name!r} must be a number or null, got {x!r}"[:200]
        if not isinstance(rec.get("skipped", False), bool):
            return f"'skipped' must be true or false, got {rec['skipped']!r}"[:200]
    if kind == "layers":
        n = len(rec["layers"])
        if not set(map(type, rec["layers"])) <= {str}:
            return "'layers' must be a list of layer names (strings)"
        for name in ("grad_norm", "grad_norm_max"):
            x = rec.get(name, rec["grad_norm"])
            if not isinstance(x, list) or len(x) != n:
                got = f"{len(x)} values" if isinstance(x, list) else repr(x)[:50]
                return f"{name!r} has {got} for {n} layers"
    return None


def _parse(raw: bytes) -> tuple[Any, str | None]:
    """A line's record, or the reason it is not JSON (a torn write can cause either)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"not UTF-8 text: byte 0x{raw[e.start]:02x} at column {e.start + 1}"
    try:
        return json.loads(text), None
    except json.JSONDecodeError as e:
        return None, f"corrupt JSON line: {e.msg} (column {e.colno})"


def _is_mark(rec: Any) -> bool:
    return isinstance(rec, dict) and rec.get("type") == TORN_LINE_MARK["type"]


def iter_jsonl(
    path: str | os.PathLike[str], *, warn: Callable[[str], None] | None = None,
    starts: bool = False,
) -> Iterator[dict[str, Any]]:
    """Stream the records of a gradguard JSONL file, one line in memory at a time.

    Every record is checked (:func:`record_problem`). Tolerated, each with one message
    naming the file and line: a truncated last line (a killed writer), and a partial line
    that a resumed :class:`~gradguard.JsonlSink` ended (it is followed by
    :data:`TORN_LINE_MARK`, which is not yielded). A UTF-8 byte-order mark is accepted.

    Args:
        path: the file.
        warn: called with each message about a skipped line (default: ``warnings.warn``).
        starts: also yield the :data:`START_TYPE` records a sink wrote where a run began
            in a directory that held records (the report reads them; by default they are
            not yielded, so that every record of ``events.jsonl`` is an event).

    Raises:
        ValueError: ``"<file>:<line>: <what is wrong>"`` for a corrupt line elsewhere,
            bytes that are not UTF-8, a record from a newer schema version or one without
            the fields its type needs. Raised when the reader reaches that line.
        OSError: the file cannot be opened or read.

    Example:
        >>> import pathlib, tempfile
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "metrics.jsonl"
        >>> _ = p.write_text('{"v": 1, "type": "step", "step": 0}\\n{"v": 1, "type": "st')
        >>> [r["step"] for r in iter_jsonl(p, warn=print)]
        /...metrics.jsonl:2: truncated last line skipped (was the run killed, or its disk full?)
        [0]
    """
    _path_arg(path, "iter_jsonl")
    p = Path(path)
    say = warn if warn is not None else (lambda m: warnings.warn(m, UserWarning, stacklevel=3))
    pending: tuple[int, str] | None = None  # a bad line; the next line says if it was torn
    with open(p, "rb") as fh:
        for i, raw in enumerate(iter(lambda: fh.readline(MAX_LINE_BYTES + 1), b""), start=1):
            if len(raw) > MAX_LINE_BYTES:
                raise ValueError(f"{p}:{i}: line longer than {MAX_LINE_BYTES} bytes: not a "
                                 "gradguard JSONL file")
            if i == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]
            if not raw.strip():
                continue
            rec, problem = _parse(raw)
            if pending is not None:
                if not _is_mark(rec):
                    raise ValueError(f"{p}:{pending[0]}: {pending[1]}")
                say(f"{p}:{pending[0]}: partial line skipped (a write was interrupted and "
                    f"the run resumed after it): {pending[1]}")
                pending = None
                continue
            if problem is not None:
                pending = (i, problem)
                continue
            if _is_mark(rec):
                continue  # the line above was whole but for its newline: nothing lost
            problem = record_problem(rec)
            if problem is not None:
                raise ValueError(f"{p}:{i}: {problem}")
            if starts or rec.get("type") != START_TYPE:
                yield rec
    if pending is not None:
        say(f"{p}:{pending[0]}: truncated last line skipped (was the run killed, or its disk full?)")


def read_jsonl(
    path: str | os.PathLike[str], *, warn: Callable[[str], None] | None = None
) -> list[dict[str, Any]]:
    """Every record of a gradguard JSONL file: ``list(iter_jsonl(path))``.

    Use :func:`iter_jsonl` for big files (it holds one line at a time).

    Example:
        >>> import pathlib, tempfile
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "events.jsonl"
        >>> _ = p.write_text('{"v": "1", "type": "event"}\\n')
        >>> read_jsonl(p)
        Traceback (most recent call last):
        ...
        ValueError: /...events.jsonl:1: schema version 'v' must be an integer, got '1'
    """
    _path_arg(path, "read_jsonl")
    return list(iter_jsonl(path, warn=warn))


def _path_arg(path: Any, owner: str) -> None:
    """Refuse a ``path`` that is no path, naming ``owner`` (found by a stranger: None gave
    pathlib's bare TypeError)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{owner}(path={path!r}): expected a file path (str or os.PathLike)")


def call_sinks(sinks: Sequence[Sink], flush: Flush, failed: set[int]) -> None:
    """Deliver a flush to every sink; a failing sink is reported once, then skipped."""
    for i, sink in enumerate(sinks):
        if i in failed:
            continue
        try:
            sink.write(flush)
        except Exception as e:  # a sink must never stop training
            failed.add(i)
            warnings.warn(
                f"gradguard: sink {type(sink).__name__} failed and is disabled for this run: "
                f"{type(e).__name__}: {e}",
                RuntimeWarning,
                stacklevel=3,
            )


def listed(layers: Sequence[str], most: int = 3) -> str:
    """A short list of layer names for a message, each in backticks (code in the report).

    Example:
        >>> listed(["a", "b", "c", "d", "e"])
        '`a`, `b`, `c` and 2 more'
    """
    shown = ", ".join(f"`{n}`" for n in layers[:most])
    return shown + (f" and {len(layers) - most} more" if len(layers) > most else "")
