"""The recovery ladder and its snapshot stores.

``Recovery()`` climbs one rung at a time, and only as far as the trouble goes:

1. **skip** a step whose gradients are non-finite (the Guard does this itself);
2. **back off** the learning rate of every param group by ``backoff`` after
   ``skip_patience`` consecutive skips or a *confirmed* loss spike (one lasting
   ``DetectorConfig.spike_confirm`` steps), then restore it linearly over ``restore_steps``
   up to the *ceiling* (the full LR until trouble comes back);
3. **roll back** model, optimizer state, clip policy and ladder to the last good snapshot
   when trouble comes back within ``patience`` steps of the previous rung; reset the
   optimizer moments of the layers that exploded (``reset_moments``), back off again, and
   set ``guard.batches_to_skip`` for data-loader users;
4. **abort** with :class:`~gradguard.TrainingDiverged` after ``max_rollbacks`` rollbacks
   that brought no healthy snapshot in between.

Persistent instability lowers the LR for good: a *relapse* (a back-off within
``relapse_window`` steps of the previous trigger, or any rollback) lowers the ceiling to
``relapse_backoff`` times the factor that failed, so the LR is never restored to a value
that has already proved unstable twice. One isolated incident still restores the full LR.

Decisions (:meth:`Recovery.decide`) are pure functions of host-known values: the skip flag
the Guard already read (non-fused optimizers: one sync per step that the Guard pays
anyway), or the flushed window (fused optimizers: the skip flag stays on the device and the
ladder learns about consecutive skips at the next flush, at most ``every`` steps later).
Ranks that see the same all-reduced window therefore take the same decisions.

Snapshots are taken at flush steps, every ``snapshot_every`` steps, only while healthy (no
skip, spike or back-off in the window), copied to CPU memory (default) or written
atomically to ``snapshot_dir`` (temp file, fsync, ``os.replace``). A snapshot containing
NaN/Inf is never kept.
"""

from __future__ import annotations

import math
import os
import tempfile
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from .events import Event

if TYPE_CHECKING:
    from .guard import Guard
    from .telemetry import StepStats, Window

ResetMoments = Literal["exploded", "all", "none"]
RESET_MOMENTS: tuple[str, ...] = ("exploded", "all", "none")
Action = Literal["none", "backoff", "rollback", "abort"]

#: Consecutive skipped steps before the learning rate is backed off (one NaN batch is
#: handled by the skip alone).
SKIP_PATIENCE = 3
#: LR multiplier on back-off: an order of magnitude, the usual distance between a diverging
#: and a stable learning rate.
BACKOFF = 0.1
#: Steps over which a backed-off LR returns linearly to its value.
RESTORE_STEPS = 100
#: Steps between snapshots (taken at the first healthy flush after that many steps).
SNAPSHOT_EVERY = 100
#: Snapshots kept (a second rollback in a row goes one snapshot further back).
KEEP = 2
#: Rollbacks without a healthy snapshot in between before TrainingDiverged.
MAX_ROLLBACKS = 3
#: Multiplier on the LR ceiling when trouble returns: the LR factor that failed, times
#: this, is the most the LR is ever restored to again (1.0: always restore the full LR).
#: The same order of magnitude as ``BACKOFF``: after k relapses the LR is at most
#: ``BACKOFF**k`` of its value, and a relapse's back-off is not undone.
RELAPSE_BACKOFF = BACKOFF
#: Trouble within this many multiples of ``restore_steps`` of the previous trigger is a
#: relapse (a return of the same instability), not a new, isolated incident.
RELAPSE_WINDOW_FACTOR = 10

SNAPSHOT_PREFIX = "snapshot-"
SNAPSHOT_SUFFIX = ".pt"


class SnapshotError(ValueError):
    """A snapshot file cannot be read (truncated, corrupt, or not a gradguard snapshot)."""


# ---- snapshot stores -------------------------------------------------------------------
def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device, copy=True)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def _all_finite(obj: Any) -> bool:
    """True when every floating tensor in ``obj`` (host tensors) is finite."""
    if isinstance(obj, Tensor):
        return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
    if isinstance(obj, dict):
        return all(_all_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(_all_finite(v) for v in obj)
    if isinstance(obj, float):
        return math.isfinite(obj)
    return True


class MemorySnapshotStore:
    """Keeps the last ``keep`` snapshots in CPU memory.

    Example:
        >>> from gradguard.recovery import MemorySnapshotStore
        >>> store = MemorySnapshotStore(keep=2)
        >>> for step in (10, 20, 30):
        ...     store.save(step, {"step": step})
        >>> store.steps(), store.load(-1)["step"]
        ([20, 30], 30)
    """

    def __init__(self, *, keep: int = KEEP) -> None:
        self.keep = _check_int("keep", keep, 1, "MemorySnapshotStore")
        self._snaps: list[tuple[int, dict[str, Any]]] = []

    def save(self, step: int, state: dict[str, Any]) -> None:
        self._snaps.append((step, state))
        del self._snaps[: -self.keep]

    def steps(self) -> list[int]:
        return [s for s, _ in self._snaps]

    def __len__(self) -> int:
        return len(self._snaps)

    def load(self, index: int = -1) -> dict[str, Any]:
        """The snapshot at ``index`` (``-1``: newest)."""
        return self._snaps[index][1]

    def load_good(self, back: int = 0) -> dict[str, Any] | None:
        """The newest snapshot, or ``back`` snapshots before it (clamped); None if empty."""
        if not self._snaps:
            return None
        return self._snaps[max(-len(self._snaps), -1 - back)][1]


class DiskSnapshotStore:
    """Snapshots as ``snapshot-<step>.pt`` files in ``directory``, written atomically.

    Each save writes a temp file in the same directory, flushes and fsyncs it, then
    ``os.replace``s it into place (and fsyncs the directory), so a process killed mid-write
    leaves the previous snapshot intact and at most a stray ``.tmp`` file.

    Raises:
        ValueError: at construction when ``directory`` cannot be created or written.

    Example:
        >>> import tempfile
        >>> from gradguard.recovery import DiskSnapshotStore
        >>> store = DiskSnapshotStore(tempfile.mkdtemp(), keep=2)
        >>> store.save(5, {"step": 5, "x": [1.0]})
        >>> store.load_good()["x"]
        [1.0]
    """

    def __init__(self, directory: str | os.PathLike[str], *, keep: int = KEEP) -> None:
        self.keep = _check_int("keep", keep, 1, "DiskSnapshotStore")
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(
                f"snapshot_dir={str(directory)!r} cannot be created: {e}"
            ) from e
        if not self.directory.is_dir() or not os.access(self.directory, os.W_OK | os.X_OK):
            raise ValueError(f"snapshot_dir={str(directory)!r} is not a writable directory")
        try:  # os.access says yes to root even on read-only mounts: really try
            with tempfile.NamedTemporaryFile(dir=self.directory, prefix=".probe-"):
                pass
        except OSError as e:
            raise ValueError(f"snapshot_dir={str(directory)!r} is not writable: {e}") from e

    def path(self, step: int) -> Path:
        return self.directory / f"{SNAPSHOT_PREFIX}{step:010d}{SNAPSHOT_SUFFIX}"

    def paths(self) -> list[Path]:
        """Snapshot files, oldest first (temp files are ignored)."""
        return sorted(
            p for p in self.directory.glob(f"{SNAPSHOT_PREFIX}*{SNAPSHOT_SUFFIX}")
            if p.name[len(SNAPSHOT_PREFIX):-len(SNAPSHOT_SUFFIX)].isdigit()
        )

    def steps(self) -> list[int]:
        return [int(p.name[len(SNAPSHOT_PREFIX):-len(SNAPSHOT_SUFFIX)]) for p in self.paths()]

    def __len__(self) -> int:
        return len(self.paths())

    def save(self, step: int, state: dict[str, Any]) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{SNAPSHOT_PREFIX}",
                                   suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save(state, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path(step))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(self.directory)
        for old in self.paths()[: -self.keep]:
            old.unlink(missing_ok=True)

    def load_path(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        """Load one snapshot file.

        Raises:
            SnapshotError: naming the file, when it is truncated or not a snapshot.
        """
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch.load raises many types for a damaged file
            raise SnapshotError(
                f"snapshot file {str(path)!r} is corrupt or truncated: {type(e).__name__}: {e}"
            ) from e
        if not isinstance(state, dict):
            raise SnapshotError(f"snapshot file {str(path)!r} does not hold a snapshot dict")
        return state

    def load(self, index: int = -1) -> dict[str, Any]:
        """The snapshot at ``index`` of :meth:`paths` (``-1``: newest); raises SnapshotError."""
        return self.load_path(self.paths()[index])

    def load_good(self, back: int = 0) -> dict[str, Any] | None:
        """The newest loadable snapshot at least ``back`` snapshots back: a corrupt file is
        reported (a warning naming it) and the one before it is tried. None if none loads."""
        from .guard import GradGuardWarning

        paths = self.paths()
        start = max(0, len(paths) - 1 - back)
        for p in reversed(paths[: start + 1]):
            try:
                return self.load_path(p)
            except SnapshotError as e:
                warnings.warn(f"{e}; falling back to the previous snapshot", GradGuardWarning,
                              stacklevel=2)
        return None


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return  # not supported on this platform
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the file itself is synced
    finally:
        os.close(fd)


SnapshotStore = MemorySnapshotStore | DiskSnapshotStore


def _check_int(name: str, value: Any, low: int, owner: str = "Recovery") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{owner}({name}={value!r}): must be an int >= {low}")
    return value


# ---- the ladder ----------------------------------------------------------------------
@dataclass(frozen=True)
class Decision:
    """What the ladder does and why (no side effects)."""

    action: Action
    step: int
    reason: str = ""
    layers: tuple[str, ...] = ()


@dataclass
class _LadderState:
    consecutive_skips: int = 0
    factor: float = 1.0  # current LR multiplier applied by the ladder
    backoff_level: float = 1.0  # factor right after the last back-off
    ceiling: float = 1.0  # the factor the LR is restored to (lowered by relapses)
    backoff_step: int | None = None
    last_trigger: int | None = None
    trouble_start: int | None = None
    rollbacks: int = 0  # since the last healthy snapshot
    total_rollbacks: int = 0
    backoffs: int = 0
    last_snapshot: int | None = None
    base_lr: list[Any] = field(default_factory=list)
    set_lr: list[Any] = field(default_factory=list)


class Recovery:
    """The recovery ladder: skip → LR back-off → rollback → abort.

    Args:
        skip_patience: consecutive skipped steps that trigger a back-off (k, >= 1).
        backoff: LR multiplier on back-off, in (0, 1).
        restore_steps: steps over which the LR returns linearly to its value (m, >= 1).
        patience: steps after a back-off/rollback during which new trouble escalates to the
            next rung (default: ``restore_steps``).
        snapshot_every: steps between snapshots (s, >= 1); taken only while healthy.
        keep: snapshots kept (>= 1).
        snapshot_dir: write snapshots atomically there instead of CPU memory.
        reset_moments: after a rollback, zero the optimizer state of the layers that
            exploded (``"exploded"``), of every parameter (``"all"``) or of none.
        max_rollbacks: rollbacks without a healthy snapshot in between before
            :class:`~gradguard.TrainingDiverged` (n, >= 0).
        relapse_backoff: on a relapse (a back-off within ``relapse_window`` steps of the
            previous trigger, or a rollback), the ceiling the LR is restored to becomes this
            times the factor in force, for the rest of the run; in (0, 1], 1 restores the
            full LR every time.
        relapse_window: steps after a trigger during which new trouble counts as a relapse
            (>= 0; default: ``RELAPSE_WINDOW_FACTOR * restore_steps``).
        skip_batches: ``guard.batches_to_skip`` after a rollback (None: the number of steps
            from the first trigger of the episode to the rollback).

    Raises:
        ValueError: for an option outside its range or a snapshot_dir that is not writable.

    Example:
        >>> import torch, gradguard as gg
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> guard = gg.Guard(model, opt, recovery=gg.Recovery(skip_patience=2), every=5)
        >>> for step in range(4):
        ...     loss = model(torch.randn(8, 4)).pow(2).mean()
        ...     if step in (1, 2):
        ...         loss = loss * float("nan")          # two bad batches in a row
        ...     loss.backward(); _ = guard.step(loss); opt.zero_grad()
        >>> round(opt.param_groups[0]["lr"], 4)        # backed off at step 2, restoring
        0.0109
        >>> guard.close(); [e.kind for e in guard.events if e.kind == "lr_backoff"]
        ['lr_backoff']
    """

    def __init__(
        self,
        *,
        skip_patience: int = SKIP_PATIENCE,
        backoff: float = BACKOFF,
        restore_steps: int = RESTORE_STEPS,
        patience: int | None = None,
        snapshot_every: int = SNAPSHOT_EVERY,
        keep: int = KEEP,
        snapshot_dir: str | os.PathLike[str] | None = None,
        reset_moments: ResetMoments = "exploded",
        max_rollbacks: int = MAX_ROLLBACKS,
        skip_batches: int | None = None,
        relapse_backoff: float = RELAPSE_BACKOFF,
        relapse_window: int | None = None,
    ) -> None:
        self.skip_patience = _check_int("skip_patience", skip_patience, 1)
        if isinstance(backoff, bool) or not isinstance(backoff, (int, float)):
            raise TypeError(f"Recovery(backoff={backoff!r}): expected a number in (0, 1)")
        if not (0.0 < float(backoff) < 1.0):
            raise ValueError(
                f"Recovery(backoff={backoff!r}): must be in (0, 1) (it multiplies the LR)"
            )
        self.backoff = float(backoff)
        self.restore_steps = _check_int("restore_steps", restore_steps, 1)
        self.patience = self.restore_steps if patience is None else _check_int(
            "patience", patience, 1)
        self.snapshot_every = _check_int("snapshot_every", snapshot_every, 1)
        self.keep = _check_int("keep", keep, 1)
        if reset_moments not in RESET_MOMENTS:
            raise ValueError(
                f"Recovery(reset_moments={reset_moments!r}): allowed values are {RESET_MOMENTS}"
            )
        self.reset_moments: ResetMoments = reset_moments
        self.max_rollbacks = _check_int("max_rollbacks", max_rollbacks, 0)
        if isinstance(relapse_backoff, bool) or not isinstance(relapse_backoff, (int, float)):
            raise TypeError(
                f"Recovery(relapse_backoff={relapse_backoff!r}): expected a number in (0, 1]")
        if not (0.0 < float(relapse_backoff) <= 1.0):
            raise ValueError(
                f"Recovery(relapse_backoff={relapse_backoff!r}): must be in (0, 1] (it "
                f"multiplies the LR ceiling; 1 restores the full LR every time)"
            )
        self.relapse_backoff = float(relapse_backoff)
        self.relapse_window = (RELAPSE_WINDOW_FACTOR * self.restore_steps
                               if relapse_window is None
                               else _check_int("relapse_window", relapse_window, 0))
        self.skip_batches = None if skip_batches is None else _check_int(
            "skip_batches", skip_batches, 0)
        self.snapshot_dir = None if snapshot_dir is None else Path(snapshot_dir)
        self.store: SnapshotStore = (
            MemorySnapshotStore(keep=keep) if snapshot_dir is None
            else DiskSnapshotStore(snapshot_dir, keep=keep)
        )
        self.state = _LadderState()
        self.decisions: list[Decision] = []
        self._guard: weakref.ref[Guard] | None = None
        self._host_skips = False

    def __repr__(self) -> str:
        return (
            f"Recovery(skip_patience={self.skip_patience}, backoff={self.backoff}, "
            f"restore_steps={self.restore_steps}, snapshot_every={self.snapshot_every}, "
            f"max_rollbacks={self.max_rollbacks}, reset_moments={self.reset_moments!r}, "
            f"relapse_backoff={self.relapse_backoff}, relapse_window={self.relapse_window}, "
            f"snapshot_dir={None if self.snapshot_dir is None else str(self.snapshot_dir)!r})"
        )

    @property
    def lr_factor(self) -> float:
        """The multiplier the ladder currently applies to every param group's LR."""
        return self.state.factor

    @property
    def lr_ceiling(self) -> float:
        """The most the ladder restores the LR factor to (1.0 until a relapse lowers it)."""
        return self.state.ceiling

    # ---- hooks the Guard calls ---------------------------------------------------------
    def attach(self, guard: Guard) -> None:
        other = self._guard() if self._guard is not None else None
        if other is not None and other is not guard:
            raise ValueError("this Recovery is already attached to another Guard: make one each")
        self._guard = weakref.ref(guard)

    def after_step(self, guard: Guard, stats: StepStats, skipped: Tensor | bool) -> None:
        """Per step, host values only: count consecutive skips when the Guard already knows
        the skip flag (non-fused optimizers), and move the LR back towards its value."""
        step = guard.step_count - 1
        if isinstance(skipped, bool):
            self._host_skips = True
            self.state.consecutive_skips = self.state.consecutive_skips + 1 if skipped else 0
            if skipped and self.state.consecutive_skips % self.skip_patience == 0:
                reason = f"{self.state.consecutive_skips} consecutive non-finite steps skipped"
                self.act(guard, self.decide(step, reason, _bad_layers(guard, stats)))
                return
        self._restore_lr(guard, step)

    def on_flush(self, guard: Guard, window: Window, events: Sequence[Event] = ()) -> None:
        """At each flush: consecutive skips (fused optimizers), confirmed loss spikes, and
        snapshots while healthy."""
        trigger = self.trigger(window, events)
        if trigger is not None:
            step, reason = trigger
            self.act(guard, self.decide(step, reason, _exploded_layers(events)))
            return
        if self._healthy(window, events):
            self._maybe_snapshot(guard, window.steps[-1])

    # ---- pure decisions ----------------------------------------------------------------
    def trigger(self, window: Window, events: Sequence[Event]) -> tuple[int, str] | None:
        """The first trigger in a flushed window, ``(step, reason)``, or None. Pure apart
        from carrying the consecutive-skip count across windows (fused optimizers)."""
        found: tuple[int, str] | None = None
        if not self._host_skips:
            run = self.state.consecutive_skips
            for step, sk in zip(window.steps, window.skipped.tolist()):
                run = run + 1 if sk else 0
                if sk and run % self.skip_patience == 0 and found is None:
                    found = (step, f"{run} consecutive non-finite steps skipped")
            self.state.consecutive_skips = run
        for e in events:
            if e.kind == "loss_spike":  # reported only once confirmed (DetectorConfig)
                cand = (e.step, f"confirmed loss spike ({e.message})")
                if found is None or cand[0] < found[0]:
                    found = cand
                break
        return found

    def decide(self, step: int, reason: str, layers: Sequence[str]) -> Decision:
        """The rung for a trigger at ``step``: back off, or escalate when trouble returns
        within ``patience`` steps of the last rung; abort past ``max_rollbacks``."""
        st = self.state
        recent = st.last_trigger is not None and step - st.last_trigger <= self.patience
        if not recent:
            return Decision("backoff", step, reason, tuple(layers))
        if st.rollbacks >= self.max_rollbacks:
            return Decision("abort", step, reason, tuple(layers))
        return Decision("rollback", step, reason, tuple(layers))

    # ---- side effects ------------------------------------------------------------------
    def act(self, guard: Guard, d: Decision) -> None:
        from .guard import TrainingDiverged

        self.decisions.append(d)
        st = self.state
        relapse = st.last_trigger is not None and d.step - st.last_trigger <= self.relapse_window
        if st.last_trigger is None or d.step - st.last_trigger > self.patience:
            st.trouble_start = d.step
        st.last_trigger = d.step
        st.consecutive_skips = 0 if d.action != "backoff" else st.consecutive_skips
        lowered = False
        if d.action == "rollback" or (d.action == "backoff" and relapse):
            # the trouble came back: the LR in force now is too high for this run, for good
            lowered = self._lower_ceiling()
        if d.action == "backoff":
            st.backoffs += 1
            self._set_factor(guard, self._backed_off(), d.step)
            guard.add_event(Event(
                kind="lr_backoff", step=d.step, severity="warning", value=st.factor,
                message=(f"step {d.step}: {d.reason}; learning rate x{st.factor:g}, restored "
                         f"over {self.restore_steps} steps"
                         + (f" to x{st.ceiling:g} only (the trouble came back)" if lowered
                            else (f" to x{st.ceiling:g}" if st.ceiling < 1.0 else ""))),
                remedy="If this repeats, lower the base learning rate or add warm-up.",
                data={"factor": st.factor, "reason": d.reason, "ceiling": st.ceiling,
                      "relapse": relapse},
            ))
        elif d.action == "rollback":
            self._rollback(guard, d)
        else:
            run_dir = _run_dir(guard)
            msg = (f"step {d.step}: training diverged: {d.reason}, after {st.rollbacks} "
                   f"rollback(s) without recovering"
                   + (f"; events in {run_dir}" if run_dir else ""))
            guard.add_event(Event(
                kind="abort", step=d.step, severity="error", message=msg,
                remedy=("Run gg.doctor(model, batch, loss_fn) on a failing batch; lower the "
                        "learning rate; check the data for NaN/Inf."),
                data={"rollbacks": st.total_rollbacks, "reason": d.reason},
            ))
            raise TrainingDiverged(msg, events=guard.events, run_dir=run_dir)

    def _rollback(self, guard: Guard, d: Decision) -> None:
        st = self.state
        snap = self.store.load_good(back=min(st.rollbacks, self.keep - 1))
        st.rollbacks += 1
        st.total_rollbacks += 1
        if snap is None:  # nothing good to go back to yet: back off deeper instead
            self._set_factor(guard, self._backed_off(), d.step)
            guard.add_event(Event(
                kind="lr_backoff", step=d.step, severity="warning", value=st.factor,
                message=(f"step {d.step}: {d.reason} again and no snapshot yet; learning "
                         f"rate x{st.factor:g}, restored to x{st.ceiling:g} only"),
                remedy="Lower the base learning rate or add warm-up.",
                data={"factor": st.factor, "reason": d.reason, "ceiling": st.ceiling,
                      "relapse": True},
            ))
            return
        opt = guard.optimizer
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        guard.model.load_state_dict(snap["model"])
        opt.load_state_dict(snap["optimizer"])
        for g, h in zip(opt.param_groups, hyper):  # LR schedules are not rolled back
            g.update(h)
        if guard.clip is not None and snap.get("clip") is not None:
            guard.clip.load_state_dict(_to_device(snap["clip"], guard.telemetry.device))
        reset = self._reset_moments(guard, d.layers)
        self._set_factor(guard, self._backed_off(), d.step)
        start = st.trouble_start if st.trouble_start is not None else d.step
        skip = self.skip_batches if self.skip_batches is not None else d.step - start + 1
        guard.batches_to_skip = skip
        guard.add_event(Event(
            kind="rollback", step=d.step, severity="error", value=float(snap["step"]),
            message=(f"step {d.step}: {d.reason} persists; rolled back to the snapshot of "
                     f"step {snap['step']}, learning rate x{st.factor:g} (restored to "
                     f"x{st.ceiling:g} only), "
                     f"{len(reset)} layer(s) with reset optimizer state, "
                     f"{skip} batch(es) to skip (rollback {st.rollbacks}/{self.max_rollbacks})"),
            remedy=("Lower the learning rate; if the data caused it, skip "
                    "guard.batches_to_skip batches."),
            data={"snapshot_step": snap["step"], "reset_layers": reset,
                  "batches_to_skip": skip, "reason": d.reason, "factor": st.factor,
                  "ceiling": st.ceiling},
        ))

    def _reset_moments(self, guard: Guard, layers: Sequence[str]) -> list[str]:
        if self.reset_moments == "none":
            return []
        from .telemetry import layer_of

        names = guard.names
        chosen = set(layers) if self.reset_moments == "exploded" and layers else None
        reset: list[str] = []
        for name, p in zip(names, guard.telemetry.params):
            lay = layer_of(name)
            if chosen is not None and lay not in chosen:
                continue
            for v in guard.optimizer.state.get(p, {}).values():
                if isinstance(v, Tensor):
                    v.zero_()  # moments and Adam's step: the bias correction restarts too
            if lay not in reset:
                reset.append(lay)
        return reset

    def _lower_ceiling(self) -> bool:
        """Trouble came back: at most ``relapse_backoff`` times the factor now in force (the
        LR that failed) is restored from now on. Returns True when the ceiling moved."""
        st = self.state
        new = min(st.ceiling, st.factor) * self.relapse_backoff
        if new >= st.ceiling:
            return False
        st.ceiling = new
        return True

    def _backed_off(self) -> float:
        """The factor a back-off sets: ``backoff`` times the current one, never above the
        ceiling."""
        st = self.state
        return min(st.factor * self.backoff, st.ceiling)

    def _set_factor(self, guard: Guard, factor: float, step: int) -> None:
        st = self.state
        groups = guard.optimizer.param_groups
        if len(st.base_lr) != len(groups) or st.factor == 1.0:
            st.base_lr = [_lr_value(g["lr"]) for g in groups]
            st.set_lr = list(st.base_lr)
        for i, g in enumerate(groups):
            cur = _lr_value(g["lr"])
            if cur != st.set_lr[i]:  # someone else (a scheduler) moved it: follow them
                st.base_lr[i] = cur / st.factor
            new = st.base_lr[i] * factor
            if isinstance(g["lr"], Tensor):
                g["lr"].fill_(new)
            else:
                g["lr"] = new
            st.set_lr[i] = new
        st.factor = factor
        if factor < 1.0:
            st.backoff_level = factor
            st.backoff_step = step

    def _restore_lr(self, guard: Guard, step: int) -> None:
        st = self.state
        top = st.ceiling
        if st.factor >= top or st.backoff_step is None:
            return
        t = step - st.backoff_step
        f = min(top, st.backoff_level + (top - st.backoff_level) * t / self.restore_steps)
        if f != st.factor:
            level, at = st.backoff_level, st.backoff_step
            self._set_factor(guard, f, step)
            st.backoff_level, st.backoff_step = level, at
            if f >= top:
                st.backoff_step = None

    # ---- snapshots -----------------------------------------------------------------------
    def _healthy(self, window: Window, events: Sequence[Event]) -> bool:
        bad = {"nonfinite_grad", "skip", "loss_spike", "grad_spike"}
        # info-level skips (routine loss-scale overflows) are no sign of trouble
        return (self.state.factor >= self.state.ceiling and not bool(window.skipped.any())
                and not any(e.kind in bad and e.severity != "info" for e in events))

    def _maybe_snapshot(self, guard: Guard, step: int) -> None:
        st = self.state
        if st.last_snapshot is not None and step - st.last_snapshot < self.snapshot_every:
            return
        self.snapshot(guard, step)

    def snapshot(self, guard: Guard, step: int | None = None) -> bool:
        """Take a snapshot now (model, optimizer, clip policy). Returns False, keeping
        nothing, when any value is NaN/Inf."""
        step = guard.step_count - 1 if step is None else step
        state = {
            "step": step,
            "model": _to_cpu(guard.model.state_dict()),
            "optimizer": _to_cpu(guard.optimizer.state_dict()),
            "clip": None if guard.clip is None else _to_cpu(guard.clip.state_dict()),
        }
        if not _all_finite(state):  # host-side check of the host copies
            return False
        self.store.save(step, state)
        self.state.last_snapshot = step
        self.state.rollbacks = 0
        return True

    # ---- checkpointing -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Ladder state (snapshots themselves are not included)."""
        st = self.state
        return {k: (list(v) if isinstance(v, list) else v) for k, v in vars(st).items()} | {
            "host_skips": self._host_skips}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        sd = dict(sd)
        self._host_skips = bool(sd.pop("host_skips", False))
        known = set(vars(_LadderState()))
        unknown = set(sd) - known
        if unknown:
            raise ValueError(f"Recovery.load_state_dict: unknown keys {sorted(unknown)}")
        self.state = _LadderState(**sd)


def _lr_value(lr: Any) -> float:
    return float(lr.detach().cpu()) if isinstance(lr, Tensor) else float(lr)


def _bad_layers(guard: Guard, stats: StepStats) -> list[str]:
    """Layers with a non-finite gradient norm (a host read, on the trigger path only)."""
    from .telemetry import layer_of

    norms = stats.param_norms.detach().float().cpu().tolist()
    return list(dict.fromkeys(
        layer_of(n) for n, v in zip(guard.names, norms) if not math.isfinite(v)))


def _exploded_layers(events: Sequence[Event]) -> list[str]:
    out: list[str] = []
    for e in events:
        if e.kind in ("nonfinite_grad", "grad_spike"):
            for lay in e.data.get("layers", []):
                if lay not in out:
                    out.append(lay)
    return out


def _run_dir(guard: Guard) -> str | None:
    for s in guard.sinks:
        d = getattr(s, "run_dir", None)
        if d is not None:
            return str(d)
    return None
