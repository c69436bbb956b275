"""``gradguard run``: guard every optimizer of an unmodified training script."""

from __future__ import annotations

import argparse
from typing import Any

from ..guard import DEFAULT_EVERY, ON_NONFINITE


def register(sub: Any) -> None:
    p = sub.add_parser(
        "run",
        help="run a training script with every optimizer it creates guarded (zero code)",
        description=(
            "Run an unmodified training script as __main__. Every torch.optim optimizer it "
            "steps is guarded (global step hooks): gradients are measured and clipped, "
            "non-finite steps are skipped, and at exit (also on Ctrl-C or an error, which is "
            "re-raised) the run directory (events.jsonl, metrics.jsonl, run.json) and "
            "report.html are written. A second optimizer writes to OUT/optimizer1, and so on. "
            "The script's exit code is returned; gradguard's own files never change it (a "
            "full disk is a warning). OUT is checked before the script starts: exit 2 if it "
            "cannot be created or written."
        ),
        epilog=(
            "examples:\n"
            "  gradguard run --clip zclip train.py --lr 3e-4\n"
            "  python -m gradguard run --clip norm:1.0 --out runs/exp1 train.py"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--clip",
        default="none",
        metavar="POLICY",
        help="zclip | autoclip | norm:MAX | value:MAX | agc | none (default: none: measure "
        "and skip non-finite steps only)",
    )
    p.add_argument(
        "--on-nonfinite",
        default="skip",
        choices=list(ON_NONFINITE),
        help="what to do with a non-finite gradient (default: skip)",
    )
    p.add_argument("--out", default=None, help="run directory (default: runs/<script name>)")
    p.add_argument(
        "--every",
        type=int,
        default=DEFAULT_EVERY,
        help=f"telemetry flush interval in steps (default: {DEFAULT_EVERY})",
    )
    p.add_argument("--no-report", action="store_true", help="do not write report.html")
    p.add_argument("script", help="the training script")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the script")
    p.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..integrations._hooked import parse_clip
    from ..integrations.run import OutDirError, run_script
    from . import UsageError

    if not Path(args.script).is_file():
        raise UsageError(f"script {args.script!r} does not exist or is not a file")
    try:
        parse_clip(args.clip)
    except ValueError as e:
        raise UsageError(f"--clip: {e}") from e
    if args.every < 1:
        raise UsageError(f"--every {args.every}: must be >= 1")
    try:
        result = run_script(
            args.script,
            args.args,
            out=args.out,
            clip=args.clip,
            on_nonfinite=args.on_nonfinite,
            every=args.every,
            report=not args.no_report,
        )
    except OutDirError as e:  # raised before the script starts: the script's own errors pass
        raise UsageError(str(e)) from e
    return result.exit_code
