"""The lab's data sets and models: the digits data set (scikit-learn, imported on first use),
minibatch streams, the adding problem, plain MLPs and their accuracy, and the types of a
batch and a loss function."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

Batch = tuple[Tensor, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]


_DIGITS: tuple[Tensor, Tensor] | None = None


def digits() -> tuple[Tensor, Tensor]:
    """``sklearn.datasets.load_digits`` (1797 8×8 images, shipped with scikit-learn),
    standardised per feature: ``(x [1797, 64] float32, y [1797] int64)``."""
    global _DIGITS
    if _DIGITS is None:
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                "gradguard lab needs scikit-learn for the digits data set: "
                "pip install 'gradguard[lab]'"
            ) from e
        d = load_digits()
        x = torch.tensor(d.data, dtype=torch.float32)
        x = (x - x.mean(0)) / (x.std(0) + 1e-6)
        _DIGITS = (x, torch.tensor(d.target, dtype=torch.long))
    return _DIGITS


def minibatches(x: Tensor, y: Tensor, bs: int, seed: int) -> Callable[[int], Batch]:
    """A deterministic stream of random minibatches (with replacement across epochs)."""
    g = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    perm = [torch.randperm(n, generator=g)]
    pos = [0]

    def get(step: int) -> Batch:
        if pos[0] + bs > n:
            perm[0] = torch.randperm(n, generator=g)
            pos[0] = 0
        idx = perm[0][pos[0] : pos[0] + bs]
        pos[0] += bs
        return x[idx], y[idx]

    return get


def adding_batch(bs: int, length: int, g: torch.Generator) -> Batch:
    """The adding problem (Hochreiter & Schmidhuber 1997): a sequence of ``(value, marker)``
    pairs, two markers set; the target is the sum of the two marked values. Predicting the
    mean (1.0) gives MSE 1/6 ≈ 0.167."""
    values = torch.rand(bs, length, generator=g)
    marks = torch.zeros(bs, length)
    half = max(length // 2, 1)
    first = torch.randint(0, half, (bs,), generator=g)
    second = torch.randint(half, length, (bs,), generator=g)
    rows = torch.arange(bs)
    marks[rows, first] = 1.0
    marks[rows, second] = 1.0
    x = torch.stack([values, marks], dim=-1)
    y = (values * marks).sum(dim=1, keepdim=True)
    return x, y


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        out = model(x)
    if not bool(torch.isfinite(out).all()):
        return math.nan
    return float((out.argmax(dim=1) == y).float().mean())


def mlp(
    depth: int,
    width: int,
    *,
    init: str | None = None,
    act: Callable[[], nn.Module] = nn.ReLU,
    bn: bool = False,
    d_in: int = 64,
    d_out: int = 10,
    seed: int = 0,
) -> nn.Sequential:
    """``depth`` hidden layers of ``width`` units; ``init``: ``"he"`` (Kaiming normal, fan
    in), ``"xavier"`` (Glorot normal) or None (PyTorch's default), biases zero."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    d = d_in
    for _ in range(depth):
        lin = nn.Linear(d, width)
        if init == "he":
            nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
            nn.init.zeros_(lin.bias)
        elif init == "xavier":
            nn.init.xavier_normal_(lin.weight)
            nn.init.zeros_(lin.bias)
        layers.append(lin)
        if bn:
            layers.append(nn.BatchNorm1d(width))
        layers.append(act())
        d = width
    layers.append(nn.Linear(d, d_out))
    return nn.Sequential(*layers)


def split_digits(n_train: int = 1400) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Digits split in a fixed shuffled order: ``(x_train, y_train, x_val, y_val)``."""
    x, y = digits()
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(1234))
    x, y = x[perm], y[perm]
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]
