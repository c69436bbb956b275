"""``gradguard doctor spec.py``."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser(
        "doctor",
        help="diagnose exploding/vanishing gradients of a model on one batch",
        description=(
            "Load SPEC (a Python file defining setup() -> (model, batch, loss_fn[, optimizer])), "
            "run gg.doctor on it and print the diagnosis. Exit 0 when healthy, 1 when a "
            "warning or error was found, 2 on a usage error."
        ),
        epilog="example:  gradguard doctor spec.py --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("spec", help="Python file that defines setup()")
    p.add_argument("--json", action="store_true", help="print diag.to_dict() as JSON")
    p.add_argument("--save", metavar="PATH", help="also write the diagnosis JSON to PATH (atomic)")
    p.add_argument("--budget", type=float, metavar="SECONDS",
                   help="the time the probes share (default: 5 s up to 30M parameters, more "
                        "above); a larger one lets the LR probe finish its comparisons")
    p.set_defaults(func=command)


def load_setup(path: str) -> tuple[Any, ...]:
    from . import UsageError

    spec_path = Path(path)
    if spec_path.is_dir():
        raise UsageError(f"spec {path!r}: is a directory; give the Python file that "
                         "defines setup()")
    if not spec_path.is_file():
        raise UsageError(f"spec {path!r}: no such file")
    spec = importlib.util.spec_from_file_location("gradguard_doctor_spec", spec_path)
    if spec is None or spec.loader is None:
        raise UsageError(f"spec {path!r}: cannot be loaded as a Python module")
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(spec_path.resolve().parent))
    try:
        spec.loader.exec_module(mod)
    except Exception as e:  # the spec's own code is broken: no finding about the model
        raise UsageError(_raised(path, "running it", e)) from e
    finally:
        sys.path.pop(0)
    setup = getattr(mod, "setup", None)
    if setup is None:
        raise UsageError(f"spec {path!r}: defines no setup() function")
    if not callable(setup):
        raise UsageError(f"spec {path!r}: setup is not a function (it is of type "
                         f"{type(setup).__name__}); define setup() returning (model, batch, "
                         "loss_fn[, optimizer])")
    try:
        got = setup()
    except Exception as e:
        raise UsageError(_raised(path, "setup()", e)) from e
    if not isinstance(got, (tuple, list)) or len(got) not in (3, 4):
        raise UsageError(
            f"spec {path!r}: setup() must return (model, batch, loss_fn[, optimizer]), got "
            f"{type(got).__name__}" + (f" of length {len(got)}" if isinstance(got, (tuple, list)) else "")
        )
    return tuple(got)


def _raised(path: str, what: str, e: BaseException) -> str:
    """A usage error's text for an exception the spec raised, with the traceback's frames
    in the spec (exit 2, not the findings code 1: a CI check must tell them apart)."""
    import traceback

    frames = [f"  {Path(fr.filename).name}:{fr.lineno}: {fr.line}" for fr in
              traceback.extract_tb(e.__traceback__) if Path(fr.filename).resolve()
              == Path(path).resolve()]
    if isinstance(e, SyntaxError) and e.lineno is not None:
        frames = [f"  {Path(path).name}:{e.lineno}: {(e.text or '').strip()}"]
    where = ("\n" + "\n".join(frames)) if frames else ""
    return f"spec {path!r}: {what} raised {type(e).__name__}: {e}{where}"


def _print_rich(diag: Any) -> bool:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        return False
    console = Console()
    colour = {"error": "bold red", "warning": "yellow", "info": "cyan"}
    title = f"gradguard doctor: {diag.model} ({diag.n_params:,} parameters)"
    if not diag.findings:
        console.print(f"[bold]{title}[/bold]\n[green]healthy: no finding.[/green]")
        if diag.cut:
            console.print(diag.cut_note().strip(), markup=False)
        return True
    table = Table(title=title, show_lines=True)
    for col in ("#", "severity", "cause", "where", "evidence", "remedy"):
        table.add_column(col, overflow="fold")
    for i, f in enumerate(diag.findings, 1):
        ev = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in list(f.evidence.items())[:8])
        table.add_row(str(i), f"[{colour[f.severity]}]{f.severity}[/]", f.cause, f.where or "-", ev, f.remedy)
    console.print(table)
    verdict = "[green]healthy (info only)[/green]" if diag.healthy else f"[bold red]top cause: {diag.top.cause}[/bold red]"
    console.print(verdict)
    if diag.cut:
        console.print(diag.cut_note().strip(), markup=False)
    return True


def command(args: argparse.Namespace) -> int:
    from ..doctor import doctor
    from . import EXIT_FINDINGS, EXIT_OK, UsageError

    if args.budget is not None and not (math.isfinite(args.budget) and args.budget > 0):
        # found by a stranger: the error named the internal keyword budget_s and the spec
        raise UsageError(f"--budget {args.budget:g}: must be a number of seconds > 0")
    got = load_setup(args.spec)
    try:
        diag = doctor(*got, budget_s=args.budget)
    except (TypeError, ValueError) as e:
        raise UsageError(f"spec {args.spec!r}: {e}") from e
    if args.save:
        try:
            diag.save(args.save)
        except OSError as e:
            raise UsageError(f"--save {args.save!r}: cannot be written: "
                             f"{e.strerror or e}") from e
    if args.json:
        print(json.dumps(diag.to_dict(), indent=1))
    elif not (sys.stdout.isatty() and _print_rich(diag)):
        print(diag)
    return EXIT_OK if diag.healthy else EXIT_FINDINGS
