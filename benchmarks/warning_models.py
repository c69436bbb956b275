"""Data, models and LR schedules of the early-warning runs (``benchmarks/warning_runs.py``).

Everything is small, runs on one CPU thread and needs no download: sklearn's
``load_digits``, synthetic regression and sequence tasks, and the characters of Python's
own ``argparse`` source for a tiny language model.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

Batch = tuple[Tensor, Tensor]


# ---- data ------------------------------------------------------------------------------
@functools.cache
def _digits() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    return (x - x.mean(0)) / (x.std(0) + 0.1), torch.tensor(d.target)


def digits_batch(seed: int, size: int = 64, image: bool = False, noise: float = 0.2
                 ) -> Callable[[int], Batch]:
    """Digits minibatches whose labels are redrawn at random with probability ``noise`` on
    every draw: the loss keeps a floor (no run memorises its way to a loss of 0, where the
    10x-median divergence label would fire on noise)."""
    x, y = _digits()

    def batch(step: int) -> Batch:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        i = torch.randint(0, len(y), (size,), generator=g)
        xb = x[i].reshape(size, 1, 8, 8) if image else x[i]
        flip = torch.rand(size, generator=g) < noise
        return xb, torch.where(flip, torch.randint(0, 10, (size,), generator=g), y[i])

    return batch


def teacher_batch(seed: int, d_in: int = 16, size: int = 64, noise: float = 0.3
                  ) -> Callable[[int], Batch]:
    """Regression on a random tanh teacher network, with Gaussian label noise (a floor)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    w1 = torch.randn(d_in, 32, generator=g) / math.sqrt(d_in)
    w2 = torch.randn(32, 1, generator=g) / math.sqrt(32)

    def batch(step: int) -> Batch:
        gs = torch.Generator().manual_seed(seed * 1_000_003 + step)
        xb = torch.randn(size, d_in, generator=gs)
        y = torch.tanh(xb @ w1) @ w2 * 3.0
        return xb, y + noise * torch.randn(size, 1, generator=gs)

    return batch


def sequence_batch(seed: int, length: int = 20, size: int = 32, task: str = "adding",
                   noise: float = 0.1) -> Callable[[int], Batch]:
    """``adding``: the sum of the two marked values of a sequence (Hochreiter 1997);
    ``mean``: the mean of the inputs, predicted at the last step. Targets carry Gaussian
    noise of std ``noise``, a loss floor (see :func:`digits_batch`)."""

    def batch(step: int) -> Batch:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        vals = torch.rand(size, length, generator=g)
        eps = noise * torch.randn(size, 1, generator=g)
        if task == "mean":
            return vals.unsqueeze(-1), vals.mean(1, keepdim=True) + eps
        marks = torch.zeros(size, length)
        a = torch.randint(0, length // 2, (size,), generator=g)
        b = torch.randint(length // 2, length, (size,), generator=g)
        marks[torch.arange(size), a] = 1.0
        marks[torch.arange(size), b] = 1.0
        return torch.stack([vals, marks], -1), (vals * marks).sum(1, keepdim=True) + eps

    return batch


@functools.cache
def corpus() -> tuple[Tensor, int]:
    import argparse
    import json.decoder

    text = inspect.getsource(argparse) + inspect.getsource(json.decoder)
    chars = sorted(set(text))
    idx = {c: i for i, c in enumerate(chars)}
    return torch.tensor([idx[c] for c in text]), len(chars)


def text_batch(seed: int, seq: int = 32, size: int = 16) -> Callable[[int], Batch]:
    data, _ = corpus()

    def batch(step: int) -> Batch:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        i = torch.randint(0, len(data) - seq - 1, (size,), generator=g)
        x = torch.stack([data[j : j + seq] for j in i.tolist()])
        y = torch.stack([data[j + 1 : j + seq + 1] for j in i.tolist()])
        return x, y

    return batch


# ---- models ----------------------------------------------------------------------------
def mlp(d_in: int, width: int, depth: int, d_out: int, act: type[nn.Module] = nn.ReLU,
        residual: bool = False) -> nn.Module:
    if residual:
        return _ResMLP(d_in, width, depth, d_out)
    layers: list[nn.Module] = [nn.Linear(d_in, width), act()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), act()]
    return nn.Sequential(*layers, nn.Linear(width, d_out))


class _ResMLP(nn.Module):
    def __init__(self, d_in: int, width: int, depth: int, d_out: int) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.head = nn.Linear(width, d_out)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        for b in self.blocks:
            h = h + F.relu(b(h))
        return self.head(h)


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(16 * 64, 10))


class Half(nn.Module):
    """Runs ``inner`` and hands its output on in float16, as a mixed-precision layer does:
    past 65504 it overflows to Inf."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x).half()


class Widen(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.float()


#: The largest finite float16.
F16_MAX = 65504.0


class Attention(nn.Module):
    """Causal self-attention (``F.scaled_dot_product_attention``); ``half=True`` gives the
    logits ``q·kᵀ/√d`` float16's range, as a mixed-precision kernel does: past 65504 they
    overflow and the output is NaN (emulated in float32: CPU float16 matmuls are 20x slower)."""

    def __init__(self, d: int, heads: int, qk_norm: bool, half: bool = False) -> None:
        super().__init__()
        self.heads, self.half = heads, half
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.qn = nn.LayerNorm(d // heads) if qk_norm else nn.Identity()
        self.kn = nn.LayerNorm(d // heads) if qk_norm else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape

        def split(z: Tensor) -> Tensor:
            return z.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = self.qn(split(self.q(x))), self.kn(split(self.k(x))), split(self.v(x))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if self.half:  # past float16's range a logit is Inf, and the softmax NaN
            s = (q @ k.transpose(-1, -2)).abs().amax() / math.sqrt(d // self.heads)
            y = torch.where(s > F16_MAX, torch.nan, y)
        return self.o(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, qk_norm: bool, half: bool = False) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, heads, qk_norm, half)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyLM(nn.Module):
    """A pre-LN character transformer (nanoGPT's shape), optionally with qk-LayerNorm."""

    def __init__(self, vocab: int, d: int = 32, layers: int = 2, heads: int = 2,
                 qk_norm: bool = False, seq: int = 32, half: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(seq, d))
        self.blocks = nn.ModuleList(Block(d, heads, qk_norm, half) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, x: Tensor) -> Tensor:
        h = self.emb(x) + self.pos[: x.shape[1]]
        for b in self.blocks:
            h = b(h)
        return self.head(self.ln(h))


class SeqNet(nn.Module):
    def __init__(self, kind: str, d_in: int, hidden: int) -> None:
        super().__init__()
        cls = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[kind]
        self.rnn = cls(d_in, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class LinearRNN(nn.Module):
    """h_t = W h_{t-1} + U x_t, no squashing: the state grows as ρ(W)^t once ρ(W) > 1."""

    def __init__(self, d_in: int, hidden: int) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, hidden)
        self.rec = nn.Linear(hidden, hidden, bias=False)
        nn.init.orthogonal_(self.rec.weight, gain=0.9)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> Tensor:
        u = self.inp(x)
        h = torch.zeros(x.shape[0], u.shape[-1])
        for t in range(x.shape[1]):
            h = self.rec(h) + u[:, t]
        return self.head(h)


# ---- losses and schedules --------------------------------------------------------------
def ce(model: nn.Module, b: Batch) -> Tensor:
    out = model(b[0]).float()
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), b[1].reshape(-1))


def mse(model: nn.Module, b: Batch) -> Tensor:
    return F.mse_loss(model(b[0]).float(), b[1])


def const(lr: float) -> Callable[[int], float]:
    return lambda t: lr


def exp_ramp(lr0: float, per_step: float) -> Callable[[int], float]:
    """lr0 · e^(per_step · t): a slow exponential LR ramp (an LR range test left running)."""
    return lambda t: lr0 * math.exp(per_step * t)


def linear_ramp(lr0: float, lr1: float, steps: int) -> Callable[[int], float]:
    return lambda t: lr0 + (lr1 - lr0) * t / steps


def warmup_cosine(peak: float, warmup: int, total: int, floor: float = 0.0) -> Callable[[int], float]:
    def f(t: int) -> float:
        if t < warmup:
            return peak * (t + 1) / warmup
        p = min(1.0, (t - warmup) / max(1, total - warmup))
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * p))
    return f


def cosine_restarts(peak: float, period: int, floor: float = 0.0) -> Callable[[int], float]:
    """SGDR (Loshchilov & Hutter 2017): cosine decay restarted to ``peak`` every period."""
    return lambda t: floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * (t % period) / period))


def one_cycle(peak: float, total: int, up: float = 0.3) -> Callable[[int], float]:
    """Smith's one-cycle: a linear rise to ``peak`` over ``up`` of the run, then down."""
    n = int(total * up)
    return lambda t: peak * (0.04 + 0.96 * t / n) if t < n else peak * max(
        0.001, 1 - (t - n) / (total - n))


def step_decay(lr: float, every: int, gamma: float = 0.3) -> Callable[[int], float]:
    return lambda t: lr * gamma ** (t // every)
