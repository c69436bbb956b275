"""Real architectures broken on purpose, each in one way a user breaks them, with the cause
the doctor must name first: the training-dynamics causes (init, activations, learning rate,
recurrences) here, the others in :mod:`.broken_other`, the cases added once the probes were
settled in :mod:`.held_out`."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..cases import Case, Setup
from .data import ce, images, lm_shifted, token_ids
from .healthy import hf_setup, make_opt
from .nets import (
    RNNLM,
    VGG,
    InplaceSigmoid,
    InplaceTanh,
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


DYNAMIC: list[Case] = [
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
]
