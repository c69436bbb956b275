"""Named defaults of the :class:`~gradguard.Recovery` options, and the checks of its
numeric options."""

from __future__ import annotations

from typing import Any, Literal

from .ladder import LadderConfig
from .snapshots import check_int

ResetMoments = Literal["exploded", "all", "none"]
RESET_MOMENTS: tuple[str, ...] = ("exploded", "all", "none")

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
#: Rollbacks without a healthy snapshot in between before TrainingDiverged.
MAX_ROLLBACKS = 3
#: Multiplier on the LR ceiling when trouble returns: the LR factor that failed, times
#: this, is the most the LR is ever restored to again (1.0: always restore the full LR).
#: Halving per relapse (a bisection from above) settles within 2x of the largest stable
#: LR; the back-off itself (x``BACKOFF``) is what gets the run out of trouble at once.
RELAPSE_BACKOFF = 0.5
#: Steps after a back-off (or rollback) by which the loss must be back near its level
#: before the trouble; otherwise the back-off kept a damaged model and the ladder rolls
#: back to a snapshot from before the trouble.
RECOVERY_WINDOW = 50
#: "Back near its level": the median of the last ``PROGRESS_STEPS`` losses at most this
#: many times the median loss of the last healthy window before the trouble.
STALL_FACTOR = 1.5
PROGRESS_STEPS = 10
#: A healthy flush whose last ``PROGRESS_STEPS`` losses have a median at most this times
#: the newest snapshot's level has a snapshot due every ``IMPROVED_EVERY`` steps
#: (:mod:`.ladder`), not every ``snapshot_every``: a rollback then finds weights near the
#: level the run had reached, not ones it learnt far past.
IMPROVED = 0.5
#: ... and what it fell since is at least this share of what the run learnt from its fresh
#: level down to it (a loss halving near zero is no progress to keep).
IMPROVED_SHARE = 0.25
#: Steps after the ladder acted during which spikes are clipped (by the clip policy), not
#: skipped: right after a back-off the gradients are still large, and skipping them all
#: would freeze the model where it is.
SPIKE_GRACE = 10
#: Trouble within this many multiples of ``restore_steps`` of the previous trigger is a
#: relapse (a return of the same instability), not a new, isolated incident.
RELAPSE_WINDOW_FACTOR = 10
#: While the ladder is idle, the tests of the loss level (a rise, a network that died, the
#: LR probe's cue) judge at the first flush this many steps (the default ``every``) or more
#: after their last judgement, whatever the guard's ``every``: each judgement is a chance
#: for a healthy run's noise to pass a threshold, and flushing every ten steps must not
#: make that five times as likely (at
#: ``every=10`` the healthy runs of benchmarks/quality.py were rolled back three times in
#: 20,000 steps, one ending 1.76x its unguarded loss). While the ladder is at work they
#: judge at every flush (every ten steps, :meth:`gradguard.Recovery.flush_every`). A
#: ``snapshot_every`` under this sets the pace instead: snapshots are taken only at judged
#: flushes (a snapshot is a healthy verdict).
JUDGE_EVERY = 50
#: Event kinds that make a flushed window unhealthy (no snapshot from it).
UNHEALTHY = frozenset({"nonfinite_grad", "skip", "loss_spike", "grad_spike"})


def _above_one(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 1.0):
        raise ValueError(f"Recovery({name}={value!r}): must be a number > 1")
    return float(value)


def _fraction(name: str, value: Any, high_open: bool, what: str) -> float:
    interval = "(0, 1)" if high_open else "(0, 1]"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Recovery({name}={value!r}): expected a number in {interval}")
    v = float(value)
    if not (0.0 < v < 1.0 or (not high_open and v == 1.0)):
        raise ValueError(f"Recovery({name}={value!r}): must be in {interval} ({what})")
    return v


def ladder_config(*, skip_patience: int, backoff: float, restore_steps: int,
                  patience: int | None, snapshot_every: int, keep: int, max_rollbacks: int,
                  relapse_backoff: float, relapse_window: int | None,
                  skip_batches: int | None, recovery_window: int,
                  stall_factor: float, undo_backoff: bool = True) -> LadderConfig:
    """The ladder's options from :class:`~gradguard.Recovery`'s, checked (a ValueError or
    TypeError naming the option and its allowed values) and with their derived defaults."""
    restore = check_int("restore_steps", restore_steps, 1)
    return LadderConfig(
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
        undo_backoff=check_flag("undo_backoff", undo_backoff),
    )


def check_flag(name: str, value: object) -> bool:
    """``value`` when it is a bool, else a TypeError naming the Recovery option."""
    if not isinstance(value, bool):
        raise TypeError(f"Recovery({name}={value!r}): must be True or False")
    return value
