"""``gradguard bench``."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="measure gradguard's step-time overhead against bare AdamW",
        description=(
            "Time a full training step (MLP 6x1024 and a 4-layer d=256 transformer, 1 thread) "
            "for bare AdamW, AdamW + clip_grad_norm_, and AdamW under gradguard's Guard, "
            "interleaved in one process; print ratios and optionally write JSON."
        ),
        epilog="example:  gradguard bench --quick --out overhead.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="small models, few repeats (seconds)")
    p.add_argument("--out", default=None, help="write the results as JSON to this file")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .bench import format_report
    from .bench import run as run_bench
    from .cli import EXIT_OK, UsageError

    if args.threads < 1:
        raise UsageError(f"--threads {args.threads}: must be >= 1")
    print(format_report(run_bench(quick=args.quick, out=args.out, threads=args.threads)))
    return EXIT_OK
