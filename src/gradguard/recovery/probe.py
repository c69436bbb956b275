"""An LR too high that never spikes: the loss sits well above its best, and lowering the LR
brings it down, raising it again brings it back up.

Some runs at an LR several times too high never produce a NaN, a spike or a loss that gives
back half its progress: they train, but noisily, their loss wandering between its best and
several times that (an MLP on Adam at 30x, a CNN on fused Adam at 10x: 3-4x the held-out
loss of the same run at the right LR). Nothing in the loss alone tells such a run from a
healthy one whose loss is noisy; what tells them apart is how the loss answers the LR. At
the LR in force, the loss of a run whose LR is too high sits at a noise floor the LR
sets: halve the LR and the floor falls within a few dozen steps, restore it and the floor
rises again. A healthy run's loss does not rise when its own LR comes back.

:class:`LrProbe` runs that experiment when the loss is noisy (its recent level ``SEVERE``
(2) times its best or more, having given back 3% of what the run learnt:
:meth:`~gradguard.recovery.rise.LossRise.noisy`) with the ladder idle, and is seen so again
within ``CONFIRM`` steps (flushing every ten steps meanwhile): a floor the LR sets keeps
coming back, a healthy run's excursion above twice its best does not, and a probe in a
healthy run, however harmless, perturbs a trajectory that may be chaotic (docs/recovery.md
has the figures). Three phases, each judged by the median of its last ``MEASURE`` taken
losses:

* *before*: the last ``MEASURE`` losses at the LR in force;
* *trial*: ``TRIAL`` steps at ``FACTOR`` (half) of it;
* *after*: ``AFTER`` steps at the LR in force again.

The LR is too high when the trial's level is at most ``GAIN`` times the level before and
the level after is at least ``RISE`` times the trial's: the loss fell when the LR fell and
rose when it rose. The ladder then lowers its ceiling to half the factor in force (a
*lower* trigger, :mod:`.ladder`) and puts it on probation, where its strict loss-rise test
goes on halving it while the loss keeps rising from its best, until the LR settles
(reported as ``lr_settled``). Otherwise the LR stays, and the next probe waits
``COOLDOWN`` steps, twice as long after each probe that found nothing. A probe costs a
healthy run ``TRIAL`` steps at half its LR.

A probe started on an excursion's peak is confounded: an LR too high can also throw the
loss up every couple of hundred steps (to ten times its best and more, an MLP on Adam at
100x), and each excursion decays by itself; halving the LR there halves the loss, and
restoring it finds the loss still falling. Such a probe *fell* (the trial's level at most
``GAIN`` times the level before) but did not rise again. The evidence it leaves is
completed by the next excursion: a cue confirmed again within ``RECUR`` steps of a probe
that fell is the LR's doing, and the ladder lowers it as for a probe that found it too
high. A probe that fell waits ``COOLDOWN`` steps before the next, not twice as long.
None of the healthy runs of benchmarks/quality.py (20,000 steps), benchmarks/rescue.py
(24,000 steps, 1,000 per run) and the lab ever confirmed a cue: no probe ran in any of
them.

Decisions are taken at flushes (every ten steps while a probe runs) from host values the
flush already has: no device read.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Literal, NamedTuple

#: Taken steps at ``FACTOR`` times the LR.
TRIAL = 30
#: Taken steps at the LR in force again, after the trial.
AFTER = 30
#: The last taken losses of a phase whose median is its level.
MEASURE = 20
#: The LR multiplier of the trial.
FACTOR = 0.5
#: The trial's level must be at most this times the level before ...
GAIN = 0.5
#: ... and the level after at least this times the trial's.
RISE = 1.25
#: Steps after a probe that found nothing before the next (doubled after each such probe).
COOLDOWN = 200

#: A cue confirmed within this many steps of a probe that fell (the loss halved at half the
#: LR, and did not rise again when it came back) lowers the LR with no probe of its own.
RECUR = 2 * COOLDOWN

#: A probe starts when the cue is seen again within this many steps of its first sight
#: (at flushes ten steps apart meanwhile): a floor the LR sets keeps coming back, a
#: healthy run's excursion above twice its best does not.
CONFIRM = 50

Phase = Literal["trial", "after"]


class Probed(NamedTuple):
    """A finished probe: its levels, and whether the LR is too high."""

    step: int
    before: float
    trial: float
    after: float
    too_high: bool

    @property
    def fell(self) -> bool:
        """The loss fell by half (``GAIN``) at half the LR."""
        return self.trial <= GAIN * self.before


class LrProbe:
    """The LR probe's phases (see the module docstring). Host values only."""

    def __init__(self) -> None:
        self.phase: Phase | None = None
        self.levels: list[float] = []  # before, trial: the finished phases' levels
        self.next: int = 0  # no probe before this step
        self.suspect: int | None = None  # the step the cue was first seen (in a row)
        self.cooldown = COOLDOWN
        self._recent: list[float] = []  # the last MEASURE losses before the probe
        self._phase: list[float] = []  # the current phase's taken losses
        self.probes = 0
        self.fell: tuple[int, float, float] | None = None  # step, before, trial of the last that fell

    @property
    def factor(self) -> float:
        """The LR multiplier the probe applies now (on top of the ladder's)."""
        return FACTOR if self.phase == "trial" else 1.0

    @property
    def active(self) -> bool:
        return self.phase is not None

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

    def start(self, step: int) -> bool:
        """Begin a probe after ``step`` if one may (enough history, past the cooldown)."""
        self.suspect = None
        if self.phase is not None or step < self.next or len(self._recent) < MEASURE:
            return False
        self.levels = [statistics.median(self._recent)]
        self.phase, self._phase = "trial", []
        self.probes += 1
        return True

    def advance(self, step: int) -> Probed | None:
        """At a flush: move to the next phase when this one is long enough; a
        :class:`Probed` when the probe is over."""
        if self.phase == "trial" and len(self._phase) >= TRIAL:
            self.levels.append(statistics.median(self._phase[-MEASURE:]))
            self.phase, self._phase = "after", []
        elif self.phase == "after" and len(self._phase) >= AFTER:
            before, trial = self.levels
            after = statistics.median(self._phase[-MEASURE:])
            done = Probed(step, before, trial, after, trial <= GAIN * before and after >= RISE * trial)
            recent = self._phase[-MEASURE:]
            self._end(step, found=done.too_high, fell=done.fell)
            if done.fell and not done.too_high:
                self.fell = (step, before, trial)
            self._recent = recent  # the level at the LR in force, for the next probe
            return done
        return None

    def cancel(self, step: int) -> None:
        """The ladder acted during the probe (or while its cue was confirmed): it is void."""
        self.suspect = None
        if self.phase is not None:
            self._end(step, found=True)
            self._recent = []

    def _end(self, step: int, *, found: bool, fell: bool = False) -> None:
        self.phase, self._phase = None, []
        if found:
            self.next = step + 1
        else:
            self.next = step + self.cooldown
            if not fell:
                self.cooldown *= 2

    def state_dict(self) -> dict[str, object]:
        return {"phase": self.phase, "suspect": self.suspect, "levels": list(self.levels),
                "next": self.next, "cooldown": self.cooldown, "recent": list(self._recent),
                "losses": list(self._phase), "probes": self.probes,
                "fell": None if self.fell is None else list(self.fell)}

    def load_state_dict(self, sd: dict[str, object]) -> None:
        self.phase = sd.get("phase")  # type: ignore[assignment]
        self.suspect = sd.get("suspect")  # type: ignore[assignment]
        self.levels = list(sd.get("levels") or [])  # type: ignore[call-overload]
        self.next = int(sd.get("next") or 0)  # type: ignore[call-overload]
        self.cooldown = int(sd.get("cooldown") or COOLDOWN)  # type: ignore[call-overload]
        self._recent = list(sd.get("recent") or [])  # type: ignore[call-overload]
        self._phase = list(sd.get("losses") or [])  # type: ignore[call-overload]
        self.probes = int(sd.get("probes") or 0)  # type: ignore[call-overload]
        fell = sd.get("fell")
        self.fell = None if fell is None else (int(fell[0]), float(fell[1]), float(fell[2]))  # type: ignore[index]
