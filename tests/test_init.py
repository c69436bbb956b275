"""gg.init: audit against He/Xavier for the activation that follows, and re-init schemes."""

from __future__ import annotations

import math

import pytest
import torch
from tests.zoo.cases import mlp
from tests.zoo.models import FunctionalMLP, RNNClassifier
from torch import nn

import gradguard as gg


def test_audit_finds_activation_after_each_layer_and_recommends_accordingly():
    torch.manual_seed(0)
    m = FunctionalMLP(16, 32, 3, 2, act="tanh")
    rep = gg.init.audit(m, (torch.randn(32, 16), None))
    assert [(r.path, r.activation) for r in rep.rows] == [("hidden.0", "tanh"), ("hidden.1", "tanh"), ("out", None)]
    r = rep.rows[1]
    assert r.recommended_std == pytest.approx(5 / 3 * math.sqrt(2 / 64))
    assert r.std == pytest.approx(float(m.hidden[1].weight.detach().std()))


def test_audit_flags_a_layer_ten_times_too_large():
    torch.manual_seed(0)
    m = mlp(16, 32, 4, 1)
    gg.init.apply_(m, "he")
    with torch.no_grad():
        m[2].weight.mul_(10)
    rep = gg.init.audit(m, (torch.randn(32, 16), None))
    assert [r.path for r in rep.flagged] == ["2"]
    assert rep.flagged[0].factor == pytest.approx(10, rel=0.2)
    assert "too large" in str(rep)


@pytest.mark.parametrize("scheme", ["he", "xavier", "orthogonal", "lsuv"])
def test_every_scheme_keeps_a_deep_relu_net_signal_within_a_decade(scheme):
    torch.manual_seed(0)
    m = mlp(32, 64, 16, 1)
    x = torch.randn(128, 32)
    gg.init.apply_(m, scheme, batch=(x, None))  # type: ignore[arg-type]
    with torch.no_grad():
        h = m[:-1](x)
    ratio = float(h.pow(2).mean().sqrt() / x.pow(2).mean().sqrt())
    # the default PyTorch init shrinks it ~1e-6x over 15 ReLU layers; xavier (gain sqrt 2) too
    assert 0.1 < ratio < 10, ratio
    assert all(float(lin.bias.detach().abs().max()) == 0 for lin in m if isinstance(lin, nn.Linear))


def test_lsuv_gives_unit_variance_outputs():
    torch.manual_seed(0)
    m = mlp(20, 50, 5, 3)
    x = torch.randn(256, 20) * 7
    gg.init.apply_(m, "lsuv", batch=(x, None))
    with torch.no_grad():
        for i in (0, 2, 4, 6):
            assert float(m[: i + 1](x).std()) == pytest.approx(1.0, abs=0.1)


def test_orthogonal_rnn_blocks_and_lstm_forget_bias():
    torch.manual_seed(0)
    m = RNNClassifier(cell="lstm")
    gg.init.apply_(m, "orthogonal")
    w = m.rnn.weight_hh_l0.detach()
    for k in range(4):
        blk = w[32 * k : 32 * (k + 1)]
        assert torch.allclose(blk @ blk.T, torch.eye(32), atol=1e-5)
    b = (m.rnn.bias_ih_l0 + m.rnn.bias_hh_l0).detach()
    assert torch.allclose(b[32:64], torch.ones(32))  # forget gate
    assert float(b[:32].abs().max()) == 0


def test_apply_rejects_unknown_scheme_and_lsuv_without_batch():
    with pytest.raises(ValueError, match=r"scheme='kaiming'.*allowed"):
        gg.init.apply_(nn.Linear(2, 2), "kaiming")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"lsuv.*needs batch"):
        gg.init.apply_(nn.Linear(2, 2), "lsuv")


def test_reinit_fixes_what_the_doctor_found():
    from tests.zoo.broken import init_small_mlp

    model, batch, loss_fn, _ = init_small_mlp()
    assert gg.doctor(model, batch, loss_fn).top.cause == "init_too_small"
    gg.init.apply_(model, "he")
    assert gg.doctor(model, batch, loss_fn).healthy


def test_audit_reads_fans_from_groups_and_recommends_he_before_silu():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.SiLU(), nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.SiLU(),
                      nn.Flatten(), nn.Linear(16 * 8 * 8, 2))
    rows = {r.path: r for r in gg.init.audit(m, (torch.randn(4, 3, 8, 8), None)).rows}
    dw = rows["2"]
    assert (dw.fan_in, dw.fan_out, dw.activation) == (9, 9, "silu")
    assert dw.recommended_std == pytest.approx(math.sqrt(2 / 9))  # He: SiLU is in the ReLU family


def test_apply_he_uses_the_fan_in_of_a_transposed_matrix():
    class Conv1D(nn.Module):  # GPT-2's layout: weight [in, out], y = x @ W
        def __init__(self, n_in, n_out):
            super().__init__()
            self.weight = nn.Parameter(torch.empty(n_in, n_out))

        def forward(self, x):
            return x @ self.weight

    torch.manual_seed(0)
    m = nn.Sequential(Conv1D(256, 64), nn.ReLU(), nn.Linear(64, 1))
    gg.init.apply_(m, "he", batch=(torch.randn(8, 256), None))
    assert float(m[0].weight.detach().std()) == pytest.approx(math.sqrt(2 / 256), rel=0.05)
