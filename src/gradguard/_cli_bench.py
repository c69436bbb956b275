"""``gradguard bench``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO


def register(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="measure gradguard's step-time overhead against bare AdamW",
        description=(
            "Time a full training step (MLP 6x1024 and a 4-layer d=256 transformer, 1 thread) "
            "for bare AdamW, AdamW + clip_grad_norm_, and AdamW under gradguard's Guard, "
            "interleaved in one process; print ratios and optionally write JSON. Takes "
            "minutes (seconds with --quick): progress per workload and variant is shown as a "
            "rich bar on a terminal, as plain lines on stderr otherwise.\n\n"
            "Exit codes: 0 measured, 2 usage error."
        ),
        epilog="example:  gradguard bench --quick --out overhead.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="small models, few repeats (seconds)")
    p.add_argument("--out", default=None, help="write the results as JSON to this file")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    p.set_defaults(func=run)


ProgressFn = Callable[[str, str, int, int], None]


@contextmanager
def progress_display(terminal: bool, file: TextIO | None = None) -> Iterator[ProgressFn]:
    """Yield a ``progress(workload, stage, done, total)`` callback for :func:`gradguard.bench.run`.

    On a terminal (and with ``rich`` installed): one rich progress bar per workload, with
    the variant being warmed up or the round being timed. Otherwise: plain lines on
    ``file`` (default ``sys.stderr``, so the report on stdout stays clean) for each new
    workload, each variant's warm-up, every quarter of the rounds, and the end.
    """
    rich_progress: Any = None
    if terminal:
        try:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )
        except ImportError:  # rich is optional: plain lines instead
            pass
        else:
            console = Console(file=file, force_terminal=True)
            rich_progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
            )
    if rich_progress is not None:
        tasks: dict[str, Any] = {}

        def on_rich(workload: str, stage: str, done: int, total: int) -> None:
            if workload not in tasks:
                tasks[workload] = rich_progress.add_task(workload, total=total)
            rich_progress.update(
                tasks[workload], completed=done, total=total, description=f"{workload}: {stage}"
            )

        with rich_progress:
            yield on_rich
        return

    out = file if file is not None else sys.stderr
    seen: set[str] = set()

    def on_plain(workload: str, stage: str, done: int, total: int) -> None:
        if workload not in seen:
            seen.add(workload)
            print(f"bench: {workload}", file=out, flush=True)
        if stage.startswith("round "):
            i, n = (int(v) for v in stage.split()[1].split("/"))
            if i != 1 and i % max(n // 4, 1) != 0:
                return
        print(f"bench: {workload}: {stage} ({done}/{total})", file=out, flush=True)

    yield on_plain


def run(args: argparse.Namespace) -> int:
    from .bench import format_report
    from .bench import run as run_bench
    from .cli import EXIT_OK, UsageError

    if args.threads < 1:
        raise UsageError(f"--threads {args.threads}: must be >= 1")
    with progress_display(sys.stdout.isatty()) as progress:
        report = run_bench(quick=args.quick, out=args.out, threads=args.threads, progress=progress)
    print(format_report(report))
    return EXIT_OK
