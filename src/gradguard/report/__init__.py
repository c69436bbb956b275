"""HTML incident report of a run directory: ``gg.report(run_dir)`` and ``gradguard report``."""

from __future__ import annotations

from ._data import ReportError, RunData, load_run
from ._html import report

__all__ = ["ReportError", "RunData", "load_run", "report"]
