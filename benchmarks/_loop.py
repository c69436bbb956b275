"""The step of a benchmark's plain training loop, guarded or not."""

from __future__ import annotations

import json
from pathlib import Path
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


def write_result(out: str | Path, result: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """Write ``result`` as indented JSON to ``out`` (its folder made), print ``summary``, and
    return ``result``."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return result
