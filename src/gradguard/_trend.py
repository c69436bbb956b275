"""Robust trend statistics of positive ``(step, value)`` points: a Theil–Sen slope and a
Mann–Kendall test on ``log(value)`` (used by :mod:`gradguard.precursors`, which re-exports
them)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Trend:
    """Theil–Sen / Mann–Kendall trend of ``log(value)`` over flush points: ``slope`` of
    ``ln(value)`` per step, Mann–Kendall ``z`` (continuity-corrected, > 0 rising), the fitted
    ``growth = exp(slope · span)``, ``elasticity = slope · t`` at the last point (``d ln x /
    d ln t``), the first and last step (``start``, ``end``) and the ``last`` value."""

    slope: float
    z: float
    growth: float
    elasticity: float
    start: int
    end: int
    last: float

    def steps_to(self, factor: float) -> float:
        """Steps until the signal is ``factor`` x its value at the start of the span, at
        the fitted rate (0 when it already is; inf when it is not rising)."""
        if self.slope <= 0:
            return math.inf
        need = math.log(factor) - self.slope * (self.end - self.start)
        return max(need, 0.0) / self.slope


def trend(points: Sequence[tuple[int, float]]) -> Trend | None:
    """The trend of positive ``(step, value)`` points (None with fewer than 3).

    Example:
        >>> from gradguard.precursors import trend
        >>> t = trend([(100 * i, 2.0 ** i) for i in range(1, 9)])
        >>> round(t.growth), round(t.z, 2), round(t.elasticity, 1)
        (128, 3.34, 5.6)
    """
    x = [float(s) for s, _ in points]
    fit = _fit(x, [math.log(v) for _, v in points])
    if fit is None:
        return None
    b, z = fit
    span = x[-1] - x[0]
    return Trend(b, z, math.exp(b * span), b * (x[-1] + 1.0), int(x[0]), int(x[-1]),
                 points[-1][1])


def fall(points: Sequence[tuple[int, float]]) -> tuple[float, float] | None:
    """Mann–Kendall ``z`` (< 0 falling) and the Theil–Sen change over the span of
    ``(step, value)`` points of any sign, on the values themselves (a loss that goes below
    zero, as a Gaussian negative log-likelihood does, has no logarithm); None with fewer
    than 3 points.

    Example:
        >>> from gradguard._trend import fall
        >>> z, change = fall([(100 * i, 1.0 - 0.5 * i) for i in range(8)])
        >>> round(z, 2), round(change, 2)
        (-3.34, -3.5)
    """
    x = [float(s) for s, _ in points]
    fit = _fit(x, [float(v) for _, v in points])
    if fit is None:
        return None
    b, z = fit
    return z, b * (x[-1] - x[0])


#: A fit over more points than this is a fit over the medians of blocks of consecutive
#: points (at most this many blocks, the newest block full): the pairs are the square of
#: the points, and at ``every=1`` the 400 flush points of a precursor's trend made every
#: step of a run take 100-400 ms (found by a stranger). Only a guard flushing more often
#: than every 7 steps has more.
MAX_POINTS = 64


def _blocks(x: list[float], y: list[float]) -> tuple[list[float], list[float]]:
    """``(x, y)`` as is, or the medians of consecutive blocks when there are more than
    :data:`MAX_POINTS` (the oldest block may be short; the newest are whole).

    Example:
        >>> from gradguard._trend import _blocks
        >>> bx, by = _blocks([float(i) for i in range(130)], [float(i % 3) for i in range(130)])
        >>> len(bx), bx[:2], bx[-1]
        (44, [0.0, 2.0], 128.0)
    """
    n = len(x)
    if n <= MAX_POINTS:
        return x, y
    k = math.ceil(n / MAX_POINTS)
    cuts = list(range(n, 0, -k))[::-1]  # block ends, from the newest back
    starts = [max(0, c - k) for c in cuts]
    return ([statistics.median(x[a:b]) for a, b in zip(starts, cuts)],
            [statistics.median(y[a:b]) for a, b in zip(starts, cuts)])


def _fit(x: list[float], y: list[float]) -> tuple[float, float] | None:
    """Theil–Sen slope of ``y`` over ``x`` and Mann–Kendall z (continuity-corrected), over
    :func:`_blocks` of the points."""
    x, y = _blocks(x, y)
    n = len(x)
    if n < 3:
        return None
    slopes, s = [], 0
    for i in range(n):
        for j in range(i + 1, n):
            s += (y[j] > y[i]) - (y[j] < y[i])
            if x[j] != x[i]:
                slopes.append((y[j] - y[i]) / (x[j] - x[i]))
    if not slopes:
        return None
    var = n * (n - 1) * (2 * n + 5) / 18.0  # no ties correction: values are continuous
    z = (s - math.copysign(1, s)) / math.sqrt(var) if s else 0.0
    return statistics.median(slopes), z
