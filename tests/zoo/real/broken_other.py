"""Real architectures broken on purpose: non-finite values, input scale, custom backwards,
disconnected layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cases import Case, Setup
from ..models import BadSwish
from . import hf
from .data import ce, images, labels, token_ids
from .healthy import hf_setup, make_opt
from .nets import EncoderClassifier, MobileNetV3, TimmResNet


# ---- nonfinite_input / nonfinite_loss / half_precision_overflow / unscaled_input ---------------
def efficientnet_nan_pixel() -> Setup:
    m, (x, y), loss, opt = hf_setup("efficientnet", "rmsprop", 1e-3)
    x[3, 1, 7, 7] = float("nan")
    return m, (x, y), loss, opt


def vit_inf_pixel() -> Setup:
    m, (x, y), loss, opt = hf_setup("vit")
    x[0, 0, 0, 0] = float("inf")
    return m, (x, y), loss, opt


def bert_masked_mean_no_mask() -> Setup:
    """BERT MLM whose loss averages over masked positions: a batch with none masked is 0/0."""
    m, (ids, _), _, opt = hf_setup("bert", "adamw", 1e-4)
    mask = torch.zeros_like(ids, dtype=torch.bool)

    def masked_mlm(out: object, t: Tensor) -> Tensor:
        per_tok = F.cross_entropy(out.logits.transpose(1, 2), t, reduction="none")  # type: ignore[attr-defined]
        return (per_tok * mask).sum() / mask.sum()

    return m, (ids, ids), masked_mlm, opt


def clip_style_log_softmax_by_hand() -> Setup:
    """A contrastive image classifier (ConvNeXt) with temperature 0.001 and log(softmax)
    written by hand: the softmax underflows to 0 and its log is -inf."""
    m, (x, y), _, opt = hf_setup("convnext")

    def loss(out: object, t: Tensor) -> Tensor:
        p = torch.softmax(out.logits / 1e-3, dim=-1)  # type: ignore[attr-defined]
        return -torch.log(p.gather(1, t[:, None])).mean()

    return m, (x, y), loss, opt


def autoencoder_fp16_sum_loss() -> Setup:
    """A conv autoencoder in float16 with a sum-reduced MSE: the loss overflows 65504."""
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(),
        nn.ConvTranspose2d(32, 16, 4, 2, 1), nn.ReLU(), nn.ConvTranspose2d(16, 3, 4, 2, 1),
    ).half()
    x = images(n=16, hw=64)[0].half()
    return m, (x, x), lambda out, t: F.mse_loss(out, t, reduction="sum"), make_opt(m, "adam", 1e-3)




def convnext_raw_pixels() -> Setup:
    """ConvNeXt fed raw 0..255 pixels (the normalisation step forgotten)."""
    m, (x, y), loss, opt = hf_setup("convnext")
    return m, ((x * 0.25 + 0.5).clamp(0, 1) * 255.0, y), loss, opt


def tabular_encoder_unscaled() -> Setup:
    """A TransformerEncoder over tabular rows with features in dollars and square feet."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 12, 8, generator=g) * torch.tensor([1, 1, 3e4, 1, 2e3, 1, 1, 5e5])
    m = _TabularEncoder()
    return m, (x, labels(16, 3)), ce, make_opt(m, "adamw", 1e-3)


class _TabularEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, norm_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.enc(self.inp(x)).mean(1))


# ---- wrong_gradient / disconnected_layer ----------------------------------------------------
class _BadSwishModule(nn.Module):
    def __init__(self, inplace: bool = False) -> None:
        super().__init__()

    def forward(self, x: Tensor) -> Tensor:
        return BadSwish.apply(x)


def timm_resnet_custom_swish() -> Setup:
    """timm ResNet-18 with a hand-written Swish autograd.Function whose backward is wrong,
    used as ``act_layer`` in all 17 places."""
    torch.manual_seed(0)
    m = TimmResNet(act=_BadSwishModule)
    return m, images(hw=64), ce, make_opt(m, "sgd", 0.02)


def encoder_custom_gelu_wrong() -> Setup:
    """nn.TransformerEncoder classifier (pre-LN) whose FFN activation is a custom Function
    with a wrong backward."""
    torch.manual_seed(0)
    m = EncoderClassifier()
    for layer in m.enc.layers:
        layer.activation = _BadSwishModule()
    ids = token_ids(vocab=500)
    return m, (ids, labels(4, 5)), ce, make_opt(m, "adamw", 5e-4)


class _Probe(nn.Module):
    """A classifier on features the user detached by mistake (meant to fine-tune all)."""

    def __init__(self, backbone: nn.Module, d: int, k: int = 10) -> None:
        super().__init__()
        self.backbone, self.head = backbone, nn.Linear(d, k)

    def forward(self, x: Tensor) -> Tensor:
        feats = self.backbone(x).pooler_output.flatten(1).detach()
        return self.head(feats)


def convnext_features_detached() -> Setup:

    torch.manual_seed(0)
    m = _Probe(hf.build("convnext").convnext, 128)
    return m, images(), ce, make_opt(m, "adamw", 1e-3)


def mobilenet_v3_unused_classifier() -> Setup:
    """MobileNetV3 whose forward returns pooled features to a new head: the library's own
    classifier is still in the model and in the optimizer but never used."""
    torch.manual_seed(0)
    inner = MobileNetV3()
    m = _NewHead(inner)
    return m, images(hw=64), ce, make_opt(m, "rmsprop", 1e-3)


class _NewHead(nn.Module):
    def __init__(self, net: MobileNetV3) -> None:
        super().__init__()
        self.net, self.head = net, nn.Linear(net.classifier[0].in_features, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.adaptive_avg_pool2d(self.net.features(x), 1).flatten(1))


OTHER: list[Case] = [
    Case("efficientnet_nan_pixel", "nonfinite_input", efficientnet_nan_pixel),
    Case("vit_inf_pixel", "nonfinite_input", vit_inf_pixel),
    Case("bert_masked_mean_no_mask", "nonfinite_loss", bert_masked_mean_no_mask),
    Case("convnext_log_softmax_t1e-3", "nonfinite_loss", clip_style_log_softmax_by_hand),
    Case("autoencoder_fp16_sum_loss", "half_precision_overflow", autoencoder_fp16_sum_loss),
    Case("convnext_raw_pixels", "unscaled_input", convnext_raw_pixels),
    Case("tabular_encoder_unscaled", "unscaled_input", tabular_encoder_unscaled),
    Case("timm_resnet_bad_swish", "wrong_gradient", timm_resnet_custom_swish),
    Case("encoder_bad_custom_gelu", "wrong_gradient", encoder_custom_gelu_wrong),
    Case("convnext_features_detached", "disconnected_layer", convnext_features_detached),
    Case("mobilenet_v3_unused_classifier", "disconnected_layer", mobilenet_v3_unused_classifier),
]
