from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

Setup = tuple[nn.Module, Any, Callable[..., torch.Tensor], "torch.optim.Optimizer | None"]


@dataclass
class Case:
    name: str
    cause: str | None
    build: Callable[[], Setup]
    slow: bool = False  # several seconds: run by benchmarks/doctor_zoo.py, not by the unit tests

    def __repr__(self) -> str:
        return self.name


def mlp(d_in: int, width: int, depth: int, d_out: int, act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = d_in
    for _ in range(depth - 1):
        layers += [nn.Linear(d, width), act()]
        d = width
    layers.append(nn.Linear(d, d_out))
    return nn.Sequential(*layers)


def init_linear_(model: nn.Module, scheme: str, std: float | None = None) -> nn.Module:
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            if scheme == "he":
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            elif scheme == "xavier":
                nn.init.xavier_normal_(m.weight)
            elif scheme == "xavier_tanh":
                nn.init.xavier_normal_(m.weight, gain=5 / 3)
            elif scheme == "normal":
                assert std is not None
                nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


def regression(n: int = 64, d: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return x, (x[:, :3].sum(1, keepdim=True)).sin()


def classification(n: int = 64, d: int = 16, k: int = 5, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return x, torch.randint(0, k, (n,), generator=g)


def images(n: int = 16, c: int = 3, hw: int = 12, k: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, hw, hw, generator=g), torch.randint(0, k, (n,), generator=g)


def sequences(n: int = 16, t: int = 20, d: int = 8, k: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, t, d, generator=g), torch.randint(0, k, (n,), generator=g)


def tokens(n: int = 16, t: int = 12, vocab: int = 50, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (n, t), generator=g)
    return x, x.roll(-1, dims=1)
