"""The ``gradguard`` command line.

Each subcommand lives in its own module that exposes ``register(subparsers)``; the module
list is :data:`SUBCOMMANDS`. Exit codes: 0 ok, 1 findings/divergence, 2 usage error.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .. import __version__

EXIT_OK, EXIT_FINDINGS, EXIT_USAGE = 0, 1, 2

#: Modules that register a subcommand (``register(subparsers) -> None``); the parser they
#: add must set ``func=handler`` where ``handler(args) -> int`` returns the exit code.
SUBCOMMANDS: tuple[str, ...] = tuple(
    f"gradguard.cli.{name}" for name in ("demo", "bench", "report", "run", "lab", "doctor")
)


class UsageError(Exception):
    """A bad command line or input file: printed without a traceback, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradguard",
        description="Detect, diagnose and fix exploding and vanishing gradients in PyTorch.",
        epilog="Start with:  gradguard demo",
    )
    parser.add_argument("--version", action="version", version=f"gradguard {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in SUBCOMMANDS:
        importlib.import_module(mod).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.func(args))
    except UsageError as e:
        print(f"gradguard {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
