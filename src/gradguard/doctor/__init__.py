"""``gg.doctor``: name the cause of exploding/vanishing gradients and the remedy, from one
batch. Each probe is a small module: :mod:`.inputs` (the batch), :mod:`.numerics`
(non-finite values, float16, disconnected parameters), :mod:`.signal` (signal propagation
through depth: init, saturation, dead units), :mod:`.recurrent`, :mod:`.lr`,
:mod:`.gradcheck` (custom autograd Functions)."""

from __future__ import annotations

from ._report import CAUSE_PRIORITY, Diagnosis, Finding
from ._run import doctor
from .gradcheck import GradcheckEntry, GradcheckReport, gradcheck

__all__ = [
    "CAUSE_PRIORITY",
    "Diagnosis",
    "Finding",
    "GradcheckEntry",
    "GradcheckReport",
    "doctor",
    "gradcheck",
]
