"""The doctor's time budget, shared by its probes.

The instrumented pass and the step probe at the user's learning rate always run; what
refines a verdict (smaller learning rates, more power iterations for the curvature, a
second custom Function to gradcheck) runs while the budget lasts, and what the budget cut
short is reported in ``Diagnosis.cut``.

Example:
    >>> from gradguard.doctor._budget import Budget, default_budget
    >>> default_budget(10_000_000), round(default_budget(100_000_000), 2)
    (5.0, 9.13)
    >>> b = Budget(5.0)
    >>> b.allows(1.0), b.allows(60.0)
    (True, False)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

#: seconds at up to BUDGET_PARAMS parameters (one CPU thread)
DEFAULT_BUDGET_S = 5.0
#: above this many parameters the default budget grows with the square root of the size:
#: a pass costs in proportion to the parameters, so a larger model gets fewer optional
#: passes and the doctor stays interactive (~10 s for GPT-2 small's 124M). ResNet-50
#: (25.6M) and its peers are within it: 5 s
BUDGET_PARAMS = 30_000_000


def default_budget(n_params: int) -> float:
    """``DEFAULT_BUDGET_S`` up to ``BUDGET_PARAMS`` parameters, times ``sqrt(n / BUDGET_PARAMS)`` above."""
    return DEFAULT_BUDGET_S * max(1.0, n_params / BUDGET_PARAMS) ** 0.5


@dataclass
class Budget:
    """Wall-clock seconds the probes share, from construction on."""

    total_s: float
    start: float = field(default_factory=time.perf_counter)
    cut: list[str] = field(default_factory=list)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.total_s - self.elapsed()

    def allows(self, cost_s: float) -> bool:
        """True when ``cost_s`` more seconds fit in what is left."""
        return cost_s <= self.left()

    def note(self, what: str) -> None:
        """Record that the budget cut ``what`` short."""
        if what not in self.cut:
            self.cut.append(what)
