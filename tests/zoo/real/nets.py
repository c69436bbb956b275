"""Architectures written with torch.nn the way their reference implementations write them
(module structure, activations and weight init), at small width.

- :class:`MobileNetV3` follows torchvision's ``mobilenet_v3_small`` (Howard et al. 2019):
  depthwise convs, squeeze-excitation with Hardsigmoid, Hardswish, kaiming fan_out init.
- :class:`VGG` follows torchvision's ``vgg11``/``vgg16`` (Simonyan & Zisserman 2015).
- :class:`TimmResNet` follows timm's ``resnet18``: ``ReLU(inplace=True)``, the last BN of
  every block zero-initialised (``zero_init_last``); any activation/norm can be swapped in,
  as timm's ``act_layer``/``norm_layer`` arguments allow.
- :class:`MLPMixer` follows timm's ``mixer_s``: zero-initialised head (Tolstikhin et al. 2021).
- :class:`RNNLM` is PyTorch's word_language_model example (LSTM/GRU/RNN).
- :class:`EncoderClassifier` wraps ``nn.TransformerEncoder``, pre-LN or post-LN.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class InplaceSigmoid(nn.Module):
    """timm's ``Sigmoid(inplace=True)``: ``x.sigmoid_()``."""

    def __init__(self, inplace: bool = True) -> None:
        super().__init__()
        self.inplace = inplace

    def forward(self, x: Tensor) -> Tensor:
        return x.sigmoid_() if self.inplace else x.sigmoid()


class InplaceTanh(nn.Module):
    """timm's ``Tanh(inplace=True)``: ``x.tanh_()``."""

    def __init__(self, inplace: bool = True) -> None:
        super().__init__()
        self.inplace = inplace

    def forward(self, x: Tensor) -> Tensor:
        return x.tanh_() if self.inplace else x.tanh()


def torchvision_init_(model: nn.Module, conv_nonlinearity: str) -> None:
    """torchvision's classification init: convs kaiming fan_out, BN 1/0, Linear N(0, 0.01)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity=conv_nonlinearity)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


def _divisible(v: float, d: int = 8) -> int:
    new = max(d, int(v + d / 2) // d * d)
    return new + d if new < 0.9 * v else new


class _SE(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        s = _divisible(c // 4)
        self.fc1, self.fc2 = nn.Conv2d(c, s, 1), nn.Conv2d(s, c, 1)
        self.relu, self.gate = nn.ReLU(), nn.Hardsigmoid()

    def forward(self, x: Tensor) -> Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.fc2(self.relu(self.fc1(s))))


def _cba(c_in: int, c_out: int, k: int, s: int, act: type[nn.Module] | None, groups: int = 1) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, k, s, (k - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out)]
    if act is not None:
        layers.append(act(inplace=True) if act in (nn.ReLU, nn.Hardswish) else act())
    return nn.Sequential(*layers)


class _InvertedResidual(nn.Module):
    def __init__(self, c_in: int, k: int, exp: int, c_out: int, se: bool, act: type[nn.Module], s: int) -> None:
        super().__init__()
        self.res = s == 1 and c_in == c_out
        layers: list[nn.Module] = []
        if exp != c_in:
            layers.append(_cba(c_in, exp, 1, 1, act))
        layers.append(_cba(exp, exp, k, s, act, groups=exp))
        if se:
            layers.append(_SE(exp))
        layers.append(_cba(exp, c_out, 1, 1, None))
        self.block = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        y = self.block(x)
        return x + y if self.res else y


class MobileNetV3(nn.Module):
    """torchvision ``mobilenet_v3_small`` (``width`` scales the channels)."""

    SMALL = (  # in, kernel, expanded, out, SE, activation, stride
        (16, 3, 16, 16, True, "RE", 2), (16, 3, 72, 24, False, "RE", 2), (24, 3, 88, 24, False, "RE", 1),
        (24, 5, 96, 40, True, "HS", 2), (40, 5, 240, 40, True, "HS", 1), (40, 5, 240, 40, True, "HS", 1),
        (40, 5, 120, 48, True, "HS", 1), (48, 5, 144, 48, True, "HS", 1), (48, 5, 288, 96, True, "HS", 2),
        (96, 5, 576, 96, True, "HS", 1), (96, 5, 576, 96, True, "HS", 1),
    )

    def __init__(self, k: int = 10, width: float = 0.5) -> None:
        super().__init__()
        w = lambda c: _divisible(c * width)  # noqa: E731
        layers: list[nn.Module] = [_cba(3, w(16), 3, 2, nn.Hardswish)]
        for c_in, ks, exp, c_out, se, a, s in self.SMALL:
            layers.append(_InvertedResidual(w(c_in), ks, w(exp), w(c_out), se, nn.ReLU if a == "RE" else nn.Hardswish, s))
        last = w(576)
        layers.append(_cba(w(96), last, 1, 1, nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(last, 1024), nn.Hardswish(inplace=True), nn.Dropout(0.2), nn.Linear(1024, k))
        torchvision_init_(self, conv_nonlinearity="leaky_relu")  # mobilenetv3.py keeps the default

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


class VGG(nn.Module):
    """torchvision VGG (``cfg`` "A" = vgg11, "D" = vgg16) at ``1/shrink`` width, with or
    without BatchNorm, any activation, torchvision's init."""

    CFG: ClassVar[dict[str, tuple[int | str, ...]]] = {
        "A": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
        "D": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    }

    def __init__(self, cfg: str = "A", k: int = 10, shrink: int = 8, bn: bool = True, act: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for v in self.CFG[cfg]:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            assert isinstance(v, int)
            out = v // shrink
            layers.append(nn.Conv2d(c, out, 3, padding=1))
            if bn:
                layers.append(nn.BatchNorm2d(out))
            layers.append(act(inplace=True) if act is nn.ReLU else act())
            c = out
        self.features = nn.Sequential(*layers)
        hidden = 4096 // shrink // 4
        self.classifier = nn.Sequential(
            nn.Linear(c, hidden), act(), nn.Dropout(), nn.Linear(hidden, hidden), act(), nn.Dropout(), nn.Linear(hidden, k)
        )
        torchvision_init_(self, conv_nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


class _Basic(nn.Module):
    def __init__(self, c_in: int, c: int, s: int, act: type[nn.Module], norm: type[nn.Module]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c, 3, s, 1, bias=False)
        self.bn1 = norm(c)
        self.act1 = act(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = norm(c)
        self.act2 = act(inplace=True)
        self.downsample = (
            nn.Sequential(nn.Conv2d(c_in, c, 1, s, bias=False), norm(c)) if s != 1 or c_in != c else None
        )

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.act1(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.act2(y + shortcut)


class TimmResNet(nn.Module):
    """timm ``resnet18`` at ``width`` base channels; ``act``/``norm`` as timm's
    ``act_layer``/``norm_layer`` (``nn.Identity`` for no norm)."""

    def __init__(
        self,
        k: int = 10,
        width: int = 16,
        depths: tuple[int, ...] = (2, 2, 2, 2),
        act: type[nn.Module] = nn.ReLU,
        norm: type[nn.Module] = nn.BatchNorm2d,
        zero_init_last: bool = True,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = norm(width)
        self.act1 = act(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, c = [], width
        for i, d in enumerate(depths):
            out = width * 2**i
            stages.append(nn.Sequential(*[_Basic(c if j == 0 else out, out, 2 if (i and j == 0) else 1, act, norm) for j in range(d)]))
            c = out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(c, k)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_last:
            for m in self.modules():
                if isinstance(m, _Basic) and isinstance(m.bn2, nn.BatchNorm2d):
                    nn.init.zeros_(m.bn2.weight)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean((2, 3)))


class _MixerMlp(nn.Module):
    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _MixerBlock(nn.Module):
    def __init__(self, d: int, tokens: int) -> None:
        super().__init__()
        self.norm1, self.mlp_tokens = nn.LayerNorm(d, eps=1e-6), _MixerMlp(tokens, tokens // 2)
        self.norm2, self.mlp_channels = nn.LayerNorm(d, eps=1e-6), _MixerMlp(d, 4 * d)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.mlp_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.mlp_channels(self.norm2(x))


class MLPMixer(nn.Module):
    """timm ``mixer_s16`` at small size, timm's init (head zero-initialised)."""

    def __init__(self, k: int = 10, img: int = 32, patch: int = 4, d: int = 64, depth: int = 4) -> None:
        super().__init__()
        tokens = (img // patch) ** 2
        self.stem = nn.Conv2d(3, d, patch, patch)
        self.blocks = nn.Sequential(*[_MixerBlock(d, tokens) for _ in range(depth)])
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.head = nn.Linear(d, k)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                if name.startswith("head"):
                    nn.init.zeros_(m.weight)
                    nn.init.zeros_(m.bias)
                else:
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.normal_(m.bias, std=1e-6)
            elif isinstance(m, nn.Conv2d):  # lecun normal
                nn.init.trunc_normal_(m.weight, std=1 / math.sqrt(m.weight[0].numel()))
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.blocks(x)).mean(1))


class RNNLM(nn.Module):
    """PyTorch's word_language_model: embedding, a recurrent stack, a decoder (init
    uniform ±0.1, zero decoder bias)."""

    def __init__(self, vocab: int = 500, d: int = 64, h: int = 128, layers: int = 2, cell: str = "LSTM", **rnn_kw: object) -> None:
        super().__init__()
        self.encoder = nn.Embedding(vocab, d)
        self.rnn: nn.RNNBase = getattr(nn, cell)(d, h, layers, batch_first=True, **rnn_kw)
        self.decoder = nn.Linear(h, vocab)
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def forward(self, ids: Tensor) -> Tensor:
        out, _ = self.rnn(self.encoder(ids))
        return self.decoder(out)


class EncoderClassifier(nn.Module):
    """Token + learned position embedding, ``nn.TransformerEncoder``, mean pool, linear head."""

    def __init__(self, vocab: int = 500, d: int = 64, layers: int = 4, k: int = 5, t: int = 32, norm_first: bool = True) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(1, t, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.1, batch_first=True, norm_first=norm_first, activation="gelu")
        self.enc = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(d) if norm_first else None, enable_nested_tensor=False)
        self.head = nn.Linear(d, k)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.enc(self.tok(ids) + self.pos[:, : ids.shape[1]]).mean(1))
