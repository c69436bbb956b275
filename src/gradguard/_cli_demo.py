"""``gradguard demo``."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="train an unstable model unguarded and guarded, compare, write a report",
        description=(
            "Train the same 6-layer MLP twice on data with corrupted batches (inputs blown "
            "up by 1e4, one NaN feature): once unguarded (it diverges to NaN), once under "
            "Guard(clip=ZClip(), recovery=Recovery()) (it recovers). Prints a side-by-side "
            "summary, writes the guarded run's JSONL files and an HTML report to --out, and "
            "prints the report's path. Takes seconds on a CPU; downloads nothing.\n\n"
            "Exit codes: 0 the unguarded run broke and the guarded one recovered, "
            "1 otherwise, 2 usage error."
        ),
        epilog="example:  gradguard demo --out runs/demo --steps 400 --seed 0",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    p.add_argument("--steps", type=int, default=400, help="training steps per run (default: 400)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.set_defaults(func=run)


def _progress() -> tuple[AbstractContextManager[Any], Callable[[str, int], Callable[[], None]] | None]:
    """A rich progress bar on a terminal (stderr); nothing otherwise."""
    if not sys.stderr.isatty():
        return nullcontext(), None
    try:
        from rich.progress import Progress
    except ImportError:
        return nullcontext(), None
    bar = Progress(transient=True)

    def start(name: str, total: int) -> Callable[[], None]:
        task = bar.add_task(f"training {name}", total=total)
        return lambda: bar.advance(task)

    return bar, start


def run(args: argparse.Namespace) -> int:
    from .cli import EXIT_FINDINGS, EXIT_OK, UsageError
    from .demo import format_summary, rich_summary, run_demo

    if args.steps < 40:
        raise UsageError(f"--steps {args.steps}: must be >= 40 so the corrupted batches land")
    ctx, progress = _progress()
    with ctx:
        a, b = run_demo(out=args.out, steps=args.steps, seed=args.seed, progress=progress)
    if sys.stdout.isatty():
        try:
            from rich.console import Console

            Console().print(rich_summary(a, b))
        except ImportError:
            print(format_summary(a, b, args.out))
    else:
        print(format_summary(a, b, args.out))
    try:
        from .report import report
        from .report._data import load_run, summary_sentence

        path = report(args.out, Path(args.out) / "report.html")
        sentence = re.sub(r"`([^`]+)`", r"layer '\1'", summary_sentence(load_run(args.out)))
        print(f"guarded run: {sentence}")
        print(f"report: {path.resolve()}")
    except ImportError as e:
        print(f"gradguard demo: no HTML report: {e}", file=sys.stderr)
    return EXIT_OK if (a.broke and not b.broke) else EXIT_FINDINGS
