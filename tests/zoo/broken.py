"""Broken setups: two or more per cause, in different styles."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cases import Case, classification, images, init_linear_, mlp, regression, sequences, tokens
from .models import (
    BadSquare,
    BadSwish,
    CellLoop,
    FunctionalMLP,
    LoopRNN,
    RNNClassifier,
    SmallCNN,
    SwishMLP,
    TinyGPT,
    lm_loss,
)


def _seed(s: int = 0) -> None:
    torch.manual_seed(s)


# ---- init_too_large ----------------------------------------------------------------
def init_large_mlp():
    _seed()
    m = init_linear_(mlp(16, 64, 10, 1), "normal", std=0.5)
    return m, regression(), nn.MSELoss(), None


def init_large_cnn():
    _seed()
    m = SmallCNN(depth=5, width=16)
    for c in m.convs:
        nn.init.normal_(c.weight, std=0.6)
    return m, images(), nn.CrossEntropyLoss(), torch.optim.SGD(m.parameters(), lr=1e-3)


def init_large_tanh_free_linear():
    _seed()
    m = FunctionalMLP(16, 48, 8, 5, act="relu")
    for lin in m.hidden:
        nn.init.uniform_(lin.weight, -0.9, 0.9)
    return m, classification(), nn.CrossEntropyLoss(), None


# ---- init_too_small ----------------------------------------------------------------
def init_small_mlp():
    _seed()
    m = init_linear_(mlp(16, 64, 10, 1), "normal", std=0.01)
    return m, regression(), nn.MSELoss(), torch.optim.Adam(m.parameters(), lr=1e-3)


def init_small_cnn():
    _seed()
    m = SmallCNN(depth=6, width=16)
    for c in m.convs:
        nn.init.normal_(c.weight, std=0.005)
        nn.init.zeros_(c.bias)
    return m, images(), nn.CrossEntropyLoss(), None


def init_small_tanh():
    _seed()
    m = FunctionalMLP(16, 64, 8, 5, act="tanh")
    for lin in m.hidden:
        nn.init.normal_(lin.weight, std=0.02)
    return m, classification(), nn.CrossEntropyLoss(), None


# ---- saturating_activation -----------------------------------------------------------
def sigmoid_deep_mlp():
    _seed()
    m = init_linear_(mlp(16, 64, 12, 1, act=nn.Sigmoid), "xavier")
    return m, regression(), nn.MSELoss(), None


def tanh_saturated():
    _seed()
    m = FunctionalMLP(16, 64, 6, 5, act="tanh")
    for lin in m.hidden:
        nn.init.normal_(lin.weight, std=1.0)
    return m, classification(), nn.CrossEntropyLoss(), None


def sigmoid_cnn():
    _seed()
    m = SmallCNN(depth=6, width=16, act="sigmoid")
    return m, images(), nn.CrossEntropyLoss(), torch.optim.SGD(m.parameters(), lr=0.01)


# ---- dead_units --------------------------------------------------------------------------
def dead_bias_mlp():
    _seed()
    m = init_linear_(mlp(16, 64, 6, 1), "he")
    for layer in m:
        if isinstance(layer, nn.Linear):
            nn.init.constant_(layer.bias, -4.0)
    return m, regression(), nn.MSELoss(), None


def dead_cnn():
    _seed()
    m = SmallCNN(depth=5, width=16)
    for c in m.convs[1:]:
        nn.init.constant_(c.bias, -3.0)
    return m, images(), nn.CrossEntropyLoss(), None


def dead_after_bad_step():
    _seed()
    m = FunctionalMLP(16, 64, 5, 5)
    with torch.no_grad():  # what a huge update leaves behind: every weight pushed negative
        for lin in m.hidden[1:]:
            lin.weight.abs_().neg_()
    return m, (classification()[0].abs(), classification()[1]), nn.CrossEntropyLoss(), None


# ---- lr_too_high ---------------------------------------------------------------------------
def lr_sgd_mlp():
    _seed()
    m = init_linear_(mlp(16, 64, 4, 1), "he")
    return m, regression(), nn.MSELoss(), torch.optim.SGD(m.parameters(), lr=3.0)


def lr_adam_cnn():
    _seed()
    m = SmallCNN(depth=3, width=16)
    return m, images(), nn.CrossEntropyLoss(), torch.optim.Adam(m.parameters(), lr=3.0)


def lr_gpt():
    _seed()
    m = TinyGPT(layers=2)
    return m, tokens(), lm_loss, torch.optim.SGD(m.parameters(), lr=300.0, momentum=0.9)


# ---- recurrent_explosion ---------------------------------------------------------------------
def rnn_relu_explode():
    _seed()
    m = RNNClassifier(cell="rnn", nonlinearity="relu")
    with torch.no_grad():
        q, _ = torch.linalg.qr(torch.randn(32, 32))
        m.rnn.weight_hh_l0.copy_(3.0 * q)
    return m, sequences(t=30), nn.CrossEntropyLoss(), None


def loop_rnn_explode():
    _seed()
    m = LoopRNN(act="relu")
    with torch.no_grad():
        q, _ = torch.linalg.qr(torch.randn(32, 32))
        m.rec.weight.copy_(3.0 * q)
    return m, sequences(t=30), nn.CrossEntropyLoss(), None


# ---- recurrent_vanishing ---------------------------------------------------------------------
def rnn_tanh_vanish():
    _seed()
    m = RNNClassifier(cell="rnn")
    return m, sequences(t=60), nn.CrossEntropyLoss(), None


def cell_loop_vanish():
    _seed()
    m = CellLoop(cell="rnn")
    with torch.no_grad():
        m.cell.weight_hh.mul_(0.5)
    return m, sequences(t=40), nn.CrossEntropyLoss(), None


def loop_rnn_vanish():
    _seed()
    m = LoopRNN(act="tanh")
    return m, sequences(t=50), nn.CrossEntropyLoss(), None


def lstm_shut_forget_gate():
    _seed()
    m = RNNClassifier(cell="lstm")
    with torch.no_grad():  # forget gate bias -5: the cell forgets everything every step
        m.rnn.bias_ih_l0[32:64] = -5.0
        m.rnn.bias_hh_l0[32:64] = 0.0
    return m, sequences(t=40), nn.CrossEntropyLoss(), None


# ---- nonfinite_input ----------------------------------------------------------------------------
def nan_input_mlp():
    _seed()
    m = init_linear_(mlp(16, 32, 3, 1), "he")
    x, y = regression()
    x[5, 3] = float("nan")
    return m, (x, y), nn.MSELoss(), None


def inf_image_cnn():
    _seed()
    m = SmallCNN(depth=2)
    x, y = images()
    x[2, 0, 4, 4] = float("inf")
    return m, (x, y), nn.CrossEntropyLoss(), None


def nan_target():
    _seed()
    m = FunctionalMLP(16, 32, 3, 1)
    x, y = regression()
    y[7] = float("nan")
    return m, (x, y), nn.MSELoss(), None


# ---- nonfinite_loss --------------------------------------------------------------------------------
def log_of_softmax_zero():
    _seed()
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 5), nn.Softmax(dim=-1))
    with torch.no_grad():
        m[2].weight.mul_(300.0)

    def loss(p, y):  # hand-written NLL on probabilities: log(0) = -inf
        return -torch.log(p.gather(1, y[:, None])).mean()

    return m, classification(), loss, None


def divide_by_zero_loss():
    _seed()
    m = FunctionalMLP(16, 32, 3, 1)
    x, y = regression()
    y = torch.zeros_like(y)

    def loss(out, t):  # relative error against targets that are exactly 0
        return ((out - t) / t.abs()).pow(2).mean()

    return m, (x, y), loss, None


def bce_by_hand():
    _seed()
    m = init_linear_(mlp(16, 32, 3, 1), "normal", std=3.0)
    x, _ = regression()
    y = (x[:, :1] > 0).float()

    def loss(z, t):
        p = torch.sigmoid(z * 50)
        return -(t * torch.log(p) + (1 - t) * torch.log(1 - p)).mean()

    return m, (x * 10, y), loss, None


# ---- half_precision_overflow -----------------------------------------------------------------------
def fp16_activations():
    _seed()
    m = nn.Sequential(nn.Linear(16, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 1))
    with torch.no_grad():
        m[2].weight.normal_(0, 50.0)
    m = m.half()
    x, y = regression()
    return m, ((x * 60).half(), y.half()), nn.MSELoss(), None


def fp16_loss():
    _seed()
    m = init_linear_(mlp(16, 32, 3, 1), "he").half()
    x, y = regression()
    return m, (x.half(), (y * 400).half()), nn.MSELoss(), None


# ---- unscaled_input -------------------------------------------------------------------------------
def unscaled_tabular():
    _seed()
    m = mlp(16, 32, 3, 1)
    x, y = regression()
    x[:, :4] *= 5000.0  # prices, areas in square feet ...
    return m, (x, y), nn.MSELoss(), torch.optim.SGD(m.parameters(), lr=1e-3)


def unscaled_images():
    _seed()
    m = SmallCNN(depth=3)
    x, y = images()
    return m, (x * 255.0, y), nn.CrossEntropyLoss(), torch.optim.SGD(m.parameters(), lr=0.01)


# ---- wrong_gradient ----------------------------------------------------------------------------------
def bad_swish_mlp():
    _seed()
    m = SwishMLP(BadSwish)
    return m, regression(), nn.MSELoss(), None


class _SquareLayer(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return BadSquare.apply(x)


def bad_square_seq():
    _seed()
    m = nn.Sequential(nn.Linear(16, 32), _SquareLayer(), nn.Linear(32, 5))
    return m, classification(), nn.CrossEntropyLoss(), None


# ---- disconnected_layer --------------------------------------------------------------------------
class _Detached(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(16, 32)
        self.mid = nn.Linear(32, 32)
        self.out = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.enc(x)).detach()  # a stray detach cuts the encoder off
        return self.out(F.relu(self.mid(h)))


def detached_encoder():
    _seed()
    m = _Detached()
    return m, regression(), nn.MSELoss(), None


class _Unused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 5))
        self.aux_head = nn.Linear(32, 5)  # defined, never used

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def unused_head():
    _seed()
    m = _Unused()
    return m, classification(), nn.CrossEntropyLoss(), None


# slow divergence: the loss falls for the first steps, η·λ_max is past the stability limit
def lr_slow_deep_mlp():
    """Plain 11-layer He MLP at SGD lr 0.3, momentum 0.9: η·λ_max ≈ 16x the limit 2(1+β);
    the 4-step probe sees the loss fall, full-batch training reaches NaN at step ~13."""
    _seed()
    m = init_linear_(mlp(64, 128, 11, 10), "he")
    return m, classification(n=128, d=64, k=10), nn.CrossEntropyLoss(), torch.optim.SGD(m.parameters(), lr=0.3, momentum=0.9)


def lr_slow_digits_t7():
    """The lab's T7 plain network on load_digits (η·λ_max ≈ 3.4x the limit; NaN at step ~73)."""
    from gradguard.lab._common import mlp as lab_mlp
    from gradguard.lab._common import split_digits

    m = lab_mlp(10, 128, init="he")
    x, y, _, _ = split_digits()
    return m, (x[:256], y[:256]), nn.CrossEntropyLoss(), torch.optim.SGD(m.parameters(), lr=0.3, momentum=0.9)


def lr_slow_nesterov_tanh():
    """Tanh MLP, MSE, Nesterov SGD lr 0.08 (limit 2(1+β)/(1+2β) ≈ 1.36): η·λ_max ≈ 3.6x; NaN at ~29."""
    _seed()
    m = init_linear_(mlp(16, 64, 6, 1, act=nn.Tanh), "xavier_tanh")
    return m, regression(), nn.MSELoss(), torch.optim.SGD(m.parameters(), lr=0.08, momentum=0.9, nesterov=True)


BROKEN = [
    Case("init_large_mlp", "init_too_large", init_large_mlp),
    Case("init_large_cnn", "init_too_large", init_large_cnn),
    Case("init_large_functional", "init_too_large", init_large_tanh_free_linear),
    Case("init_small_mlp", "init_too_small", init_small_mlp),
    Case("init_small_cnn", "init_too_small", init_small_cnn),
    Case("init_small_tanh", "init_too_small", init_small_tanh),
    Case("sigmoid_deep_mlp", "saturating_activation", sigmoid_deep_mlp),
    Case("tanh_saturated", "saturating_activation", tanh_saturated),
    Case("sigmoid_cnn", "saturating_activation", sigmoid_cnn),
    Case("dead_bias_mlp", "dead_units", dead_bias_mlp),
    Case("dead_cnn", "dead_units", dead_cnn),
    Case("dead_after_bad_step", "dead_units", dead_after_bad_step),
    Case("lr_sgd_mlp", "lr_too_high", lr_sgd_mlp),
    Case("lr_adam_cnn", "lr_too_high", lr_adam_cnn),
    Case("lr_gpt", "lr_too_high", lr_gpt),
    Case("lr_slow_deep_mlp", "lr_too_high", lr_slow_deep_mlp),
    Case("lr_slow_nesterov_tanh", "lr_too_high", lr_slow_nesterov_tanh),
    Case("rnn_relu_explode", "recurrent_explosion", rnn_relu_explode),
    Case("loop_rnn_explode", "recurrent_explosion", loop_rnn_explode),
    Case("rnn_tanh_vanish", "recurrent_vanishing", rnn_tanh_vanish),
    Case("cell_loop_vanish", "recurrent_vanishing", cell_loop_vanish),
    Case("loop_rnn_vanish", "recurrent_vanishing", loop_rnn_vanish),
    Case("lstm_shut_forget_gate", "recurrent_vanishing", lstm_shut_forget_gate),
    Case("nan_input_mlp", "nonfinite_input", nan_input_mlp),
    Case("inf_image_cnn", "nonfinite_input", inf_image_cnn),
    Case("nan_target", "nonfinite_input", nan_target),
    Case("log_of_softmax_zero", "nonfinite_loss", log_of_softmax_zero),
    Case("divide_by_zero_loss", "nonfinite_loss", divide_by_zero_loss),
    Case("bce_by_hand", "nonfinite_loss", bce_by_hand),
    Case("fp16_activations", "half_precision_overflow", fp16_activations),
    Case("fp16_loss", "half_precision_overflow", fp16_loss),
    Case("unscaled_tabular", "unscaled_input", unscaled_tabular),
    Case("unscaled_images", "unscaled_input", unscaled_images),
    Case("bad_swish_mlp", "wrong_gradient", bad_swish_mlp),
    Case("bad_square_seq", "wrong_gradient", bad_square_seq),
    Case("detached_encoder", "disconnected_layer", detached_encoder),
    Case("unused_head", "disconnected_layer", unused_head),
]
try:  # load_digits needs scikit-learn (an optional extra)
    import sklearn  # noqa: F401

    BROKEN.append(Case("lr_slow_digits_t7", "lr_too_high", lr_slow_digits_t7))
except ImportError:  # pragma: no cover
    pass
