"""The loss-rise test's chance gate (gradguard.recovery.scatter): a rise must stand above
the ratio the loss's own scatter gives a two-block level over the best."""

from __future__ import annotations

import math

import torch

from gradguard.recovery.rise import BLOCK, LossRise
from gradguard.recovery.scatter import CHANCE_BLOCKS, chance_ratio


def losses(n: int, sigma: float, level: float = 1.0, tail: float = 0.0, seed: int = 0
           ) -> list[float]:
    """``n`` losses about ``level``, log-normal with ``sigma``; a share ``tail`` of them
    20-1,000x higher (batches holding a gross outlier)."""
    g = torch.Generator().manual_seed(seed)
    base = level * torch.exp(sigma * torch.randn(n, generator=g))
    hit = torch.rand(n, generator=g) < tail
    high = torch.exp(math.log(20) + math.log(50) * torch.rand(n, generator=g))
    return torch.where(hit, base * high, base).tolist()


def feed(rise: LossRise, values: list[float], start: int = 0) -> None:
    for i in range(0, len(values), 50):
        chunk = values[i:i + 50]
        rise.update(list(range(start + i, start + i + len(chunk))), chunk, [False] * len(chunk))


def test_the_chance_ratio_follows_the_scatter_and_needs_a_few_blocks():
    assert chance_ratio([0.1] * (CHANCE_BLOCKS * BLOCK - 1), BLOCK) is None
    calm = [math.log(x) for x in losses(320, 0.2)]
    noisy = [math.log(x) for x in losses(320, 0.5)]
    tailed = [math.log(x) for x in losses(320, 0.2, tail=0.28)]
    c, n, t = (chance_ratio(r, BLOCK) for r in (calm, noisy, tailed))
    assert c is not None and n is not None and t is not None
    assert 1.1 < c < 1.5 < n < t and t > 3
    assert chance_ratio(calm, BLOCK) == c  # a fixed seed: the same residuals, the same ratio


def test_a_calm_loss_that_rose_half_again_has_risen():
    """Chance gives a calm loss no 1.6x two-block level: the gate changes nothing."""
    rise = LossRise()
    feed(rise, [4.0] * 3 + losses(397, 0.2))  # learnt from 4 down to 1
    assert rise.chance() is not None and rise.chance() < 1.5
    feed(rise, losses(100, 0.2, level=3.0, seed=1), start=400)  # gave back 2/3
    found = rise.risen(1.5)
    assert found is not None and found.ratio > 2


def test_a_heavy_tailed_loss_has_not_risen_by_its_own_scatter():
    """A loss whose batches hold gross outliers a quarter of the time: its ten-step
    medians stray past 1.5x the best by chance, and a window now and then holds two
    blocks in a row half made of outliers (2x and more), with no change of level at all.
    Without the gate a strict test found a rise at 4 of 20 flushes; with it at most one
    (a chance gate is no certainty: the peak of a window scanned step by step)."""
    rise = LossRise()
    values = [40.0] * 3 + losses(1997, 0.3, tail=0.28)
    feed(rise, values[:1000])
    ungated = gated = 0
    for i in range(1000, 2000, 50):
        feed(rise, values[i:i + 50], start=i)
        peak = rise.peak.ratio if rise.peak is not None else 0.0
        ungated += rise.latest / rise.best > 1.5 or peak >= 2
        gated += rise.risen(1.5, strict=True) is not None
        assert rise.risen(1.5) is None or rise.risen(1.5, strict=True) is not None
        rise.judged()
    assert ungated >= 4 and gated <= 1


def test_a_loss_that_falls_steadily_is_no_scatter_and_the_residuals_round_trip():
    """Residuals are about each block's third-lowest value: a loss that falls 1% a step
    gives residuals within one block's span, and no chance ratio to speak of."""
    rise = LossRise()
    feed(rise, [4.0 * 0.99 ** i for i in range(200)])
    resid = rise.state_dict()["resid"]
    assert len(resid) == 200 and max(abs(r) for r in resid) <= 10 * math.log(1 / 0.99)
    assert rise.chance() < 1.3
    other = LossRise()
    other.load_state_dict(rise.state_dict())
    assert other.chance() == rise.chance()
    feed(rise, [4.0 * 0.99 ** i for i in range(200, 210)], start=200)
    feed(other, [4.0 * 0.99 ** i for i in range(200, 210)], start=200)
    assert other.state_dict()["resid"] == rise.state_dict()["resid"]
