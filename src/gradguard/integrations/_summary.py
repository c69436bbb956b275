"""The end of a zero-code run: each run directory's ``guard.json``, saved state, report
and judged outcome, the run's ``run.json``, and the lines printed to stderr."""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import GuardConfig
from ..rundir import guard_info
from . import _rundir


@dataclass
class RunResult:
    """What a zero-code run did (also written to ``<run_dir>/run.json``).

    Attributes:
        script, argv: what ran.
        exit_code: the script's own exit code (0, its ``sys.exit`` code, 1 on an
            exception, 130 on Ctrl-C); -1 when not known (the ``GRADGUARD`` switch).
        run_dir: this run's directory (None on ranks that write nothing).
        optimizers: one row per guarded optimizer (a trainer's included): steps, skips,
            clip, report, and ``outcome`` (:class:`gradguard.report._outcome.Outcome`
            as a dict, with ``ok``).
    """

    script: str
    argv: list[str]
    exit_code: int
    run_dir: Path | None
    optimizers: list[dict[str, Any]] = field(default_factory=list)
    #: optimizer class -> why its steps were not guarded (``step(closure)``, ...)
    unguarded: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """No guard's run diverged, stalled or was stopped (unjudged rows count as ok), and
        none went unrecorded (its run directory written by another process)."""
        return all((r.get("outcome") or {}).get("ok", True) and not r.get("refused")
                   for r in self.optimizers)

    def write(self, run_dir: Path, crashed: BaseException | None, started: float, *,
              resumed: bool, clips_applied_at_once: dict[str, int]) -> None:
        """Write ``run.json``; a resumed run keeps the earlier sessions' entries. Not when a
        guard's records were refused: the directory is another process's run."""
        if any(r.get("refused") for r in self.optimizers):
            return
        path = run_dir / "run.json"
        sessions: list[Any] = []
        if resumed and path.is_file():
            try:
                sessions = list(json.loads(path.read_text(encoding="utf-8")).get("sessions", []))
            except (ValueError, AttributeError):
                sessions = []
        error = None if crashed is None else f"{type(crashed).__name__}: {crashed}"
        sessions.append({"started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
                         "argv": self.argv, "exit_code": self.exit_code, "error": error})
        _rundir.write_json(path, {
            "v": 1, "script": self.script, "argv": self.argv, "exit_code": self.exit_code,
            "error": error, "ok": self.ok, "optimizers": self.optimizers,
            "unguarded": self.unguarded,
            "script_clips_applied_at_once": clips_applied_at_once, "sessions": sessions,
        })


def finish_run_dir(run_dir: Path, clip: Any, config: GuardConfig, state: dict[str, Any] | None,
                   guard: Any, info: dict[str, Any], immediate: dict[str, int],
                   report: bool) -> dict[str, Any]:
    """Write a guard's ``guard.json``, ``guard_state.pt`` and report; judge its outcome.
    Returns its row for ``run.json`` and the summary. A guard whose sink there was refused
    (another process writes the directory: its lock) writes nothing and is not judged:
    the directory's records are the other run's (found by a stranger: two ``gradguard run
    --resume-from`` of one directory at once, the second printed the first's verdict as
    its own, overwrote its ``guard.json``, and passed ``--fail-on-divergence``)."""
    meta = guard_info(clip, config, zero_code=True)
    if guard is not None and refused(guard, run_dir):
        return {**info, "run_dir": str(run_dir), "clip": meta["clip"], "refused": True,
                "report": None, "outcome": None, "steps": guard.step_count,
                "skipped_steps": guard.skipped_steps, "events": len(guard.events),
                "summary": (f"not recorded: another process writes {run_dir}, so nothing of "
                            "this run was written there and it is not judged; give each run "
                            "its own directory")}
    try:  # bookkeeping: a full disk costs a warning, never the script's outcome
        # "finished": the run reached its end (the report notes a directory without it)
        _rundir.write_json(run_dir / _rundir.GUARD_FILE, {**meta, "finished": True})
        if state is not None:
            _rundir.save_state(run_dir, state)
    except OSError as e:
        warnings.warn(f"gradguard run: the guard's files in {run_dir} not written: {e}",
                      RuntimeWarning, stacklevel=2)
    row: dict[str, Any] = {**info, "run_dir": str(run_dir), "clip": meta["clip"],
                           "report": write_report(run_dir) if report else None}
    if guard is not None:
        row.update(steps=guard.step_count, skipped_steps=guard.skipped_steps,
                   events=len(guard.events))
    try:
        from ..report._data import load_run
        from ..report._outcome import judge
        from ..report._summary import summary_sentence

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a truncated line was already reported
            data = load_run(run_dir)
        outcome = judge(data, meta)
        row.update(steps=data.n_steps, skipped_steps=int(data.skipped.sum()),
                   events=len(data.events), summary=summary_sentence(data, meta),
                   outcome={**outcome.to_dict(), "ok": outcome.ok})
    except (ImportError, ValueError) as e:  # no numpy, or nothing recorded (ReportError)
        row["outcome"] = None
        row["summary"] = f"not judged: {e}"
    return row


def refused(guard: Any, run_dir: Path) -> bool:
    """Whether ``guard``'s :class:`~gradguard.JsonlSink` into ``run_dir`` was refused: its
    first write found the directory locked by another process's sink (a sink that failed
    on a full disk is no such case: its records so far are its own)."""
    target = Path(run_dir).resolve()
    return any(getattr(sink, "locked_out", False)
               and Path(getattr(sink, "run_dir", "")).resolve() == target
               for sink in getattr(getattr(guard, "monitor", None), "sinks", ()))


def write_report(run_dir: str | os.PathLike[str]) -> str | None:
    """``gradguard.report(run_dir)`` when the report module is there; the path or None.

    A failing report is a warning, never a lost run: the JSONL files are already on disk.
    """
    import gradguard

    make = getattr(gradguard, "report", None)
    if make is None or not callable(make):
        return None
    try:
        out = make(run_dir)
    except ImportError as e:
        warnings.warn(f"gradguard: no report for {run_dir}: {e}", RuntimeWarning, stacklevel=2)
        return None
    except Exception as e:  # the run itself succeeded; say why the report is missing
        warnings.warn(
            f"gradguard: writing the report for {run_dir} failed: {type(e).__name__}: {e}",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    path = Path(out) if isinstance(out, (str, os.PathLike)) else Path(run_dir) / "report.html"
    return str(path) if path.exists() else None


def format_summary(result: RunResult, crashed: BaseException | None = None) -> str:
    """The lines ``gradguard run`` prints to stderr at the end."""
    if not result.optimizers and result.unguarded:  # it stepped, in a form not guarded
        why = "; ".join(f"{name}: {reason}" for name, reason in result.unguarded.items())
        return (f"gradguard run: {result.script} stepped its optimizers only in a form "
                f"gradguard cannot guard ({why}); nothing was guarded")
    if not result.optimizers:
        return (f"gradguard run: {result.script} never called optimizer.step(); nothing was "
                "guarded")
    how = "" if crashed is None else f" (the script raised {type(crashed).__name__})"
    code = "finished" if result.exit_code < 0 else f"exited with code {result.exit_code}"
    lines = [f"gradguard run: {result.script} {code}{how}; run directory {result.run_dir}"]
    for r in result.optimizers:
        if r.get("external"):
            what = r["name"] if r["kind"] == "optimizer" else f"{r['kind']} trainer"
            lines.append(f"  {what}: {r['summary']}"
                         + (f" -> {r['run_dir']}" if r.get("run_dir") else ""))
            continue
        who = r.get("name") or r.get("optimizer") or r["kind"]
        what = r.get("optimizer") or r["kind"]
        if r.get("replaced"):  # the script built a new optimizer over the same parameters
            what += f", built anew {r['replaced']} time{'s' * (r['replaced'] > 1)}"
        lines.append(f"  {who} ({what}, model {r.get('model') or '?'}): {r.get('steps')} steps, "
                     f"{r.get('skipped_steps')} skipped, {r.get('events')} events; "
                     f"clip: {r['clip']}")
        outcome = r.get("outcome") or {}
        status = str(outcome.get("status", "not judged")).upper().replace("_", " ")
        lines.append(f"    {status}: {r.get('summary', '')}")
        if outcome.get("evidence"):
            lines.append(f"    ({outcome['evidence']})")
        if outcome.get("remedy"):
            lines.append(f"    remedy: {outcome['remedy']}")
        lines.append(f"    -> {r.get('report') or r['run_dir']}")
    return "\n".join(lines)
