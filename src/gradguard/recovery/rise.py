"""A loss that rises and stays up: the learning rate is too high, with no NaN and no spike.

Some failing runs never produce a non-finite step or a spike that a robust z-score can
see: the loss climbs geometrically from the first steps (an LR 10x too high on a small
transformer: 4 nats to 1,000 within 50 steps, every step a little worse than the last),
or the network first learns, then dies back to chance (a CNN whose ReLUs an LR too high
killed). The per-step verdict judges each value against the recent ones, which rose too;
this test judges the loss against the best the run has reached.

At each flush, :class:`LossRise` computes rolling medians of ``BLOCK`` consecutive taken
steps' losses (skipped steps left out, carried over from the previous window) and keeps
the *best* level since the ladder last acted (the lowest of those medians) and the run's
*initial* level (the median of its first ``FIRST`` taken losses, whatever steps a
GradScaler skipped first: a fresh model's loss, before an LR too high can damage it; a
median, as the levels are, not the luckiest of three batches: on a healthy run that
learns little, a noisy loss sits 1.5x above its luckiest first batch for good, and the
lowest of them made every such run "risen"). The loss has
*risen* when the medians of the last two blocks of ``BLOCK`` steps are both above

* ``factor`` x the best (the ladder's ``stall_factor``, 1.5 by default: the band the
  progress check calls "back near its level"), and
* the best plus ``LOST`` (half) of what the run had learnt, ``initial - best``: a run
  that gives back half its progress for twenty steps is in trouble; a healthy one whose
  loss is noisy (its best ten-step median an optimistic extreme) is far from it.

Once the run has shown that its LR is too high (the ladder lowered the LR ceiling after a
relapse), and until the ladder reports the lowered LR settled, the first condition alone
decides (``strict``): a run just under the edge of stability trains, but noisily, its loss
rising well above its best and falling again without ever giving back most of its
progress; each such rise halves the ceiling again, converging on an LR that trains rather
than on the largest one that does not diverge. Once settled, the usual test applies again:
late in a run a loss near zero doubles and halves from noise alone. Even on probation a
rise must give back ``STRICT_LOST`` (3%) of what the run learnt from its fresh level (the
lowest of its first losses: a first update that blew the loss up is no level to learn
from): a loss of 0.04 against a best of 0.015, 2.3 nats below the fresh model's, is
noise; checked at every ten-step flush while the ladder is at work
(:meth:`gradguard.Recovery.flush_every`), such noise halved the ceiling every 30 to 50
steps (a digits CNN on AdamW at 100x: down to 0.001 of its LR by step 300).

A rise that came down again before the flush still counts when it was severe: two
consecutive ten-step medians above ``SEVERE`` (2) times the running best anywhere in the
window, having given back half the progress (a warm-up peak that killed a CNN's ReLUs
between two flushes: the loss is lower again at the flush, the units are still dead), while
the loss at the flush is still above ``factor`` times the best (a loss back at its best was
held up by the batches: a shard of wrong labels).
Healthy runs of benchmarks/quality.py reach 1.64x at most.

A network that died is caught even when the rise is small. A CNN whose ReLUs an LR too
high killed once it had reached 1.7 nats sits at chance (2.3 nats) for good: it gave
back all it learnt, yet at 1.37x its best it is under ``factor``; one that a first update
100x too large killed at step 1 never learnt anything to give back. :meth:`LossRise.returned`
finds the loss back at the fresh model's level (at least ``AT_FRESH`` (0.95) times the
lowest of its first ``FIRST`` losses: a first update that blows the loss up 100x is not
the fresh model's level). On its own that is no sign of trouble (early in a healthy run,
or in one that learns little, the loss wanders about its first values: a rule of this
kind alone made 9 warnings in benchmarks/quality.py's 20,000 healthy steps), so it counts
only with :class:`~.dead.DeadLayers`: layers that had a gradient and have had none at all,
exactly zero, on at least ``DEAD`` (15, :mod:`.dead`) of their last ``2 * BLOCK`` (20) taken steps or
on the last ``BLOCK`` (10) in a row (every layer below the dead ReLUs: no gradient flows through a unit that never
activates; a batch now and then that still wakes a unit does not make the network
alive). A healthy layer's gradient is never exactly zero on most steps; a task head that
takes turns with one or two others is not dead, nor one a step's graph did not reach
(a gradient of None, not zero: :class:`~.dead.DeadLayers`). Together they say what happened: the network died and
is no better than when it started; nothing but a rollback to before its death brings it
back, and a flush that finds dead layers takes no snapshot (a fresh loss far above the
dead network's: :meth:`~.dead.DeadLayers.stalled`). Under pipeline
parallelism the rule is off: each stage's per-layer columns are its own (only the scalar
ones are agreed), so the stages could decide differently.

Half of what a run learnt is no scale when it learnt nothing: a converged model fine-tuned
under a new guard starts at its best, its loss wandering 1.5-2.5x about it from batch to
batch (a digits MLP at 5e-4), and that noise was "a loss that rose" (rolled back at step
49, the LR lowered for good). While what the run learnt from its first level (the median
of its first ``BLOCK`` losses, as well measured as the levels it is compared with) is less
than ``NOISE_UNITS`` (8) times the loss's noise (:meth:`LossRise.noise`: how far a
ten-step median strays by chance, from the step-to-step changes of the log loss within
each block, so that a loss falling or climbing at a steady rate is no noise), a rise must
stand that far above the best instead (3x and more for those fine-tunes). Not under
``strict``: a loss that wanders 3x about its best at an LR too high is the symptom, not
noise to discount.

A run that learnt nothing because its LR is far too high looks the same to that test:
found as a stranger, a ``transformers`` MobileNetV2 on SGD at 0.05 (the paper's LR; 0.005
trains) has its batch losses between 2.5 and 28 from step 5, its ten-step medians 3x the
fresh model's 2.69 by step 49, under the 3.4x its noise asked of a rise over its best (the
fresh level itself), and it waited for a NaN at step 93. The fresh level is one unbiased
measure of where the run started, not the luckiest of many medians as the best is: a level
``FRESH_SIGMAS`` (3) standard errors above it (of a ten-step median against a three-step
one, ``noise * sqrt(1 + BLOCK / FIRST)``) has risen too (2.6x for that network; healthy
runs of benchmarks/quality.py reach 1.6 standard errors, healthy fine-tunes of a trained
digits MLP 1.1).
When such a run rolls back it never was below its fresh level by more than its noise (a
warm-up's first steps dip it a little: :meth:`LossRise.worse_than_fresh`):
the trigger says so and the ladder sets the LR ceiling at the back-off factor itself, not
at half of the factor that failed (:mod:`.ladder`).

Medians of ten steps shrug off single bad batches, two blocks in a row a noisy stretch.
Without the run's first steps (a resume) only the first condition applies. Measured on
healthy runs: benchmarks/quality.py (10,000 steps) and benchmarks/rescue.py (2,400).

Every rise, strict or not, must also stand above what the loss's own scatter gives a
two-block level over the best by chance (:meth:`LossRise.chance`, :mod:`.scatter`): a
heavy-tailed loss (a regression whose targets hold 2% gross outliers) has ten-step medians
that stray 1.5-3x from block to block, and its best is the luckiest of them. On a calm
loss the chance ratio is under ``stall_factor`` and changes nothing. On probation the bar
is a lower quantile of chance (``STRICT_HIGH``): there the noise is the symptom.

Losses that can be negative (log-likelihoods, GAN or RL objectives) have no ratio scale:
the test switches itself off for the run the first time it sees one. A loss of exactly 0
(a classifier that fits a batch perfectly in float32, a hinge loss) is a level like any
other; while the best level is 0 the ratio tests have nothing to divide by and wait.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections import deque
from collections.abc import Sequence
from typing import NamedTuple

from ..detectors.config import MAD_TO_SIGMA
from .scatter import CHANCE_HIGH, STRICT_HIGH, chance_ratio

#: Steps per rolling median.
BLOCK = 10
#: The first steps of a run whose lowest loss is the fresh model's level.
FIRST = 3
#: The share of what the run had learnt (initial - best) that a rise must give back.
LOST = 0.5
#: The share of what it learnt from its fresh level a rise must give back under
#: ``strict`` (see the module docstring).
STRICT_LOST = 0.03
#: A two-block level this many times the best, seen anywhere in a window, has risen even
#: if the loss came down again before the flush (see the module docstring).
SEVERE = 2.0
#: In units of the loss's own noise (:meth:`LossRise.noise`): a run whose progress from
#: its first level is less than this has learnt nothing it can give back, and a rise must
#: be this far above its best (see the module docstring). Fine-tunes of a converged model
#: learnt under 6 such units in their first 200 steps (their false rises came at 49 and 99),
#: 15 over 1,000 as they learn (the share has a scale again); an SGD MLP at an LR too high
#: had learnt 11 and more when its loss rose.
NOISE_UNITS = 8.0
#: Standard errors (of a ten-step median against the three-step fresh level, from the
#: loss's noise) above the fresh model's level that count as a rise in a run that learnt
#: nothing (see the module docstring). Healthy runs of benchmarks/quality.py reach 1.6.
FRESH_SIGMAS = 3.0
#: The last blocks of ``BLOCK`` taken steps the noise is measured over.
NOISE_BLOCKS = 32
#: The last blocks whose residuals measure the chance scatter (:mod:`.scatter`) ...
CHANCE_MEMORY = 64
#: ... each block's about its value of this rank (0: the lowest).
CENTER_RANK = 2
#: A two-block level at least this share of the fresh model's loss is back at its level
#: (with dead layers: see the module docstring).
AT_FRESH = 0.95


class Rise(NamedTuple):
    """What :meth:`LossRise.risen` found: the risen level and its ratio to the best."""

    level: float
    ratio: float


class LossRise:
    """The best loss level since the ladder last acted, and whether the loss has risen well
    above it (see the module docstring). Host values only, fed once per flush.

    Example:
        >>> rise = LossRise()
        >>> rise.update(list(range(20)), [4.0] * 3 + [1.0] * 17, [False] * 20)  # learning
        >>> rise.update(list(range(20, 40)), [2.2] * 20, [False] * 20)  # x2.2, under 1 + 0.5 * 3
        >>> rise.risen(1.5) is None
        True
        >>> rise.update(list(range(40, 60)), [3.5] * 20, [False] * 20)  # gave back 5/6
        >>> rise.risen(1.5)
        Rise(level=3.5, ratio=3.5)
    """

    def __init__(self) -> None:
        self.best: float | None = None
        self.initial: float | None = None  # the fresh model's loss (kept over resets)
        self.fresh: float | None = None  # the lowest of the first losses (see returned)
        self.latest: float | None = None  # the newest rolling median
        self.off = False  # a loss < 0 was seen: no ratio scale
        self.peak: Rise | None = None  # the highest two-block level over the best since judged
        self._carry: list[float] = []  # the last 2 * BLOCK - 1 losses, for the next window
        #: the per-step noise of the last NOISE_BLOCKS blocks of BLOCK taken losses (see
        #: :meth:`noise`; kept when the ladder acts), and the losses of the next block
        self._sigmas: deque[float] = deque(maxlen=NOISE_BLOCKS)
        self._block: list[float] = []
        #: each block's log losses about its median, the last NOISE_BLOCKS blocks' (see
        #: :meth:`chance`), and the chance ratio last computed from them (None: stale)
        self._resid: deque[float] = deque(maxlen=CHANCE_MEMORY * BLOCK)
        self._chance: dict[tuple[int, bool], float | None] = {}
        self._positions = 0  # the window positions scanned for a peak since judged
        #: the median of the run's first BLOCK taken losses (its first level, measured as
        #: well as the levels it is compared with; None without the run's first steps)
        self.first_block: float | None = None
        self.since: int | None = None  # the first step of the level learnt again (reset)
        #: the run's first taken losses while fewer than FIRST are in (None when the fresh
        #: level is known, or the guard did not see the run's first step: a resume)
        self._first: list[float] | None = None

    def update(self, steps: Sequence[int], losses: Sequence[float], skipped: Sequence[bool]) -> None:
        """Take a flushed window in (its steps, losses and skip flags)."""
        since = self.since
        if since is not None and steps and steps[-1] >= since:
            self.since = None  # the window reaches it: the next ones are all after it
        vals = [x for st, x, sk in zip(steps, losses, skipped)
                if not sk and math.isfinite(x) and (since is None or st >= since)]
        if any(x < 0 for x in vals):
            self.off = True
        if self.off:
            return
        candidates = []
        if steps and steps[0] == 0 and self.initial is None:
            self._first = []  # the run's first window: the fresh model's loss follows
        if self._first is not None:
            # the first FIRST taken steps, not steps 0-2: a GradScaler skips the first steps
            # of a float16 run (its scale too high), and with no fresh level every share test
            # was off for the run (a healthy MLP rolled back for a loss 1.9x its best)
            self._first.extend(vals[:FIRST - len(self._first)])
            if len(self._first) == FIRST:
                self.initial = statistics.median(self._first)
                self.fresh = min(self._first)
                candidates.append(self.initial)
                self._first = None
        self._block.extend(vals)
        while len(self._block) >= BLOCK:
            block, self._block = self._block[:BLOCK], self._block[BLOCK:]
            if self.first_block is None and self.initial is not None:
                self.first_block = statistics.median(block)
            if min(block) > 0:
                # about a low order statistic of the block: one that half its outliers
                # lifted keeps its centre (a median would hide them); no level across blocks
                center = math.log(sorted(block)[CENTER_RANK])
                self._resid.extend(math.log(x) - center for x in block)
                self._chance = {}
                d = [math.log(b / a) for a, b in itertools.pairwise(block)]
                mid = statistics.median(d)
                # the robust sigma of one step's log loss (a difference has twice its variance)
                self._sigmas.append(MAD_TO_SIGMA * statistics.median(abs(x - mid) for x in d)
                                    / math.sqrt(2))
        seq = self._carry + vals
        medians = [statistics.median(seq[i - BLOCK:i]) for i in range(BLOCK, len(seq) + 1)]
        if len(seq) >= 2 * BLOCK:  # the lower of the last two blocks: a rise that lasts
            self.latest = min(statistics.median(seq[-2 * BLOCK:-BLOCK]), medians[-1])
        # every position of the window: the running best, and the two-block level against it
        # (the highest since the last judgement: windows shorter than the judgements' pace)
        pool = candidates if self.best is None else [*candidates, self.best]
        best = min(pool) if pool else None
        self._positions += max(0, len(medians) - BLOCK)
        for j, m in enumerate(medians):
            best = m if best is None else min(best, m)
            if j >= BLOCK and best > 0 and self._gave_back(level := min(medians[j - BLOCK], m), best):
                if self.peak is None or level / best > self.peak.ratio:
                    self.peak = Rise(level, level / best)
        self.best = best
        self._carry = seq[-(2 * BLOCK - 1):]

    def _gave_back(self, level: float, best: float, *, strict: bool = False) -> bool:
        if strict:  # the lowest first loss: a first update that blew the loss up is no level
            start, share = self.fresh, STRICT_LOST
        else:
            start, share = self.initial, LOST
            noise = self.noise()
            if noise is not None and level > 0 and self._learnt_nothing(best, noise):
                # it learnt no more than its noise (a fine-tuned model starts at its best):
                # no share of that is a scale; the rise must stand out of the noise itself,
                # or out of the fresh model's level (one unbiased measure, not the luckiest)
                return math.log(level / best) > NOISE_UNITS * noise or self._above_fresh(level, noise)
        return start is None or level > best + share * (start - best)

    def _learnt_nothing(self, best: float, noise: float) -> bool:
        """Whether what the run learnt from its first level down to ``best`` is less than
        ``NOISE_UNITS`` times the loss's ``noise`` (see the module docstring)."""
        first = self.first_block
        return (first is not None and min(first, best) > 0
                and math.log(first / best) < NOISE_UNITS * noise)

    def _above_fresh(self, level: float, noise: float | None) -> bool:
        """Whether ``level`` stands ``FRESH_SIGMAS`` standard errors above the fresh model's
        level, in log units: the error of a ``BLOCK``-step median against a ``FIRST``-step
        one, both from the loss's own noise (see the module docstring)."""
        initial = self.initial
        if initial is None or initial <= 0 or noise is None:
            return False
        return math.log(level / initial) > FRESH_SIGMAS * noise * math.sqrt(1 + BLOCK / FIRST)

    def worse_than_fresh(self) -> bool:
        """Whether the run has learnt nothing (its best since the ladder last acted is the
        fresh model's level, or below it by less than ``NOISE_UNITS`` of its noise: a
        warm-up's dip) and its loss now stands well above that level: no LR in force has
        trained it (see the module docstring)."""
        best, noise = self.best, self.noise()
        return (best is not None and self.initial is not None and self.latest is not None
                and noise is not None
                and (best >= self.initial or self._learnt_nothing(best, noise))
                and self._above_fresh(self.latest, noise))

    def noise(self) -> float | None:
        """The loss's noise in log units: how far a ``BLOCK``-step median strays by chance,
        from the step-to-step changes of the log loss within each of the last
        ``NOISE_BLOCKS`` blocks (their spread about their median: a loss that climbs or
        falls at a steady rate is no noise), or None before a block is in."""
        if not self._sigmas:
            return None
        step = statistics.median(self._sigmas)  # the per-step noise
        # that of the median of BLOCK of them (a median's error is sqrt(pi / 2) times a mean's)
        return math.sqrt(math.pi / 2 / BLOCK) * step

    def risen(self, factor: float, *, strict: bool = False) -> Rise | None:
        """A :class:`Rise` when the loss has risen more than ``factor`` times its best (or
        ``SEVERE`` times anywhere in the last window), else None. ``strict``: the ratio
        alone decides (the run has shown already that its LR is too high; see the module
        docstring)."""
        if self.off or self.best is None or self.best <= 0:
            return None
        if self.latest is not None:
            ratio = self.latest / self.best
            if ratio > factor and self._gave_back(self.latest, self.best, strict=strict) \
                    and self._beyond_chance(ratio, strict=strict):
                return Rise(self.latest, ratio)
        # a severe peak that came down counts while the loss is still up at the flush (the
        # ReLUs it killed hold it there); one back within ``factor`` of the best was the
        # batches' (found by a stranger: 20 steps of 30% wrong labels, the loss back under
        # its level before them at the flush, rolled back 100 steps with the LR halved)
        peak = self.peak
        return peak if peak is not None and peak.ratio >= SEVERE and (
            self.latest is None or self.latest > factor * self.best) and \
            self._beyond_chance(peak.ratio, self._positions, strict=strict) else None

    def chance(self, positions: int = 1, *, strict: bool = False) -> float | None:
        """The ratio of a two-block level to the best that the loss's own scatter reaches
        by chance, at one position or the highest over ``positions``, at the quantile
        asked of a rise on probation (``strict``) or not (:func:`.scatter.chance_ratio` of
        the residuals; once per block that came in); None with too few residuals."""
        key = (positions, strict)
        if key not in self._chance:
            self._chance[key] = chance_ratio(list(self._resid), BLOCK, positions,
                                             STRICT_HIGH if strict else CHANCE_HIGH)
        return self._chance[key]

    def _beyond_chance(self, ratio: float, positions: int = 1, *, strict: bool) -> bool:
        chance = self.chance(positions, strict=strict)
        return chance is None or ratio > chance

    def noisy(self, level: float | None = None, *, cue: bool = False) -> Rise | None:
        """A :class:`Rise` when the recent level is ``SEVERE`` (2) times the best or more and
        has given back ``STRICT_LOST`` of what the run learnt (no snapshot of such weights),
        else None; ``level``: another stretch's. ``cue``: the LR probe's (:mod:`.probe`),
        also above what the loss's scatter gives by chance (:meth:`chance`): a healthy loss
        at batch 2 sits at twice its luckiest median now and then."""
        latest, best = self.latest if level is None else level, self.best
        if self.off or latest is None or best is None or best <= 0:
            return None
        ratio = latest / best
        return Rise(latest, ratio) if ratio >= SEVERE and self._gave_back(latest, best, strict=True) \
            and (not cue or self._beyond_chance(ratio, strict=False)) else None

    def gives_back(self, loss: float) -> bool:
        """Whether a loss this high gives back ``STRICT_LOST`` (3%) of what the run learnt
        from its fresh level (True while that is unknown). A confirmed loss spike that
        does not is no trouble to act on: a converged classifier's loss of 1e-4 that
        spikes x14 on one hard batch has given back 0.1% of what it learnt."""
        if self.off or self.best is None:
            return True
        return self._gave_back(loss, self.best, strict=True)

    def returned(self) -> Rise | None:
        """A :class:`Rise` when the loss is back at the fresh model's level (``AT_FRESH``
        times the lowest of the first ``FIRST`` losses or more; a sign of trouble only with
        dead layers: see the module docstring), else None."""
        latest, fresh, best = self.latest, self.fresh, self.best
        if self.off or latest is None or fresh is None or best is None or best <= 0:
            return None
        return Rise(latest, latest / best) if latest >= AT_FRESH * fresh else None

    def judged(self) -> None:
        """The rise was judged: the next judgement looks at the windows from here on."""
        self.peak = None
        self._positions = 0

    def reset(self, since: int | None = None) -> None:
        """The ladder acted (a back-off or rollback): the level is learnt again from here,
        from step ``since`` on (an act between flushes: the next window's steps before it
        ran on the weights it replaced; found by a stranger, a rollback to the fresh
        weights at step 60, the growth rule's, took its best from steps 50-59 and rolled
        back again at 120 for a loss "3x its best")."""
        self.best = self.latest = self.peak = None
        self._carry = []
        self._positions = 0
        self.since = since

    def state_dict(self) -> dict[str, object]:
        return {"best": self.best, "initial": self.initial, "fresh": self.fresh,
                "latest": self.latest, "off": self.off, "carry": list(self._carry),
                "sigmas": list(self._sigmas), "block": list(self._block),
                "resid": list(self._resid),
                "first_block": self.first_block, "first": self._first}

    def load_state_dict(self, sd: dict[str, object]) -> None:
        self.best = sd.get("best")  # type: ignore[assignment]
        self.latest = sd.get("latest")  # type: ignore[assignment]
        self.initial = sd.get("initial")  # type: ignore[assignment]
        self.fresh = sd.get("fresh", self.initial)  # type: ignore[assignment]
        self.off = bool(sd.get("off", False))
        self._carry = list(sd.get("carry") or [])  # type: ignore[call-overload]
        self._sigmas = deque(sd.get("sigmas") or [], maxlen=NOISE_BLOCKS)  # type: ignore[call-overload]
        self._block = list(sd.get("block") or [])  # type: ignore[call-overload]
        self._resid = deque(sd.get("resid") or [], maxlen=CHANCE_MEMORY * BLOCK)  # type: ignore[call-overload]
        self._chance = {}
        self.first_block = sd.get("first_block")  # type: ignore[assignment]
        first = sd.get("first")
        self._first = list(first) if first is not None else None  # type: ignore[call-overload]
