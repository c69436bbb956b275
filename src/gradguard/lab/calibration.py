"""The calibration setup shared by ``benchmarks/quality.py`` and ``gradguard lab T5``.

A smooth synthetic regression (``y = sin(2 x.w)``) learned by a small ReLU MLP with Adam,
with x1000 gradient spikes injected at fixed steps: clean, unprotected and guarded runs of
the same task, so that "the guard rescues a spiking run" is one number.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..clipping import ZClip
from ..events import Event
from ..guard import Guard
from ..recovery import Recovery
from ..testing import SPIKE_FACTOR, scale_grads_
from ._data import mlp

# ---- the calibration setup ----------------------------------------------------------------
#: Steps at which the calibration run receives a x1000 gradient spike.
CALIBRATION_SPIKES: tuple[int, ...] = (150, 300, 450)
CALIBRATION_MODES: tuple[str, ...] = ("clean", "clean_guarded", "unprotected", "guarded")


@dataclass
class CalibrationTask:
    """The calibration task's data: a smooth synthetic regression ``y = sin(2 x.w)`` and a
    fixed minibatch order (shared by ``benchmarks/quality.py`` and ``gradguard lab T5``).

    Attributes:
        x: ``[n, d]`` inputs; y: ``[n, 1]`` targets; order: ``[steps, batch]`` indices.

    Example:
        >>> from gradguard.lab.calibration import calibration_model, calibration_task
        >>> task = calibration_task(steps=3)
        >>> xb, yb = task.batch(0)
        >>> tuple(xb.shape), tuple(yb.shape), calibration_model(width=8)(xb).shape[1]
        ((64, 16), (64, 1), 1)
    """

    x: Tensor
    y: Tensor
    order: Tensor

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        """The minibatch of ``step`` (deterministic)."""
        idx = self.order[step]
        return self.x[idx], self.y[idx]

    def full_loss(self, model: nn.Module) -> float:
        """MSE of ``model`` on the whole data set (syncs; call it after training)."""
        with torch.no_grad():
            return float(nn.functional.mse_loss(model(self.x), self.y))


def calibration_task(
    *, steps: int, seed: int = 0, n: int = 2048, d: int = 16, batch_size: int = 64
) -> CalibrationTask:
    """The calibration data for a run of ``steps`` steps (see :class:`CalibrationTask`)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, 1, generator=g) / math.sqrt(d)
    y = torch.sin(2.0 * x @ w)
    order = torch.randint(0, n, (steps, batch_size), generator=g)
    return CalibrationTask(x, y, order)


def calibration_model(
    *, width: int = 256, depth: int = 4, d: int = 16, seed: int = 0
) -> nn.Sequential:
    """The calibration model: ``depth`` hidden ReLU layers of ``width``, PyTorch's default
    init under ``torch.manual_seed(seed)``, one output."""
    return mlp(depth, width, init=None, act=nn.ReLU, bn=False, d_in=d, d_out=1, seed=seed)


@dataclass
class CalibrationResult:
    """Outcome of :func:`calibration_run`: final full-data loss, events, skipped steps."""

    mode: str
    final_loss: float
    events: list[Event]
    steps: int
    seconds: float = 0.0


def calibration_run(
    mode: str,
    *,
    steps: int = 600,
    spikes: Sequence[int] = CALIBRATION_SPIKES,
    width: int = 256,
    depth: int = 4,
    seed: int = 0,
    factor: float = SPIKE_FACTOR,
    every: int = 50,
    guard_kwargs: dict[str, Any] | None = None,
) -> CalibrationResult:
    """The calibration setup: a ``depth`` x ``width`` ReLU MLP, Adam lr 1e-3, a smooth
    synthetic regression; x``factor`` gradient spikes at ``spikes`` (modes ``unprotected``
    and ``guarded``). ``guarded`` and ``clean_guarded`` run under
    ``Guard(clip=ZClip(), recovery=Recovery())`` (or ``guard_kwargs``). Returns the MSE on
    the whole training set after the last step."""
    if mode not in CALIBRATION_MODES:
        raise ValueError(f"calibration_run(mode={mode!r}): allowed values are {CALIBRATION_MODES}")
    task = calibration_task(steps=steps, seed=seed)
    model = calibration_model(width=width, depth=depth, seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    guard = None
    if mode in ("guarded", "clean_guarded"):
        kw = guard_kwargs if guard_kwargs is not None else {"clip": ZClip(), "recovery": Recovery()}
        guard = Guard(model, opt, every=every, **kw)
    inject = set(spikes) if mode in ("unprotected", "guarded") else set()
    t0 = time.perf_counter()
    for step in range(steps):
        xb, yb = task.batch(step)
        loss = nn.functional.mse_loss(model(xb), yb)
        loss.backward()
        if step in inject:
            scale_grads_(model, factor)
        if guard is not None:
            guard.step(loss)
        else:
            opt.step()
        opt.zero_grad()
    if guard is not None:
        guard.close()
    seconds = time.perf_counter() - t0
    final = task.full_loss(model)
    return CalibrationResult(mode, final, [] if guard is None else list(guard.events), steps,
                             seconds)
