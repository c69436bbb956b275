"""The optimizer state a rollback resets, and the optimizer whose state a rank holds.

After a rollback restores the snapshot's optimizer state, the moments of the layers whose
gradients exploded are zeroed (``Recovery(reset_moments=...)``): the trouble's gradients
may have reached them before the snapshot's. Only torch's own optimizers, whose state is
moments and counters, and only what a zero restarts cleanly.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..naming import layer_of

if TYPE_CHECKING:
    from ..guard import Guard


#: The state a reset keeps (the snapshot's, restored): a second moment with no bias
#: correction. Zeroed, RMSprop's first steps divide by the root of a hundredth of the
#: squared gradient, ten times the LR in every element (Adagrad's, the LR's sign): an LR
#: burst of the reset's own into the restored weights (found by a stranger: RMSprop with
#: momentum, rolled back after an LR burst, rolled back twice more after the bursts its
#: resets made, 1.55-2.22x its twin; 0.74-1.02x with the moments restored). Adam's bias
#: correction restarts with its step, and a zeroed momentum starts from the gradient.
_KEPT = {"RMSprop": ("square_avg", "grad_avg"), "Adagrad": ("sum",)}
#: The optimizers whose state is restored whole: L-BFGS's curvature pairs are lists (not
#: reset) that must match its tensors (found by a stranger: a rollback zeroed its
#: direction and last gradient and kept its history, and the run ended at chance).
_RESTORED = ("LBFGS",)


def reset_moments(guard: Guard, layers: Sequence[str] | None) -> list[str]:
    """Zero the optimizer state (moments, and Adam's step: the bias correction restarts
    too) of the parameters of ``layers`` (None or empty: every layer). Only for an
    optimizer whose ``step`` is torch's, whose state is moments and counters; another's
    may hold weights (schedule-free's ``z``, the sequence its weights are averaged from;
    Prodigy's ``p0``) or count its steps in the param groups (:mod:`.groups`), and
    zeroing it wrecks the weights the rollback restored: it is restored, not reset."""
    optimizer = local_optimizer(guard.optimizer)
    stepper = next(c for c in type(optimizer).__mro__ if "step" in vars(c))  # whose step
    if not stepper.__module__.startswith("torch.optim"):
        return []
    if stepper.__name__ in _RESTORED:
        return []
    chosen = set(layers) if layers else None
    reset: list[str] = []
    state = optimizer.state
    kept = _KEPT.get(stepper.__name__, ())
    for name, p in zip(guard.names, guard.telemetry.params):
        lay = layer_of(name)
        if chosen is not None and lay not in chosen:
            continue
        for k, v in state.get(p, {}).items():
            if isinstance(v, Tensor) and k not in kept:
                v.zero_()
        if lay not in reset:
            reset.append(lay)
    return reset


def local_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer whose state this rank holds: a ``ZeroRedundancyOptimizer`` keeps each
    rank's shard in a local optimizer (``.optim``), and its own ``state_dict()`` needs a
    collective consolidation first. Every rank snapshots and restores its own shard (the
    ranks roll back together), as each keeps its own snapshot files."""
    # no import here: torch.distributed.optim scripts its functional optimizers with
    # torch.jit when imported (a second or so, and deprecation warnings); an optimizer of
    # that class exists only once its module was imported
    zero = sys.modules.get("torch.distributed.optim.zero_redundancy_optimizer")
    if zero is not None and isinstance(optimizer, zero.ZeroRedundancyOptimizer):
        return optimizer.optim
    return optimizer
