"""``Finding`` and ``Diagnosis``: what the doctor found, readable and JSON-serialisable."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..events import CAUSES, SCHEMA_VERSION, SEVERITIES, Severity

#: Root causes before the symptoms they provoke: a NaN in the batch explains a NaN loss, a
#: bad init explains an LR that diverges. Used to order findings of equal urgency.
CAUSE_PRIORITY: tuple[str, ...] = (
    "nonfinite_input",
    "half_precision_overflow",
    "wrong_gradient",
    "nonfinite_loss",
    "unscaled_input",
    "recurrent_explosion",
    "recurrent_vanishing",
    "init_too_large",
    "init_too_small",
    "saturating_activation",
    "dead_units",
    "lr_too_high",
    "disconnected_layer",
)
#: The LR is a root cause as a signal that decays is, not a symptom of the layers after
#: it: an ``lr_too_high`` error ranks with ``init_too_small`` (found by a stranger: a
#: 10-layer ReLU MLP at AdamW 0.1, its loss 2.3 -> 142 in one step, an ``lr_too_high``
#: error, led with an ``init_too_small`` warning whose He init left it at chance). Not with
#: ``init_too_large``: weights too large make any LR diverge (a ReLU MLP with weights x5
#: at SGD 0.05, told to lower its LR 100x, trains at it once re-initialised).
LR_SLOT = CAUSE_PRIORITY.index("init_too_small")
_SEV_RANK = {"error": 0, "warning": 1, "info": 2}


def _jsonable(x: Any) -> Any:
    """Evidence as JSON: non-finite floats become the strings ``"nan"``, ``"inf"``, ``"-inf"``."""
    if isinstance(x, bool) or x is None or isinstance(x, (int, str)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else repr(x)
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    try:
        return _jsonable(float(x))
    except (TypeError, ValueError):
        return str(x)


@dataclass
class Finding:
    """One cause the doctor found, with the numbers it measured.

    Attributes:
        cause: one of :data:`gradguard.events.CAUSES`.
        severity: ``"info"``, ``"warning"`` or ``"error"``.
        where: the module path it is about (``"net.3"``), ``"batch"``, ``"loss_fn"``, or None.
        evidence: measured numbers (JSON-serialisable).
        remedy: one sentence the user can act on.
        confidence: 0..1, how sure the probe is that this is the cause.

    Example:
        >>> from gradguard.doctor import Finding
        >>> f = Finding("dead_units", "warning", "net.1", {"dead_fraction": 0.97},
        ...             "lower the bias", 0.9)
        >>> f.to_dict()["cause"]
        'dead_units'
    """

    cause: str
    severity: Severity
    where: str | None
    evidence: dict[str, Any] = field(default_factory=dict)
    remedy: str = ""
    confidence: float = 1.0

    def __post_init__(self) -> None:
        if self.cause not in CAUSES:
            raise ValueError(f"Finding cause={self.cause!r} is not known; allowed: {CAUSES}")
        if self.severity not in SEVERITIES:
            raise ValueError(f"Finding severity={self.severity!r}; allowed: {SEVERITIES}")
        if not 0.0 <= self.confidence <= 1.0:
            raise ValueError(f"Finding confidence={self.confidence!r}; allowed: 0..1")

    def to_dict(self) -> dict[str, Any]:
        return {
            "cause": self.cause,
            "severity": self.severity,
            "where": self.where,
            "evidence": _jsonable(self.evidence),
            "remedy": self.remedy,
            "confidence": round(float(self.confidence), 3),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Finding:
        return cls(
            cause=d["cause"],
            severity=d["severity"],
            where=d.get("where"),
            evidence=dict(d.get("evidence") or {}),
            remedy=d.get("remedy", ""),
            confidence=float(d.get("confidence", 1.0)),
        )

    def sort_key(self) -> tuple[int, int, int, int, float]:
        actionable = 0 if self.severity in ("error", "warning") else 1
        order = CAUSE_PRIORITY.index(self.cause)
        return (
            actionable,
            LR_SLOT if self.cause == "lr_too_high" and self.severity == "error" else order,
            _SEV_RANK[self.severity],
            order,
            -self.confidence,
        )

    def __str__(self) -> str:
        ev = ", ".join(f"{k}={_fmt(v)}" for k, v in self.evidence.items())
        where = f" at {self.where}" if self.where else ""
        return (
            f"[{self.severity}] {self.cause}{where} (confidence {self.confidence:.2f})\n"
            f"    evidence: {ev or '-'}\n    remedy: {self.remedy}"
        )


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, (list, tuple)) and v and isinstance(v[0], dict):
        return f"[{len(v)} records]"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v[:8]) + (", ..." if len(v) > 8 else "") + "]"
    return str(v)


@dataclass
class Diagnosis:
    """The doctor's verdict: findings, most urgent first.

    Findings are ordered: ``error``/``warning`` before ``info``; among those, root causes
    before the symptoms they provoke (see :data:`CAUSE_PRIORITY`; an ``lr_too_high`` error
    ranks with ``init_too_small``, :data:`LR_SLOT`), then ``error`` before ``warning``, then by
    confidence.

    Attributes:
        findings: the findings, in that order.
        model: the model's class name.
        n_params: number of parameters of the model.
        probes: the probes that ran.
        elapsed_s: wall time of the diagnosis.
        budget_s: the time budget the probes shared.
        cut: what the budget cut short (e.g. ``"lr: stopped before lr x 0.01"``).

    Example:
        >>> from gradguard.doctor import Diagnosis
        >>> Diagnosis([], model="MLP", n_params=10).healthy
        True
    """

    findings: list[Finding] = field(default_factory=list)
    model: str = ""
    n_params: int = 0
    probes: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    budget_s: float | None = None
    cut: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.findings = sorted(self.findings, key=Finding.sort_key)

    @property
    def top(self) -> Finding | None:
        """The most urgent finding, or None."""
        return self.findings[0] if self.findings else None

    @property
    def healthy(self) -> bool:
        """True when no finding is a ``warning`` or an ``error``."""
        return all(f.severity == "info" for f in self.findings)

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": SCHEMA_VERSION,
            "type": "diagnosis",
            "model": self.model,
            "n_params": self.n_params,
            "healthy": self.healthy,
            "probes": list(self.probes),
            "elapsed_s": round(self.elapsed_s, 4),
            "budget_s": self.budget_s,
            "cut_by_budget": list(self.cut),
            "findings": [f.to_dict() for f in self.findings],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Diagnosis:
        if d.get("v", SCHEMA_VERSION) > SCHEMA_VERSION:
            raise ValueError(
                f"diagnosis schema version {d['v']} is newer than this gradguard "
                f"understands ({SCHEMA_VERSION}); upgrade gradguard"
            )
        return cls(
            findings=[Finding.from_dict(f) for f in d.get("findings", [])],
            model=d.get("model", ""),
            n_params=int(d.get("n_params", 0)),
            probes=list(d.get("probes", [])),
            elapsed_s=float(d.get("elapsed_s", 0.0)),
            budget_s=d.get("budget_s"),
            cut=list(d.get("cut_by_budget", [])),
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``to_dict()`` as JSON atomically (temp file, fsync, ``os.replace``)."""
        from ..rundir import write_atomic

        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        return write_atomic(p, json.dumps(self.to_dict(), indent=1, allow_nan=False))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Diagnosis:
        """Read a file written by :meth:`save` (or ``json.dump(diag.to_dict(), f)``)."""
        with open(path, encoding="utf-8") as fh:
            try:
                d = json.load(fh)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not a JSON diagnosis: {e.msg}") from e
        if not isinstance(d, dict) or d.get("type") != "diagnosis":
            raise ValueError(f"{path}: not a gradguard diagnosis (no \"type\": \"diagnosis\")")
        return cls.from_dict(d)

    def __str__(self) -> str:
        head = f"gradguard doctor: {self.model} ({self.n_params:,} parameters)"
        if not self.findings:
            return f"{head}\n  healthy: no finding.{self.cut_note()}"
        verdict = "healthy (info only)" if self.healthy else f"top cause: {self.findings[0].cause}"
        lines = [f"{head}: {verdict}"]
        for i, f in enumerate(self.findings, 1):
            lines.append(f"{i}. " + str(f).replace("\n", "\n  "))
        return "\n".join(lines) + self.cut_note()

    def cut_note(self) -> str:
        """A line naming the probes the time budget cut short (empty when none was): a
        "healthy" from a cut LR probe is a weaker verdict, and the text must say so."""
        if not self.cut:
            return ""
        budget = "" if self.budget_s is None else f" ({self.budget_s:.3g} s)"
        return (f"\n  cut short by the time budget{budget}: {'; '.join(self.cut)} "
                "(gg.doctor(..., budget_s=...) gives them longer)")
