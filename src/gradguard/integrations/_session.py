"""The zero-code session: the hooks that guard every optimizer a script steps and every
trainer it builds (see :mod:`gradguard.integrations.run` for the whole picture)."""

from __future__ import annotations

import copy
import os
import sys
import types
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.amp.grad_scaler import GradScaler, OptState
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)
from torch.optim.swa_utils import AveragedModel

from .. import _lifecycle as lifecycle
from .._wrapped import inner_optimizer
from ..config import GuardConfig, resolve_config
from ..events import Sink
from ..guard import Guard
from ..sinks import JsonlSink
from . import _frameworks as fw
from . import _rundir
from ._averages import Averages
from ._clip_intercept import ClipInterceptor
from ._clip_policy import InterceptedClip, ScriptClipMode
from ._hooked import LossTracker, hooked_guard, no_gradients, parse_clip, recovery_for
from ._names import ParamTable, find_model
from ._script_skips import note_script_skips, note_stopped_on_nonfinite
from ._summary import finish_run_dir
from ._takeover import Succession, Unit, driven, succeed


def _is_wrapper(optimizer: Any) -> bool:
    """accelerate's AcceleratedOptimizer and similar: the inner optimizer is guarded."""
    return inner_optimizer(optimizer) is not None


class ZeroCodeSession:
    """Guards every optimizer that steps, and every trainer built, while installed.

    Args:
        run_dir: this run's directory (None: write nothing, e.g. on ranks other than 0).
            The k-th further optimizer writes to ``run_dir/optimizer<k>``, the k-th
            further trainer to ``run_dir/trainer<k>``.
        config: a :class:`~gradguard.GuardConfig` (or its options as keywords; ``clip``
            may also be spelled as on the command line, ``"zclip"``). Every guard is built
            from it with its own copy of the clip policy and recovery ladder. Its sinks go
            to the first guard; ``sinks_for(run_dir)`` makes sinks for each.
        script_clip: ``"compose"`` or ``"replace"``: how ``config.clip`` combines with the
            script's own clipping (:mod:`._clip_intercept`).
        report: write ``report.html`` into each run directory at the end.
        resume_from: the run directory of an earlier session that this one continues:
            each guard starts from the ``guard_state.pt`` of its directory there.
        frameworks: attach the native callbacks to Lightning / Hugging Face trainers.

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
        >>> session.units[0].guard.step_count, session.units[0].model_name
        (3, 'model')
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str] | None,
        config: GuardConfig | None = None,
        *,
        script_clip: ScriptClipMode = "compose",
        report: bool = True,
        resume_from: Path | None = None,
        frameworks: bool = True,
        sinks_for: Callable[[Path], Sequence[Sink]] | None = None,
        **options: Any,
    ) -> None:
        if isinstance(options.get("clip"), str):
            options["clip"] = parse_clip(options["clip"])
        self.config = resolve_config("ZeroCodeSession", config, options)
        InterceptedClip(ClipInterceptor(), None, script_clip)  # fail now on a bad mode
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.script_clip: ScriptClipMode = script_clip
        self.report, self.resume_from, self.sinks_for = report, resume_from, sinks_for
        self.units: list[Unit] = []
        self.rows: list[dict[str, Any]] = []
        self.interceptor = ClipInterceptor()
        self._by_id: dict[int, Unit] = {}
        self._succession = Succession()  # which new optimizer goes on with which run
        self._loss = LossTracker()
        self._warned: set[str] = set()
        #: optimizer class -> why it stepped unguarded (for a run that guarded nothing)
        self.unguarded: dict[str, str] = {}
        self._undo: list[Callable[[], None]] = []
        self._scaler_stepping: Any = None
        self._trainers = fw.TrainerHooks(self._attach_trainer) if frameworks else None
        self._closed = False
        self._averages = Averages(self.units)  # EMAs the script keeps (:mod:`._averages`)

    # ---- install / uninstall -------------------------------------------------------
    def install(self) -> None:
        """Hook torch (optimizer steps, backward, GradScaler, clipping) and the trainers."""
        for handle in (register_optimizer_step_pre_hook(self._pre_hook),
                       register_optimizer_step_post_hook(self._post_hook)):
            self._undo.append(handle.remove)
        self.interceptor.install()
        self._undo.append(self.interceptor.uninstall)
        session = self

        def wrap(owner: Any, name: str, make: Callable[[Any], Callable[..., Any]]) -> None:
            orig = getattr(owner, name)
            fn = make(orig)
            fn.__doc__ = orig.__doc__
            setattr(owner, name, fn)
            self._undo.append(lambda: setattr(owner, name, orig))

        def backward(orig: Any) -> Callable[..., Any]:
            def fn(t: Tensor, *args: Any, **kwargs: Any) -> Any:
                session._loss.add(t)
                # new gradients: a clip still pending belongs before them (torch order)
                session.interceptor.flush("clipped before another backward")
                session.interceptor.stepped()
                return orig(t, *args, **kwargs)
            return fn

        def zero_grad(orig: Any) -> Callable[..., Any]:
            def fn(owner: Any, *args: Any, **kwargs: Any) -> Any:
                session._loss.discard()  # their gradients are gone: behind no step
                note_script_skips(session.interceptor, session.units, owner)
                return orig(owner, *args, **kwargs)
            return fn

        def opt_init(orig: Any) -> Callable[..., Any]:
            def fn(opt: Any, *args: Any, **kwargs: Any) -> None:
                orig(opt, *args, **kwargs)
                session.interceptor.optimizers.add(opt)
                session._succession.built(opt)
            return fn

        def scale(orig: Any) -> Callable[..., Any]:
            def fn(scaler: GradScaler, outputs: Any) -> Any:
                out = orig(scaler, outputs)
                if isinstance(outputs, Tensor) and isinstance(out, Tensor):
                    session._loss.alias(out, outputs)  # record the loss, not loss * scale
                return out
            return fn

        def step(orig: Any) -> Callable[..., Any]:
            def fn(scaler: GradScaler, optimizer: Any, *args: Any, **kwargs: Any) -> Any:
                return session._scaler_step(orig, scaler, optimizer, *args, **kwargs)
            return fn

        def destroy(orig: Any) -> Callable[..., Any]:
            def fn(*args: Any, **kwargs: Any) -> Any:
                if not args and kwargs.get("group") is None:
                    session._close_guards()  # their last flush is a collective: do it now
                return orig(*args, **kwargs)
            return fn

        if torch.distributed.is_available():
            wrap(torch.distributed, "destroy_process_group", destroy)
        wrap(torch.Tensor, "backward", backward)
        wrap(torch.optim.Optimizer, "__init__", opt_init)
        wrap(torch.optim.Optimizer, "zero_grad", zero_grad)
        wrap(torch.nn.Module, "zero_grad", zero_grad)
        wrap(AveragedModel, "__init__", self._averages.wrap_init)
        wrap(GradScaler, "scale", scale)
        wrap(GradScaler, "step", step)
        if self._trainers is not None:
            self._trainers.install()
            self._undo.append(self._trainers.uninstall)

    def uninstall(self) -> None:
        while self._undo:
            self._undo.pop()()

    def __enter__(self) -> ZeroCodeSession:
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        error = exc[1] if isinstance(exc[1], BaseException) else None
        self.close(failed=exc[0] is not None, error=error)

    # ---- the hooks -----------------------------------------------------------------
    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"gradguard run: {message}", RuntimeWarning, stacklevel=4)

    def _owned(self, optimizer: Any) -> bool:
        return any(u.callback is not None and fw.owns(u.callback, optimizer) for u in self.units)

    def _pre_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.interceptor.optimizers.add(optimizer)
        if _is_wrapper(optimizer) or optimizer is self._scaler_stepping:
            return
        if self._owned(optimizer):
            self._loss.take()  # the trainer's callback records its own loss
            return
        if driven(self, optimizer):
            return
        # args is (optimizer, *step_args): a closure is step's first argument
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        scaled = getattr(optimizer, "grad_scale", None) is not None
        if closure is not None or scaled:
            why = ("step(closure) computes its gradients inside the step, after gradguard's "
                   "hook" if closure is not None else
                   "a GradScaler steps it with still-scaled gradients")
            self._warn_once(f"unguarded{id(optimizer)}",
                            f"{type(optimizer).__name__}: {why}; this optimizer is not guarded")
            self.unguarded.setdefault(type(optimizer).__name__, why)
            ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
            self.interceptor.flush("the optimizer steps unguarded", ids)
            return
        if no_gradients(optimizer):
            return
        unit = self._unit_for(optimizer, sys._getframe(1), None)
        assert unit.guard is not None
        unit.guard.step(self._loss.take(unit.guard))
        self._succession.tick(unit)

    def _post_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.interceptor.stepped()
        self._succession.stepped(self._by_id.get(id(optimizer)), optimizer)

    def _scaler_step(self, orig: Callable[..., Any], scaler: GradScaler, optimizer: Any,
                     *args: Any, **kwargs: Any) -> Any:
        if (self._closed or not scaler.is_enabled() or _is_wrapper(optimizer)
                or self._owned(optimizer) or driven(self, optimizer) or "closure" in kwargs):
            return orig(scaler, optimizer, *args, **kwargs)
        stage = scaler._per_optimizer_states[id(optimizer)]["stage"]
        if stage is OptState.STEPPED:
            return orig(scaler, optimizer, *args, **kwargs)  # raises its own error
        if stage is OptState.READY:
            scaler.unscale_(optimizer)  # what scaler.step does first; the guard needs it
        unit = self._unit_for(optimizer, sys._getframe(2), scaler)
        assert unit.guard is not None
        executor: Any = unit.guard.executor
        executor.scaler = scaler  # its found_inf now also carries the guard's verdict
        unit.guard.step(self._loss.take(unit.guard))
        self._succession.tick(unit)
        self._scaler_stepping = optimizer
        try:
            return orig(scaler, optimizer, *args, **kwargs)
        finally:
            self._scaler_stepping = None
            self.interceptor.stepped()  # also when the scaler skipped the step
            self._succession.stepped(self._by_id.get(id(optimizer)), optimizer)

    # ---- guards and callbacks ------------------------------------------------------
    def _dir(self, k: int, label: str, root: Path | None = None) -> Path | None:
        root = self.run_dir if root is None else root
        if root is None:
            return None
        return root if k == 0 else root / f"{label}{k}"

    def _resume_dir(self, k: int, label: str) -> Path | None:
        return None if self.resume_from is None else self._dir(k, label, self.resume_from)

    def guard_config(self, k: int, run_dir: Path | None, *, jsonl: bool = True,
                     sinks: list[Sink] | None = None) -> GuardConfig:
        """The k-th guard's config: the session's, with its own clip policy (wrapping the
        script's clipping), its own recovery ladder and its run directory's sinks (or
        ``sinks``: a retired guard's, still open)."""
        cfg = self.config
        rec = recovery_for(cfg.recovery, k)
        if sinks is None:
            sinks = self._sinks(k, run_dir, jsonl)
        clip = InterceptedClip(self.interceptor, copy.deepcopy(cfg.clip), self.script_clip)
        return cfg.replace(clip=clip, recovery=rec, sinks=sinks)

    def _sinks(self, k: int, run_dir: Path | None, jsonl: bool) -> list[Sink]:
        sinks: list[Sink] = list(self.config.sinks) if k == 0 else []
        if run_dir is not None:
            sinks += list(self.sinks_for(run_dir)) if self.sinks_for is not None else []
            if jsonl:
                try:
                    sinks.append(JsonlSink(run_dir))
                    sinks[-1].zero_code = True  # type: ignore[attr-defined]
                except ValueError as e:  # a full or read-only disk must not stop the script
                    self._warn_once(f"out{k}", f"{e}; optimizer {k} is guarded but not recorded")
        return sinks

    def _unit_for(self, optimizer: torch.optim.Optimizer, frame: types.FrameType | None,
                  scaler: GradScaler | None) -> Unit:
        unit = self._by_id.get(id(optimizer))
        if unit is not None and unit.optimizer is optimizer:
            return unit
        prev = self._succession.predecessor(self.units, optimizer)
        if prev is not None:
            return succeed(self, prev, optimizer, frame, scaler)
        model, model_name, opt_name = find_model(optimizer, frame)
        k = len(self.units)
        run_dir = self._dir(k, "optimizer")
        cfg = self.guard_config(k, run_dir)
        guard = hooked_guard(model if model is not None else ParamTable.of(optimizer),
                             optimizer, cfg, scaler=scaler)
        saved = self._resume_dir(k, "optimizer")
        if saved is not None and (said := _rundir.resume_guard(guard, saved, k)) is not None:
            self._warn_once(f"resume{k}", said)
        self._averages.hand(guard)
        unit = Unit(k, "optimizer", run_dir, guard, None, optimizer, opt_name, model_name)
        self.units.append(unit)
        self._by_id[id(optimizer)] = unit
        return unit

    def _attach_trainer(self, kind: str, trainer: Any) -> None:
        if self._closed:
            return
        launcher = getattr(getattr(trainer, "strategy", None), "launcher", None)
        env = getattr(launcher, "cluster_environment", None)
        if type(launcher).__name__ == "_SubprocessScriptLauncher" and (
                getattr(trainer, "world_size", 1) > 1) and not getattr(
                env, "creates_processes_externally", True):
            # (under torchrun, or a rank Lightning started, the processes exist already:
            # every one is guarded; found by a regression hunt)
            # found by a stranger: Lightning's launcher starts the other ranks as new
            # `python script.py` processes, unguarded, and this rank guarded alone hung at
            # its first collective: nothing in this process is guarded, said once
            why = ("Lightning starts its other ranks as new `python` processes, which "
                   "`gradguard run` does not reach, and this rank guarded alone would hang "
                   "at its first collective: run `torchrun --nproc-per-node N -m gradguard "
                   "run script.py`, or set GRADGUARD (docs/integrations.md, \"torchrun and "
                   "other launchers\")")
            self._warn_once("launcher", f"{type(trainer).__name__}: {why}; nothing is guarded")
            self.unguarded[type(trainer).__name__] = why
            self.uninstall()
            return
        own = fw.gradguard_callback(kind, trainer)
        if own is not None:  # added by hand: it guards (and writes) on its own; only note
            self.units.append(Unit(len(self.units), kind, None, callback=own, external=True))
            return  # its optimizers, so that the generic hook leaves them alone
        k = len(self.units)
        run_dir = self._dir(k, "trainer")
        states: list[Any] | None = None
        saved = self._resume_dir(k, "trainer")
        if saved is not None:
            dirs = [saved, *sorted(saved.glob("optimizer*"))]
            states = [s for s in map(_rundir.load_state, dirs) if s is not None] or None
        make = fw.lightning_callback if kind == "lightning" else fw.hf_callback
        cb = make(self.guard_config(k, run_dir, jsonl=False), run_dir, states)
        fw.add_callback(kind, trainer, cb)
        self.units.append(Unit(k, kind, run_dir, callback=cb, name=type(trainer).__name__,
                               trainer=trainer))

    # ---- the end -------------------------------------------------------------------
    def close(self, *, failed: bool = False, error: BaseException | None = None) -> None:
        """Uninstall the hooks, close every guard, and finish each run directory: its
        ``guard.json``, ``guard_state.pt``, ``report.html`` and judged outcome
        (:attr:`rows`). ``failed``: the script raised (no collective: a DDP rank that
        raised hung in one while the others waited in backward); ``error``: what it raised,
        told by an ``abort`` event on each guard still open. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.uninstall()
        if not failed:
            note_stopped_on_nonfinite(self._loss.pending(), self.units)
        self._close_guards(failed, error)
        self.interceptor.flush("session closed")
        self.rows = []
        for u in self.units:
            self.rows += self._finish_unit(u)

    def _close_guards(self, failed: bool = False, error: BaseException | None = None) -> None:
        """Close every guard still open (a trainer that raised mid-fit included); without
        a collective once the script destroyed its process group or raised."""
        dist = torch.distributed
        gone = failed or (dist.is_available() and not dist.is_initialized())
        for u in self.units:
            guards = [u.guard] if u.guard is not None else []
            if u.callback is not None:
                guards += list(getattr(u.callback, "guards", {}).values())
                if getattr(u.callback, "guard", None) is not None:
                    guards.append(u.callback.guard)
            for g in guards:  # the script has ended: what the last flush decides is said only
                if error is not None:  # found by a stranger: a crash was "healthy / ok"
                    lifecycle.left_on(g, error)
                lifecycle.close(g, failed=gone and g.dist is not None, after_script=True)

    def _finish_unit(self, u: Unit) -> list[dict[str, Any]]:
        if u.external and u.callback is None:  # the script's own gg.Guard
            return [{"index": u.index, "kind": u.kind, "name": u.name, "external": True,
                     "clip": "the script's own gg.Guard", "run_dir": None, "outcome": None,
                     "summary": "guarded by the gg.Guard the script built itself"}]
        if u.external:  # the script's own callback writes its own run directory
            dirs = [str(d) for d in getattr(u.callback, "run_dirs", [])]
            return [{"index": u.index, "kind": u.kind, "name": type(u.callback).__name__,
                     "external": True, "clip": "the script's own GradGuardCallback",
                     "run_dir": dirs[0] if dirs else None, "outcome": None,
                     "summary": "guarded by the GradGuardCallback the script added itself"}]
        items: list[tuple[Path | None, Any, Any, Guard | None, str | None]]
        if u.guard is not None:
            items = [(u.run_dir, u.guard.clip, u.guard.state_dict(), u.guard, None)]
        else:
            items = [(d, clip, s, None, o) for d, clip, s, o in fw.callback_guards(u.callback)]
        rows = []
        for d, clip, state, guard, opt in items:
            if d is None:
                continue
            model = u.model_name
            if u.trainer is not None:  # the trainer's module (Lightning) or model (HF)
                m = getattr(u.trainer, "lightning_module", None) or getattr(u.trainer, "model", None)
                model = type(m).__name__ if m is not None else None
            info = {"index": u.index, "kind": u.kind, "name": u.name, "model": model,
                    "optimizer": opt or (type(u.optimizer).__name__
                                         if u.optimizer is not None else None),
                    "replaced": u.replaced}
            rows.append(finish_run_dir(d, clip, self.config, state, guard, info,
                                       dict(self.interceptor.immediate), self.report))
        return rows

