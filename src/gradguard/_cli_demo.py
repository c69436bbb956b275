"""``gradguard demo``."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="train an unstable model unguarded and guarded, and compare",
        description=(
            "Train the same model twice on data with corrupted batches: once unguarded "
            "(it diverges to NaN), once under Guard(clip=ZClip()) (it recovers). Prints a "
            "side-by-side summary and writes the guarded run's JSONL files."
        ),
        epilog="example:  gradguard demo --out runs/demo --steps 400 --seed 0",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    p.add_argument("--steps", type=int, default=400, help="training steps per run (default: 400)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .cli import EXIT_FINDINGS, EXIT_OK, UsageError
    from .demo import format_summary, run_demo

    if args.steps < 40:
        raise UsageError(f"--steps {args.steps}: must be >= 40 so the corrupted batches land")
    a, b = run_demo(out=args.out, steps=args.steps, seed=args.seed)
    print(format_summary(a, b, args.out))
    return EXIT_OK if (a.broke and not b.broke) else EXIT_FINDINGS
