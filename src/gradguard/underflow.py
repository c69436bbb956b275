"""Gradients too small for float32's squares: their norm reads exactly 0.

A gradient whose elements are all under about 1e-19 in magnitude has squares under
float32's smallest subnormal, and ``torch.linalg.vector_norm`` (and ``_foreach_norm``,
which the telemetry uses) returns exactly 0 for it. Such a layer looks like one with no
gradient at all, though its signal only vanished on its way back (found by a stranger:
transformers' EfficientNet at its own init, its BatchNorm gains near 0.02, had gradients
of 1e-36 to 1e-34 in its first 84 of 96 parameters, every one of which measured 0, and was
told "units dead from the start" while its loss sat at chance). :func:`grad_amax` reads
the largest magnitude of such layers' gradients, once per flush, only for layers that look
silent.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def grad_amax(params: Sequence[Tensor], layer_index: Sequence[int],
              layers: Sequence[int]) -> list[float]:
    """Per layer in ``layers``, the largest magnitude of its parameters' gradients now (0
    without one). One host read; at a flush, not on the step path."""
    want = set(layers)
    found: dict[int, list[Tensor]] = {j: [] for j in layers}
    for j, p in zip(layer_index, params):
        g = p.grad
        if j in want and g is not None and g.numel() and not g.is_sparse:
            found[j].append(g.detach().abs().amax().float())
    live = [torch.stack([t.to(ts[0].device) for t in ts]).amax() for ts in found.values() if ts]
    if not live:
        return [0.0] * len(layers)
    values = iter(torch.stack([t.to(live[0].device) for t in live]).tolist())  # one read
    return [next(values) if found[j] else 0.0 for j in layers]
