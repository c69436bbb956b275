"""``gg.doctor``: name the cause of exploding/vanishing gradients and the remedy, from one
batch. Each probe is a small module: :mod:`.inputs` (the batch), :mod:`.numerics`
(non-finite values, float16, disconnected parameters), :mod:`.signal` (signal propagation
along the chain of weight layers: init), :mod:`.activations` (dead and saturated units),
:mod:`.stacks` (repeated blocks compared block to block), :mod:`.recurrent`, :mod:`.lr`
with :mod:`.sharpness` (the learning rate), :mod:`.gradcheck` (custom autograd Functions).
The instrumented pass is :mod:`._capture` (activations: :mod:`._acts`, attention entropy:
:mod:`._attention`); the LR probe's in-place steps are :mod:`._steps`; the time budget the
probes share is :mod:`._budget`."""

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
