"""The recovery ladder's values: its options (:class:`LadderConfig`), where it stands
(:class:`LadderState`), what it hears (:class:`Trigger`) and what it asks for
(:class:`Action`). The rules that move it are :func:`gradguard.recovery.ladder.transition`
(the ladder's module docstring explains them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

#: a ``skip`` trigger's ``reason`` for a non-finite step (the default when it has none);
#: the others name a spike ("spiking", "loss-spiking") or a batch on another scale
NONFINITE_REASON = "non-finite"
#: a step skipped because its batch moved the batch norm statistics from another scale
#: (:meth:`gradguard._running.RunningStats.offscale`)
OFFSCALE_REASON = "off-scale"
#: a step skipped because its gradient norm spiked (the per-step verdict)
SPIKE_REASON = "spiking"
#: the skips the batches may be at fault for rather than the weights: the next step on
#: the same weights, or the first on weights a rollback restored, tells (``sound`` and
#: ``data`` in :mod:`.ladder`). A skipped step changes no weight, so a gradient that
#: spikes again on the weights a spiking streak ran on, or on weights restored from before
#: it, is the batches' (a stretch of inputs far off their scale), not an LR's doing.
DATA_REASONS = (NONFINITE_REASON, OFFSCALE_REASON, SPIKE_REASON)



def near(value: float, level: float, factor: float) -> bool:
    """``value`` is back near the loss ``level``: at most ``factor`` times it. A level at or
    below zero (a Gaussian negative log-likelihood, a WGAN critic's score) has no ratio
    scale, and the level is no evidence against the loss: True (``factor`` times -1.4 is
    -2.1, and "near its level" asked a loss to be half as good again as its best: a
    WGAN-GP generator at -1.4 was rolled back three times for "not coming back" from a
    spike, each to an older snapshot, the snapshots having stopped at its first negative
    level).

    Example:
        >>> near(1.4, 1.0, 1.5), near(1.6, 1.0, 1.5), near(-0.5, -1.4, 1.5)
        (True, False, True)
    """
    return level <= 0 or value <= level * factor


TriggerKind = Literal["skip", "clean", "tick", "spike", "healthy", "snapshot", "progress",
                      "level", "lower", "restored", "shifted", "raise", "capped", "weights"]
ActionKind = Literal["backoff", "rollback", "abort", "snapshot", "settled", "lower", "level_off",
                     "data", "sound", "shifted", "raised"]


@dataclass(frozen=True)
class LadderConfig:
    """The ladder's options (validated by :class:`gradguard.Recovery`)."""

    skip_patience: int = 3
    backoff: float = 0.1
    restore_steps: int = 100
    patience: int = 100
    snapshot_every: int = 100
    keep: int = 2
    max_rollbacks: int = 3
    relapse_backoff: float = 0.5
    relapse_window: int = 1000
    skip_batches: int | None = None
    recovery_window: int = 50
    stall_factor: float = 1.5
    #: undo a back-off for non-finite steps when the next step proves the weights sound
    undo_backoff: bool = True


@dataclass(frozen=True)
class LadderState:
    """Where the ladder stands (host values only, identical on every rank)."""

    consecutive_skips: int = 0
    factor: float = 1.0  # LR multiplier in force
    backoff_level: float = 1.0  # factor right after the last back-off
    ceiling: float = 1.0  # the factor the LR is restored to (lowered by relapses)
    backoff_step: int | None = None
    last_trigger: int | None = None
    trouble_start: int | None = None
    rollbacks: int = 0  # since the last healthy snapshot
    #: of those, the ones that found no snapshot to restore and backed off instead
    unrestored: int = 0
    total_rollbacks: int = 0
    backoffs: int = 0
    last_snapshot: int | None = None
    #: the last snapshot taken at the regular pace (``snapshot_every``), not for a loss
    #: that kept falling (``Trigger.improved``): the pace runs from it
    last_regular: int | None = None
    pre_level: float | None = None  # the loss level before the current episode began
    watching: int | None = None  # a back-off/rollback whose effect on the loss is pending
    at_ceiling: int | None = None  # since when the factor sits at a lowered ceiling
    settled: float | None = None  # the ceiling last reported as settled
    #: the lowest factor the LR failed at: the factor in force when the ceiling was lowered
    #: (None once a raise, a change of data or the loss level off lifted it again); the
    #: settled ceiling is within a halving of it, or below it by a jump (a run worse than
    #: fresh, :func:`~.ladder._failures`)
    failed: float | None = None
    #: the loss level proved no evidence in this run (see ``level_off`` in :mod:`.ladder`):
    #: no rung is decided by it any more
    level_off: bool = False
    #: the ceiling before the first rung of the current trouble that lowered it (lifted
    #: back to it when the loss level proves no evidence, ``level_off``, or the batches
    #: prove at fault, ``data``); None when no rung of it lowered the ceiling
    episode_ceiling: float | None = None
    #: the first step of a streak of non-finite steps the batches are at fault for (see
    #: ``data`` in :mod:`.ladder`); None outside one
    data_streak: int | None = None
    #: the step from which the factor the last rung set is in force, while no update has
    #: been taken at it (every step since skipped): it has not failed, nor has the ceiling
    #: it came back to; None once an update was taken
    untested: int | None = None
    #: the state before a back-off that answered a streak of non-finite (or off-scale) steps, while the
    #: next step may still prove the weights sound (see ``sound`` in :mod:`.ladder`); None
    #: otherwise
    undo: LadderState | None = None
    #: the step at which the ladder last undid a back-off (``sound``)
    undone: int | None = None
    #: the ``reason`` of the streak whose back-off ``undo`` may undo (:data:`DATA_REASONS`)
    undo_reason: str = NONFINITE_REASON
    #: the step at which the batches last proved changed (``shifted`` in :mod:`.ladder`)
    shifted: int | None = None
    #: the ceiling that change left in force: the rungs the loss level decided after it
    #: lowered it on evidence the ``level_off`` that follows disowns, and it lifts the
    #: ceiling back to this one (a lowered LR that "settled" in between included)
    shift_ceiling: float | None = None
    #: rollbacks the loss level decided since then (a second one within
    #: ``relapse_window`` steps of the change turns the loss-level tests off)
    level_rollbacks: int = 0
    #: the step at which a retry last lifted the ceiling (``raise``), and the ceiling it
    #: lifted it from: trouble within ``relapse_window`` steps of it is a relapse, and
    #: the ceiling drops back to that one at once (the LR retried failed)
    raised: int | None = None
    raised_from: float | None = None
    #: the step at which spikes on restored weights were first found the batches' fault
    #: (``data``) in this stretch: found so again within ``patience`` steps of it, not
    #: from then to ``2 * patience`` (batches that keep spiking are a change no shift test
    #: saw, and each rollback would put back the statistics that had begun to learn it:
    #: the ladder climbs), afresh after that
    spike_data: int | None = None
    #: ceilings lowered in a row while on probation (none settled, lifted or levelled off
    #: in between): each failure of a lowered ceiling drops the next one further
    #: (:func:`~.ladder_lr.failed_ceiling`)
    lowerings: int = 0

    @property
    def probation(self) -> bool:
        """A lowered ceiling not yet reported settled."""
        return self.ceiling < 1.0 and self.settled != self.ceiling


@dataclass(frozen=True)
class Trigger:
    """Something the ladder reacts to.

    Kinds: ``skip`` (a bad step was skipped), ``clean`` (a step was taken), ``tick`` (step
    ``step`` is about to run: the LR restores), ``spike`` (a confirmed loss spike), ``healthy`` (a
    healthy flush: a snapshot may be due), ``snapshot`` (a snapshot was kept),
    ``progress`` (a flush reports the recent loss, ``value``), ``level`` (the loss level
    before the current trouble, ``value``, learnt late: the trouble came before any healthy
    flush), ``restored`` (a rollback loaded weights taken at the loss level ``value``: when
    it is above the level before the trouble, the progress check asks for it instead; a
    rollback to an older snapshot cannot be asked to beat a best the later weights had
    reached), ``lower`` (the LR probe found the LR too high), ``shifted`` (the weights a
    rollback restored gave the trouble's loss: the batches changed, :mod:`.shift`),
    ``raise`` (a retry found the ceiling before the trouble, ``value``, trains: :mod:`.probe`). On
    ``skip``/``spike``, ``value`` is the loss level before the trouble (None: unknown).
    """

    kind: TriggerKind
    step: int
    reason: str = ""
    value: float | None = None
    #: the step at which the ladder hears of it (later than ``step`` for skip flags that
    #: stayed on the device); what it does starts from there (default: ``step``)
    at: int | None = None
    #: a ``spike`` from a loss that rose yet kept most of its progress (the strict loss-rise
    #: test, :mod:`.rise`): the LR in force is too high, the weights are not damaged. It
    #: backs off and lowers the ceiling, never rolls back, and sets no progress check
    mild: bool = False
    #: a ``spike`` whose weights are clearly worse than the newest snapshot's (the loss
    #: level now is over ``stall_factor`` times the level the snapshot was taken at), or a
    #: ``skip`` for the loss itself (the update before it wrecked the weights): it rolls
    #: back at once (a ``skip``: when it completes ``skip_patience``), with no back-off
    #: first that would keep the worse weights
    rollback: bool = False
    #: a ``spike`` from the loss-spike detector, confirmed at a flush after it began at
    #: ``step``: when a rung already took effect at or after ``step`` (a step of the same
    #: spike was skipped at once and completed ``skip_patience``), it answered this spike,
    #: and the confirmation is not a second incident
    confirmed: bool = False
    #: a ``spike`` the loss level decided in a run that has learnt nothing (never below its
    #: fresh model's level by more than its noise) and stands well above it (:meth:`~.rise.LossRise.worse_than_fresh`):
    #: no LR factor in force has trained it; a rollback sets the ceiling at the back-off
    #: factor itself, not at half the factor that failed
    worse_than_fresh: bool = False
    #: a ``spike`` the loss level decided (it rose well above its best: :mod:`.rise`), not
    #: a spike, a NaN or a network that died; like the progress check, it assumes a loss
    #: that training lowers
    by_level: bool = False
    #: a non-finite (or off-scale) ``skip`` of the first step on weights a rollback
    #: restored: they had finite gradients when saved, so the batches are at fault, not
    #: the weights
    data: bool = False
    #: a ``clean`` step whose update was voided (the weights were restored after its
    #: backward): no update was taken
    voided: bool = False
    #: a ``rollback`` ``spike``'s cap on the LR factor, measured beside it (the weights'
    #: growth in the first steps, :mod:`.growth`)
    cap: float | None = None
    #: a ``rollback`` ``spike``'s weights to restore, held beside it (the weights before
    #: the first step, :mod:`.growth`); None: a snapshot the ladder picks
    fresh: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    #: a ``healthy`` flush whose loss is well below the newest snapshot's level (the run
    #: learnt much since): a snapshot is due sooner than ``snapshot_every``
    improved: bool = False


@dataclass(frozen=True)
class Action:
    """What the ladder wants done. ``back``: how many snapshots before the newest to roll
    back to; ``skip_batches``: batches a data-loader user should skip after a rollback."""

    kind: ActionKind
    step: int
    reason: str = ""
    factor: float = 1.0
    ceiling: float = 1.0
    relapse: bool = False
    lowered: bool = False
    back: int = 0
    skip_batches: int = 0
    rollbacks: int = 0
    #: decided by the loss level (a rise, or a loss that did not come back): wrong for a
    #: loss that may rise in a healthy run (a GAN's players), which the event says
    by_level: bool = False
    #: an ``abort`` for batches that stay non-finite or off-scale (``data``), not for
    #: weights that diverged
    data: bool = False
