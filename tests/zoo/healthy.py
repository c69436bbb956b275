"""Healthy setups: well-initialised models with a sane learning rate."""

from __future__ import annotations

import torch
from torch import nn

from .cases import Case, classification, images, init_linear_, mlp, regression, sequences, tokens
from .models import (
    CellLoop,
    FunctionalMLP,
    GoodSwish,
    ResNet,
    RNNClassifier,
    SmallCNN,
    SwishMLP,
    TinyGPT,
    TorchEncoder,
    lm_loss,
)


def _seed(s: int = 0) -> None:
    torch.manual_seed(s)


def he_mlp_deep():
    _seed()
    m = init_linear_(mlp(16, 64, 20, 1), "he")
    return m, regression(), nn.MSELoss(), torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)


def he_mlp_very_deep_narrow():
    _seed()
    m = init_linear_(mlp(16, 32, 40, 5), "he")
    return m, classification(), nn.CrossEntropyLoss(), torch.optim.Adam(m.parameters(), lr=1e-4)


def default_mlp_shallow():
    _seed()
    m = mlp(16, 64, 3, 5)
    return m, classification(), nn.CrossEntropyLoss(), torch.optim.Adam(m.parameters(), lr=1e-3)


def xavier_tanh_mlp():
    _seed()
    m = FunctionalMLP(16, 64, 8, 5, act="tanh")
    init_linear_(m, "xavier_tanh")
    return m, classification(), nn.CrossEntropyLoss(), torch.optim.SGD(m.parameters(), lr=0.01)


def bn_cnn():
    _seed()
    m = SmallCNN(depth=5, width=16, bn=True)
    init_linear_(m, "he")
    return m, images(), nn.CrossEntropyLoss(), torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)


def gelu_cnn_default():
    _seed()
    m = SmallCNN(depth=3, width=16, act="gelu")
    return m, images(), nn.CrossEntropyLoss(), torch.optim.AdamW(m.parameters(), lr=1e-3)


def resnet():
    _seed()
    m = ResNet(c=8, blocks=4)
    for mod in m.modules():
        if isinstance(mod, nn.Conv2d):
            nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
    return m, images(), nn.CrossEntropyLoss(), torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)


def lstm_classifier():
    _seed()
    m = RNNClassifier(cell="lstm")
    return m, sequences(t=20), nn.CrossEntropyLoss(), torch.optim.Adam(m.parameters(), lr=1e-3)


def gru_classifier():
    _seed()
    m = RNNClassifier(cell="gru")
    return m, sequences(t=15), nn.CrossEntropyLoss(), torch.optim.Adam(m.parameters(), lr=1e-3)


def lstm_cell_loop():
    _seed()
    m = CellLoop(cell="lstm")
    return m, sequences(t=12), nn.CrossEntropyLoss(), torch.optim.Adam(m.parameters(), lr=2e-3)


def tiny_gpt():
    _seed()
    m = TinyGPT(layers=3)
    return m, tokens(), lm_loss, torch.optim.AdamW(m.parameters(), lr=3e-4)


def torch_encoder():
    _seed()
    m = TorchEncoder()
    return m, sequences(t=10), nn.CrossEntropyLoss(), torch.optim.AdamW(m.parameters(), lr=5e-4)


def swish_custom_fn():
    _seed()
    m = SwishMLP(GoodSwish)
    return m, regression(), nn.MSELoss(), torch.optim.Adam(m.parameters(), lr=1e-3)


def sigmoid_output_bce():
    _seed()
    m = init_linear_(mlp(16, 32, 4, 1), "he")
    x, _ = regression()
    y = (x[:, :1] > 0).float()
    return m, (x, y), nn.BCEWithLogitsLoss(), torch.optim.SGD(m.parameters(), lr=0.05)


def embedding_bag_text():
    _seed()
    m = nn.Sequential(nn.EmbeddingBag(100, 32), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 100, (32, 10), generator=g)
    y = torch.randint(0, 2, (32,), generator=g)
    return m, (x, y), nn.CrossEntropyLoss(), torch.optim.Adam(m.parameters(), lr=1e-3)


def dropout_mlp_no_opt():
    _seed()
    m = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 1))
    return m, regression(), nn.MSELoss(), None


def lstm_long_sequence():
    _seed()
    m = RNNClassifier(cell="lstm")  # gradients to step 1 shrink at init: an info, not a warning
    return m, sequences(t=80), nn.CrossEntropyLoss(), torch.optim.Adam(m.parameters(), lr=1e-3)


def hf_bert_classifier():
    from transformers import BertConfig, BertForSequenceClassification

    _seed()
    cfg = BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128, vocab_size=100)
    m = BertForSequenceClassification(cfg)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (8, 16), generator=g)
    y = torch.randint(0, 2, (8,), generator=g)

    def loss(out, t):
        return nn.functional.cross_entropy(out.logits, t)

    return m, ({"input_ids": ids}, y), loss, torch.optim.AdamW(m.parameters(), lr=2e-5)


def plain_deep_mlp_sgd_sane_lr():
    """The broken lr_slow_deep_mlp at lr 0.01: η·λ_max ≈ 0.54x the limit, trains."""
    _seed()
    m = init_linear_(mlp(64, 128, 11, 10), "he")
    return m, classification(n=128, d=64, k=10), nn.CrossEntropyLoss(), torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)


def bn_deep_mlp_high_lr():
    """BatchNorm MLP at SGD lr 0.3: η·λ_max ≈ 3.4x the limit at init, yet it trains (scale
    invariance lowers the curvature): the curvature rule must only inform here."""
    _seed()
    layers: list[nn.Module] = []
    d = 64
    for _ in range(10):
        layers += [nn.Linear(d, 128), nn.BatchNorm1d(128), nn.ReLU()]
        d = 128
    m = init_linear_(nn.Sequential(*layers, nn.Linear(128, 10)), "he")
    return m, classification(n=128, d=64, k=10), nn.CrossEntropyLoss(), torch.optim.SGD(m.parameters(), lr=0.3, momentum=0.9)


HEALTHY = [
    Case("he_mlp_deep", None, he_mlp_deep),
    Case("he_mlp_very_deep_narrow", None, he_mlp_very_deep_narrow),
    Case("default_mlp_shallow", None, default_mlp_shallow),
    Case("xavier_tanh_mlp", None, xavier_tanh_mlp),
    Case("bn_cnn", None, bn_cnn),
    Case("gelu_cnn_default", None, gelu_cnn_default),
    Case("resnet", None, resnet),
    Case("lstm_classifier", None, lstm_classifier),
    Case("gru_classifier", None, gru_classifier),
    Case("lstm_cell_loop", None, lstm_cell_loop),
    Case("tiny_gpt", None, tiny_gpt),
    Case("torch_encoder", None, torch_encoder),
    Case("swish_custom_fn", None, swish_custom_fn),
    Case("sigmoid_output_bce", None, sigmoid_output_bce),
    Case("embedding_bag_text", None, embedding_bag_text),
    Case("dropout_mlp_no_opt", None, dropout_mlp_no_opt),
    Case("lstm_long_sequence", None, lstm_long_sequence),
    Case("plain_deep_mlp_sgd_sane_lr", None, plain_deep_mlp_sgd_sane_lr),
    Case("bn_deep_mlp_high_lr", None, bn_deep_mlp_high_lr),
]
try:  # transformers is an optional extra (gradguard[hf])
    import transformers  # noqa: F401

    HEALTHY.append(Case("hf_bert_classifier", None, hf_bert_classifier))
except ImportError:  # pragma: no cover
    pass
