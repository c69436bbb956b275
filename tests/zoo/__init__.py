"""A zoo of broken and healthy training setups for gg.doctor.

Every case builds ``(model, batch, loss_fn, optimizer)`` from a seed, small enough to run
in well under a second on one CPU core. ``cause`` is the DESIGN.md cause the doctor's top
finding must name, or None for a healthy setup (no warning/error allowed).
"""

from __future__ import annotations

from .broken import BROKEN
from .cases import Case
from .healthy import HEALTHY

CASES: list[Case] = [*BROKEN, *HEALTHY]

__all__ = ["BROKEN", "CASES", "HEALTHY", "Case"]
