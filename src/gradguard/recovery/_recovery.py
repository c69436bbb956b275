"""The :class:`Recovery` object: its options, the hooks the guard calls, and carrying
out the ladder's actions (see the package docstring, :mod:`gradguard.recovery`)."""

from __future__ import annotations

import dataclasses
import os
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .. import distributed
from ..events import Event
from ..executors import NONFINITE, STALE, Hook
from . import _flush, actions
from .defaults import (
    BACKOFF,
    MAX_ROLLBACKS,
    RECOVERY_WINDOW,
    RELAPSE_BACKOFF,
    RELAPSE_WINDOW_FACTOR,
    RESET_MOMENTS,
    RESTORE_STEPS,
    SKIP_PATIENCE,
    SNAPSHOT_EVERY,
    SPIKE_GRACE,
    STALL_FACTOR,
    ResetMoments,
    _above_one,
    _fraction,
)
from .ladder import Action, LadderConfig, LadderState, Trigger, transition
from .late import LateFlags, enabled
from .probe import LrProbe
from .ring import SnapshotRing
from .rise import BLOCK, DeadLayers, LossRise
from .snapshots import KEEP, DiskSnapshotStore, MemorySnapshotStore, check_int, state_bytes
from .verdict import LOSS_SPIKE, SpikeVerdict

if TYPE_CHECKING:
    from ..guard import Guard
    from ..telemetry import StepStats, Window


class Recovery:
    """The recovery ladder: skip → LR back-off → rollback → abort (see :mod:`.ladder`).

    Args:
        skip_patience: consecutive skipped steps that trigger a back-off (k, >= 1).
        backoff: LR multiplier on back-off, in (0, 1).
        restore_steps: steps over which the LR returns linearly to its value (m, >= 1).
        patience: steps after a back-off/rollback during which new trouble escalates to the
            next rung (default: ``restore_steps``); also the longest streak of non-finite
            steps the batches are at fault for (the restored weights' first step is
            non-finite too: ``nonfinite_input``, :mod:`.ladder`) before
            :class:`~gradguard.TrainingDiverged`.
        snapshot_every: steps between snapshots (s, >= 1); taken only while healthy.
        keep: snapshots kept (>= 1).
        snapshot_dir: also write each snapshot there (atomically, on a background thread:
            training never waits on the disk; a failed write warns once and the in-memory
            snapshots go on serving rollbacks).
        snapshot_memory: the most bytes the in-memory snapshots may hold (the newest is
            always kept), the LR probe's copies of the training state counted with them (a
            probe that would not fit is not run: a warning says so once); None: ``keep``
            snapshots (see :attr:`snapshot_bytes`).
        reset_moments: after a rollback, zero the optimizer state of the layers that
            exploded (``"exploded"``), of every parameter (``"all"``) or of none.
        max_rollbacks: rollbacks without a healthy snapshot in between before
            :class:`~gradguard.TrainingDiverged` (n, >= 0); when the loss level alone
            decided the last of them, the loss does not answer the weights and the
            loss-level tests are turned off instead (a ``loss_level_off`` event, see
            :mod:`.ladder`).
        relapse_backoff: on a relapse the ceiling the LR is restored to becomes this times
            the factor in force, for the rest of the run; in (0, 1], 1 restores the full LR
            every time.
        relapse_window: steps after a trigger during which new trouble counts as a relapse
            (>= 0; default: ``RELAPSE_WINDOW_FACTOR * restore_steps``).
        skip_batches: ``guard.batches_to_skip`` after a rollback (None: the number of steps
            from the first trigger of the episode to the rollback).
        skip_spikes: skip a step whose gradient norm the per-step verdict calls a spike
            (:mod:`.verdict`); False leaves spikes to the clip policy.
        loss_rise: back off when the loss rises and stays up (:mod:`.rise`). It assumes
            a loss that training should lower; turn it off for objectives that may rise
            in a healthy run (a GAN's generator, RL returns, an annealed regulariser, a
            curriculum that makes the data harder).
        lr_probe: when the loss sits at least twice its best without a spike (and again
            within 50 steps), train the same weights for 30 steps at the LR in force and
            30 at half of it (a copy of the training state is restored between the two);
            if half the LR halved the loss, the LR is too high and the ladder lowers it
            (:mod:`.probe`). Needs ``loss_rise`` (the same loss levels, the same kind of
            loss).
        recovery_window: steps after a back-off or rollback by which the loss must be back
            near its level before the trouble, else the ladder rolls back (>= 1).
        stall_factor: "near its level": at most this many times it (> 1); also the rise
            the loss-rise test looks for.

    The LR back-off is a multiplier applied to the LR the optimizer is about to use and
    removed after the step (:class:`~gradguard.recovery.actions.LrMultiplier`): it
    composes with any LR scheduler; ``param_groups[i]["lr"]`` between steps stays the
    schedule's value.

    Raises:
        ValueError: for an option outside its range or a snapshot_dir that is not writable.

    Example:
        >>> import torch, gradguard as gg
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> rec = gg.Recovery(skip_patience=2)
        >>> guard = gg.Guard(model, opt, recovery=rec, every=5)
        >>> for step in range(4):
        ...     loss = model(torch.randn(8, 4)).pow(2).mean()
        ...     if step in (1, 2):
        ...         loss = loss * float("nan")          # two bad batches in a row
        ...     loss.backward(); _ = guard.step(loss); opt.zero_grad()
        >>> round(rec.lr_factor, 4)                    # backed off at step 2: step 3 ran at x0.1
        0.1
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
        snapshot_memory: int | None = None,
        skip_spikes: bool = True,
        loss_rise: bool = True,
        lr_probe: bool = True,
        recovery_window: int = RECOVERY_WINDOW,
        stall_factor: float = STALL_FACTOR,
    ) -> None:
        restore = check_int("restore_steps", restore_steps, 1)
        if reset_moments not in RESET_MOMENTS:
            raise ValueError(
                f"Recovery(reset_moments={reset_moments!r}): allowed values are {RESET_MOMENTS}"
            )
        if snapshot_dir is not None and not isinstance(snapshot_dir, (str, os.PathLike)):
            raise TypeError(
                f"Recovery(snapshot_dir={snapshot_dir!r}): expected a path (str or "
                "os.PathLike) or None"
            )
        self.config = LadderConfig(
            skip_patience=check_int("skip_patience", skip_patience, 1),
            backoff=_fraction("backoff", backoff, True, "it multiplies the LR"),
            restore_steps=restore,
            patience=restore if patience is None else check_int("patience", patience, 1),
            snapshot_every=check_int("snapshot_every", snapshot_every, 1),
            keep=check_int("keep", keep, 1),
            max_rollbacks=check_int("max_rollbacks", max_rollbacks, 0),
            relapse_backoff=_fraction(
                "relapse_backoff", relapse_backoff, False,
                "it multiplies the LR ceiling; 1 restores the full LR every time"),
            relapse_window=(RELAPSE_WINDOW_FACTOR * restore if relapse_window is None
                            else check_int("relapse_window", relapse_window, 0)),
            skip_batches=None if skip_batches is None else check_int("skip_batches", skip_batches, 0),
            recovery_window=check_int("recovery_window", recovery_window, 1),
            stall_factor=_above_one("stall_factor", stall_factor),
        )
        if not isinstance(skip_spikes, bool):
            raise TypeError(f"Recovery(skip_spikes={skip_spikes!r}): must be True or False")
        self.skip_spikes = skip_spikes
        if not isinstance(loss_rise, bool):
            raise TypeError(f"Recovery(loss_rise={loss_rise!r}): must be True or False")
        self.loss_rise = loss_rise
        if not isinstance(lr_probe, bool):
            raise TypeError(f"Recovery(lr_probe={lr_probe!r}): must be True or False")
        self.lr_probe = lr_probe and loss_rise
        self.reset_moments: ResetMoments = reset_moments
        self.snapshot_dir = None if snapshot_dir is None else Path(snapshot_dir)
        self.ring = SnapshotRing(keep, snapshot_memory, snapshot_dir)
        self.state = LadderState()
        self.actions: list[Action] = []  # what the ladder did, oldest first
        self._guard: weakref.ref[Guard] | None = None
        self._mult: actions.LrMultiplier | None = None
        # steps whose skip flag the ladder already counted on the host (a fused optimizer's
        # first steps, a step that was read for raise/warn); the flush replays the others
        self._host_steps: set[int] = set()
        self._late = LateFlags()  # the device's skip flags, heard before the flush
        self._level: float | None = None  # the loss level of the last healthy flush
        self._verdict = SpikeVerdict()
        self._rise = LossRise()
        self._dead = DeadLayers()
        self._probe = LrProbe()
        self._progress: float | None = None  # the loss level of the latest flush
        self.restores = 0  # weights restored: rollbacks, and the LR probe's forks (_flush)
        #: the first step whose gradients a rollback's restored weights give (a later one
        #: when that step's update was voided): its verdict tests the weights (see ``data``
        #: in :mod:`.ladder`); None once judged
        self._restored_at: int | None = None
        self._restored_from = -1  # the snapshot step the last rollback restored
        #: the snapshot (and the restores count then) whose weights have had no finite
        #: gradients yet (a snapshot holds the weights after an update, not yet evaluated;
        #: skipped steps leave them in place), and the snapshots whose weights had: only
        #: their restore tests the batches
        self._verify: tuple[int, int] | None = None
        self._verified: set[int] = set()
        self._judged = -1  # the step of the last judgement of the loss level (see _flush)

    def __getattr__(self, name: str) -> Any:
        # the ladder options read as attributes: rec.backoff, rec.restore_steps, ...
        cfg = self.__dict__.get("config")
        if cfg is not None and name in LadderConfig.__dataclass_fields__:
            return getattr(cfg, name)
        raise AttributeError(f"'Recovery' object has no attribute {name!r}")

    def __repr__(self) -> str:
        c = self.config
        return (
            f"Recovery(skip_patience={c.skip_patience}, backoff={c.backoff}, "
            f"restore_steps={c.restore_steps}, snapshot_every={c.snapshot_every}, "
            f"max_rollbacks={c.max_rollbacks}, reset_moments={self.reset_moments!r}, "
            f"relapse_backoff={c.relapse_backoff}, relapse_window={c.relapse_window}, "
            f"snapshot_dir={None if self.snapshot_dir is None else str(self.snapshot_dir)!r})"
        )

    @property
    def decisions(self) -> list[Action]:
        """What the ladder decided so far (back-offs, rollbacks, an abort), oldest first."""
        return [a for a in self.actions if a.kind != "snapshot"]

    @property
    def lr_factor(self) -> float:
        """The multiplier the ladder currently applies to every param group's LR (with an
        LR probe's trial, :mod:`.probe`)."""
        return self.state.factor * self._probe.factor

    @property
    def lr_ceiling(self) -> float:
        """The most the ladder restores the LR factor to (1.0 until a relapse lowers it)."""
        return self.state.ceiling

    @property
    def store(self) -> MemorySnapshotStore:
        """The snapshots rollbacks restore from (host memory, pinned from CUDA)."""
        return self.ring.store

    @property
    def disk(self) -> DiskSnapshotStore | None:
        """Their copies on disk, when ``snapshot_dir`` is set."""
        return self.ring.disk

    @disk.setter
    def disk(self, store: DiskSnapshotStore | None) -> None:
        self.ring.disk = store

    # ---- hooks the Guard calls ---------------------------------------------------------
    def attach(self, guard: Guard) -> None:
        other = self._guard() if self._guard is not None else None
        if other is not None and other is not guard:
            raise ValueError("this Recovery is already attached to another Guard: make one each")
        self._guard = weakref.ref(guard)
        if self.disk is not None:
            self.disk.rank = None if guard.dist is None else guard.dist.rank
        if self._mult is None:
            self._mult = actions.LrMultiplier(guard.optimizer, lambda: self.lr_factor)

    def detach(self) -> None:
        """Remove the LR multiplier's hooks (the guard's ``close`` calls it)."""
        if self._mult is not None:
            self._mult.remove()
            self._mult = None
        self.ring.close()
        self._guard = None

    def wait(self) -> None:
        """Block until the snapshots submitted to ``snapshot_dir`` are on disk."""
        self.ring.wait()

    @property
    def snapshot_bytes(self) -> int:
        """Host memory the in-memory snapshots hold now, with the LR probe's copy of the
        training state while a probe runs (``snapshot_memory`` bounds them together)."""
        fork = self._probe.fork
        return self.store.nbytes() + (0 if fork is None else state_bytes(fork))

    def relayout(self, guard: Guard) -> None:
        """The optimizer's parameter groups changed: the snapshots hold the old groups and
        cannot be loaded into it any more; the next healthy flush takes a new one. The
        spike verdict forgets the old set's norm (as the clip policy does), and an LR probe
        under way is void (its copy of the training state is of the old groups)."""
        self.ring.clear()
        self._verdict = SpikeVerdict()
        self._probe.cancel(guard.step_count)
        self.state = dataclasses.replace(self.state, last_snapshot=None, rollbacks=0)

    def flush_every(self, every: int) -> int:
        """Steps between the guard's flushes: ``every``, or at most ``BLOCK`` (10) while
        the ladder is at work (a progress check pending, the LR restoring, or a lowered
        ceiling not yet settled): a relapse is then caught within ten steps rather than
        up to ``every`` later, and the LR that failed is the one in force when the loss
        rose. Decided from the ladder's state alone, identical on every rank."""
        return min(every, BLOCK) if self.busy else every

    @property
    def busy(self) -> bool:
        """The ladder is at work: a progress check pending, the LR restoring, a lowered
        ceiling not yet settled, or the LR probe running (or confirming its cue)."""
        st = self.state
        return (st.watching is not None or st.factor < st.ceiling or st.probation
                or self._probe.watching)

    def before_step(self, guard: Guard) -> None:
        """Before each optimizer step: set the LR factor this step uses (the restore after a
        back-off moves one step at a time, starting from the back-off factor itself), and
        before the run's very first step keep the weights as they are, before anything can
        have gone wrong (a run whose first update wrecks it still has a healthy state to go
        back to; outside the ladder's ``snapshot_every`` cadence; a resumed run goes on
        with the snapshots it had). A trainer steps the optimizer after the guard's hook:
        the skip flags of its earlier steps are heard here, once its last update is done."""
        if guard.step_count == 0 and not len(self.store) and self.ring.keep(guard, -1, disk=False):
            self._kept(-1)
        if isinstance(guard.executor, Hook):
            self._hear(guard)
        self._feed(guard, Trigger("tick", guard.step_count), list)

    def verdict(self, stats: StepStats, loss: Tensor | float | None) -> Tensor:
        """This step's spike verdict (device uint8 bits, no host read; see
        :mod:`.verdict`): zero unless ``skip_spikes`` and the ladder is not in the first
        ``SPIKE_GRACE`` steps after acting (its statistics still learn from every step).

        Under torch.distributed only the gradient norm is judged per step: the total norm is
        the same on every rank (one all-reduce, or identical DDP gradients), the loss is
        each rank's own, and a skip must be decided alike everywhere without a collective
        of its own. Loss spikes are then judged at the flush, over the agreed window."""
        if distributed.world_size() > 1:
            loss = None
        code = self._verdict(stats.total_norm, loss)
        g = self._guard() if self._guard is not None else None
        step = g.step_count if g is not None else 0
        last = self.state.last_trigger
        if not self.skip_spikes or (last is not None and step - last <= SPIKE_GRACE):
            return code.zero_()
        return code

    def after_step(self, guard: Guard, stats: StepStats, outcome: Any) -> None:
        """Per step: count skips when the guard knows the skip flag (non-fused optimizers);
        a flag that stayed on the device (fused optimizers, a ``GradScaler``) is copied to
        the host without waiting and heard once there (:mod:`.late`), else at the flush."""
        step = guard.step_count - 1
        if outcome.code is not None or isinstance(outcome.trouble, bool):
            self._host_steps.add(step)
            trig = self._skip_trigger(bool(outcome.trouble), step, outcome.code or 0)
            self._feed(guard, trig, lambda: actions.nonfinite_layers(guard, stats.param_norms))
            return
        skipped = outcome.skipped
        if not isinstance(skipped, Tensor) or not enabled():
            return
        if outcome.amp_row is None:  # skipped exactly when in trouble: the verdict bits alone
            self._late.push(step, skipped, (stats.param_norms, False))
        else:  # a GradScaler's routine overflow is skipped and no trouble: both, packed
            flag = skipped.to(torch.uint8) * 2 + outcome.trouble.to(torch.uint8)
            self._late.push(step, flag, (stats.param_norms, True))
        if not isinstance(guard.executor, Hook):  # the update is done: act after it
            self._hear(guard)

    def _hear(self, guard: Guard) -> None:
        """Feed the ladder the device skip flags whose copy to the host has completed."""
        at = guard.step_count - 1
        for step, flag, (norms, packed) in self._late.heard():
            self._host_steps.add(step)
            trouble, code = (bool(flag & 1), flag >> 1) if packed else (flag != 0, flag)
            trig = self._skip_trigger(trouble, step, code, at=at)
            self._feed(guard, trig, lambda n=norms: actions.nonfinite_layers(guard, n))

    def _skip_trigger(self, skipped: bool, step: int, code: int, at: int | None = None) -> Trigger:
        """The ladder's trigger for a step and its verdict ``code``. A step skipped for its
        loss (judged per step in a run's first steps only: the update before it wrecked
        the weights, see :mod:`.verdict`) asks for a rollback, not a back-off that would
        keep the wrecked weights."""
        if self._verify is not None and step > self._verify[0] and not skipped and not code & STALE:
            # the first step taken since the snapshot: its gradients were the snapshot's
            # weights' (the steps between were skipped), unless a restore replaced them
            if self._verify[1] == self.restores:
                self._verified.add(self._verify[0])
            self._verify = None
        first = (self._restored_at is not None and step >= self._restored_at
                 and not code & STALE)  # the first gradients of restored weights
        if first:
            self._restored_at = None
        if not skipped:
            return Trigger("clean", step, at=at, voided=bool(code & STALE))
        reason = ("loss-spiking" if code & LOSS_SPIKE else "spiking" if code & ~NONFINITE
                  else "non-finite")
        return Trigger("skip", step, reason, self._level, at=at, rollback=bool(code & LOSS_SPIKE),
                       data=first and bool(code & NONFINITE))

    def on_flush(self, guard: Guard, window: Window, events: Sequence[Event] = (),
                 overflows: Any = ()) -> None:
        """At each flush: consecutive skips (fused optimizers), confirmed loss spikes, a
        loss that rose or a network that died, the loss after a back-off, the LR probe, and
        snapshots while healthy (:mod:`._flush`). Routine loss-scale overflows
        (``overflows``) are no trouble."""
        _flush.on_flush(self, guard, window, events, overflows)

    # ---- carrying out the ladder's actions ----------------------------------------------------
    def _feed(self, guard: Guard, trig: Trigger, layers: Any) -> bool:
        """Advance the ladder by ``trig`` and carry its actions out; True when it acted
        (beyond a snapshot)."""
        self.state, todo = transition(self.config, self.state, trig)
        acted = False
        for a in todo:
            self.actions.append(a)
            if a.kind == "snapshot":
                self.snapshot(guard, a.step)
                continue
            if a.kind == "settled":
                guard.add_event(actions.settled_event(guard, a))
                continue
            if a.kind == "lower":
                self._rise.reset()
                guard.add_event(actions.lowered_event(guard, a))
                continue
            acted = True
            self._rise.reset()  # the loss level is learnt again after the ladder acted
            if a.kind == "data":
                guard.add_event(actions.data_event(guard, a, self._restored_from))
                continue
            if a.kind == "level_off":
                self._probe.cancel(a.step)
                guard.add_event(actions.level_off_event(guard, a, self.config.restore_steps))
                continue
            level = trig.value if trig.mild else self.state.pre_level  # before the trouble
            if a.kind == "backoff":
                guard.add_event(actions.backoff_event(a, self.config.restore_steps, level=level))
            elif a.kind == "rollback":
                snap = self.ring.load(self._back(a.back))
                if snap is None:  # nothing good to go back to yet: the deeper back-off only
                    guard.add_event(actions.backoff_event(a, self.config.restore_steps,
                                                          no_snapshot=True, level=level))
                else:
                    actions.rollback(guard, a, snap, layers(), self.reset_moments,
                                     self.config.max_rollbacks, level)
                    self.restores += 1
                    back_to = int(snap["step"])
                    # a test of the batches only when the weights had finite gradients
                    self._restored_at = guard.step_count if back_to in self._verified else None
                    self._restored_from = back_to
                    # the progress check asks the loss back near the level of the weights
                    # it restarts from, if those were above the level before the trouble
                    step = int(snap["step"])
                    back_at = self._rise.fresh if step < 0 else self.ring.levels.get(step)
                    self.state, _ = transition(self.config, self.state,
                                               Trigger("restored", a.step, value=back_at))
            else:
                raise actions.abort(guard, a, self.state.rollbacks)
        return acted

    def snapshot(self, guard: Guard, step: int | None = None) -> bool:
        """Take a snapshot now (model, optimizer, clip policy) into host memory, and hand a
        copy to the disk writer. Returns False, keeping nothing, when any value is NaN/Inf."""
        step = guard.step_count - 1 if step is None else step
        if not self.ring.keep(guard, step):
            return False
        self._kept(step)
        self.ring.remember(step, self._progress)
        self.state, _ = transition(self.config, self.state, Trigger("snapshot", step))
        return True

    def _back(self, back: int) -> int:
        """How many snapshots before the newest in memory a rollback goes to: one further
        when the newest one's weights never had finite gradients (every step since it was
        skipped: restoring them restores the trouble's own weights, a no-op for a streak of
        skipped steps) and an older one is kept."""
        steps = self.store.steps()
        return back + 1 if len(steps) > 1 and steps[-1] not in self._verified else back

    def _kept(self, step: int) -> None:
        """A snapshot of ``step`` was kept: its weights' first gradients are to come."""
        self._verify = (step, self.restores)
        self._verified &= set(self.store.steps())

    # ---- checkpointing -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Ladder state, the spike verdict's statistics and the loss level (the in-memory
        snapshots are not included; with ``snapshot_dir`` they survive on disk)."""
        return dataclasses.asdict(self.state) | {
            "host_steps": sorted(self._host_steps), "level": self._level,
            "verdict": self._verdict.state_dict(), "rise": self._rise.state_dict(),
            "dead": self._dead.state_dict(), "probe": self._probe.state_dict(),
            "progress": self._progress, "judged": self._judged,
            "snapshot_levels": [[k, v] for k, v in sorted(self.ring.levels.items())],
            "restored": [self._restored_at, self._restored_from],
            "verify": None if self._verify is None else list(self._verify),
            "verified": sorted(self._verified)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        sd = dict(sd)
        self._host_steps = set(sd.pop("host_steps", ()))
        self._level = sd.pop("level", None)
        self._progress = sd.pop("progress", None)
        self._judged = int(sd.pop("judged", -1))
        self._restored_at, self._restored_from = sd.pop("restored", None) or (None, -1)
        verify = sd.pop("verify", None)
        self._verify = None if verify is None else (int(verify[0]), int(verify[1]))
        self._verified = set(sd.pop("verified", ()))
        self.ring.levels = {int(k): v for k, v in sd.pop("snapshot_levels", ())}
        rise = sd.pop("rise", None)
        if rise is not None:
            self._rise.load_state_dict(rise)
        probe = sd.pop("probe", None)
        if probe is not None:
            self._probe.load_state_dict(probe)
        dead = sd.pop("dead", None)
        if dead is not None:
            self._dead.load_state_dict(dead)
        verdict = sd.pop("verdict", None)
        if verdict is not None:
            self._verdict.load_state_dict(verdict)
        sd.pop("host_skips", None)  # gradguard 0.1
        for legacy in ("base_lr", "set_lr"):  # gradguard 0.1 tracked the LR itself
            sd.pop(legacy, None)
        known = {f.name for f in dataclasses.fields(LadderState)}
        unknown = set(sd) - known
        if unknown:
            raise ValueError(f"Recovery.load_state_dict: unknown keys {sorted(unknown)}")
        self.state = LadderState(**sd)

