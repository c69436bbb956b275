"""Trainers under ``gradguard run``: the native callbacks, attached with no edit.

Lightning always steps with ``optimizer.step(closure)`` (forward and backward run inside
the step, after any step pre-hook), so the generic hook cannot guard it; the Hugging Face
``Trainer`` clips and steps through accelerate. When the script builds a
``lightning.pytorch.Trainer`` or a ``transformers.Trainer`` (or a subclass), the session
appends :class:`gradguard.integrations.lightning.GradGuardCallback` /
:class:`gradguard.integrations.hf.GradGuardCallback` to it: the same code path as adding
the callback by hand, with the session's configuration, run directory and clip policy.

The trainer modules are not imported here: an import hook patches ``Trainer.__init__``
when the script imports them (or at once, when they are already imported). A trainer
that already has a gradguard callback is left alone.

What the zero-code subclasses add to the by-hand callbacks:

* Lightning's ``gradient_clip_val`` clips right *after* ``on_before_optimizer_step``, so
  the guard already measures pre-clip norms; the coefficient Lightning is about to apply
  is recorded as the clip that happened (Lightning still clips, and the module's own
  ``on_before_optimizer_step`` sees what it always saw). With ``--clip ...
  --script-clip replace`` Lightning's clip is switched off for the fit and put back
  afterwards. A module that overrides ``configure_gradient_clipping`` keeps its own
  clipping, not recorded in the coefficient.
* Each further ``fit``/``train`` of the same trainer writes its own run directory.
* ``--resume`` restores the guard from ``guard_state.pt`` unless the trainer's own
  checkpoint already carried one.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._clip_intercept import describe_clip

#: Module that defines each supported trainer, and the framework it belongs to.
TRAINER_MODULES = {
    "lightning.pytorch.trainer.trainer": "lightning",
    "transformers.trainer": "transformers",
}

Attach = Callable[[str, Any], None]


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Runs ``patch(name, module)`` right after one of ``TRAINER_MODULES`` is executed."""

    def __init__(self, patch: Callable[[str, types.ModuleType], None]) -> None:
        self.patch = patch
        self._busy: set[str] = set()

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in TRAINER_MODULES or fullname in self._busy:
            return None
        self._busy.add(fullname)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._busy.discard(fullname)
        loader = getattr(spec, "loader", None)
        if spec is None or loader is None or not hasattr(loader, "exec_module"):
            return None
        orig_exec = loader.exec_module
        patch = self.patch

        def exec_module(module: types.ModuleType) -> None:
            orig_exec(module)
            patch(fullname, module)

        loader.exec_module = exec_module  # this spec's own loader instance
        return spec


class TrainerHooks:
    """Patches ``Trainer.__init__`` of the supported frameworks so that ``attach(kind,
    trainer)`` runs on each new trainer; ``uninstall`` puts everything back."""

    def __init__(self, attach: Attach) -> None:
        self.attach = attach
        self._finder = _PostImportFinder(self._patch)
        self._saved: list[tuple[type, Any]] = []

    def install(self) -> None:
        sys.meta_path.insert(0, self._finder)
        for name in TRAINER_MODULES:
            if name in sys.modules:
                self._patch(name, sys.modules[name])

    def uninstall(self) -> None:
        if self._finder in sys.meta_path:
            sys.meta_path.remove(self._finder)
        for cls, init in reversed(self._saved):
            cls.__init__ = init  # type: ignore[misc]
        self._saved = []

    def _patch(self, name: str, module: types.ModuleType) -> None:
        cls = getattr(module, "Trainer", None)
        if not isinstance(cls, type) or any(c is cls for c, _ in self._saved):
            return
        kind, attach = TRAINER_MODULES[name], self.attach
        orig: Any = cls.__dict__.get("__init__") or vars(cls)["__init__"]

        @functools.wraps(orig)
        def __init__(trainer: Any, *args: Any, **kwargs: Any) -> None:
            orig(trainer, *args, **kwargs)
            if not getattr(trainer, "_gradguard_zero_code", False):
                trainer._gradguard_zero_code = True
                attach(kind, trainer)

        self._saved.append((cls, orig))
        cls.__init__ = __init__  # type: ignore[misc]


def gradguard_callback(kind: str, trainer: Any) -> Any:
    """The gradguard callback the user already added by hand, or None."""
    cbs = trainer.callbacks if kind == "lightning" else trainer.callback_handler.callbacks
    return next((cb for cb in cbs if type(cb).__module__.startswith("gradguard.")), None)


def lightning_callback(config: Any, run_dir: Path | None, resume_state: list[Any] | None) -> Any:
    """The zero-code Lightning callback (see the module docstring)."""
    import lightning.pytorch as pl

    from .lightning import GradGuardCallback

    class ZeroCodeLightningCallback(GradGuardCallback):
        state_key = "GradGuardCallback"  # checkpoints interchange with the by-hand callback

        def __init__(self) -> None:
            super().__init__(config=config, run_dir=run_dir, report=False)
            self._fits = 0
            self._saved_clip: tuple[Any, Any] | None = None

        def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
            # replaces the by-hand check (one clip, not two): Lightning clips right after
            # this callback's hook; that clip is recorded as part of the clip that happened
            # (or switched off for the fit when --clip replaces the script's clipping)
            val = trainer.gradient_clip_val
            if stage != "fit" or not val:
                return
            clip: Any = self.clip
            if clip.replaces:
                self._saved_clip = (val, trainer.gradient_clip_algorithm)
                trainer.gradient_clip_val = None
                clip.counts[f"Trainer(gradient_clip_val={val:g}) replaced"] += 1
                return
            own = (type(pl_module).configure_gradient_clipping
                   is not pl.LightningModule.configure_gradient_clipping)
            if own or not pl_module.automatic_optimization:
                return  # its own clipping: applied at once when it happens (not recorded)
            alg = trainer.gradient_clip_algorithm
            kind = "value" if str(getattr(alg, "value", alg)) == "value" else "norm"
            self.config = self.config.replace(clip=clip.with_foreseen(((kind, float(val)),)))

        def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
            if self._saved_clip is not None:
                trainer.gradient_clip_val, trainer.gradient_clip_algorithm = self._saved_clip
                self._saved_clip = None

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            self._fits += 1  # a later fit from step 0: a run of its own (the callback's fit<k>)
            if self._fits == 1 and self._loaded is None and resume_state:
                self._loaded = resume_state
            super().on_train_start(trainer, pl_module)

    return ZeroCodeLightningCallback()


def hf_callback(config: Any, run_dir: Path | None, resume_state: list[Any] | None) -> Any:
    """The zero-code Hugging Face callback (see the module docstring)."""
    from .hf import GradGuardCallback

    class ZeroCodeHFCallback(GradGuardCallback):
        def __init__(self) -> None:
            super().__init__(config=config, run_dir=run_dir, report=False)
            self._trains = 0
            self.run_dirs: list[Path] = []
            self.made: list[Any] = []  # the guard of each train(), for the session's summary

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._trains += 1
            if self.guard is not None:  # a second train(): a run of its own
                self.guard = None
                self.run_dir = None if run_dir is None else run_dir / f"train{self._trains - 1}"
            mgn = getattr(args, "max_grad_norm", None)
            aliases = getattr(self.clip, "aliases", None)
            if isinstance(mgn, (int, float)) and mgn > 0 and isinstance(aliases, dict):
                # the Trainer's clip_grad_norm_ is the user's setting: said by its name
                aliases[describe_clip("norm", float(mgn))] = (
                    f"TrainingArguments(max_grad_norm={float(mgn):g})")
            super().on_train_begin(args, state, control, **kwargs)
            if self._resume_state is None and resume_state and self._trains == 1:
                self._resume_state = resume_state[0]

        def _make_guard(self, args: Any, model: Any, optimizer: Any, scaler: Any) -> Any:
            guard = super()._make_guard(args, model, optimizer, scaler)
            if self.resolved_run_dir is not None:
                self.run_dirs.append(self.resolved_run_dir)
                self.made.append(guard)
            return guard

    return ZeroCodeHFCallback()


def add_callback(kind: str, trainer: Any, callback: Any) -> None:
    """Add ``callback`` to ``trainer`` (Lightning: before the checkpoint callbacks, which
    Lightning keeps last)."""
    if kind == "transformers":
        trainer.add_callback(callback)
        return
    from lightning.pytorch.callbacks import Checkpoint

    cbs = trainer.callbacks
    at = next((i for i, c in enumerate(cbs) if isinstance(c, Checkpoint)), len(cbs))
    cbs.insert(at, callback)


def owns(callback: Any, optimizer: Any) -> bool:
    """True when ``callback`` (either framework) guards ``optimizer`` right now."""
    guards = getattr(callback, "guards", None)
    if isinstance(guards, dict):
        return id(optimizer) in guards
    guard = getattr(callback, "guard", None)
    return guard is not None and guard.optimizer is optimizer


def callback_guards(callback: Any) -> list[tuple[Path, Any, Any, str | None]]:
    """``(run_dir, clip policy, final guard state or None, optimizer)`` of each run directory
    a zero-code callback wrote; ``optimizer`` names the optimizer (its index and class) when
    the run had several, so that their rows are told apart, else None."""
    dirs = [Path(d) for d in getattr(callback, "run_dirs", [])]
    made = getattr(callback, "made", None)
    if made is not None:  # Hugging Face: one guard per train()
        return [(d, g.clip, g.state_dict(), None) for d, g in zip(dirs, made)]
    final = list(getattr(callback, "_final", None) or [])  # Lightning: the last fit's guards
    states = [None] * (len(dirs) - len(final)) + final
    # each guard's own clip policy (a further optimizer's is a copy, with its own counts:
    # the first one's was reported for every optimizer, "clipped" where it never was)
    clips = list(getattr(callback, "_final_clips", None) or [])
    clips = [callback.clip] * (len(dirs) - len(clips)) + clips
    kinds = list(getattr(callback, "_final_optimizers", None) or [])
    names: list[str | None] = [None] * len(dirs)
    if len(kinds) > 1:  # one fit's optimizers: its last len(kinds) directories, in order
        names[len(dirs) - len(kinds):] = [f"optimizer {k}: {c}" for k, c in enumerate(kinds)]
    return [(d, c, s, n) for d, c, s, n in zip(dirs, clips, states, names)]
