"""The step of a benchmark's plain training loop, guarded or not."""

from __future__ import annotations

from typing import Any

import torch


def train_step(loss: torch.Tensor, opt: torch.optim.Optimizer, guard: Any = None) -> None:
    """``loss.backward()``, then ``guard.step(loss)`` (or ``opt.step()`` unguarded), then
    ``opt.zero_grad()``."""
    loss.backward()
    if guard is not None:
        guard.step(loss)
    else:
        opt.step()
    opt.zero_grad()
