"""The :class:`Recovery` object: its options, the hooks the guard calls, and carrying
out the ladder's actions (see the package docstring, :mod:`gradguard.recovery`)."""

from __future__ import annotations

import dataclasses
import os
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

from ..events import Event
from ..rundir import dir_arg
from . import _checkpoint, _flush, _probing, _steps, actions, growth
from .dead import DeadLayers
from .defaults import (
    BACKOFF,
    MAX_ROLLBACKS,
    RECOVERY_WINDOW,
    RELAPSE_BACKOFF,
    RESET_MOMENTS,
    RESTORE_STEPS,
    SKIP_PATIENCE,
    SNAPSHOT_EVERY,
    STALL_FACTOR,
    ResetMoments,
    check_flag,
    ladder_config,
)
from .follow import Followers
from .groups import SteppedKeys
from .ladder import Action, LadderConfig, LadderState, Trigger, transition
from .late import LateFlags
from .multiplier import LrMultiplier
from .probe import LrProbe
from .ring import SnapshotRing
from .rise import BLOCK, LossRise
from .shift import ShiftTest
from .snapshots import KEEP, DiskSnapshotStore, MemorySnapshotStore, state_bytes
from .tally import ClipTally
from .verdict import SpikeVerdict

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
        snapshot_memory: the most bytes the in-memory snapshots and the LR probe's copies
            may hold (the newest is always kept; a probe that would not fit is not run, said
            once); None: ``keep`` snapshots (see :attr:`snapshot_bytes`).
        reset_moments: after a rollback, zero the optimizer state of the layers that
            exploded (``"exploded"``), of every parameter (``"all"``) or of none; torch's
            optimizers only (another's state may hold weights: :func:`.moments.reset_moments`).
        max_rollbacks: rollbacks without a healthy snapshot in between before
            :class:`~gradguard.TrainingDiverged` (n, >= 0); when the loss level alone
            decided the last, the loss tests are turned off instead (``loss_level_off``).
        relapse_backoff: on a relapse the ceiling the LR is restored to becomes this times
            the factor in force, for good (its square, its cube when a lowered ceiling
            fails a third, fourth time before it settled); in (0, 1], 1 restores the full LR every time.
        relapse_window: steps after a trigger during which new trouble counts as a relapse
            (>= 0; default: ``RELAPSE_WINDOW_FACTOR * restore_steps``).
        skip_batches: ``guard.batches_to_skip`` after a rollback (None: the number of steps
            from the first trigger of the episode to the rollback).
        skip_spikes: skip a step whose gradient norm the per-step verdict calls a spike
            (:mod:`.verdict`); False leaves spikes to the clip policy.
        loss_rise: back off when the loss rises and stays up (:mod:`.rise`); turn it off
            for objectives that may rise in a healthy run (a GAN's generator, RL returns,
            an annealed regulariser, a curriculum that makes the data harder).
        lr_probe: when the loss sits at twice its best or more with no spike, train the same
            weights 30 steps at the LR in force and 30 at half of it; if half the LR halved
            the loss, the ladder lowers it (:mod:`.probe`). Needs ``loss_rise``.
        early_growth: weights grown 2x by step 20 (the median matrix's norm) roll back to the
            fresh ones at a capped LR at step 60, unless the loss learnt by then
            (:mod:`.growth`); False leaves them.
        undo_backoff: undo a back-off for a streak of non-finite (or off-scale) steps when
            the first step taken after it is clean: the batches were at fault, not the
            weights (``nonfinite_input``/``unscaled_input``, :mod:`.ladder`); False keeps it.
        recovery_window: steps after a back-off or rollback by which the loss must be back
            near its level before the trouble, else the ladder rolls back (>= 1).
        stall_factor: "near its level": at most this many times it (> 1); also the rise
            the loss-rise test looks for.
        also: state rolled back with the weights (an ``AveragedModel``/EMA, or a list):
            anything with ``state_dict()``/``load_state_dict()`` (:mod:`.follow`).

    The LR back-off is a multiplier applied to the LR the optimizer is about to use and
    removed after the step (:class:`~gradguard.recovery.multiplier.LrMultiplier`): it
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
        >>> factors = []
        >>> for step in range(4):
        ...     loss = model(torch.randn(8, 4)).pow(2).mean()
        ...     if step in (1, 2):
        ...         loss = loss * float("nan")          # two bad batches in a row
        ...     loss.backward(); _ = guard.step(loss); opt.zero_grad()
        ...     factors.append(round(rec.lr_factor, 4))
        >>> factors  # backed off at step 2; step 3, on the same weights, is finite: undone
        [1.0, 1.0, 0.1, 1.0]
        >>> guard.close()
        >>> [e.kind for e in guard.events if e.kind in ("lr_backoff", "nonfinite_input")]
        ['lr_backoff', 'nonfinite_input']
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
        undo_backoff: bool = True,
        recovery_window: int = RECOVERY_WINDOW,
        stall_factor: float = STALL_FACTOR,
        also: Any = None,
        early_growth: bool = True,
    ) -> None:
        if reset_moments not in RESET_MOMENTS:
            raise ValueError(
                f"Recovery(reset_moments={reset_moments!r}): allowed values are {RESET_MOMENTS}"
            )
        if snapshot_dir is not None and not isinstance(snapshot_dir, (str, os.PathLike)):
            raise TypeError(
                f"Recovery(snapshot_dir={snapshot_dir!r}): expected a path (str or "
                "os.PathLike) or None"
            )
        if snapshot_dir is not None:  # found by a stranger: "" wrote snapshots in "."
            dir_arg(snapshot_dir, "Recovery snapshot_dir (or None: in memory only)")
        self.config = ladder_config(
            skip_patience=skip_patience, backoff=backoff, restore_steps=restore_steps,
            patience=patience, snapshot_every=snapshot_every, keep=keep,
            max_rollbacks=max_rollbacks, relapse_backoff=relapse_backoff,
            relapse_window=relapse_window, skip_batches=skip_batches,
            recovery_window=recovery_window, stall_factor=stall_factor,
            undo_backoff=undo_backoff)
        self.skip_spikes = check_flag("skip_spikes", skip_spikes)
        self.loss_rise = check_flag("loss_rise", loss_rise)
        self.lr_probe = check_flag("lr_probe", lr_probe) and loss_rise
        self.early_growth = check_flag("early_growth", early_growth)
        self.reset_moments: ResetMoments = reset_moments
        self.snapshot_dir = None if snapshot_dir is None else Path(snapshot_dir)
        self.ring = SnapshotRing(keep, snapshot_memory, snapshot_dir)
        self.also = Followers()  # state rolled back with the weights
        self.also.add(also, "Recovery(also=...)")
        self.state = LadderState()
        self.actions: list[Action] = []  # what the ladder did, oldest first
        self._guard: weakref.ref[Guard] | None = None
        self._mult: LrMultiplier | None = None
        self._stepped: SteppedKeys | None = None  # group values the step writes (.groups)
        # steps whose skip flag the ladder already counted on the host (a fused optimizer's
        # first steps, a step that was read for raise/warn); the flush replays the others
        self._host_steps: set[int] = set()
        self._last_taken: int | None = None  # the last taken step heard (_steps.verdict)
        #: the ladder's state at each recent LR jump (step -> state; :mod:`._slip`): what a
        #: burst's factors are capped by when it ends, and what a rollback past it restores
        self._jumps: dict[int, LadderState] = {}
        self._late = LateFlags()  # the device's skip flags, heard before the flush
        self._handed = False  # took over another ladder's run (:meth:`adopt`)
        self._weights = LateFlags()  # checks of the weights at non-finite steps (_steps)
        self._level: float | None = None  # the loss level of the last healthy flush
        self._verdict = SpikeVerdict()
        self._rise = LossRise()
        self._dead = DeadLayers()
        self._probe = LrProbe()
        self._shift = ShiftTest()  # each rollback's test of the batches (:mod:`.shift`)
        self._undo: dict[str, Any] | None = None  # the state a rollback replaced (.shift)
        self._undo_untouched = False  # ... which no update had touched since its streak began
        self._undo_ladder: LadderState | None = None  # ... and the ladder before that streak
        self._clips = ClipTally()  # how often the clip acted at the LR in force
        self._progress: float | None = None  # the loss level of the latest flush
        self._flushed: list[float] = []  # the latest flush's last taken losses (.growth)
        self._grew: growth.Noted | None = None  # a growth found, to decide on (.growth)
        #: the plateau schedulers a rollback reset, to settle at the next step (.plateau)
        self._plateaus: list[tuple[Any, int]] = []
        #: the latest sampled share of a layer's units that died (:mod:`gradguard.units`)
        self._dying: float | None = None
        self.restores = 0  # weights restored: rollbacks, and the LR probe's forks (_flush)
        self._judged = -1  # the step of the last judgement of the loss level (see _flush)
        #: the loss of the run's first step; after a capped wreck's rollback to the weights
        #: before it, (first step on them, that loss, the factor then), the losses since
        self._first: float | None = None
        self._first_check: tuple[int, float | None, float | None] | None = None
        self._first_after: list[float] = []
        #: resumed from a checkpoint with no snapshot to restore (none on disk): the first
        #: step keeps the resumed weights (:meth:`before_step`)
        self._resumed = False

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
            self._mult = LrMultiplier(guard.optimizer, lambda: self.lr_factor)
            self._stepped = SteppedKeys(actions.local_optimizer(guard.optimizer))

    def adopt(self, other: Recovery, *, snapshots: bool) -> None:
        """Go on with ``other``'s run over a new optimizer (:mod:`gradguard.integrations._takeover`):
        its flags in flight, what it rolls back, and with ``snapshots`` its snapshots."""
        self._late, self._weights = other._late, other._weights
        self._handed = True  # no checkpoint: nothing "left behind" to warn of on load
        self.also.add(other.also.objs, "Recovery.adopt")
        if snapshots:
            self.ring.store = other.ring.store

    def also_restore(self, *objs: Any) -> None:
        """Roll ``objs`` back with the weights from the next snapshot on (``also``)."""
        self.also.add(list(objs), "Recovery.also_restore")

    def partner_restored(self) -> None:
        """A guard stepped with this one put its weights back (:func:`gradguard._owners.restored`):
        the loss moved for neither this guard's trouble nor its batches. Its level is
        learnt again, and the test of its own last rollback's restored weights is dropped
        (that loss is no longer theirs alone: :mod:`.shift`)."""
        guard = self._guard() if self._guard is not None else None
        self._rise.reset(guard.step_count if guard is not None else None)
        self._shift.armed = None

    def finish(self, guard: Guard) -> None:
        """The run ends (``guard.close``): a probe's trial arm under way is discarded, and
        a growth noted but not yet decided on is said (:mod:`.growth`)."""
        _probing.abandon(self, guard)
        self._unsettled(guard)

    def ended_in_trial(self, guard: Guard) -> None:
        """The script ended (``gradguard run``) during a probe's trial arm: said, not undone."""
        _probing.abandon(self, guard, undo=False)
        self._unsettled(guard)

    def _unsettled(self, guard: Guard) -> None:
        """A warning for a growth noted at ``growth.STEP`` the run ended before deciding on."""
        if self._grew is not None:
            noted, self._grew = self._grew, None
            guard.add_event(growth.unsettled(noted, max(0, guard.step_count - 1)))

    def detach(self) -> None:
        """Remove the LR multiplier's hooks (the guard's ``close`` calls it)."""
        if self._mult is not None:
            self._mult.remove()
            self._mult = None
        if self._stepped is not None:
            self._stepped.remove()
        self.ring.close()
        self._guard = None

    def wait(self) -> None:
        """Block until the snapshots submitted to ``snapshot_dir`` are on disk."""
        self.ring.wait()

    @property
    def snapshot_bytes(self) -> int:
        """Host memory the in-memory snapshots hold now, with the LR probe's copy of the
        training state while a probe runs and a rollback's until the shift test judged it
        (``snapshot_memory`` bounds them together)."""
        held = [c for c in (self._probe.fork, self._undo) if c is not None]
        return self.store.nbytes() + sum(state_bytes(c) for c in held)

    def relayout(self, guard: Guard, old: tuple[int, ...] | None = None) -> None:
        """The optimizer's parameter groups changed (``old``: their sizes before, when
        known): the snapshots hold the old groups. When groups were only added after the
        old ones (``add_param_group``: a backbone unfrozen) they stay, remapped
        (:meth:`.ring.SnapshotRing.relayout`); else they cannot be loaded any more and are
        dropped, and the next healthy flush takes a new one. The spike verdict forgets the
        old set's norm (as the clip policy does) and keeps the loss's, and an LR probe
        under way is void (its copy of the training state is of the old groups)."""
        self.ring.relayout(guard, old)
        self._undo = None
        growth.relayout(self, guard)
        # the loss is the same model's, on its scale: its history stays (found by a
        # stranger: a head added by add_param_group raised the loss 20x for a few steps,
        # and a verdict warming up again from those took them for updates that wrecked
        # the weights, skipped every step and aborted a run that was back within ten)
        self._verdict.forget_norm()
        self._probe.cancel(guard.step_count)
        self.state = dataclasses.replace(self.state, last_snapshot=None, last_regular=None,
                                         rollbacks=0)

    def renorm(self) -> None:
        """Parameters got their first gradient (:func:`gradguard._lifecycle.renorm`): the
        spike verdict forgets the old set's norm, as the clip policy does, and the loss's
        (a branch used for the first time may be a task whose loss is on another scale)."""
        self._verdict = SpikeVerdict()

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
        back to; outside the ladder's ``snapshot_every`` cadence; on disk too with
        ``snapshot_dir``; a resumed run goes on with the snapshots it had)
        (:func:`._steps.before_step`)."""
        _steps.before_step(self, guard)

    def hear_flags(self, guard: Guard) -> None:
        """A trainer steps the optimizer after the guard's hook: the skip flags of its
        earlier steps are heard before this step's verdict, once its last update is done
        (:func:`._steps.hear_flags`)."""
        _steps.hear_flags(self, guard)

    def verdict(self, stats: StepStats, loss: Tensor | float | None) -> Tensor:
        """This step's spike verdict (device uint8 bits, no host read; see
        :func:`._steps.verdict`)."""
        return _steps.verdict(self, stats, loss)

    def loss_ok(self, finite: Tensor | bool) -> Tensor | bool:
        """May this step's skip be a routine loss-scale overflow (:meth:`SpikeVerdict.loss_ok`)."""
        return self._verdict.loss_ok(finite)

    def after_step(self, guard: Guard, stats: StepStats, outcome: Any) -> None:
        """Per step: hear the step's skip flag (see :func:`._steps.after_step`)."""
        _steps.after_step(self, guard, stats, outcome)

    def on_flush(self, guard: Guard, window: Window, events: Sequence[Event] = (),
                 overflows: Any = ()) -> None:
        """At each flush: consecutive skips (fused optimizers), confirmed loss spikes, a
        loss that rose or a network that died, the loss after a back-off, the LR probe, and
        snapshots while healthy (:mod:`._flush`). Routine loss-scale overflows
        (``overflows``) are no trouble."""
        _flush.on_flush(self, guard, window, events, overflows)

    # ---- carrying out the ladder's actions ----------------------------------------------------
    def _feed(self, guard: Guard, trig: Trigger, layers: Any) -> bool:
        """Advance the ladder by ``trig`` and carry its actions out (:func:`.actions.feed`);
        True when it acted (beyond a snapshot). While a retry's trial runs (:mod:`.probe`),
        trouble ends it instead (the trial is discarded, not the run's), and no snapshot
        keeps its weights; trouble about its steps heard after that is void."""
        return _probing.feed(self, guard, trig, layers)

    def snapshot(self, guard: Guard, step: int | None = None, *, improved: bool = False) -> bool:
        """Take a snapshot now (model, optimizer, clip policy) into host memory, and hand a
        copy to the disk writer. Returns False, keeping nothing, when any value is NaN/Inf."""
        step = guard.step_count - 1 if step is None else step
        if not self.ring.keep(guard, step):
            return False
        self.ring.kept(step, self.restores)
        self.ring.remember(step, self._progress, self._dying)
        self.state, _ = transition(self.config, self.state,
                                   Trigger("snapshot", step, improved=improved))
        return True

    # ---- checkpointing -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Ladder state, the spike verdict's statistics and the loss level (the in-memory
        snapshots are not included; with ``snapshot_dir`` they survive on disk), and
        between steps 20 and 60 a growth noted with the weights before the first step
        (:mod:`.growth`)."""
        return _checkpoint.state_dict(self)

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the snapshots are no part of it (but the weights
        before the first step while the growth rule's decision is pending): what a resumed run
        rolls back to is in :func:`._checkpoint.load_state_dict`."""
        _checkpoint.load_state_dict(self, sd)
