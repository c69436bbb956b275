"""How two loss levels of a run compare, within the run's own noise (for :mod:`._outcome`)."""

from __future__ import annotations

import math
from typing import Any

#: Two levels within this relative distance are the same level (mini-batch losses wander
#: by a few % at a fixed point) ...
REL_TOL = 0.05
#: ... or within this many robust standard deviations (1.4826 MAD) of the window's noise.
NOISE_K = 3.0


def median(x: Any) -> float | None:
    import numpy as np

    return float(np.median(x)) if len(x) else None


def spread(window: Any) -> float:
    """The robust standard deviation of ``window`` (MAD x 1.4826; 0 when empty)."""
    import numpy as np

    return 1.4826 * float(np.median(np.abs(window - np.median(window)))) if len(window) else 0.0


def floor_back(pre: Any, end: Any) -> bool:
    """Whether the lower quartile of the ``end`` window is back at that of the window
    ``pre`` before an incident (within its tolerance): a loss on two levels, more than
    half its batches at one (a 99:1 classifier under label smoothing: a batch without a
    minority sample sits at the smoothing's floor), has its median flip between them by
    chance, and runs an LR burst left unharmed were "not recovered, the loss ended at
    0.23, above the 0.208 it had". Its lower batches tell: a run the trouble damaged has
    them raised too (found by a regression hunt: an interquartile range as the noise
    passed a loss 5-22x its level)."""
    import numpy as np

    if len(pre) < 4 or len(end) < 4:
        return False
    lower = pre[pre <= np.median(pre)]  # the lower level alone: its own noise
    low = float(np.percentile(pre, 25))
    return float(np.percentile(end, 25)) <= low + tol(low, lower)


def tol(level: float, window: Any) -> float:
    return max(REL_TOL * abs(level), NOISE_K * spread(window))


def back_at(before: float, final: float, end: Any) -> bool:
    """Whether the loss ended (``final``, the median of the ``end`` window) back at the level
    ``before`` it, within the end window's own noise (in log units when the losses are
    positive): for a level the recovery reported, whose steps before its flush were the
    trouble's (found by a stranger: a loss 16x its level at the end of a run whose LR was
    raised 30x 50 steps before was "recovered", the rise's own spread taken for noise)."""
    import numpy as np

    if before > 0 and final > 0 and len(end) and bool((end > 0).all()):
        return math.log(final / before) <= max(math.log1p(REL_TOL),
                                               NOISE_K * spread(np.log(end)))
    return final <= before + tol(before, end)


def rose(start: float, final: float, end: Any) -> bool:
    """Whether the loss ended (``final``, the median of the ``end`` window) above where it
    started, out of the end window's noise. In log units when the losses are positive: a
    loss that exploded is noisy in absolute terms (5,228, 1,983, 2,997 at the end of a run
    that started at 4.4: a spread of thousands, which called it "healthy")."""
    import numpy as np

    if start > 0 and final > 0 and len(end) and bool((end > 0).all()):
        return math.log(final / start) > max(math.log1p(REL_TOL), NOISE_K * spread(np.log(end)))
    return final > start + tol(start, end)


def flat(start: float, final: float, first: Any) -> bool:
    """Whether the loss ended where it started, within the noise of its ``first`` steps. In
    log units when the losses are positive, the noise from the step-to-step changes: the
    spread about their median counts a loss that falls fast through its first steps as
    noise (found as a stranger: a digits MLP in the Hugging Face Trainer at AdamW 0.03 falls
    from 2.3 to 0.1 in them; its fall from 0.654 to 0.00185 was "within the noise of its
    first steps"). A final level under every one of the first steps' losses (by
    ``REL_TOL``) fell, whatever their noise: a stream whose batches differ in difficulty
    (four tasks taking turns, their losses 1-16x apart) has step-to-step changes that
    called its fall from 0.97 to 0.054 "within the noise"; a loss that does not move puts
    its median under the lowest of as many of its own values about never."""
    import numpy as np

    if len(first) > 2 and final < (1 - REL_TOL) * float(np.min(first)):
        return False
    if start > 0 and final > 0 and len(first) > 2 and bool((first > 0).all()):
        return math.log(start / final) <= max(math.log1p(REL_TOL), NOISE_K * step_noise(first))
    return final >= start - tol(start, first)


def step_noise(window: Any) -> float:
    """The robust standard deviation of the log losses of ``window`` (positive, more than
    two), from their step-to-step changes: a trend through it (a loss that falls fast, or
    climbs) is no noise. A change has twice the variance of a loss."""
    import numpy as np

    return spread(np.diff(np.log(window))) / math.sqrt(2)


def flat_words(start: float, final: float) -> str:
    """How a flat loss is told: "did not fall" when it ended within ``REL_TOL`` of where it
    started or above; a loss that fell by more, but within the noise of its first steps
    (GPT-2 at 33x its LR in the HF Trainer: 3.274 to 2.997, its first losses 2.7-6.4),
    "fell only ... within the noise of its first steps"."""
    if final >= start - REL_TOL * abs(start):
        return f"the loss did not fall ({start:.4g} at the start, {final:.4g} at the end)"
    return (f"the loss fell only from {start:.4g} to {final:.4g}, within the noise of its "
            "first steps")
