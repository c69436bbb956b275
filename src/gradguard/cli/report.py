"""``gradguard report``."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser(
        "report",
        help="write a self-contained HTML incident report for a run directory",
        description=(
            "Read RUN_DIR/metrics.jsonl and events.jsonl (written by gg.JsonlSink) and, when "
            "present, the doctor's diagnosis.json; write one HTML file with a summary "
            "sentence, loss and gradient-norm plots with events, a per-layer heatmap, the "
            "gradient flow, and the events with remedies. No network needed to view it.\n\n"
            "Exit codes: 0 written; 2 with one line naming the file (and line) for a "
            "missing or empty run directory, a corrupt line, bytes that are not UTF-8, a "
            "record without the fields its type needs, a newer schema, or an output that "
            "cannot be written. A truncated last line (a killed run), or a partial line that "
            "a resumed run ended, is skipped with a warning naming it."
        ),
        epilog="example:  gradguard report runs/exp1 -o exp1.html",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory with metrics.jsonl")
    p.add_argument(
        "-o", "--out", default=None, help="output file (default: RUN_DIR/report.html)"
    )
    p.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    from ..report import ReportError, report
    from . import EXIT_OK, UsageError

    try:
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    except ImportError:  # progress is a nicety; the report itself needs matplotlib
        Progress = None  # type: ignore[assignment,misc]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            if Progress is not None and sys.stderr.isatty():
                with Progress(
                    SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                    transient=True,
                ) as bar:
                    task = bar.add_task("reading run", total=None)
                    path = report(
                        args.run_dir, args.out,
                        progress=lambda what: bar.update(task, description=f"drawing {what}"),
                    )
            else:
                path = report(args.run_dir, args.out)
        except (ReportError, ImportError) as e:
            raise UsageError(str(e)) from e
        except OSError as e:  # reading errors are ReportErrors: this is the output
            target = args.out or os.path.join(args.run_dir, "report.html")
            raise UsageError(f"{target}: cannot be written: {e}") from e
    for w in caught:
        if issubclass(w.category, UserWarning):
            print(f"gradguard report: warning: {w.message}", file=sys.stderr)
    print(path)
    return EXIT_OK
