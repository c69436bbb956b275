"""Zero-code guarding: run an unmodified training script with every optimizer guarded.

``gradguard run [options] train.py [args]`` installs a :class:`ZeroCodeSession` and runs
the script as ``__main__``. The session guards

* every ``torch.optim`` optimizer the script steps itself: a global step pre-hook gives
  it a hook-driven :class:`~gradguard.Guard` the first time it steps (one guard step per
  ``optimizer.step()``: gradient accumulation, several optimizers and GAN-style loops
  work as written; a new optimizer over the same parameters, built each epoch, goes on
  with the run of the one it replaces). ``scaler.step(optimizer)`` of an enabled ``GradScaler`` is guarded
  with the scaler: the gradients are unscaled first (as ``scaler.step`` does anyway), the
  unscaled loss is recorded, and the scaler's own overflow skips are counted;
* every Lightning and Hugging Face ``Trainer`` the script builds, through its native
  callback (:mod:`._frameworks`).

The script's own ``clip_grad_norm_``/``clip_grad_value_`` calls are deferred to the
guard (:mod:`._clip_intercept`): gradguard records the true pre-clip norms, and the
script's clip as the clip that happened. Each run writes its own directory
(:mod:`._rundir`); at exit (normal, ``sys.exit``, Ctrl-C or an exception, which is then
re-raised) the guards are closed, reports written, and each run directory is judged on
its loss (:func:`gradguard.report._outcome.judge`).

Names: the first time an optimizer steps, the calling frames are searched for the
``nn.Module`` holding its parameters, so layers get module paths (``encoder.0``);
parameters no module claims are named from the optimizer (``param_group0.p3``).
"""

from __future__ import annotations

import gc
import os
import runpy
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..config import GuardConfig
from ..events import Sink
from ..rundir import dir_problem
from . import _rundir
from ._clip_policy import ScriptClipMode
from ._session import Unit, ZeroCodeSession
from ._summary import RunResult, format_summary, write_report

__all__ = ["OutDirError", "RunResult", "Unit", "ZeroCodeSession", "format_summary",
           "run_script", "write_report"]


def run_script(
    script: str | os.PathLike[str],
    argv: Sequence[str] = (),
    *,
    out: str | os.PathLike[str] | None = None,
    resume: str | os.PathLike[str] | None = None,
    config: GuardConfig | None = None,
    script_clip: ScriptClipMode = "compose",
    report: bool = True,
    quiet: bool = False,
    sinks_for: Callable[[Path], Sequence[Sink]] | None = None,
    **options: Any,
) -> RunResult:
    """Run ``script`` as ``__main__`` with ``argv``, every optimizer and trainer guarded.

    Args:
        out: where this script's runs go (default ``runs/<script name>``); this run gets
            ``out/<start time>``, and ``out/latest`` points at it.
        resume: continue a run directory instead (``"latest"`` or a path).
        config, options: the guards' :class:`~gradguard.GuardConfig` (``clip`` may be a
            command-line spelling such as ``"zclip"``).
        script_clip: how ``clip`` combines with the script's own clipping.

    Returns:
        The :class:`RunResult`: the script's exit code (0, or its ``sys.exit`` code), the
        run directory, and one row per guard with its judged outcome. An exception raised
        by the script (including ``KeyboardInterrupt``) is re-raised unchanged after the
        run directory and reports are written.

    Gradguard's own files never change the outcome: a disk that fills up or turns
    read-only during the run costs a warning, not the script's exit code.

    Raises:
        FileNotFoundError: ``script`` does not exist, or ``resume`` names no run.
        OutDirError: ``out`` cannot be created or written; raised before the script
            starts.
    """
    path = Path(script)
    if not path.is_file():
        raise FileNotFoundError(f"script {str(script)!r} does not exist or is not a file")
    base = Path(out) if out is not None else Path("runs") / path.stem
    problem = dir_problem(base)  # now, not at the script's first optimizer step
    if problem is not None:
        raise OutDirError(f"--out {base}: {problem}")
    try:
        run_dir, resume_from = _rundir.open_run(base, resume)
    except OSError as e:
        raise OutDirError(f"--out {base}: {e}") from e
    # gradguard's files go where the run directory was announced even when the script
    # changes directory (a relative path then landed under the new one, the announced
    # directory left empty and `gradguard report runs/x/latest` finding nothing)
    here = None if run_dir is None else Path(os.path.abspath(run_dir))
    session = ZeroCodeSession(here, config, script_clip=script_clip, report=report,
                              resume_from=resume_from, sinks_for=sinks_for, **options)
    result = RunResult(str(path), list(argv), 0, run_dir)
    if not quiet and run_dir is not None:
        print(f"gradguard run: {path} -> {run_dir}", file=sys.stderr)
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    sys.argv = [str(path), *argv]
    sys.path.insert(0, str(path.resolve().parent))
    crashed: BaseException | None = None
    started = time.time()
    session.install()
    term = _SigTerm()
    try:
        # as `python script.py` does (Python 3.9+): the script's __file__ is absolute, so a
        # script that changes directory still finds the files next to it
        runpy.run_path(os.path.abspath(path), run_name="__main__")
    except Terminated as e:  # a scheduler's time limit: finish the run dir, then exit so
        crashed = e
        result.exit_code = int(e.code)  # type: ignore[arg-type]
    except SystemExit as e:
        result.exit_code = _exit_code(e)
    except BaseException as e:  # finish the run dir, then re-raise it unchanged
        crashed = e
        result.exit_code = 130 if isinstance(e, KeyboardInterrupt) else 1
    finally:
        term.defer()  # a SIGTERM now waits until the run directory is finished
        sys.argv, sys.path[:] = saved_argv, saved_path
        session.close(failed=crashed is not None, error=crashed)
        result.optimizers = session.rows
        result.unguarded = dict(session.unguarded)
        if here is not None:
            try:
                result.write(here, crashed, started, resumed=resume is not None,
                             clips_applied_at_once=dict(session.interceptor.immediate))
            except OSError as e:  # the run's outcome is the script's, not this file's
                warnings.warn(f"gradguard run: {here / 'run.json'} not written: {e}",
                              RuntimeWarning, stacklevel=2)
            if not quiet:
                print(format_summary(result, crashed), file=sys.stderr)
        term.undo()
    if term.deferred and crashed is None:
        crashed = Terminated(128 + term.deferred)
    # free the script's models and optimizers now, as its own return would have: the
    # guards' hooks tie them into cycles that only the collector frees, else during
    # interpreter shutdown, after the script destroyed its process group (a DDP model
    # torn down then can abort a gloo rank: "terminate called without an active exception")
    del session
    gc.collect()
    if crashed is not None:
        raise crashed
    return result


class OutDirError(ValueError):
    """The run directory of ``gradguard run`` cannot be created or written."""


class Terminated(SystemExit):
    """SIGTERM arrived while the script ran (a cluster scheduler's time limit, ``kill``):
    raised in the script's main thread so that the run directory is finished (its guards'
    state saved for ``--resume``, ``run.json``, the report) before the process exits with
    ``128 + SIGTERM``, as a shell reports it. Killed at once before, the run left only its
    JSONL files, and ``--resume`` started its guards from step 0 again."""

    def __str__(self) -> str:
        return "terminated by SIGTERM"


class _SigTerm:
    """SIGTERM while the script runs raises :class:`Terminated` in it, unless a handler other
    than the default one is in place (the process's own) or this is no main thread. While
    the run directory is finished after it (:meth:`defer`), a SIGTERM waits: found by a
    stranger, torchrun's SIGTERM to rank 0 after another rank raised arrived while rank 0
    wrote its report, and the failed run was left with no run.json and no report (torchrun
    waits for its workers before it kills them). :meth:`undo` puts the default back."""

    def __init__(self) -> None:
        import signal
        import threading

        self.deferred = 0  # the signal that arrived while deferred
        self._on = (threading.current_thread() is threading.main_thread()
                    and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)
        if self._on:
            signal.signal(signal.SIGTERM, self._raise)

    @staticmethod
    def _raise(signum: int, frame: Any) -> None:
        raise Terminated(128 + signum)

    def _wait(self, signum: int, frame: Any) -> None:
        self.deferred = signum

    def defer(self) -> None:
        import signal

        if self._on and signal.getsignal(signal.SIGTERM) is self._raise:
            signal.signal(signal.SIGTERM, self._wait)

    def undo(self) -> None:
        import signal

        if self._on and signal.getsignal(signal.SIGTERM) in (self._raise, self._wait):
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _exit_code(e: SystemExit) -> int:
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code
    print(e.code, file=sys.stderr)
    return 1

