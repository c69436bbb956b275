"""``gradguard lab``."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser(
        "lab",
        help="reproduce the classic exploding/vanishing-gradient experiments on CPU",
        description=(
            "Run the lab experiments T0..T11 (or one of them) with gradguard's telemetry. "
            "Each writes OUT/<ID>/result.json (measured vs reference figures, pass/fail "
            "per claim, what the default guard did) and PNG plots."
        ),
        epilog="example:  gradguard lab all --out lab_results --fast",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("id", nargs="?", default="all", help="T0..T11 or 'all' (default: all)")
    p.add_argument("--out", default="lab_results", help="results folder (default: lab_results)")
    p.add_argument("--fast", action="store_true", help="few steps / small models (seconds each)")
    p.add_argument("--list", action="store_true", help="list the experiments and exit")
    p.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    from .. import lab
    from . import EXIT_FINDINGS, EXIT_OK, UsageError

    if args.list:
        for key in lab.ORDER:
            print(f"{key:>4}  {lab.title(key)}")
        return EXIT_OK
    ids = list(lab.ORDER) if args.id.lower() == "all" else [args.id]
    try:
        ids = [lab._canonical(i) for i in ids]
    except ValueError as e:
        raise UsageError(str(e)) from e
    from ..rundir import dir_problem

    if (problem := dir_problem(args.out)) is not None:
        # found by a stranger: --out naming a file ended in a NotADirectoryError traceback
        raise UsageError(f"--out {args.out}: {problem}")
    try:
        from rich.console import Console
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    except ImportError:  # rich is optional: plain lines instead of a progress bar
        Progress = None  # type: ignore[assignment,misc]

    def line(r: lab.Result) -> str:
        ok = sum(c.passed for c in r.claims)
        guard = lab.guard_outcome(r)
        return (f"{r.id:>4} {'PASS' if r.passed else 'FAIL'} {ok}/{len(r.claims)} claims  "
                f"{r.seconds:6.1f}s  {r.title}" + (f"\n       {guard}" if guard else ""))

    if Progress is not None:
        console = Console(stderr=True)
        with Progress(
            SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console
        ) as prog:
            task = prog.add_task("lab", total=len(ids))

            def progress(key: str, r: lab.Result | None) -> None:
                if r is None:
                    prog.update(task, description=f"{key}: {lab.title(key)}")
                else:
                    prog.console.print(line(r))
                    prog.advance(task)

            results = lab.run_all(out=args.out, fast=args.fast, ids=ids, progress=progress)
    else:

        def progress(key: str, r: lab.Result | None) -> None:
            if r is not None:
                print(line(r), flush=True)

        results = lab.run_all(out=args.out, fast=args.fast, ids=ids, progress=progress)
    failed = [r.id for r in results if not r.passed]
    print(f"results in {args.out}/ (summary.md); claims failed in: {', '.join(failed) or 'none'}")
    return EXIT_FINDINGS if failed else EXIT_OK
