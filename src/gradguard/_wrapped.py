"""Optimizer wrappers that step an inner optimizer: accelerate's ``AcceleratedOptimizer``.

``accelerator.prepare(optimizer)`` returns a ``torch.optim.Optimizer`` subclass that never
ran ``Optimizer.__init__`` (no step hooks of its own) and keeps the real optimizer as
``.optimizer``. Its ``step()`` does nothing on the micro-batches of gradient accumulation
(``accelerator.accumulate``: the gradients are not synced yet), and with fp16 mixed
precision steps through its ``GradScaler`` and updates it. A :class:`~gradguard.Guard`
given the wrapper guards the inner optimizer (its hooks, param groups and state), does
nothing on the micro-batches, and uses the wrapper's scaler (updating it after the step,
as the wrapper would) when the step passes none. Any other wrapper with no step hooks of
its own is refused at construction (its ``step()`` may do more than this module keeps).
"""

from __future__ import annotations

from typing import Any

import torch


def inner_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    """The optimizer a wrapper steps (``.optimizer``), or None when ``optimizer`` is none."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) and inner is not optimizer else None


def accelerate_inner(optimizer: Any) -> torch.optim.Optimizer | None:
    """The optimizer inside accelerate's ``AcceleratedOptimizer`` (None for anything else:
    another wrapper's ``step()`` may do more than this module knows to keep)."""
    inner = inner_optimizer(optimizer)
    module = type(optimizer).__module__
    return inner if inner is not None and (module == "accelerate" or module.startswith(
        "accelerate.")) else None


def accumulating(wrapper: Any) -> bool:
    """The wrapper's step would do nothing: a micro-batch of gradient accumulation."""
    state = getattr(wrapper, "gradient_state", None)
    return state is not None and getattr(state, "sync_gradients", True) is False
