"""``gradguard run`` switched on from the environment, for launchers that start
``python train.py`` themselves.

``torchrun`` can run gradguard directly (``torchrun --nproc-per-node 2 -m gradguard run
train.py``). Launchers that only run a script file (``accelerate launch``, DeepSpeed,
cluster job scripts) get it from the environment instead: put the folder this module
prints on ``PYTHONPATH`` and set ``GRADGUARD`` to ``1`` or to ``gradguard run`` options::

    export PYTHONPATH="$(python -m gradguard.integrations.auto):$PYTHONPATH"
    GRADGUARD="--clip zclip" accelerate launch train.py --lr 3e-4

Python then runs that folder's ``sitecustomize`` at start-up, which calls
:func:`activate` for the script being run (never for ``python -c``, a REPL or a
launcher's own process). Under ``torch.distributed`` only rank 0 (``RANK``) writes the
run directory. At interpreter exit the guards are closed, the reports written and the
summary printed. The script's exit code is unchanged; ``--fail-on-divergence`` needs
``gradguard run`` itself (an exit hook cannot change the exit code).
"""

from __future__ import annotations

import argparse
import atexit
import gc
import os
import shlex
import sys
import time
from pathlib import Path

from . import _rundir
from ._summary import RunResult, format_summary
from .run import ZeroCodeSession

#: The environment variable that switches guarding on.
ENV = "GRADGUARD"
#: The folder to put on ``PYTHONPATH`` (it holds only ``sitecustomize.py``).
SITE_DIR = Path(__file__).with_name("_site")
_OFF = ("", "0", "off", "false", "no")


def options(value: str) -> list[str]:
    """``gradguard run`` options from the variable's value (``"1"``: the defaults).

    Example:
        >>> options("1"), options("--clip zclip --no-recovery")
        ([], ['--clip', 'zclip', '--no-recovery'])
    """
    return [] if value.strip().lower() in ("1", "on", "true", "yes") else shlex.split(value)


def _parse(opts: list[str], script: str) -> argparse.Namespace:
    from ..cli import run as cli_run

    sub = argparse.ArgumentParser(prog="gradguard").add_subparsers()
    cli_run.register(sub)
    parser: argparse.ArgumentParser = sub.choices["run"]
    return parser.parse_args([*opts, script])


def activate(argv: list[str] | None = None) -> ZeroCodeSession | None:
    """Guard the script being run, as ``gradguard run`` would, until the interpreter exits.

    Returns the installed session, or None when ``GRADGUARD`` is unset/``0`` or ``argv``
    (default ``sys.argv``) does not run a script file.
    """
    argv = sys.argv if argv is None else argv
    value = os.environ.get(ENV, "")
    script = argv[0] if argv else ""
    if value.strip().lower() in _OFF or not script.endswith(".py") or not Path(script).is_file():
        return None
    from ..cli.run import build_config, resume_arg, sinks_for

    args = _parse(options(value), script)
    base = Path(args.out) if args.out is not None else Path("runs") / Path(script).stem
    run_dir, resume_from = _rundir.open_run(base, resume_arg(args))
    session = ZeroCodeSession(run_dir, build_config(args), script_clip=args.script_clip,
                              report=not args.no_report, resume_from=resume_from,
                              sinks_for=sinks_for(args))
    session.install()
    crashed: list[BaseException] = []
    hook = sys.excepthook

    def excepthook(tp: type[BaseException], exc: BaseException, tb: object) -> None:
        crashed.append(exc)
        hook(tp, exc, tb)  # type: ignore[arg-type]

    sys.excepthook = excepthook
    started = time.time()

    held = [session]  # let go of at exit (see finish)

    def finish() -> None:
        session = held.pop()
        session.close()
        if run_dir is not None:
            # an exit hook cannot see sys.exit's code: -1 says "not known" (0 or the script's)
            result = RunResult(script, argv[1:], 1 if crashed else -1, run_dir, session.rows)
            result.write(run_dir, crashed[0] if crashed else None, started,
                         resumed=resume_from is not None,
                         clips_applied_at_once=dict(session.interceptor.immediate))
            print(format_summary(result, crashed[0] if crashed else None), file=sys.stderr)
        # the script's models go now, while the interpreter is fully alive (see run_script)
        del session
        gc.collect()

    atexit.register(finish)
    print(f"gradguard: {ENV} is set: guarding {script} -> {run_dir}", file=sys.stderr)
    return session


if __name__ == "__main__":  # pragma: no cover - prints the folder for PYTHONPATH
    print(SITE_DIR)
