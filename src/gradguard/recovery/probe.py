"""Ask the run whether its LR is too high: halve it for a while and keep it if the loss falls.

Some runs whose LR is too high never show a symptom the other tests watch: no NaN, no
spike, no rise above the best level. They train, noisily, and stall at a loss several times
what the right LR reaches (an LR 10x too high on a regression MLP with SGD, 30x with Adam:
the loss bounces around a level its twin passes early on). Nothing in the gradients or the
loss tells such a run from a healthy one that has converged: both have stopped improving.
What tells them apart is what a lower LR does, so the guard tries it.

At each flush :class:`LrProbe` takes the taken steps' losses in. When the ladder is quiet
(the LR at its ceiling, nothing being watched, no trouble for ``SPAN`` steps) and the loss
has **stalled**, the median of the last ``SPAN`` losses not ``STALL_GAIN`` (10%) below the
median of the ``SPAN`` before, it starts a probe: the LR runs at ``relapse_backoff``
(half) of its ceiling for ``SPAN`` steps. Then it compares the probe's losses, leaving out
its first ``SETTLE`` steps (the iterate needs a few steps to settle at the lower LR), with
the ``SPAN`` losses before it:

* median at least ``KEEP_GAIN`` (20%) lower: the LR was too high. The ceiling drops to the
  probed factor for good, and the next probe may follow at once (a bisection from above,
  one halving per ``SPAN`` steps, while each halving pays);
* otherwise the LR goes back to its ceiling, and the next probe waits twice as long as the
  last wait (``SPAN``, 2 ``SPAN``, 4 ``SPAN``, ...): a healthy run that has converged pays
  ``SPAN`` steps at half its LR, then ever more rarely.

A stall of 50 steps cannot be a 20% gain from the trend alone, so a probe that keeps
measured the LR. A probe is no trouble: its events are ``info`` (``lr_probe``), it never
rolls back, and any trouble during it ends it (the ladder's back-off takes over).

Losses that can be zero or negative have no ratio scale: the probe switches itself off for
the run the first time it sees one (as the loss-rise test does).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

#: Steps a stall is judged over, and a probe runs for.
SPAN = 50
#: A stall: the last SPAN losses' median less than this share below the SPAN before.
STALL_GAIN = 0.1
#: A probe keeps the lower LR when its median is at least this share below the one before.
KEEP_GAIN = 0.2
#: The first steps of a probe, left out of its median (the iterate settles at the new LR).
SETTLE = 10


class LrProbe:
    """When to probe a lower LR, and whether it paid (see the module docstring). Host
    values only, fed once per flush.

    Example:
        >>> probe = LrProbe()
        >>> probe.update(list(range(100)), [1.0] * 100, [False] * 100)  # a stall
        >>> probe.due(99, quiet=True)
        True
        >>> probe.start(99)
        >>> probe.update(list(range(100, 150)), [0.6] * 50, [False] * 50)  # 40% lower
        >>> probe.verdict(149)
        (True, 1.0, 0.6)
    """

    def __init__(self) -> None:
        self.off = False  # a loss <= 0 was seen: no ratio scale
        self.started: int | None = None  # the step a running probe began after
        self.before: float | None = None  # the median of the SPAN losses before it
        self.wait = SPAN  # steps the next probe waits after one that did not pay
        self.not_before = 0  # no probe starts before this step
        self._hist: list[tuple[int, float]] = []  # (step, loss) of taken steps, newest last

    def update(self, steps: Sequence[int], losses: Sequence[float], skipped: Sequence[bool]) -> None:
        """Take a flushed window in (its steps, losses and skip flags)."""
        vals = [(s, x) for s, x, sk in zip(steps, losses, skipped) if not sk and math.isfinite(x)]
        if any(x <= 0 for _, x in vals):
            self.off = True
        if self.off:
            return
        self._hist = (self._hist + vals)[-4 * SPAN:]

    def median(self, lo: int, hi: int) -> float | None:
        """Median loss of the taken steps in ``(lo, hi]`` (None: fewer than half of them)."""
        xs = [x for s, x in self._hist if lo < s <= hi]
        return statistics.median(xs) if len(xs) >= (hi - lo) // 2 else None

    def due(self, step: int, *, quiet: bool) -> bool:
        """True when a probe should start after ``step``: the ladder is ``quiet`` and the
        loss has stalled over the last two ``SPAN`` steps."""
        if self.off or self.started is not None or not quiet or step < self.not_before:
            return False
        now, before = self.median(step - SPAN, step), self.median(step - 2 * SPAN, step - SPAN)
        return now is not None and before is not None and now > (1 - STALL_GAIN) * before

    def start(self, step: int) -> None:
        """A probe begins after ``step`` (the ladder lowered the LR)."""
        self.started, self.before = step, self.median(step - SPAN, step)

    def verdict(self, step: int) -> tuple[bool, float, float] | None:
        """At a flush ``step``: ``(kept, median before, median during)`` once the running
        probe has had ``SPAN`` steps, else None. Ends the probe."""
        if self.started is None or step - self.started < SPAN or self.before is None:
            return None
        during = self.median(self.started + SETTLE, step)
        if during is None:
            return None
        kept = during <= (1 - KEEP_GAIN) * self.before
        result = (kept, self.before, during)
        if kept:
            self.wait, self.not_before = SPAN, step + SPAN  # the next halving: a stall from here
        else:
            self.not_before, self.wait = step + self.wait, 2 * self.wait
        self.started = self.before = None
        return result

    def cancel(self, step: int) -> None:
        """The ladder acted on trouble: a running probe ends without a verdict, and none
        starts until the loss has had ``2 SPAN`` steps of its own again."""
        self.started = self.before = None
        self.not_before = max(self.not_before, step + 2 * SPAN)

    def state_dict(self) -> dict[str, object]:
        return {"off": self.off, "started": self.started, "before": self.before,
                "wait": self.wait, "not_before": self.not_before,
                "hist": [list(p) for p in self._hist]}

    def load_state_dict(self, sd: dict[str, object]) -> None:
        self.off = bool(sd.get("off", False))
        self.started = sd.get("started")  # type: ignore[assignment]
        self.before = sd.get("before")  # type: ignore[assignment]
        self.wait = int(sd.get("wait", SPAN))  # type: ignore[call-overload]
        self.not_before = int(sd.get("not_before", 0))  # type: ignore[call-overload]
        self._hist = [(int(s), float(x)) for s, x in sd.get("hist") or []]  # type: ignore[attr-defined]
