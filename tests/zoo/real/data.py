"""Batches and losses shared by the real zoo."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def images(n: int = 8, hw: int = 32, k: int = 10, seed: int = 1) -> tuple[Tensor, Tensor]:
    """ImageNet-normalised-like pixels (zero mean, unit variance) and class labels."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, hw, hw, generator=g), torch.randint(0, k, (n,), generator=g)


def token_ids(n: int = 4, t: int = 32, vocab: int = 1000, seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, t), generator=g)


def labels(n: int, k: int, seed: int = 2) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, k, (n,), generator=g)


def _logits(out: object) -> Tensor:
    return out.logits if hasattr(out, "logits") else out  # type: ignore[return-value]


def ce(out: object, y: Tensor) -> Tensor:
    """Cross-entropy on ``out.logits`` (a HF output) or on ``out``, any number of positions."""
    z = _logits(out)
    return F.cross_entropy(z.reshape(-1, z.shape[-1]).float(), y.reshape(-1))


def lm_shifted(out: object, ids: Tensor) -> Tensor:
    """Next-token loss as language models are trained: position t predicts token t + 1, so
    the last position's logits get no gradient."""
    z = _logits(out)[:, :-1]
    return F.cross_entropy(z.reshape(-1, z.shape[-1]).float(), ids[:, 1:].reshape(-1))
