"""Gradient norms of one backward pass, measured with gradguard's own
:class:`~gradguard.telemetry.Telemetry` (per layer, per parameter, RMS per layer)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..telemetry import Telemetry, Window
from ._data import Batch, LossFn


def _one_pass(model: nn.Module, batch: Batch, loss_fn: LossFn) -> Window:
    tel = Telemetry(list(model.named_parameters()), every=1)
    model.zero_grad(set_to_none=True)
    x, y = batch
    loss_fn(model(x), y).backward()
    tel.record(tel.measure(), loss=None, clip_coef=None, skipped=None)
    window = tel.flush()
    assert window is not None
    model.zero_grad(set_to_none=True)
    return window


def layer_grad_norms(model: nn.Module, batch: Batch, loss_fn: LossFn) -> tuple[list[str], Tensor]:
    """Per-layer gradient norms of one backward pass, measured with :class:`Telemetry`."""
    window = _one_pass(model, batch, loss_fn)
    return window.layers, window.layer_norms()[0]


def param_grad_norms(model: nn.Module, batch: Batch, loss_fn: LossFn) -> tuple[list[str], Tensor]:
    """Per-parameter gradient norms of one backward pass, measured with :class:`Telemetry`."""
    window = _one_pass(model, batch, loss_fn)
    return window.names, window.param_norms[0]


def layer_grad_rms(model: nn.Module, batch: Batch, loss_fn: LossFn) -> tuple[list[str], Tensor]:
    """Per-layer gradient RMS (norm / sqrt(numel)): the std of a zero-mean gradient."""
    layers, norms = layer_grad_norms(model, batch, loss_fn)
    sizes = dict.fromkeys(layers, 0)
    for name, p in model.named_parameters():
        head = name.rpartition(".")[0] or "(root)"
        sizes[head] += p.numel()
    n = torch.tensor([sizes[lay] for lay in layers], dtype=torch.float32)
    return layers, norms / n.sqrt()
