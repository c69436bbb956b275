"""Healthy real architectures: the libraries' default init, the optimizer and learning rate
their authors train them with (scaled to a small batch)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..cases import Case, Setup
from . import hf
from .data import ce, images, labels, lm_shifted, token_ids
from .nets import RNNLM, VGG, EncoderClassifier, MLPMixer, MobileNetV3, TimmResNet


def hf_batch(name: str, model: nn.Module) -> tuple[Any, Callable[..., torch.Tensor]]:
    """A batch that fits ``hf.SPECS[name]``'s input kind, and the loss it is trained with."""
    k = hf.kind(name)
    cfg = model.config  # type: ignore[union-attr]
    if k in ("img", "img64"):
        return images(hw=64 if k == "img64" else 32), ce
    ids = token_ids(vocab=cfg.vocab_size)
    if k == "lm":
        return (ids, ids), lm_shifted
    if k == "mlm":
        return (ids, ids), ce
    if k == "cls":
        return (ids, labels(ids.shape[0], cfg.num_labels)), ce
    dec = token_ids(vocab=cfg.vocab_size, t=16, seed=3)  # s2s: teacher forcing
    return ({"input_ids": ids, "decoder_input_ids": dec}, dec.roll(-1, 1)), ce


def hf_setup(name: str, opt: str = "adamw", lr: float = 1e-3, seed: int = 0, library_init: bool = False, **over: Any) -> Setup:
    model = hf.build(name, seed=seed, library_init=library_init, **over)
    batch, loss = hf_batch(name, model)
    return model, batch, loss, make_opt(model, opt, lr)


def make_opt(model: nn.Module, opt: str, lr: float) -> torch.optim.Optimizer:
    p = model.parameters()
    if opt == "adamw":
        return torch.optim.AdamW(p, lr=lr, weight_decay=0.01)
    if opt == "adam":
        return torch.optim.Adam(p, lr=lr)
    if opt == "sgd":
        return torch.optim.SGD(p, lr=lr, momentum=0.9, weight_decay=1e-4)
    if opt == "rmsprop":
        return torch.optim.RMSprop(p, lr=lr, alpha=0.9, eps=1e-3, momentum=0.9)
    raise ValueError(opt)


def _hf(name: str, opt: str = "adamw", lr: float = 1e-3) -> Case:
    return Case(f"hf_{name}", None, lambda: hf_setup(name, opt, lr))


def _net(model: nn.Module, batch: Any, loss: Callable[..., torch.Tensor], opt: str, lr: float) -> Setup:
    return model, batch, loss, make_opt(model, opt, lr)


def lstm_lm() -> Setup:
    torch.manual_seed(0)
    ids = token_ids(vocab=500)
    return _net(RNNLM(cell="LSTM"), (ids, ids), lm_shifted, "adam", 1e-3)


def gru_lm() -> Setup:
    torch.manual_seed(0)
    ids = token_ids(vocab=500, t=48)
    return _net(RNNLM(cell="GRU", dropout=0.2), (ids, ids), lm_shifted, "adam", 1e-3)


def encoder(norm_first: bool) -> Setup:
    torch.manual_seed(0)
    ids = token_ids(vocab=500)
    return _net(EncoderClassifier(norm_first=norm_first), (ids, labels(4, 5)), ce, "adamw", 5e-4)


def mobilenet_v3() -> Setup:
    torch.manual_seed(0)
    return _net(MobileNetV3(), images(hw=64), ce, "rmsprop", 1e-3)


def vgg11_bn() -> Setup:
    torch.manual_seed(0)
    return _net(VGG("A"), images(), ce, "sgd", 0.01)


def timm_resnet18() -> Setup:
    torch.manual_seed(0)
    return _net(TimmResNet(), images(hw=64), ce, "sgd", 0.1)


def mlp_mixer() -> Setup:
    torch.manual_seed(0)
    return _net(MLPMixer(), images(), ce, "adamw", 1e-3)


REAL_HEALTHY: list[Case] = [
    _hf("gpt2", "adamw", 6e-4),
    _hf("llama", "adamw", 3e-4),
    _hf("mistral", "adamw", 3e-4),
    _hf("qwen2", "adamw", 3e-4),
    _hf("gpt_neox", "adamw", 3e-4),
    _hf("opt", "adamw", 3e-4),
    _hf("phi", "adamw", 3e-4),
    _hf("bloom", "adamw", 3e-4),
    _hf("bert", "adamw", 1e-4),
    _hf("albert", "adamw", 1e-4),
    _hf("roberta", "adamw", 2e-5),
    _hf("distilbert", "adamw", 5e-5),
    _hf("deberta_v2", "adamw", 2e-5),
    _hf("t5", "adamw", 1e-3),
    _hf("bart", "adamw", 3e-4),
    _hf("resnet", "sgd", 0.1),
    _hf("convnext", "adamw", 4e-3),
    _hf("convnextv2", "adamw", 4e-3),
    _hf("mobilenet_v1", "rmsprop", 1e-3),
    _hf("mobilenet_v2", "sgd", 0.05),
    _hf("efficientnet", "rmsprop", 1e-3),
    _hf("regnet", "sgd", 0.1),
    _hf("vit", "adamw", 1e-3),
    _hf("swin", "adamw", 1e-3),
    _hf("dinov2", "adamw", 1e-3),
    _hf("beit", "adamw", 1e-3),
    _hf("poolformer", "adamw", 1e-3),
    _hf("focalnet", "adamw", 1e-3),
    _hf("mobilevit", "adamw", 2e-3),
    _hf("levit", "adamw", 5e-4),
    _hf("pvt_v2", "adamw", 1e-3),
    Case("lstm_lm", None, lstm_lm),
    Case("gru_lm", None, gru_lm),
    Case("torch_encoder_pre_ln", None, lambda: encoder(True)),
    Case("torch_encoder_post_ln", None, lambda: encoder(False)),
    Case("mobilenet_v3_small", None, mobilenet_v3),
    Case("vgg11_bn", None, vgg11_bn),
    Case("timm_resnet18", None, timm_resnet18),
    Case("mlp_mixer", None, mlp_mixer),
]
