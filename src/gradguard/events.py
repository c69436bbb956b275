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
from collections.abc import Sequence
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
    "rollback",
    "abort",
    "clip",
    "update_ratio",
    # a precursor of divergence seen before the loss spikes (gradguard.precursors)
    "divergence_risk",
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
    """

    steps: list[dict[str, Any]]
    layers: dict[str, Any]
    events: list[Event]
    window: Any = None


@runtime_checkable
class Sink(Protocol):
    """Receives flushes. Implement ``write`` and ``close``."""

    def write(self, flush: Flush) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """Append-only JSONL files in a run directory.

    Writes ``events.jsonl`` (one event per line) and ``metrics.jsonl`` (one line per step
    plus one ``"type": "layers"`` line per flush). Every line carries ``"v": 1``; every write
    is flushed and fsynced so that a killed process loses at most the line being written.

    Example:
        >>> import tempfile, gradguard as gg
        >>> sink = gg.JsonlSink(tempfile.mkdtemp())
        >>> sink.close()
    """

    def __init__(self, run_dir: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.run_dir = Path(run_dir)
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"JsonlSink run_dir={str(run_dir)!r} cannot be created: {e}") from e
        if not os.access(self.run_dir, os.W_OK):
            raise ValueError(f"JsonlSink run_dir={str(run_dir)!r} is not writable")
        self.fsync = fsync
        self.events_path = self.run_dir / "events.jsonl"
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self._events = open(self.events_path, "a", encoding="utf-8")
        self._metrics = open(self.metrics_path, "a", encoding="utf-8")

    def _append(self, fh: Any, lines: Sequence[dict[str, Any]]) -> None:
        if not lines:
            return
        fh.write("".join(json.dumps(x, allow_nan=False) + "\n" for x in lines))
        fh.flush()
        if self.fsync:
            os.fsync(fh.fileno())

    def write(self, flush: Flush) -> None:
        metrics = [{"v": SCHEMA_VERSION, "type": "step", **r} for r in flush.steps]
        if flush.layers:
            metrics.append({"v": SCHEMA_VERSION, "type": "layers", **flush.layers})
        self._append(self._metrics, metrics)
        self._append(self._events, [e.to_json() for e in flush.events])

    def close(self) -> None:
        for fh in (self._events, self._metrics):
            if not fh.closed:
                fh.close()


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a gradguard JSONL file.

    A truncated *last* line (a killed writer) is skipped with a warning; a corrupt line
    elsewhere, or a line from a newer schema version, raises ``ValueError`` naming the file
    and line number.
    """
    p = Path(path)
    out: list[dict[str, Any]] = []
    with open(p, encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines):
                warnings.warn(
                    f"{p}:{i}: truncated last line skipped (was the run killed?)",
                    stacklevel=2,
                )
                break
            raise ValueError(f"{p}:{i}: corrupt JSON line: {e.msg}") from e
        if not isinstance(rec, dict) or "v" not in rec:
            raise ValueError(f"{p}:{i}: not a gradguard record (no schema version 'v')")
        if rec["v"] > SCHEMA_VERSION:
            raise ValueError(
                f"{p}:{i}: schema version {rec['v']} is newer than this gradguard "
                f"understands ({SCHEMA_VERSION}); upgrade gradguard"
            )
        out.append(rec)
    return out


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
