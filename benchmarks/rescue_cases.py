"""The tasks, recipes and faults the rescue benchmark (``benchmarks/rescue.py``) is made of.

A :class:`Task` is a model and its data (a factory for each, seeded); a :class:`Recipe` is
how a user trains it (optimizer, schedule, their own clipping, an injected fault). A run is
a task trained with a recipe for a number of steps. Everything is small enough for one CPU
thread and deterministic: the data streams draw from their own ``torch.Generator``.

Data ships with Python or scikit-learn: the docstrings of a fixed list of stdlib modules
(char-level language modelling, the last 10% held out) and ``load_digits`` (the
gradguard lab's fixed split: 1400 training images, 397 held out).
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from gradguard.lab._common import minibatches, split_digits

Batch = tuple[Tensor, Tensor]
BatchFn = Callable[[int], Batch]
LossFn = Callable[[Tensor, Tensor], Tensor]
OptimizerFactory = Callable[..., Optimizer]
ScheduleFactory = Callable[[Optimizer, int], LRScheduler]


# ---- data -------------------------------------------------------------------------------
#: The stdlib modules whose docstrings (module, public classes and functions) make the text.
CORPUS_MODULES = (
    "argparse", "collections", "functools", "json", "pathlib", "textwrap", "itertools", "re",
    "string", "difflib", "heapq", "shutil", "subprocess", "logging", "datetime", "statistics",
    "random",
)
CTX = 32  # characters per sequence
LM_BATCH = 16


@cache
def corpus() -> tuple[Tensor, int]:
    """The text as character ids ``[n] int64`` and the vocabulary size (ASCII 32..126 plus
    newline; anything else maps to ``?``). About 110k characters on Python 3.11."""
    parts: list[str] = []
    for name in CORPUS_MODULES:
        mod = importlib.import_module(name)
        parts.append(mod.__doc__ or "")
        for attr, obj in sorted(vars(mod).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != name:
                continue
            if inspect.isfunction(obj) or inspect.isclass(obj):
                parts.append(obj.__doc__ or "")
    text = "\n".join(p.strip() for p in parts if p.strip())
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    index = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([index.get(c, index["?"]) for c in text], dtype=torch.long)
    return ids, len(chars)


def _lm_split() -> tuple[Tensor, Tensor]:
    ids, _ = corpus()
    cut = int(0.9 * ids.numel())
    return ids[:cut], ids[cut:]


def lm_batches(seed: int) -> BatchFn:
    """Random windows of the training text: ``(x [B, CTX], y [B, CTX])``, y shifted by one."""
    train, _ = _lm_split()
    g = torch.Generator().manual_seed(seed)

    def get(step: int) -> Batch:
        start = torch.randint(0, train.numel() - CTX - 1, (LM_BATCH,), generator=g)
        idx = start[:, None] + torch.arange(CTX + 1)
        win = train[idx]
        return win[:, :-1], win[:, 1:]

    return get


@cache
def lm_eval() -> Batch:
    """64 fixed windows of the held-out text."""
    _, held = _lm_split()
    g = torch.Generator().manual_seed(4321)
    start = torch.randint(0, held.numel() - CTX - 1, (64,), generator=g)
    win = held[start[:, None] + torch.arange(CTX + 1)]
    return win[:, :-1], win[:, 1:]


def lm_loss(logits: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def digits_batches(seed: int, bs: int = 32) -> BatchFn:
    x, y, _, _ = split_digits()
    return minibatches(x, y, bs, seed)


def digits_eval() -> Batch:
    _, _, xv, yv = split_digits()
    return xv, yv


@cache
def _regression_data() -> tuple[Tensor, Tensor]:
    """A smooth nonlinear regression target in 16 dimensions with 10% noise: 2048 points."""
    g = torch.Generator().manual_seed(777)
    x = torch.randn(2048, 16, generator=g)
    w = torch.randn(16, 4, generator=g) / 4
    y = torch.sin(x @ w).sum(1, keepdim=True) + 0.25 * (x[:, :2] ** 2).sum(1, keepdim=True)
    y = y + 0.1 * torch.randn(y.shape, generator=g)
    return x, (y - y.mean()) / y.std()


def regression_batches(seed: int, bs: int = 64) -> BatchFn:
    x, y = _regression_data()
    return minibatches(x[:1792], y[:1792], bs, seed)


def regression_eval() -> Batch:
    x, y = _regression_data()
    return x[1792:], y[1792:]


# ---- models -----------------------------------------------------------------------------
class CharTransformer(nn.Module):
    """A 2-layer pre-LN GPT-style character model (d=64, 4 heads, causal, no dropout)."""

    def __init__(self, vocab: int, d: int = 64, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(CTX, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True,
                                           norm_first=True, activation="gelu")
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        self.mask: Tensor
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(CTX),
                             persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        t = x.shape[1]
        h = self.tok(x) + self.pos[:t]
        h = self.blocks(h, mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.ln(h))


class CharRNN(nn.Module):
    """Embedding -> ``nn.RNN`` (tanh or relu) or ``nn.LSTM`` -> linear, one layer."""

    def __init__(self, vocab: int, cell: str, hidden: int = 128, emb: int = 32) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, emb)
        self.rnn: nn.Module
        if cell == "lstm":
            self.rnn = nn.LSTM(emb, hidden, batch_first=True)
        else:
            self.rnn = nn.RNN(emb, hidden, nonlinearity=cell, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(self.emb(x))
        return self.head(out)


def digits_cnn() -> nn.Module:
    """Two 3x3 conv layers (16, 32 channels) with max-pooling on the 8x8 digits, then a
    linear classifier."""
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 2 * 2, 10),
    )


def mlp(d_in: int, d_out: int, width: int = 128, depth: int = 2,
        act: Callable[[], nn.Module] = nn.ReLU) -> nn.Module:
    """``depth`` hidden layers of ``width`` with activation ``act`` (ReLU; PyTorch's default
    init)."""
    layers: list[nn.Module] = []
    d = d_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), act()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, d_out))


# ---- tasks ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    """A model and its data.

    Attributes:
        name: short identifier.
        model: builds the model (called after ``torch.manual_seed(seed)``).
        batches: ``seed -> batch(step)``, a deterministic training stream.
        held_out: the held-out batch the final evaluation loss is measured on.
        loss: ``loss(model(x), y)``.
    """

    name: str
    model: Callable[[], nn.Module]
    batches: Callable[[int], BatchFn]
    held_out: Callable[[], Batch]
    loss: LossFn


CE: LossFn = nn.functional.cross_entropy
MSE: LossFn = nn.functional.mse_loss

def pretrained_digits_mlp(steps: int = 1500) -> nn.Module:
    """The digits MLP trained to its best (Adam 1e-3, batches of 32, ``steps`` steps): the
    model a user fine-tunes, its training loss about 5e-4 from the first step. Called after
    ``torch.manual_seed(seed)``: its batches come from a stream seeded from that seed."""
    model = mlp(64, 10)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    batch = digits_batches(torch.initial_seed() + 1000)
    for step in range(steps):
        x, y = batch(step)
        loss = CE(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


CHAR_TRANSFORMER = Task("char_transformer", lambda: CharTransformer(corpus()[1]),
                        lm_batches, lm_eval, lm_loss)
CHAR_RNN_TANH = Task("char_rnn_tanh", lambda: CharRNN(corpus()[1], "tanh"),
                     lm_batches, lm_eval, lm_loss)
CHAR_LSTM = Task("char_lstm", lambda: CharRNN(corpus()[1], "lstm"), lm_batches, lm_eval,
                 lm_loss)
DIGITS_CNN = Task("digits_cnn", digits_cnn, digits_batches, digits_eval, CE)
DIGITS_MLP = Task("digits_mlp", lambda: mlp(64, 10), digits_batches, digits_eval, CE)
DIGITS_MLP_PRETRAINED = Task("digits_mlp_pretrained", pretrained_digits_mlp, digits_batches,
                             digits_eval, CE)
REGRESSION_MLP = Task("regression_mlp", lambda: mlp(16, 1, width=64), regression_batches,
                      regression_eval, MSE)


# ---- faults -----------------------------------------------------------------------------
class Fault(Protocol):
    """Something that goes wrong in a run, injected by the harness."""

    def batches(self, batch: BatchFn, steps: int, seed: int) -> tuple[BatchFn, frozenset[int]]:
        """Wrap the data stream; returns it and the steps whose batch is corrupted (their
        training loss says nothing about the model and is left out of the final loss)."""
        ...

    def after_backward(self, step: int, steps: int, model: nn.Module) -> None:
        """Runs after ``loss.backward()`` and before the optimizer (or guard) step."""
        ...


@dataclass(frozen=True)
class GradStorm:
    """Every gradient multiplied by ``factor`` for ``length`` consecutive steps, starting
    at ``start`` (a fraction of the run): a stretch of bad batches, a transient numerical
    blow-up in a layer."""

    factor: float = 100.0
    length: int = 20
    start: float = 0.3

    def first(self, steps: int) -> int:
        return int(self.start * steps)

    def batches(self, batch: BatchFn, steps: int, seed: int) -> tuple[BatchFn, frozenset[int]]:
        return batch, frozenset()

    def after_backward(self, step: int, steps: int, model: nn.Module) -> None:
        if self.first(steps) <= step < self.first(steps) + self.length:
            with torch.no_grad():
                for p in model.parameters():
                    if p.grad is not None:
                        p.grad.mul_(self.factor)


@dataclass(frozen=True)
class BadInputs:
    """A random ``fraction`` of the batches (seeded) has corrupted inputs: all NaN (a
    missing value in a sensor column, half of the bad batches) or scaled by ``scale`` (a
    unit error, the other half)."""

    fraction: float = 0.05
    scale: float = 1e4

    def batches(self, batch: BatchFn, steps: int, seed: int) -> tuple[BatchFn, frozenset[int]]:
        g = torch.Generator().manual_seed(seed + 99)
        pick = torch.rand(steps, generator=g) < self.fraction
        nan = torch.rand(steps, generator=g) < 0.5
        bad = frozenset(int(i) for i in pick.nonzero().flatten())

        def get(step: int) -> Batch:
            x, y = batch(step)
            if step in bad:
                x = torch.full_like(x, math.nan) if nan[step] else x * self.scale
            return x, y

        return get, bad

    def after_backward(self, step: int, steps: int, model: nn.Module) -> None:
        pass


# ---- recipes ----------------------------------------------------------------------------
@dataclass(frozen=True)
class WarmupCosine:
    """Linear warm-up over ``warmup`` of the run, then cosine decay to ``floor`` x peak
    (a ``LambdaLR``)."""

    warmup: float = 0.1
    floor: float = 0.1

    def __call__(self, opt: Optimizer, steps: int) -> LRScheduler:
        w = max(1, int(self.warmup * steps))

        def factor(step: int) -> float:
            if step < w:
                return (step + 1) / w
            t = min(1.0, (step - w) / max(1, steps - w))
            return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * t))

        return LambdaLR(opt, factor)


@dataclass(frozen=True)
class CosineRestarts:
    """``CosineAnnealingWarmRestarts`` with ``cycles`` equal cycles over the run."""

    cycles: int = 3

    def __call__(self, opt: Optimizer, steps: int) -> LRScheduler:
        return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
            opt, T_0=max(1, steps // self.cycles), eta_min=0.0)


@dataclass(frozen=True)
class StepDecay:
    """``StepLR``: the LR times ``gamma``, ``drops`` times evenly over the run."""

    drops: int = 2
    gamma: float = 0.3

    def __call__(self, opt: Optimizer, steps: int) -> LRScheduler:
        return torch.optim.lr_scheduler.StepLR(
            opt, step_size=max(1, steps // (self.drops + 1)), gamma=self.gamma)


@dataclass(frozen=True)
class Recipe:
    """How a user trains a task.

    Attributes:
        optimizer: the optimizer class (``torch.optim.SGD``, ``AdamW`` ...).
        lr: its learning rate (the peak LR under a schedule).
        options: the optimizer's other keyword arguments.
        schedule: ``(optimizer, steps) -> scheduler`` stepped once per step, or None.
        clip_norm: the user's own ``clip_grad_norm_`` (after the fault, before the step).
        fault: what goes wrong, or None.
    """

    optimizer: OptimizerFactory
    lr: float
    options: Mapping[str, Any] = field(default_factory=dict)
    schedule: ScheduleFactory | None = None
    clip_norm: float | None = None
    fault: Fault | None = None

    def make_optimizer(self, model: nn.Module) -> Optimizer:
        return self.optimizer(model.parameters(), lr=self.lr, **self.options)
