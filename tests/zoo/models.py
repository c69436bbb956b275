"""Model classes of the zoo, written in different styles."""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn


class FunctionalMLP(nn.Module):
    """Weights held in a ModuleList, activations called functionally."""

    def __init__(self, d_in: int, width: int, depth: int, d_out: int, act: str = "relu") -> None:
        super().__init__()
        dims = [d_in] + [width] * (depth - 1)
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(dims))
        self.out = nn.Linear(width, d_out)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for lin in self.hidden:
            z = lin(x)
            x = torch.sigmoid(z) if self.act == "sigmoid" else z.tanh() if self.act == "tanh" else F.relu(z)
        return self.out(x)


class SmallCNN(nn.Module):
    def __init__(self, c_in: int = 3, width: int = 8, depth: int = 4, k: int = 4, act: str = "relu", bn: bool = False) -> None:
        super().__init__()
        convs = []
        c = c_in
        for _ in range(depth):
            convs.append(nn.Conv2d(c, width, 3, padding=1))
            c = width
        self.convs = nn.ModuleList(convs)
        self.bns = nn.ModuleList(nn.BatchNorm2d(width) for _ in range(depth)) if bn else None
        self.head = nn.Linear(width, k)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if self.bns is not None:
                x = self.bns[i](x)
            x = torch.sigmoid(x) if self.act == "sigmoid" else F.gelu(x) if self.act == "gelu" else F.relu(x)
        return self.head(x.mean(dim=(2, 3)))


class ResBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


class ResNet(nn.Module):
    def __init__(self, c: int = 8, blocks: int = 4, k: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True))
        self.layers = nn.Sequential(*[ResBlock(c) for _ in range(blocks)])
        self.fc = nn.Linear(c, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layers(self.stem(x)).mean(dim=(2, 3)))


class RNNClassifier(nn.Module):
    def __init__(self, d: int = 8, h: int = 32, k: int = 3, cell: str = "lstm", nonlinearity: str = "tanh") -> None:
        super().__init__()
        if cell == "lstm":
            self.rnn: nn.RNNBase = nn.LSTM(d, h, batch_first=True)
        elif cell == "gru":
            self.rnn = nn.GRU(d, h, batch_first=True)
        else:
            self.rnn = nn.RNN(d, h, batch_first=True, nonlinearity=nonlinearity)
        self.fc = nn.Linear(h, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.fc(out[:, -1])


class LoopRNN(nn.Module):
    """A hand-written Elman RNN over time (time-major loop, shared weights)."""

    def __init__(self, d: int = 8, h: int = 32, k: int = 3, act: str = "tanh") -> None:
        super().__init__()
        self.inp = nn.Linear(d, h)
        self.rec = nn.Linear(h, h, bias=False)
        self.fc = nn.Linear(h, k)
        self.act = act
        self.h = h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.shape[0], self.h)
        for t in range(x.shape[1]):
            z = self.inp(x[:, t]) + self.rec(h)
            h = torch.tanh(z) if self.act == "tanh" else F.relu(z)
        return self.fc(h)


class CellLoop(nn.Module):
    """nn.LSTMCell / nn.RNNCell stepped by hand."""

    def __init__(self, d: int = 8, h: int = 32, k: int = 3, cell: str = "lstm") -> None:
        super().__init__()
        self.cell: nn.Module = nn.LSTMCell(d, h) if cell == "lstm" else nn.RNNCell(d, h)
        self.kind = cell
        self.fc = nn.Linear(h, k)
        self.h = h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.shape[0], self.h)
        c = x.new_zeros(x.shape[0], self.h)
        for t in range(x.shape[1]):
            if self.kind == "lstm":
                h, c = self.cell(x[:, t], (h, c))
            else:
                h = self.cell(x[:, t], h)
        return self.fc(h)


class Attention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)
        mask = torch.ones(t, t, dtype=torch.bool).tril()
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = Attention(d, heads)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int = 50, d: int = 32, heads: int = 4, layers: int = 3, t: int = 12) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(1, t, d))
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos[:, : idx.shape[1]]
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln(x))


def lm_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


class TorchEncoder(nn.Module):
    """nn.TransformerEncoder classifier (pre-LN)."""

    def __init__(self, d_in: int = 8, d: int = 32, k: int = 3, layers: int = 2) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        layer = nn.TransformerEncoderLayer(d, 4, 64, dropout=0.1, batch_first=True, norm_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.fc = nn.Linear(d, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.enc(self.inp(x)).mean(1))


class BadSquare(torch.autograd.Function):
    """x**2 with a wrong backward (3x instead of 2x)."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return g * 3 * x


class BadSwish(torch.autograd.Function):
    """x * sigmoid(x), backward forgets the product rule."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return g * torch.sigmoid(x)


class GoodSwish(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return g * (s + x * s * (1 - s))


class SwishMLP(nn.Module):
    def __init__(self, fn: type[torch.autograd.Function], d: int = 16, h: int = 32, k: int = 1) -> None:
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(d, h), nn.Linear(h, h), nn.Linear(h, k)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fn.apply(self.l1(x))
        x = self.fn.apply(self.l2(x))
        return self.l3(x)
