"""Real architectures broken on purpose, each in one way a user breaks them, with the cause
the doctor must name first."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cases import Case, Setup
from ..models import BadSwish
from .data import ce, images, labels, lm_shifted, token_ids
from .healthy import hf_setup, make_opt
from .nets import (
    RNNLM,
    VGG,
    EncoderClassifier,
    InplaceSigmoid,
    InplaceTanh,
    MLPMixer,
    MobileNetV3,
    TimmResNet,
)


def _scale_weights_(model: nn.Module, factor: float) -> nn.Module:
    """Every weight matrix/kernel times ``factor`` (not the norm layers' gains)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.mul_(factor)
    return model


def _with(setup: Setup, opt: str, lr: float) -> Setup:
    m, b, loss, _ = setup
    return m, b, loss, make_opt(m, opt, lr)


# ---- init_too_small / init_too_large -----------------------------------------------------
def gpt2_weights_tiny_sgd() -> Setup:
    """GPT-2 with every weight x0.01 (a wrong unit in a custom init), trained with SGD."""
    m, b, loss, _ = hf_setup("gpt2")
    return _scale_weights_(m, 0.01), b, loss, make_opt(m, "sgd", 0.1)


def llama_init_range_tiny_sgd() -> Setup:
    """Llama with ``initializer_range=1e-4`` (meant 1e-2), SGD."""
    return hf_setup("llama", "sgd", 0.1, initializer_range=1e-4)


def vgg16_std_tiny() -> Setup:
    """VGG-16 without BN, weights drawn N(0, 1e-3) (the bias-style init used for weights)."""
    torch.manual_seed(0)
    m = VGG("D", bn=False)
    for c in m.modules():
        if isinstance(c, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(c.weight, std=1e-3)
    return m, images(), ce, make_opt(m, "sgd", 0.01)


def vgg11_randn_weights() -> Setup:
    """VGG-11 without BN, weights from ``torch.randn`` (std 1: no fan-in scaling)."""
    torch.manual_seed(0)
    m = VGG("A", bn=False)
    for c in m.modules():
        if isinstance(c, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(c.weight, std=1.0)
    return m, images(), ce, make_opt(m, "sgd", 0.01)


def mixer_std_one() -> Setup:
    """MLP-Mixer with its Linear layers drawn N(0, 1) (no fan-in scaling)."""
    torch.manual_seed(0)
    m = MLPMixer()
    for name, c in m.named_modules():
        if isinstance(c, nn.Linear) and not name.startswith("head"):
            nn.init.normal_(c.weight, std=1.0)
    return m, images(), ce, make_opt(m, "adamw", 1e-3)


def gpt2_init_range_one() -> Setup:
    """GPT-2 with ``initializer_range=1.0`` (meant 0.02)."""
    return hf_setup("gpt2", "adamw", 6e-4, initializer_range=1.0)


# ---- saturating_activation -----------------------------------------------------------------
def timm_resnet_sigmoid_no_bn() -> Setup:
    """timm ResNet-18 with ``act_layer=Sigmoid(inplace=True)`` and no norm layer."""
    torch.manual_seed(0)
    m = TimmResNet(act=InplaceSigmoid, norm=nn.Identity)
    return m, images(hw=64), ce, make_opt(m, "sgd", 0.05)


def vgg16_sigmoid() -> Setup:
    """VGG-16 without BN, with sigmoid activations (the classic vanishing-gradient setup)."""
    torch.manual_seed(0)
    m = VGG("D", bn=False, act=nn.Sigmoid)
    return m, images(), ce, make_opt(m, "sgd", 0.01)


def timm_resnet_tanh_no_bn() -> Setup:
    """timm ResNet-18 with ``Tanh(inplace=True)``, no norm layer, weights x3."""
    torch.manual_seed(0)
    m = _scale_weights_(TimmResNet(act=InplaceTanh, norm=nn.Identity), 3.0)
    return m, images(hw=64), ce, make_opt(m, "sgd", 0.05)


def mobilenet_v2_relu6_saturated() -> Setup:
    """MobileNetV2 with its BN layers removed and weights x4: ReLU6 units pinned at 6."""
    m, b, loss, _ = hf_setup("mobilenet_v2")
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.fill_(20.0)
    return m, b, loss, make_opt(m, "sgd", 0.01)


# ---- dead_units ------------------------------------------------------------------------
def resnet_bn_bias_negative() -> Setup:
    """HF ResNet whose BN shifts were set to -3 (a wrong ``bias`` init): ReLUs all off."""
    m, b, loss, opt = hf_setup("resnet", "sgd", 0.02)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.bias.fill_(-3.0)
    return m, b, loss, opt


def vgg11_bias_negative() -> Setup:
    """VGG-11 (BN) whose conv layers end in BN shifts of -2: most ReLUs never fire."""
    torch.manual_seed(0)
    m = VGG("A")
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.bias.fill_(-2.5)
    return m, images(), ce, make_opt(m, "sgd", 0.01)


# ---- lr_too_high -------------------------------------------------------------------------
def bert_adamw_lr_one() -> Setup:
    return hf_setup("bert", "adamw", 1.0)


def vit_sgd_lr_huge() -> Setup:
    return hf_setup("vit", "sgd", 30.0)


def gpt2_adam_lr_high() -> Setup:
    """GPT-2 with Adam at lr 1 (the Adadelta-style default), not 1e-4."""
    return hf_setup("gpt2", "adam", 1.0)


def efficientnet_library_init() -> Setup:
    """transformers' EfficientNet as its ``_init_weights`` leaves it: BatchNorm gains drawn
    from N(0, 0.02) with eps 1e-3, so every BN scales the signal down (logits ~1e-33)."""
    return hf_setup("efficientnet", "rmsprop", 1e-3, library_init=True)


def timm_resnet_no_norm() -> Setup:
    """timm ResNet-18 with ``norm_layer=nn.Identity`` and its He init: without BN (or a
    Fixup-style rescaling) every residual block adds its variance to the stream."""
    torch.manual_seed(0)
    m = TimmResNet(norm=nn.Identity, zero_init_last=False, depths=(3, 4, 6, 3))
    return m, images(hw=64), ce, make_opt(m, "sgd", 0.05)


def lstm_lm_sgd_lr_huge() -> Setup:
    torch.manual_seed(0)
    ids = token_ids(vocab=500)
    m = RNNLM(cell="LSTM")
    return m, (ids, ids), lm_shifted, make_opt(m, "sgd", 500.0)


def convnext_adamw_lr_high() -> Setup:
    return hf_setup("convnext", "adamw", 1.0)


# ---- recurrent_explosion / recurrent_vanishing -------------------------------------------------
def irnn_lm_identity_scaled() -> Setup:
    """An IRNN language model (ReLU RNN, identity recurrent init; Le et al. 2015) with the
    identity scaled to 1.5 instead of 1."""
    torch.manual_seed(0)
    ids = token_ids(vocab=500, t=48)
    m = RNNLM(cell="RNN", layers=1, nonlinearity="relu")
    with torch.no_grad():
        m.rnn.weight_hh_l0.copy_(1.5 * torch.eye(128))
    return m, (ids, ids), lm_shifted, make_opt(m, "adam", 1e-3)


def rnn_classifier_orthogonal_x3() -> Setup:
    """A ReLU ``nn.RNN`` sequence classifier with recurrent weights 3 x orthogonal."""
    torch.manual_seed(0)
    m = _SeqClassifier(nn.RNN(16, 64, batch_first=True, nonlinearity="relu"))
    with torch.no_grad():
        nn.init.orthogonal_(m.rnn.weight_hh_l0, gain=3.0)
    return m, _seq_batch(40), ce, make_opt(m, "adam", 1e-3)


def tanh_rnn_lm_long() -> Setup:
    """A vanilla tanh RNN language model on 128-token sequences (PyTorch's default init)."""
    torch.manual_seed(0)
    ids = token_ids(n=2, vocab=500, t=128)
    m = RNNLM(cell="RNN", layers=1)
    return m, (ids, ids), lm_shifted, make_opt(m, "adam", 1e-3)


def lstm_forget_gate_shut() -> Setup:
    """An LSTM LM whose forget-gate biases were initialised to -6 (the sign flipped)."""
    torch.manual_seed(0)
    ids = token_ids(vocab=500, t=64)
    m = RNNLM(cell="LSTM", layers=1)
    with torch.no_grad():
        h = m.rnn.hidden_size
        m.rnn.bias_ih_l0[h : 2 * h] = -6.0
        m.rnn.bias_hh_l0[h : 2 * h] = 0.0
    return m, (ids, ids), lm_shifted, make_opt(m, "adam", 1e-3)


def gru_classifier_update_gate_open() -> Setup:
    """A GRU classifier whose update-gate bias is -6: it never carries its state over."""
    torch.manual_seed(0)
    m = _SeqClassifier(nn.GRU(16, 64, batch_first=True))
    with torch.no_grad():
        m.rnn.bias_ih_l0[64:128] = -6.0
    return m, _seq_batch(60), ce, make_opt(m, "adam", 1e-3)


class _SeqClassifier(nn.Module):
    def __init__(self, rnn: nn.RNNBase, k: int = 4) -> None:
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(rnn.hidden_size, k)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(x)[0][:, -1])


def _seq_batch(t: int, n: int = 8, k: int = 4) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, t, 16, generator=g), torch.randint(0, k, (n,), generator=g)


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


def gpt2_fp16_big_residual() -> Setup:
    """GPT-2 in float16 whose embeddings were scaled x1e4 (a wrong input scale in half)."""
    m, b, loss, _ = hf_setup("gpt2")
    with torch.no_grad():
        m.transformer.wpe.weight.mul_(2e5)
    m = m.half()
    return m, b, loss, make_opt(m, "adamw", 6e-4)


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
    from . import hf

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


# ---- cases added after the probes were settled (not tuned on) -------------------------------
def bert_init_range_tiny_sgd() -> Setup:
    """BERT (post-LN) with ``initializer_range=1e-4``, trained with SGD."""
    return hf_setup("bert", "sgd", 0.1, initializer_range=1e-4)


def vit_init_range_one() -> Setup:
    """ViT with ``initializer_range=1.0`` (meant 0.02)."""
    return hf_setup("vit", "adamw", 1e-3, initializer_range=1.0)


def t5_adamw_lr_ten() -> Setup:
    return hf_setup("t5", "adamw", 10.0)


def mobilenet_v3_bn_shift_negative() -> Setup:
    """MobileNetV3 whose BN shifts were initialised to -5: Hardswish/ReLU units all off."""
    torch.manual_seed(0)
    m = MobileNetV3()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.bias.fill_(-5.0)
    return m, images(hw=64), ce, make_opt(m, "rmsprop", 1e-3)


class _MeanPooled(nn.Module):
    """DistilBERT sentence classifier with masked mean pooling written by hand."""

    def __init__(self) -> None:
        super().__init__()
        from . import hf

        self.enc = hf.build("distilbert").distilbert
        self.head = nn.Linear(64, 3)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        h = self.enc(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).float()
        return self.head((h * m).sum(1) / m.sum(1))


def distilbert_empty_text_mean_pool() -> Setup:
    """A batch with one empty text (attention mask all 0): the hand-written mean pool divides
    0 by 0 inside the model."""
    torch.manual_seed(0)
    m = _MeanPooled()
    ids = token_ids()
    mask = torch.ones_like(ids)
    mask[2] = 0
    return m, ((ids, mask), labels(4, 3)), ce, make_opt(m, "adamw", 5e-5)


def regnet_raw_pixels() -> Setup:
    m, (x, y), loss, opt = hf_setup("regnet", "sgd", 0.1)
    return m, ((x * 0.25 + 0.5).clamp(0, 1) * 255.0, y), loss, opt


class _BadRMSNorm(torch.autograd.Function):
    """RMSNorm with a backward that forgets the normalisation's own derivative."""

    @staticmethod
    def forward(ctx, x, w):  # type: ignore[override]
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        ctx.save_for_backward(x, w, r)
        return x * r * w

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, w, r = ctx.saved_tensors
        return g * w * r, (g * x * r).sum(tuple(range(g.ndim - 1)))


class _FusedRMSNorm(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor) -> Tensor:
        return _BadRMSNorm.apply(x, self.weight)


def llama_custom_rmsnorm() -> Setup:
    """Llama whose RMSNorm layers were swapped for a hand-written fused Function."""
    m, b, loss, _ = hf_setup("llama", "adamw", 3e-4)
    for layer in m.model.layers:
        layer.input_layernorm = _FusedRMSNorm(64)
        layer.post_attention_layernorm = _FusedRMSNorm(64)
    return m, b, loss, make_opt(m, "adamw", 3e-4)


def bert_pretraining_mlm_only() -> Setup:
    """BertForPreTraining trained on its MLM logits only: the pooler and the next-sentence
    head are in the optimizer but never reached by the loss."""
    import transformers

    from .hf import SPECS

    torch.manual_seed(0)
    m = transformers.BertForPreTraining(transformers.BertConfig(**SPECS["bert"][2]))
    ids = token_ids()

    def mlm(out: object, t: Tensor) -> Tensor:
        z = out.prediction_logits  # type: ignore[attr-defined]
        return F.cross_entropy(z.reshape(-1, z.shape[-1]), t.reshape(-1))

    return m, (ids, ids), mlm, make_opt(m, "adamw", 1e-4)


REAL_BROKEN: list[Case] = [
    Case("gpt2_weights_x0.01_sgd", "init_too_small", gpt2_weights_tiny_sgd, slow=True),
    Case("llama_init_range_1e-4_sgd", "init_too_small", llama_init_range_tiny_sgd),
    Case("vgg16_std_1e-3", "init_too_small", vgg16_std_tiny),
    Case("vgg11_randn_weights", "init_too_large", vgg11_randn_weights),
    Case("timm_resnet34_no_norm", "init_too_large", timm_resnet_no_norm),
    Case("hf_efficientnet_library_init", "init_too_small", efficientnet_library_init),
    Case("gpt2_init_range_1", "init_too_large", gpt2_init_range_one, slow=True),
    Case("timm_resnet_sigmoid_no_bn", "saturating_activation", timm_resnet_sigmoid_no_bn),
    Case("vgg16_sigmoid", "saturating_activation", vgg16_sigmoid),
    Case("timm_resnet_tanh_no_bn_x3", "saturating_activation", timm_resnet_tanh_no_bn),
    Case("mobilenet_v2_relu6_pinned", "saturating_activation", mobilenet_v2_relu6_saturated),
    Case("resnet_bn_shift_-3", "dead_units", resnet_bn_bias_negative),
    Case("vgg11_bn_shift_-2.5", "dead_units", vgg11_bias_negative),
    Case("bert_adamw_lr_1", "lr_too_high", bert_adamw_lr_one),
    Case("vit_sgd_lr_30", "lr_too_high", vit_sgd_lr_huge),
    Case("gpt2_adam_lr_1", "lr_too_high", gpt2_adam_lr_high, slow=True),
    Case("lstm_lm_sgd_lr_500", "lr_too_high", lstm_lm_sgd_lr_huge),
    Case("convnext_adamw_lr_1", "lr_too_high", convnext_adamw_lr_high),
    Case("irnn_lm_identity_x1.5", "recurrent_explosion", irnn_lm_identity_scaled),
    Case("relu_rnn_orthogonal_x3", "recurrent_explosion", rnn_classifier_orthogonal_x3),
    Case("tanh_rnn_lm_128_steps", "recurrent_vanishing", tanh_rnn_lm_long),
    Case("lstm_forget_gate_-6", "recurrent_vanishing", lstm_forget_gate_shut),
    Case("gru_update_gate_-6", "recurrent_vanishing", gru_classifier_update_gate_open),
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
    Case("bert_init_range_1e-4_sgd", "init_too_small", bert_init_range_tiny_sgd),
    Case("vit_init_range_1", "init_too_large", vit_init_range_one),
    Case("t5_adamw_lr_10", "lr_too_high", t5_adamw_lr_ten),
    Case("mobilenet_v3_bn_shift_-5", "dead_units", mobilenet_v3_bn_shift_negative),
    Case("distilbert_empty_text_mean_pool", "nonfinite_loss", distilbert_empty_text_mean_pool),
    Case("regnet_raw_pixels", "unscaled_input", regnet_raw_pixels),
    Case("llama_custom_rmsnorm_backward", "wrong_gradient", llama_custom_rmsnorm),
    Case("bert_pretraining_mlm_only", "disconnected_layer", bert_pretraining_mlm_only),
]
