"""Zero-code guarding: run an unmodified training script with every optimizer guarded.

``gradguard run [--clip ...] [--on-nonfinite ...] [--out DIR] train.py [args]`` installs a
global ``torch.optim`` step pre-hook, runs the script as ``__main__``, and gives each
optimizer the script creates its own hook-driven :class:`~gradguard.Guard`
the first time it steps. The guard acts once per ``optimizer.step()`` (not per backward),
so gradient accumulation, several optimizers and GAN-style alternating optimizers work as
written. At exit (normal, ``sys.exit``, Ctrl-C or an exception, which is then re-raised)
the guards are closed, the run directories and reports are written, and a summary goes to
stderr.

Names: the first time an optimizer steps, the calling frames are searched for the
``nn.Module`` that holds its parameters, so layers get their module paths
(``encoder.0``); parameters no module claims are named from the optimizer
(``optimizer.param_groups.0.params.3``).

Loss: ``Tensor.backward`` is wrapped to note each scalar loss (a device tensor, no sync);
the losses since the previous optimizer step are summed (the loss whose gradient the step
applies).
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import types
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from ..config import DEFAULT_EVERY, GuardConfig
from ..decision import OnNonfinite
from ..guard import Guard
from ..rundir import dir_problem, write_atomic
from ..sinks import JsonlSink
from ._hooked import LossTracker, hooked_guard, parse_clip

#: Source directories of torch and gradguard: their frames hold no user names.
_INTERNAL = tuple(
    {
        str(d) + os.sep
        for m in (torch, sys.modules[__name__.split(".")[0]])
        if m.__file__
        for d in (Path(m.__file__).parent, Path(m.__file__).resolve().parent)
    }
)
#: How many caller frames are searched for the model that owns an optimizer's parameters.
MAX_FRAMES = 40


@dataclass
class GuardedOptimizer:
    """One optimizer the script created, and its guard."""

    index: int
    optimizer: torch.optim.Optimizer
    guard: Guard
    run_dir: Path
    name: str | None = None
    model_name: str | None = None
    report: str | None = None


@dataclass
class RunResult:
    """What a zero-code run did (also written to ``<out>/run.json``)."""

    script: str
    argv: list[str]
    exit_code: int
    out: Path
    optimizers: list[dict[str, Any]] = field(default_factory=list)


def _container(optimizer: torch.optim.Optimizer) -> nn.Module:
    """A module holding an optimizer's parameters, for when no model claims them."""
    root = nn.Module()
    for gi, group in enumerate(optimizer.param_groups):
        sub = nn.Module()
        for pi, p in enumerate(group["params"]):
            sub.register_parameter(f"p{pi}", p if isinstance(p, nn.Parameter) else nn.Parameter(p))
        root.add_module(f"param_group{gi}", sub)
    return root


def find_model(
    optimizer: torch.optim.Optimizer, frame: types.FrameType | None
) -> tuple[nn.Module | None, str | None, str | None]:
    """The module in the callers' frames that holds most of ``optimizer``'s parameters.

    Among modules holding the same number of them, the smallest wins (the generator, not
    the ``nn.ModuleDict`` holding generator and discriminator). Returns
    ``(module, module variable name, optimizer variable name)``; Nones when not found.
    """
    wanted = {id(p) for g in optimizer.param_groups for p in g["params"]}
    best: tuple[int, int] | None = None
    found: tuple[nn.Module | None, str | None] = (None, None)
    opt_name: str | None = None
    seen: set[int] = set()
    depth = 0
    while frame is not None and depth < MAX_FRAMES:
        if frame.f_code.co_filename.startswith(_INTERNAL):
            frame, depth = frame.f_back, depth + 1
            continue  # torch's step wrapper and gradguard itself: not the user's names
        candidates: list[tuple[str, Any]] = []
        for name, v in list(frame.f_locals.items()):
            if v is optimizer and opt_name is None:
                opt_name = name
            candidates.append((name, v))
            if not isinstance(v, (nn.Module, type, types.ModuleType)) and hasattr(v, "__dict__"):
                try:
                    attrs = list(vars(v).items())
                except TypeError:
                    attrs = []
                candidates += [(f"{name}.{k}", a) for k, a in attrs if isinstance(a, nn.Module)]
        for name, v in candidates:
            if not isinstance(v, nn.Module) or id(v) in seen:
                continue
            seen.add(id(v))
            ids = [id(p) for p in v.parameters()]
            hit = sum(1 for i in ids if i in wanted)
            if hit == 0:
                continue
            score = (hit, -len(ids))
            if best is None or score > best:
                best, found = score, (v, name)
        frame = frame.f_back
        depth += 1
    return found[0], found[1], opt_name


class ZeroCodeSession:
    """Guards every optimizer that steps while it is installed.

    Args:
        out: run directory of the first optimizer; the k-th further optimizer writes to
            ``out/optimizer<k>``.
        clip: command-line clip spelling (``"zclip"``, ``"autoclip"``, ``"norm:1.0"``,
            ``"value:0.5"``, ``"agc"``, ``"none"``); each optimizer gets a fresh policy.
        on_nonfinite: as for :class:`gradguard.Guard`.
        every: telemetry flush interval (steps).
        report: write ``report.html`` into each run directory at the end (when
            ``gradguard.report`` is available).

    Example:
        >>> import tempfile, torch
        >>> out = tempfile.mkdtemp()
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with ZeroCodeSession(out, clip="norm:1.0", report=False) as session:
        ...     for _ in range(3):
        ...         model(torch.randn(4, 3)).pow(2).mean().backward()
        ...         opt.step()
        ...         opt.zero_grad()
        >>> session.guarded[0].guard.step_count, session.guarded[0].model_name
        (3, 'model')
    """

    def __init__(
        self,
        out: str | os.PathLike[str],
        *,
        clip: str = "none",
        on_nonfinite: OnNonfinite = "skip",
        every: int = DEFAULT_EVERY,
        report: bool = True,
    ) -> None:
        parse_clip(clip)  # fail now on a bad spelling
        GuardConfig(on_nonfinite=on_nonfinite, every=every).validate("ZeroCodeSession")
        self.out = Path(out)
        self.clip = clip
        self.on_nonfinite: OnNonfinite = on_nonfinite
        self.every = every
        self.report = report
        self.guarded: list[GuardedOptimizer] = []
        self._by_id: dict[int, GuardedOptimizer] = {}
        self._loss = LossTracker()
        self._warned: set[str] = set()
        self._handle: Any = None
        self._orig_backward: Callable[..., Any] | None = None
        self._closed = False

    # ---- install / uninstall -------------------------------------------------------
    def install(self) -> None:
        self._handle = register_optimizer_step_pre_hook(self._pre_hook)
        orig = torch.Tensor.backward
        self._orig_backward = orig
        tracker = self._loss

        def backward(t: Tensor, *args: Any, **kwargs: Any) -> Any:
            tracker.add(t)
            return orig(t, *args, **kwargs)

        backward.__doc__ = orig.__doc__
        torch.Tensor.backward = backward  # type: ignore[method-assign,assignment]

    def uninstall(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self._orig_backward is not None:
            torch.Tensor.backward = self._orig_backward  # type: ignore[method-assign]
            self._orig_backward = None

    def __enter__(self) -> ZeroCodeSession:
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the hook ------------------------------------------------------------------
    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"gradguard run: {message}", RuntimeWarning, stacklevel=4)

    def _pre_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # args is (optimizer, *step_args): a closure is step's first argument
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is not None:
            self._warn_once(
                f"closure{id(optimizer)}",
                f"{type(optimizer).__name__}.step(closure) computes its gradients inside the "
                "step, after gradguard's hook: this optimizer is not guarded",
            )
            return
        g = self._by_id.get(id(optimizer))
        if g is None or g.optimizer is not optimizer:
            g = self._add(optimizer, sys._getframe(1))
        if getattr(optimizer, "grad_scale", None) is not None:
            # a GradScaler drives a fused optimizer: the gradients are still scaled
            self._warn_once(
                f"scaled{id(optimizer)}",
                f"{type(optimizer).__name__} is stepped by a GradScaler with scaled gradients; "
                "call scaler.unscale_(optimizer) before scaler.step(optimizer) so gradguard "
                "sees (and clips) the true gradients; these steps are not guarded",
            )
            return
        g.guard.step(self._loss.take())

    def _add(self, optimizer: torch.optim.Optimizer, frame: types.FrameType | None) -> GuardedOptimizer:
        model, model_name, opt_name = find_model(optimizer, frame)
        k = len(self.guarded)
        run_dir = self.out if k == 0 else self.out / f"optimizer{k}"
        try:
            sinks = [JsonlSink(run_dir)]
        except ValueError as e:  # a full or read-only disk must not stop the script
            self._warn_once(f"out{k}", f"{e}; optimizer {k} is guarded but not recorded")
            sinks = []
        cfg = GuardConfig(clip=parse_clip(self.clip), on_nonfinite=self.on_nonfinite,
                          every=self.every, sinks=sinks)
        guard = hooked_guard(model if model is not None else _container(optimizer), optimizer, cfg)
        g = GuardedOptimizer(k, optimizer, guard, run_dir, opt_name, model_name)
        self.guarded.append(g)
        self._by_id[id(optimizer)] = g
        return g

    # ---- the end -------------------------------------------------------------------
    def close(self) -> None:
        """Uninstall the hooks, close every guard and write the reports (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.uninstall()
        for g in self.guarded:
            g.guard.close()
        if self.report:
            for g in self.guarded:
                g.report = write_report(g.run_dir) if g.guard.sinks else None

    def summary(self) -> list[dict[str, Any]]:
        return [
            {
                "index": g.index,
                "optimizer": type(g.optimizer).__name__,
                "name": g.name,
                "model": g.model_name,
                "run_dir": str(g.run_dir),
                "steps": g.guard.step_count,
                "skipped_steps": g.guard.skipped_steps,
                "clip": repr(g.guard.clip),
                "report": g.report,
                "events": len(g.guard.events),
            }
            for g in self.guarded
        ]


def write_report(run_dir: str | os.PathLike[str]) -> str | None:
    """``gradguard.report(run_dir)`` when the report module is there; the path or None.

    A failing report is a warning, never a lost run: the JSONL files are already on disk.
    """
    import gradguard

    make = getattr(gradguard, "report", None)
    if make is None or not callable(make):
        return None
    try:
        out = make(run_dir)
    except ImportError as e:
        warnings.warn(f"gradguard: no report for {run_dir}: {e}", RuntimeWarning, stacklevel=2)
        return None
    except Exception as e:  # the run itself succeeded; say why the report is missing
        warnings.warn(
            f"gradguard: writing the report for {run_dir} failed: {type(e).__name__}: {e}",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    path = Path(out) if isinstance(out, (str, os.PathLike)) else Path(run_dir) / "report.html"
    return str(path) if path.exists() else None


def _exit_code(e: SystemExit) -> int:
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code
    print(e.code, file=sys.stderr)
    return 1


def run_script(
    script: str | os.PathLike[str],
    argv: Sequence[str] = (),
    *,
    out: str | os.PathLike[str] | None = None,
    clip: str = "none",
    on_nonfinite: OnNonfinite = "skip",
    every: int = DEFAULT_EVERY,
    report: bool = True,
    quiet: bool = False,
) -> RunResult:
    """Run ``script`` as ``__main__`` with ``argv`` and every optimizer guarded.

    Returns the :class:`RunResult` (exit code of the script: 0, or its ``sys.exit``
    code). An exception raised by the script (including ``KeyboardInterrupt``) is
    re-raised unchanged after the run directory and report are written.

    Gradguard's own files never change the outcome: a disk that fills up or turns
    read-only during the run costs a warning, not the script's exit code.

    Raises:
        FileNotFoundError: ``script`` does not exist.
        OutDirError: ``out`` cannot be created or written; raised before the script
            starts.
    """
    path = Path(script)
    if not path.is_file():
        raise FileNotFoundError(f"script {str(script)!r} does not exist or is not a file")
    out_dir = Path(out) if out is not None else Path("runs") / path.stem
    problem = dir_problem(out_dir)  # now, not at the script's first optimizer step
    if problem is not None:
        raise OutDirError(f"--out {out_dir}: {problem}")
    session = ZeroCodeSession(
        out_dir, clip=clip, on_nonfinite=on_nonfinite, every=every, report=report
    )
    result = RunResult(str(path), list(argv), 0, out_dir)
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    sys.argv = [str(path), *argv]
    sys.path.insert(0, str(path.resolve().parent))
    crashed: BaseException | None = None
    session.install()
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as e:
        result.exit_code = _exit_code(e)
    except BaseException as e:  # finish the run dir, then re-raise it unchanged
        crashed = e
        result.exit_code = 130 if isinstance(e, KeyboardInterrupt) else 1
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
        session.close()
        result.optimizers = session.summary()
        _write_run_json(result, crashed)
        if not quiet:
            print(format_summary(result, crashed), file=sys.stderr)
    if crashed is not None:
        raise crashed
    return result


class OutDirError(ValueError):
    """The run directory of ``gradguard run`` cannot be created or written."""


def _write_run_json(result: RunResult, crashed: BaseException | None) -> None:
    """``out/run.json``, atomically; a failure is a warning (the run's outcome is the
    script's, not this file's)."""
    rec = {
        "v": 1,
        "script": result.script,
        "argv": result.argv,
        "exit_code": result.exit_code,
        "error": None if crashed is None else f"{type(crashed).__name__}: {crashed}",
        "optimizers": result.optimizers,
    }
    try:
        result.out.mkdir(parents=True, exist_ok=True)
        write_atomic(result.out / "run.json", json.dumps(rec, indent=2) + "\n")
    except OSError as e:
        warnings.warn(f"gradguard run: {result.out / 'run.json'} not written: {e}",
                      RuntimeWarning, stacklevel=2)


def format_summary(result: RunResult, crashed: BaseException | None = None) -> str:
    """The lines ``gradguard run`` prints to stderr at the end."""
    if not result.optimizers:
        return (
            f"gradguard run: {result.script} never called optimizer.step(); nothing was guarded"
        )
    how = "" if crashed is None else f" (the script raised {type(crashed).__name__})"
    lines = [f"gradguard run: {result.script} exited with code {result.exit_code}{how}"]
    for o in result.optimizers:
        who = o["name"] or o["optimizer"]
        lines.append(
            f"  {who} ({o['optimizer']}, model {o['model'] or '?'}): {o['steps']} steps, "
            f"{o['skipped_steps']} skipped, {o['events']} events -> {o['report'] or o['run_dir']}"
        )
    return "\n".join(lines)
