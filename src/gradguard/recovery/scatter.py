"""How far above its best a loss's level strays by chance: the loss-rise test's gate.

The loss-rise test (:mod:`.rise`) compares the lower of the last two ten-step medians (the
*two-block level*) with the lowest such median since the ladder last acted (the *best*).
On a calm loss the best is a little below the typical level and a rise of ``stall_factor``
(1.5x) stands out of the noise. A heavy-tailed loss is another matter: a regression whose
targets hold 2% gross outliers has a batch of 16 with one of them 28% of the time, its
loss 10-1,000x the rest; a ten-step median is pulled up whenever a few of its steps are
such batches, and now and then two blocks in a row are half made of them. 88 of the 270
two-block levels of a healthy such run (Adam 1e-3, unguarded) stood 1.5x above the best so
far, and under the default guard it was rolled back 19 times, its LR down to x1e-14, its
held-out loss 5x the unguarded run's.

:func:`chance_ratio` measures the chance on the run itself. Each block's log losses about
its third-lowest value (``CENTER_RANK`` in :mod:`.rise`) are its *residuals*: a loss that
falls or climbs from block to block is no scatter, and a block that half its outliers
lifted keeps a clean centre (about its median they would hide, and chance looked smaller
than it is). The last ``CHANCE_MEMORY`` (64) blocks' residuals are resampled into ten-step
medians, and the ratio is that of the ``CHANCE_HIGH`` (99.9%) quantile of a two-block level
(the lower of two medians, at one position for the level at a flush; the highest over a
window's positions for a rise that came down again before the flush) to the
``CHANCE_LOW`` quantile of one median (a best: the lowest of many). A rise must exceed it.
On a calm loss it is under ``stall_factor`` and changes nothing (a per-step scatter of 0.2
in log units: 1.30, and 1.41 over a 50-step window; 0.5: 2.1 and 2.4); on the outlier
regression it is 4-46 at a flush and 50-160 over a window. A run that blows up (the loss
10x and more within a few blocks) passes it, as it passes the other tests.

On probation (a relapse showed the LR too high, and the strict test asks the loss to stay
within ``stall_factor`` of its best) the quantile is ``STRICT_HIGH`` (98%): a run just
under the edge of stability has a noisy loss, and its noise is the symptom. A digits CNN
on SGD at 10x, its ceiling lowered once, rises 1.8x at step 189, under the 99.9% chance of
its late, noisy loss (2.1x) and over the 98% (1.7x): the ceiling halves and it trains to
0.06 (left alone, it rolls back at 259 and ends at 0.14); the outlier regression's
two-block levels on probation, 2.1-3.1x its best, stay under the 98% (2.2-3.3x).

Host values only, at a flush that has a rise to judge; a fixed seed: the same residuals
give the same ratio.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

#: Ten-step medians resampled from the residuals (a two-block level is the lower of two) ...
RESAMPLES = 4000
#: ... or stretches of a window resampled, for the highest level anywhere in it ...
STRETCHES = 2000
#: ... the rise must exceed the ratio of this quantile of that level ...
CHANCE_HIGH = 0.999
#: ... (this one on probation: the run has shown its LR too high, and less certainty is
#: asked of the next rise; see the module docstring) ...
STRICT_HIGH = 0.98
#: ... to this quantile of one median (the best) ...
CHANCE_LOW = 0.005
#: ... once this many blocks' residuals are in (no gate before).
CHANCE_BLOCKS = 4


def chance_ratio(residuals: Sequence[float], block: int, positions: int = 1,
                 high: float = CHANCE_HIGH) -> float | None:
    """The ratio a two-block level of ``block``-step medians reaches over the best by
    chance, from the log ``residuals`` of the last blocks (see the module docstring): at
    one position (the level at a flush), or the highest over ``positions`` consecutive
    ones (a window scanned step by step for a rise that came down again before the flush),
    at the quantile ``high``; None with fewer than ``CHANCE_BLOCKS`` blocks of residuals.

    Example:
        >>> import math
        >>> calm = [0.2 * math.sin(i * 1.7) for i in range(200)]
        >>> round(chance_ratio(calm, 10), 2) < 1.5
        True
        >>> tailed = [4.0 if i % 4 == 0 else r for i, r in enumerate(calm)]
        >>> chance_ratio(tailed, 10) > 3
        True
        >>> chance_ratio(tailed, 10, positions=50) > chance_ratio(tailed, 10)
        True
    """
    if len(residuals) < CHANCE_BLOCKS * block:
        return None
    resid = torch.tensor(list(residuals), dtype=torch.float64)
    gen = torch.Generator().manual_seed(len(resid) + positions)
    pick = torch.randint(len(resid), (RESAMPLES, block), generator=gen)
    single = _median(resid[pick])
    low = torch.quantile(single, CHANCE_LOW)
    if positions <= 1:
        med = single
        level = torch.minimum(med[0::2], med[1::2])  # the lower of two blocks
    else:  # the rolling medians of resampled stretches, as the window is scanned
        stretch = resid[torch.randint(len(resid), (STRETCHES, positions + 2 * block - 1),
                                      generator=gen)]
        med = _median(stretch.unfold(1, block, 1))  # [STRETCHES, positions + block]
        level = torch.minimum(med[:, :positions], med[:, block:block + positions]).amax(dim=1)
    return math.exp(float(torch.quantile(level, high) - low))


def _median(x: torch.Tensor) -> torch.Tensor:
    """The median over the last dimension, as ``statistics.median`` (the mean of the two
    middle values of an even count)."""
    n = x.shape[-1]
    ranked = x.sort(dim=-1).values
    return ranked[..., (n - 1) // 2:n // 2 + 1].mean(dim=-1)
