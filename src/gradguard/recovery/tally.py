"""How often the clip acted since the LR ceiling in force was set, so that the LR the ladder
settles on is advised honestly (:func:`.messages.settled_event`).

An LR that held only because the guard kept clipping its gradients is the edge of what
trains, not a setting for a run without the guard. Measured (the digits GELU MLP, SGD
Nesterov at 20x its LR, seed 2): a rollback at step 17 set the ceiling at lr 0.5, ZClip
clipped 15 of the 100 steps of the back-off's restore up to it and none after, and the
ladder settled there at step 218; started at 0.5, the same network ends 15-23x its
twin's held-out loss unguarded, 2.3-15x with ZClip alone, 1.6-3.9x under
``clip_grad_norm_(1)`` (seeds 0-2), while half of it, 0.25, trains bare (0.62-1.03x).
So when the clip acted on at least ``SHARE`` of the steps taken since the ceiling was
set (the restore up to it, then the steps at it; and on ``AT_LEAST`` of them), the advice
is half that LR.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

#: The share of the steps at the settled LR whose gradients were clipped from which that
#: LR is the edge of what trains (a healthy run's ZClip clips ~1% of its steps or fewer).
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
        """The clip acted often enough under this ceiling that it held only with the clip."""
        return self.clipped >= max(AT_LEAST, SHARE * self.steps)

    def state_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)

    def load_state_dict(self, sd: dict[str, float]) -> None:
        self.ceiling = float(sd["ceiling"])
        self.steps, self.clipped = int(sd["steps"]), int(sd["clipped"])
