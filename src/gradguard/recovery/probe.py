"""An LR too high that never spikes: the loss sits well above its best, and the same weights
trained at half the LR reach a loss half as high.

Some runs at an LR several times too high never produce a NaN, a spike or a loss that gives
back half its progress: they train, but noisily, their loss wandering between its best and
several times that (an MLP on Adam at 30x, a CNN on fused Adam at 10x: 3-4x the held-out
loss of the same run at the right LR). Nothing in the loss alone tells such a run from a
healthy one whose loss is noisy; what tells them apart is how the loss answers the LR. At
the LR in force, the loss of a run whose LR is too high sits at a noise floor the LR
sets: train the same weights at half the LR and the floor is lower within a few dozen steps.

:class:`LrProbe` runs that experiment when the loss is noisy (its recent level ``SEVERE``
(2) times its best or more, having given back 3% of what the run learnt:
:meth:`~gradguard.recovery.rise.LossRise.noisy`) with the ladder idle, and is seen so again
within ``CONFIRM`` steps (flushing every ten steps meanwhile): a floor the LR sets keeps
coming back, a healthy run's excursion above twice its best does not, and a probe in a
healthy run, however harmless, perturbs a trajectory that may be chaotic (docs/recovery.md
has the figures). It is a forked experiment with a control, each arm judged by the median
of its last ``MEASURE`` taken losses:

* *before*: the last ``MEASURE`` losses at the LR in force;
* *control*: ``TRIAL`` steps at the LR in force, from the weights (and optimizer and clip
  state) copied when the probe started;
* *trial*: the copy restored, ``TRIAL`` steps at ``FACTOR`` (half) the LR from the same
  weights.

The LR is too high when the trial's level is at most ``GAIN`` (half) times the control's:
from the same weights, over as many steps, at the same point of the run, half the LR halved
the loss. The two arms differ in their LR and their batches only, so the loss falling by
itself (learning, an excursion decaying) is in both; an earlier form of the probe compared
the trial with the level before it and with the full LR again after it, and took a loss
still falling when the LR came back (a digits CNN on fused Adam at 10x: 0.29 before, 0.12
at half the LR, 0.08 after) for a healthy run. The ladder then lowers its ceiling to half
the factor in force (a *lower* trigger, :mod:`.ladder`), the run goes on from the trial's
weights, and the lowered ceiling is on probation, where its strict loss-rise test goes on
halving it while the loss keeps rising from its best, until the LR settles (reported as
``lr_settled``). Otherwise the run goes on at the LR in force from the arm whose loss is
lower (the control's state is copied at the fork), and the next probe waits ``COOLDOWN``
steps, twice as long after each probe that found nothing. A probe costs a run the
``TRIAL`` steps of the arm it discards, and holds one copy of the training state while it
runs (two for a moment at the fork).

An LR too high can also throw the loss up every couple of hundred steps (to ten times its
best and more, an MLP on Adam at 100x), and each excursion decays by itself; a probe
started on an excursion's peak may find the loss halved at half the LR against its level
before (the trial's level at most ``GAIN`` times the level before: it *fell*) but not
against the control, which decayed as well. The evidence it leaves is completed by the
next excursion: a cue confirmed again within ``RECUR`` steps of a probe that fell is the
LR's doing, and the ladder lowers it as for a probe that found it too high. A probe that
fell waits ``COOLDOWN`` steps before the next, not twice as long. None of the healthy runs
of benchmarks/quality.py (20,000 steps), benchmarks/rescue.py (24,000 steps, 1,000 per run)
and the lab ever confirmed a cue: no probe ran in any of them.

The same experiment answers the opposite question, whether an LR the ladder lowered was at
fault at all (a *retry*). A stretch of bad batches that spike rather than go non-finite
looked like an LR too high to the relapse rule, which lowered the ceiling for good (30
batches x1e4 in a row: a digits MLP's LR at x0.015, 3.2x the held-out loss of the run
without them; such spikes are now the batches' fault, ``data`` in :mod:`.ladder`). Once the lowered LR has settled and held ``restore_steps`` steps
more, with the ladder idle and the loss neither noisy nor down to ``RETRY_FLOOR`` (3%) of
the fresh model's (nothing left for the LR in force to cost), a retry runs its control at
the LR in force and its trial at the ceiling before the trouble (``episode_ceiling``; not one the
probe of half the LR found, which is the LR's own doing). The ladder lifts the ceiling
back (a ``raise`` trigger) when the trial's level is at most ``RETRY_GAIN`` (1) times the
control's, and the run goes on from the trial's weights; otherwise from the control's.
Trouble during the trial (a skipped step, a spike, a loss that rose, weights the update
made NaN: ``RETRY_TROUBLE``)
ends it at once and is no rung's: the run goes on from the control's state, and trouble
about the trial's steps heard later (a fused optimizer's skip flags) is void
(:attr:`LrProbe.discarded`; ``Recovery._feed`` is the one place that decides). A retry
that failed is followed ``restore_steps`` steps later by one halfway up
(:meth:`LrProbe.retry_target`); no ceiling is tried twice, and trouble within
``relapse_window`` steps of a lift drops the
ceiling back to the one that had held (:mod:`.ladder`).

Decisions are taken at flushes (every ten steps while a probe runs) from host values the
flush already has: no device read. The copy of the training state is taken and restored by
the flush (:func:`gradguard.recovery._probing.probe_lr`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

from ..detectors.config import MAD_TO_SIGMA

#: Taken steps of each arm: the control's at the LR in force, the trial's at ``FACTOR``
#: times it.
TRIAL = 30
#: The last taken losses of a phase whose median is its level.
MEASURE = 20
#: The LR multiplier of the trial.
FACTOR = 0.5
#: The trial's level must be at most this times the control's.
GAIN = 0.5
#: Steps after a probe that found nothing before the next (doubled after each such probe).
COOLDOWN = 200

#: The trial's level must also stand this many standard errors below the control's (in log
#: units, from the spread of each arm's losses): a level is the median of ``MEASURE``
#: losses, and where each loss is one sample's (batches of one) two such medians from the
#: same weights and LR differ by half and more by chance (:func:`log_spread`).
NOISE_Z = 2.0

#: A cue confirmed within this many steps of a probe that fell (the loss halved at half the
#: LR, and did not rise again when it came back) lowers the LR with no probe of its own.
RECUR = 2 * COOLDOWN

#: A *retry* (the ceiling a trouble lowered, tried again: see the module docstring) passes
#: when the trial's level at the ceiling before the trouble is at most this times the
#: control's: the LR that failed trains at least as well as the one that replaced it.
RETRY_GAIN = 1.0

#: A control arm whose level is still at least this share of the fresh model's loss has
#: learnt nothing at the LR in force: a trial within ``STUCK_TIE`` of it passes too (two
#: arms at chance differ by noise alone; found by a stranger: a GRU on Adam that learns its
#: task at any LR from 0.01 to 0.2 unguarded, its LR cut to x0.06 by the growth rule,
#: sat at chance for 480 steps, each retry refused on "1.39 against 1.381").
STUCK = 0.9
STUCK_TIE = 1.05

#: After a retry of the ceiling before the trouble failed, the next tries halfway (the
#: geometric mean) between the ceiling in force and the lowest that failed, while that is
#: at least this many times the ceiling in force.
RETRY_STEP = 1.5

#: No retry while the loss is at most this share of the fresh model's: the run has learnt
#: all but this of it, and the LR in force costs it nothing two arms of ``TRIAL`` steps
#: could measure (a GELU MLP on Adam at 100x, lowered to x0.09: 1.1e-5 against 2.4e-5, a
#: coin toss that put the LR back at 100x for the rest of the run).
RETRY_FLOOR = 0.03

#: The ladder's triggers that end a retry's trial as trouble (:meth:`LrProbe.fail_retry`).
RETRY_TROUBLE = ("skip", "spike", "lower", "weights")

#: A probe starts when the cue is seen again within this many steps of its first sight
#: (at flushes ten steps apart meanwhile): a floor the LR sets keeps coming back, a
#: healthy run's excursion above twice its best does not.
CONFIRM = 50

Phase = Literal["control", "trial"]


def log_spread(losses: Sequence[float]) -> float:
    """The standard error of the median of ``losses`` in log units: robust (the median
    absolute deviation of the log losses), 0.0 when a loss is not positive or there are
    fewer than two. A median of 20 losses of batches of 32 strays a few percent; of 20
    losses of single samples (a squared error's log spreads over nats), by half and more.

    Example:
        >>> log_spread([1.0, 1.0, 1.0]), round(log_spread([0.5, 1.0, 2.0, 1.0]), 3)
        (0.0, 0.322)
    """
    if len(losses) < 2 or min(losses) <= 0:
        return 0.0
    logs = [math.log(x) for x in losses]
    mid = statistics.median(logs)
    mad = statistics.median(abs(v - mid) for v in logs)
    return math.sqrt(math.pi / 2) * MAD_TO_SIGMA * mad / math.sqrt(len(logs))


class Probed(NamedTuple):
    """A finished probe: its levels (and their standard errors in log units,
    :func:`log_spread`), and whether the LR is too high (the trial's level at most ``GAIN``
    times the control's, and ``NOISE_Z`` standard errors below it)."""

    step: int
    before: float
    control: float
    trial: float
    spread_before: float = 0.0
    spread_control: float = 0.0
    spread_trial: float = 0.0

    def _below(self, level: float, spread: float) -> bool:
        """The trial's level at most ``GAIN`` times ``level``, further than chance puts it."""
        return self.trial <= GAIN * level and (
            math.log(level / self.trial) >= NOISE_Z * math.hypot(spread, self.spread_trial))

    @property
    def too_high(self) -> bool:
        return self._below(self.control, self.spread_control)

    @property
    def fell(self) -> bool:
        """The loss fell by half (``GAIN``) at half the LR against its level before."""
        return self._below(self.before, self.spread_before)


class LrProbe:
    """The LR probe's phases (see the module docstring). Host values only."""

    def __init__(self) -> None:
        self.phase: Phase | None = None
        self.levels: list[float] = []  # before, control: the finished phases' levels
        self.spreads: list[float] = []  # and their standard errors (log units)
        self.next: int = 0  # no probe before this step
        self.suspect: int | None = None  # the step the cue was first seen (in a row)
        self.cooldown = COOLDOWN
        self._recent: list[float] = []  # the last MEASURE losses before the probe
        self._phase: list[float] = []  # the current phase's taken losses
        self.probes = 0
        self.fell: tuple[int, float, float] | None = None  # step, before, trial of the last that fell
        #: the training state copied by the flush when the probe started (the trial starts
        #: from it), then at the fork the control's (the run may go on from it); not
        #: checkpointed
        self.fork: dict[str, Any] | None = None
        self.disabled = False  # see :meth:`off`
        #: a retry's trial multiplier (the ceiling before the trouble over the factor in
        #: force) while one runs; None for a probe of half the LR
        self.up: float | None = None
        self.retry_to: float | None = None  # the ceiling a retry tries again
        self.retried: list[float] = []  # the ceilings tried again so far (once each)
        self.trial_from: int | None = None  # the first step of the trial arm under way
        self.retry_next = 0  # no retry before this step
        #: the steps of the last retry's trial that failed: its late-heard trouble is void
        self.discarded: tuple[int, int] | None = None

    @property
    def factor(self) -> float:
        """The LR multiplier the probe applies now (on top of the ladder's)."""
        if self.phase != "trial":
            return 1.0
        return FACTOR if self.up is None else self.up

    @property
    def active(self) -> bool:
        return self.phase is not None

    @property
    def retrying(self) -> bool:
        """A retry's trial arm runs: the run's trouble now is the trial's, which it discards."""
        return self.phase == "trial" and self.up is not None

    def update(self, losses: Sequence[float], skipped: Sequence[bool]) -> None:
        """Take a flushed window's losses in (skipped steps and non-finite losses left out)."""
        vals = [x for x, sk in zip(losses, skipped) if not sk and math.isfinite(x)]
        if self.phase is None:
            self._recent = (self._recent + vals)[-MEASURE:]
        else:
            self._phase.extend(vals)

    @property
    def watching(self) -> bool:
        """A probe runs, or its cue was seen and is being confirmed (flush often)."""
        return self.phase is not None or self.suspect is not None

    def cue(self, step: int, seen: bool) -> Literal["probe", "recurred"] | None:
        """At an idle flush: whether the cue holds (``seen``). ``"probe"`` when it was seen
        again within ``CONFIRM`` steps of its first sight and a probe started;
        ``"recurred"`` when so confirmed within ``RECUR`` steps of a probe that fell (the
        LR is too high: :attr:`fell` says where it fell from and to)."""
        if self.phase is not None:
            return None
        if self.suspect is not None and step - self.suspect > CONFIRM:
            self.suspect = None  # not seen again: an excursion
        if not seen:
            return None
        if self.suspect is None:
            self.suspect = step
            return None
        if self.fell is not None and step - self.fell[0] <= RECUR:
            self.suspect = None
            return "recurred"
        return "probe" if self.start(step) else None

    def may_start(self, step: int) -> bool:
        """Whether a probe may begin after ``step`` (enough history, past the cooldown)."""
        return (self.phase is None and not self.disabled and step >= self.next
                and len(self._recent) >= MEASURE)

    def start(self, step: int) -> bool:
        """Begin a probe after ``step`` if one may: its control arm first."""
        self.suspect = None
        if not self.may_start(step):
            return False
        self.levels = [statistics.median(self._recent)]
        self.spreads = [log_spread(self._recent)]
        self.phase, self._phase = "control", []
        self.probes += 1
        return True

    def retry_target(self, ceiling: float, top: float) -> float | None:
        """The ceiling a retry tries next, from ``ceiling`` (in force) towards ``top`` (before
        the trouble): ``top`` first, then halfway towards the lowest that failed; None when
        that is less than ``RETRY_STEP`` times ``ceiling``."""
        failed = [c for c in self.retried if ceiling < c and (c <= top or math.isclose(c, top))]
        if not failed:
            return top
        target = math.sqrt(ceiling * min(failed))
        return target if target >= RETRY_STEP * ceiling else None

    def may_retry(self, step: int, ceiling: float) -> bool:
        """Whether a retry of ``ceiling`` may begin after ``step`` (never twice the same)."""
        return (self.suspect is None and step >= self.retry_next and self.may_start(step)
                and not any(math.isclose(ceiling, c) for c in self.retried))

    def start_retry(self, step: int, factor: float, ceiling: float) -> bool:
        """Begin a retry of ``ceiling`` (from the factor in force, ``factor``) after
        ``step`` if one may: its control arm first, its trial at ``ceiling``."""
        if not self.may_retry(step, ceiling) or not self.start(step):
            return False
        self.probes -= 1  # counted with the retries
        self.up, self.retry_to = ceiling / factor, ceiling
        self.retried.append(ceiling)
        return True

    def advance(self, step: int) -> Probed | Literal["fork"] | None:
        """At a flush: ``"fork"`` when the control arm is over (restore :attr:`fork` now:
        the trial starts from it); a :class:`Probed` when the trial is over."""
        if self.phase == "control" and len(self._phase) >= TRIAL:
            self.levels.append(statistics.median(self._phase[-MEASURE:]))
            self.spreads.append(log_spread(self._phase[-MEASURE:]))
            self.phase, self._phase, self.trial_from = "trial", [], step + 1
            return "fork"
        if self.phase == "trial" and len(self._phase) >= TRIAL:
            before, control = self.levels
            # a checkpoint from before the spreads has none: no margin
            s_before, s_control = self.spreads if len(self.spreads) == 2 else (0.0, 0.0)
            last = self._phase[-MEASURE:]
            done = Probed(step, before, control, statistics.median(last), s_before, s_control,
                          log_spread(last))
            if self.up is not None:  # a retry: the down-probes' pace is its own
                self._end_retry()
                return done
            self._end(step, found=done.too_high, fell=done.fell)
            self._recent = []  # the next probe's level: from the steps after this one
            if done.fell and not done.too_high:
                self.fell = (step, before, done.trial)
            return done
        return None

    def cancel(self, step: int) -> None:
        """The ladder acted during the probe (or while its cue was confirmed): it is void."""
        self.suspect = None
        if self.phase is not None and self.up is not None:
            self._end_retry()
        elif self.phase is not None:
            self._end(step, found=True)
            self._recent = []

    def fail_retry(self, step: int) -> None:
        """A retry's trial ran into trouble at ``step``: it is over, its steps discarded
        (trouble about them heard later is void: :attr:`discarded`)."""
        self.discarded = (self.trial_from if self.trial_from is not None else step, step)
        self._end_retry()

    def _end_retry(self) -> None:
        """A retry is over: the next one's level is learnt from the steps after it."""
        self.phase, self._phase, self.fork, self.up, self.retry_to = None, [], None, None, None
        self.trial_from, self._recent = None, []

    def forget(self, step: int) -> None:
        """The batches changed (:mod:`.shift`): a probe under way is void and the level
        before the next one is learnt from the new batches."""
        self.cancel(step)
        self._recent = []

    def off(self, step: int) -> None:
        """No probe for the rest of the run (its copies would not fit the memory budget;
        not checkpointed: a resumed run judges its own budget)."""
        self.cancel(step)
        self.disabled = True
        self.probes -= 1  # the one :meth:`start` counted never ran

    def _end(self, step: int, *, found: bool, fell: bool = False) -> None:
        self.phase, self._phase, self.fork = None, [], None
        if found:
            self.next = step + 1
        else:
            self.next = step + self.cooldown
            if not fell:
                self.cooldown *= 2

    def state_dict(self) -> dict[str, object]:
        return {"phase": self.phase, "suspect": self.suspect, "levels": list(self.levels),
                "spreads": list(self.spreads),
                "next": self.next, "cooldown": self.cooldown, "recent": list(self._recent),
                "losses": list(self._phase), "probes": self.probes,
                "fell": None if self.fell is None else list(self.fell),
                "up": self.up, "retry_to": self.retry_to, "retried": list(self.retried),
                "trial_from": self.trial_from, "retry_next": self.retry_next,
                "discarded": None if self.discarded is None else list(self.discarded)}

    def load_state_dict(self, sd: dict[str, object]) -> None:
        self.phase = sd.get("phase")  # type: ignore[assignment]
        # a control arm lost its copy: no trial; nor has a retry's trial the control's
        # state to go back to: the run goes on from the trial's weights at the LR in force
        if self.phase not in (None, "trial") or sd.get("up") is not None:
            self.phase, sd = None, {**sd, "losses": []}
        self.suspect = sd.get("suspect")  # type: ignore[assignment]
        self.levels = list(sd.get("levels") or [])  # type: ignore[call-overload]
        self.spreads = list(sd.get("spreads") or [])  # type: ignore[call-overload]
        self.next = int(sd.get("next") or 0)  # type: ignore[call-overload]
        self.cooldown = int(sd.get("cooldown") or COOLDOWN)  # type: ignore[call-overload]
        self._recent = list(sd.get("recent") or [])  # type: ignore[call-overload]
        self._phase = list(sd.get("losses") or [])  # type: ignore[call-overload]
        self.probes = int(sd.get("probes") or 0)  # type: ignore[call-overload]
        fell = sd.get("fell")
        self.fell = None if fell is None else (int(fell[0]), float(fell[1]), float(fell[2]))  # type: ignore[index]
        self.retried = [float(c) for c in sd.get("retried") or []]  # type: ignore[attr-defined]
        self.retry_next = int(sd.get("retry_next") or 0)  # type: ignore[call-overload]
        start = sd.get("trial_from")
        self.trial_from = None if start is None or self.phase is None else int(start)  # type: ignore[call-overload]
        gone = sd.get("discarded")
        self.discarded = None if gone is None else (int(gone[0]), int(gone[1]))  # type: ignore[index]
