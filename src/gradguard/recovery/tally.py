"""The LR the ladder settles on, advised honestly (:func:`.messages.settled_event`): half of
it, and how often the clip acted since its ceiling was set.

The settled LR is the highest that held *in this run, under the guard*, within a halving of
one that failed: the edge of what trains. Set from scratch it can fail. Measured with every
recipe of ``benchmarks/rescue.py`` whose guarded run settled (no schedule, no fault),
trained from scratch without the guard, held-out over the twin, seeds 0-2: at the settled
LR the small transformer on SGD went NaN, NaN, 1.07 (half: 0.99, 1.00, 0.99); the tanh RNN
1.77, 0.95, 1.16 (0.96-0.98); the transformer on AdamW 1.18-1.22 (1.00-1.07); the regression
MLPs on AdamW and SGD 1.25/0.68/1.18 and 1.06/0.82/1.37 (1.01/0.74/1.11 and 1.01/0.78/0.90);
the CNN on RMSprop 0.90/1.18/0.64 (0.62/0.90/0.63); the GELU MLP on Adam 0.91/0.99/1.18
(1.10/1.01/1.14). So the advice is ``ADVISE`` times the settled LR.

The clip can be what held it: the digits GELU MLP on SGD Nesterov at 20x its LR, seed 2 (a
stranger's setup), was rolled back at step 17 with the ceiling at lr 0.5; ZClip clipped 15 of
the 100 steps of the restore up to it and none after; the ladder settled there at step 218
(on the CPU these figures were measured on: the trajectory at 20x is chaotic, and on another
CPU, or with another thread count, the same seed was rolled back at step 12-17 with its LR
capped at 0.5 or 0.25, rolled back again at step 187-202 and settled at 0.25, few steps
clipped).
Started at 0.5 the same network ends 15-23x its twin unguarded, 2.3-15x with ZClip alone,
1.6-3.9x under ``clip_grad_norm_(1)`` (seeds 0-2); half of it, 0.25, trains bare
(0.62-1.03x). When the clip acted on at least ``SHARE`` of the steps taken since the
ceiling was set (the restore up to it, then the steps at it; and on ``AT_LEAST`` of them),
the event says so.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

#: The settled LR times this is the LR advised for the config.
ADVISE = 0.5
#: The share of the steps at the settled LR whose gradients were clipped from which the
#: event says that the clip held it (a healthy run's ZClip clips ~1% of its steps or fewer).
SHARE = 0.05
#: ... and the fewest clipped steps that say so.
AT_LEAST = 3


@dataclasses.dataclass
class ClipTally:
    """Steps taken and steps clipped since the LR ceiling became ``ceiling``."""

    ceiling: float = 1.0
    steps: int = 0
    clipped: int = 0

    def update(self, ceiling: float, coefs: Sequence[float], skips: Sequence[bool]) -> None:
        """Count a flushed window's taken steps (``coefs``: each step's clip coefficient,
        1 or NaN where nothing was clipped) under ``ceiling``; a new ceiling starts over."""
        if ceiling != self.ceiling:
            self.ceiling, self.steps, self.clipped = ceiling, 0, 0
        for coef, skipped in zip(coefs, skips):
            if not skipped:
                self.steps += 1
                self.clipped += math.isfinite(coef) and coef < 1.0

    def edge(self) -> bool:
        """The clip acted often enough under this ceiling to be what held it."""
        return self.clipped >= max(AT_LEAST, SHARE * self.steps)

    def state_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)

    def load_state_dict(self, sd: dict[str, float]) -> None:
        self.ceiling = float(sd["ceiling"])
        self.steps, self.clipped = int(sd["steps"]), int(sd["clipped"])
