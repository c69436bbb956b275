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


def _fit(x: list[float], y: list[float]) -> tuple[float, float] | None:
    """Theil–Sen slope of ``y`` over ``x`` and Mann–Kendall z (continuity-corrected)."""
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
