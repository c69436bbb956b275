"""The doctor's mechanisms, each against a reference: activations seen in every style and
measured by their true derivative, fans read from shapes, a depth signal free of vocabulary
and image size, deliberate zero inits, recurrences judged on their own transfer, one
finding per custom Function."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tests.zoo.cases import images, tokens
from tests.zoo.models import BadSwish, SmallCNN, TinyGPT, lm_loss
from tests.zoo.real.nets import RNNLM, InplaceSigmoid, MLPMixer, TimmResNet
from torch import nn

import gradguard as gg
from gradguard.doctor._acts import measure, profile
from gradguard.doctor._capture import run_capture
from gradguard.doctor._weights import constant_gates, recommended_std, weight_stats
from gradguard.doctor.recurrent import _judge, _trim
from gradguard.doctor.signal import depth_profile


def _capture(model, x, loss=lambda out: out.float().pow(2).mean()):
    return run_capture(model, lambda: model(x), loss)


class _Styles(nn.Module):
    """One activation of each style: in-place method, in-place torch function, module,
    functional, hardtanh with arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d, self.e = (nn.Linear(8, 8) for _ in range(5))
        self.sig = InplaceSigmoid()
        self.relu6 = nn.ReLU6()

    def forward(self, x):
        x = self.sig(self.a(x))  # x.sigmoid_()
        x = torch.tanh_(self.b(x))
        x = self.relu6(self.c(x))  # F.hardtanh(x, 0, 6)
        x = F.silu(self.d(x))
        return F.hardtanh_(self.e(x))


def test_in_place_and_functional_activations_are_all_captured_with_their_family():
    torch.manual_seed(0)
    cap = _capture(_Styles(), torch.randn(16, 8))
    assert [(a.kind, a.family) for a in cap.acts] == [
        ("sigmoid", "bounded"), ("tanh", "bounded"), ("hardtanh", "relu"), ("silu", "relu"), ("hardtanh", "bounded"),
    ]
    assert [a.where for a in cap.acts][:3] == ["sig", "b", "relu6"]  # modules by their path, functions by their layer


def test_saturation_is_the_share_of_inputs_where_the_derivative_is_flat():
    # sigmoid'(x) < 1% of its peak 0.25 beyond |x| = 5.99: four inputs in the tails of eight
    x = torch.tensor([[-9.0, -7.0, -1.0, 0.0, 0.5, 3.0, 7.0, 20.0]])
    act = measure("sigmoid", torch.sigmoid, x, "s", 0)
    assert act.sat_frac == pytest.approx(0.5)
    assert act.deriv_rms == pytest.approx(float((torch.sigmoid(x) * (1 - torch.sigmoid(x))).pow(2).mean().sqrt()), rel=1e-5)
    # ReLU6 (hardtanh 0..6): off at <= 0 (4 of 8), saturated at >= 6 (2 of the 4 positive)
    r6 = measure("relu6", F.hardtanh, x, "r", 0, (0.0, 6.0))
    assert (r6.family, r6.off_frac, r6.sat_frac) == ("relu", pytest.approx(4 / 8), pytest.approx(2 / 4))


def test_profile_tells_relu_like_from_bounded_functions():
    assert profile(torch.sigmoid).family == "bounded" and profile(torch.sigmoid).peak == pytest.approx(0.25, rel=1e-3)
    assert profile(F.gelu).family == "relu" and profile(F.hardswish).family == "relu"
    assert profile(F.leaky_relu).family == "smooth"


class _QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class _Gated(nn.Module):
    """Squeeze-excitation: a sigmoid gate scales the signal by its value."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.out(x * torch.sigmoid(self.fc(x)))


def test_an_activation_module_built_from_several_functions_is_measured_once_as_a_whole():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), _QuickGELU(), nn.Linear(8, 1))
    cap = _capture(model, torch.randn(32, 8))
    (act,) = cap.acts
    assert (act.kind, act.family, act.where, act.feeds) == ("_QuickGELU", "relu", "1", "2")


def test_a_sigmoid_gate_is_off_the_signal_path():
    torch.manual_seed(0)
    cap = _capture(_Gated(), torch.randn(32, 8))
    (act,) = cap.acts
    assert act.kind == "sigmoid" and act.feeds == ""  # its output goes into a product, not a layer


def test_fans_follow_groups_orientation_and_transposition():
    assert weight_stats(nn.Conv2d(32, 32, 3, groups=32))[1:] == (9, 9)
    assert weight_stats(nn.Conv2d(32, 64, 3, groups=4))[1:] == (8 * 9, 16 * 9)
    w = nn.Linear(3, 5)  # a GPT-2 Conv1D stores [in, out]: the input's last dim says which is which
    w.weight = nn.Parameter(torch.randn(16, 48))
    assert weight_stats(w, in_features=16)[1:] == (16, 48) and weight_stats(w, in_features=48)[1:] == (48, 16)
    assert weight_stats(nn.ConvTranspose2d(8, 4, 4))[1:] == (8 * 16, 4 * 16)


def test_recommended_std_is_he_for_the_relu_family_and_xavier_with_gain_for_tanh():
    assert recommended_std(9, 9, "relu", "silu")[1] == pytest.approx(math.sqrt(2 / 9))
    assert recommended_std(64, 32, "bounded", "tanh")[1] == pytest.approx(5 / 3 * math.sqrt(2 / 96))
    assert recommended_std(64, 32, None)[1] == pytest.approx(math.sqrt(2 / 96))


@pytest.mark.parametrize("vocab", [50, 5000])
def test_depth_signal_does_not_depend_on_the_vocabulary(vocab):
    torch.manual_seed(0)
    x, y = tokens(vocab=vocab)
    prof = depth_profile(_gpt_cap(vocab, x, y))
    ref = _gpt_profile_ref()
    # the same trunk at vocab 50 and 5000: a per-element gradient would differ by 1 decade
    assert abs(prof.back_hi - ref.back_hi) < 0.25 and abs(prof.back_lo - ref.back_lo) < 0.25
    assert gg.doctor(TinyGPT(vocab=vocab), (x, y), lm_loss).healthy


def _gpt_cap(vocab, x, y):
    torch.manual_seed(0)
    m = TinyGPT(vocab=vocab)
    return run_capture(m, lambda: m(x), lambda out: lm_loss(out, y))


def _gpt_profile_ref():
    x, y = tokens(vocab=50)
    return depth_profile(_gpt_cap(50, x, y))


@pytest.mark.parametrize("hw", [8, 48])
def test_depth_signal_does_not_depend_on_the_number_of_positions(hw):
    def prof(size):
        torch.manual_seed(0)
        m = SmallCNN(depth=5, width=16)
        gg.init.apply_(m, "he")
        x, y = images(hw=size)
        return depth_profile(run_capture(m, lambda: m(x), lambda out: F.cross_entropy(out, y))), (m, (x, y))

    p, (m, batch) = prof(hw)
    ref, _ = prof(16)
    # x36 positions between 8x8 and 48x48: a gradient scaled by positions would move 1.5 decades
    assert abs(p.back_lo - ref.back_lo) < 0.5 and abs(p.back_hi - ref.back_hi) < 0.5
    assert gg.doctor(m, batch, nn.CrossEntropyLoss()).healthy


def test_a_zero_initialised_head_is_deliberate_not_vanishing():
    torch.manual_seed(0)
    m = MLPMixer()
    x, y = images(n=8, hw=32, k=10)
    gates = constant_gates(m)
    assert gates == {"head.weight": 0.0}
    cap = run_capture(m, lambda: m(x), lambda out: F.cross_entropy(out, y))
    assert all(cap.param_grads[n].abs().max() == 0 for n in ("stem.weight", "blocks.0.mlp_tokens.fc1.weight"))
    assert gg.doctor(m, (x, y), nn.CrossEntropyLoss()).healthy


def test_zero_init_last_bn_blocks_are_not_called_inert():
    torch.manual_seed(0)
    m = TimmResNet()
    assert sum(1 for n in constant_gates(m) if n.endswith("bn2.weight")) == 8
    x, y = images(n=8, hw=64, k=10)
    diag = gg.doctor(m, (x, y), nn.CrossEntropyLoss())
    assert not any(f.cause == "init_too_small" for f in diag.findings)


def test_blocks_whose_weights_are_all_tiny_are_init_too_small_at_the_stack():
    torch.manual_seed(0)
    m = TinyGPT(layers=4)
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim >= 2:
                p.mul_(0.01)
    x, y = tokens()
    f = gg.doctor(m, (x, y), lm_loss).top
    assert f is not None and f.cause == "init_too_small" and f.where == "blocks"
    assert f.evidence["inert_blocks"] == 4 and f.evidence["median_update_ratio"] < 1e-3


def test_language_model_with_shifted_loss_is_not_called_exploding():
    torch.manual_seed(0)
    ids = torch.randint(0, 500, (4, 32), generator=torch.Generator().manual_seed(1))

    def shifted(out, t):
        return F.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), t[:, 1:].reshape(-1))

    diag = gg.doctor(RNNLM(cell="LSTM"), (ids, ids), shifted)
    assert diag.healthy
    (f,) = [f for f in diag.findings if f.where == "rnn"]
    assert f.cause == "recurrent_vanishing" and f.severity == "info"
    assert f.evidence["loss_grad_last_step"] == 0.0  # the position the loss ignores
    assert f.evidence["steps"] == 32 and 0 < f.evidence["per_step_factor"] < 1


def test_trailing_zero_steps_are_dropped_and_leading_zeros_kept_as_underflow():
    assert _trim([0.0, 1e-3, 1.0, 0.0, 0.0]) == [0.0, 1e-3, 1.0]
    assert _trim([0.0, 0.0]) == []


def test_a_gated_recurrence_is_never_told_to_use_an_lstm():
    series = [10.0**k for k in range(6, 0, -1)]
    lstm = _judge("rnn", nn.LSTM(4, 4), series, None)
    rnn = _judge("rnn", nn.RNN(4, 4), series, None)
    assert lstm is not None and rnn is not None
    assert lstm.cause == rnn.cause == "recurrent_explosion"
    assert "LSTM/GRU" not in lstm.remedy and "use an LSTM/GRU" in rnn.remedy


class _SwishLayer(nn.Module):
    def __init__(self, inplace: bool = False) -> None:
        super().__init__()

    def forward(self, x):
        return BadSwish.apply(x)


def test_a_wrong_custom_backward_used_in_many_places_is_one_finding():
    torch.manual_seed(0)
    m = TimmResNet(act=_SwishLayer, depths=(1, 1, 1, 1))
    x, y = images(n=4, hw=32, k=10)
    wrong = [f for f in gg.doctor(m, (x, y), nn.CrossEntropyLoss()).findings if f.cause == "wrong_gradient"]
    assert len(wrong) == 1
    assert wrong[0].evidence["function"] == "BadSwish" and wrong[0].evidence["n_modules"] == 9
    assert wrong[0].where == "act1" and "and 8 other module(s)" in wrong[0].remedy


class _MaskToken(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.mask_token = nn.Parameter(torch.zeros(8))  # used only when masking

    def forward(self, x, mask=None):
        if mask is not None:
            x = torch.where(mask[..., None], self.mask_token, x)
        return self.proj(x)


def test_a_parameter_used_only_in_some_calls_is_an_info_not_a_warning():
    m = nn.Sequential(_MaskToken(), nn.ReLU(), nn.Linear(8, 1))
    diag = gg.doctor(m, (torch.randn(16, 8), torch.randn(16, 1)), nn.MSELoss())
    (f,) = diag.findings
    assert (f.cause, f.severity, f.evidence["params_without_grad"]) == ("disconnected_layer", "info", ["0.mask_token"])
    assert diag.healthy


class _TaskHeads(nn.Module):
    def __init__(self, forgot: bool = False) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(16, 1) for _ in range(4))
        self.extra = nn.Linear(16, 16)  # never used when ``forgot``
        self.forgot = forgot

    def forward(self, x, task):
        h = self.trunk(x)
        return self.heads[task](h if self.forgot else h + 0 * self.extra(h))


def test_task_heads_a_batch_did_not_use_are_said_to_be_expected_of_that_batch():
    """Found as a stranger: the doctor on one batch of a four-task model named three heads
    "never ran in forward ... use the branch in the loss, or freeze it". It still warns (a
    forgotten module looks the same), and says the branch may be the batch's choice; a
    module unused that is no element of such a container gets no such sentence."""
    torch.manual_seed(0)
    x = torch.randn(16, 8)
    (f,) = gg.doctor(_TaskHeads(), ((x, 2), x[:, :1]), nn.MSELoss()).findings
    assert (f.cause, f.severity, f.evidence["layers"]) == (
        "disconnected_layer", "warning", ["heads.0", "heads.1", "heads.3"])
    assert "picks one of `heads.*` per batch" in f.remedy and "ran `heads.2`" in f.remedy
    found = gg.doctor(_TaskHeads(forgot=True), ((x, 2), x[:, :1]), nn.MSELoss()).findings
    (g,) = [f for f in found if f.cause == "disconnected_layer"]
    assert "extra" in g.evidence["layers"] and "picks one of" not in g.remedy


def test_attention_entropy_collapses_with_too_large_weights_and_is_evidence():
    torch.manual_seed(0)
    m = TinyGPT(layers=3)
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 1.0)
    x, y = tokens()
    f = gg.doctor(m, (x, y), lm_loss).top
    assert f is not None and f.cause == "init_too_large" and f.where == "blocks.0.attn"
    assert f.evidence["attention_collapsed"] is True and f.evidence["attention_entropy_min"] < 0.1
    healthy = _gpt_cap(50, x, y).attention
    assert len(healthy) == 3 and min(h for _, h in healthy) > 0.9


def test_sdpa_attention_entropy_matches_the_explicit_softmax():
    from gradguard.doctor._attention import normalized_entropy, sdpa_entropy

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 10, 8, generator=g) * 2 for _ in range(3))
    logits = (q @ k.transpose(-2, -1)) / math.sqrt(8)
    causal = torch.ones(10, 10, dtype=torch.bool).tril()
    p = logits.masked_fill(~causal, -math.inf).softmax(-1)
    ref = normalized_entropy(p, causal)
    assert sdpa_entropy((q, k, v), {"is_causal": True}) == pytest.approx(ref, rel=1e-5)
    assert 0.2 < ref < 0.95  # neither uniform nor one-hot at this logit scale


def _diabetes():
    from sklearn.datasets import load_diabetes

    d = load_diabetes()
    x = torch.tensor(d.data, dtype=torch.float32)
    y = torch.tensor(d.target, dtype=torch.float32)[:, None]
    x = (x - x.mean(0)) / x.std(0)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x, y, perm[:350], perm[350:]


def _regressor(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))


def test_regression_targets_far_from_unit_scale_are_found_and_standardising_them_trains():
    """``load_diabetes`` with its raw targets (mean 152, std 77): the doctor names them
    (beside the LR it also finds too high) and standardising them is the cure: on SGD
    momentum at the LR the LR probe advises, raw goes NaN, standardised trains. Class
    indices and floating targets of another shape than the output (weights) are no
    regression targets."""
    x, y, tr, te = _diabetes()
    diag = gg.doctor(_regressor(0), (x[tr[:64]], y[tr[:64]]), nn.MSELoss())
    found = [f for f in diag.findings if f.where == "targets"]
    assert [(f.cause, f.severity) for f in found] == [("unscaled_input", "warning")]
    assert 100 < found[0].evidence["target_rms"] < 1000 and "Standardise the targets" in found[0].remedy
    mu, sd = y[tr].mean(), y[tr].std()
    scaled = gg.doctor(_regressor(0), (x[tr[:64]], (y[tr[:64]] - mu) / sd), nn.MSELoss())
    assert not [f for f in scaled.findings if f.where == "targets"]
    cls = gg.doctor(nn.Linear(10, 3), (x[:64], torch.randint(0, 3, (64,))), nn.CrossEntropyLoss())
    other = gg.doctor(nn.Linear(10, 3), (x[:64], torch.full((64,), 40.0)),
                      lambda out, w: (out.pow(2).sum(1) / w).mean())
    assert not [f for d in (cls, other) for f in d.findings if f.where == "targets"]

    def train(targets: torch.Tensor, seed: int) -> float:
        model = _regressor(seed)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        g = torch.Generator().manual_seed(seed + 1)
        for _ in range(400):
            idx = tr[torch.randint(0, len(tr), (32,), generator=g)]
            loss = nn.functional.mse_loss(model(x[idx]), targets[idx])
            loss.backward()
            opt.step()
            opt.zero_grad()
        with torch.no_grad():
            pred = model(x[te])
            return nn.functional.mse_loss(pred if targets is y else pred * sd + mu, y[te]).item()

    assert math.isnan(train(y, 0)) and math.isnan(train(y, 1))
    assert train((y - mu) / sd, 0) < 3000 and train((y - mu) / sd, 1) < 3000


@pytest.mark.parametrize("act", [nn.GELU, nn.SiLU, nn.ReLU])
def test_a_network_whose_weights_are_all_zero_is_no_healthy_one(act):
    """Found as a stranger: timm's ViT, ConvNeXt, EfficientNet and Swin with every weight
    zero were "healthy: no finding" (their loss at ln 10 for good: no matrix ever gets a
    gradient); only ReLU nets were caught, as dead units. A zero-initialised head alone
    (its weight gets a gradient, the trunk gets its after the first step) is healthy."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 16), torch.randint(0, 4, (32,))

    def net():
        return nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), act(), nn.Linear(32, 32),
                             act(), nn.Linear(32, 4))

    zeroed = net()
    with torch.no_grad():
        for p in zeroed.parameters():
            p.zero_()
    diag = gg.doctor(zeroed, (x, y), nn.CrossEntropyLoss())
    found = [f for f in diag.findings if f.cause == "init_too_small" and f.severity == "error"]
    assert found and found[0].evidence["matrices_all_zero"] == 3, diag.findings
    assert not diag.healthy
    head = net()
    with torch.no_grad():
        head[-1].weight.zero_()
        head[-1].bias.zero_()
    assert not [f for f in gg.doctor(head, (x, y), nn.CrossEntropyLoss()).findings
                if f.cause == "init_too_small"]
    assert gg.doctor(net(), (x, y), nn.CrossEntropyLoss()).healthy


def test_adams_eps_that_is_zero_in_float16_is_named_not_a_lower_lr():
    """Found by a stranger: GPT-2, BERT, Llama and ViT after ``model.half()`` with AdamW's
    default eps=1e-8 (0 in float16) were told to lower the LR by more than 1000x; the
    update of an element whose gradient is 0 is 0/0 = NaN at any LR."""

    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.e, self.h = nn.Embedding(100, 32), nn.Linear(32, 100)

        def forward(self, x):
            return self.h(torch.relu(self.e(x)))

    def loss(o, t):
        return nn.functional.cross_entropy(o.float().flatten(0, 1), t.flatten())

    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 50, (8, 16), generator=g), torch.randint(0, 50, (8, 16), generator=g)
    causes = {}
    for dtype, eps in ((torch.float16, 1e-8), (torch.float16, 1e-4), (torch.float32, 1e-8)):
        torch.manual_seed(0)
        model = LM().to(dtype)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=eps)
        diag = gg.doctor(model, (x, y), loss, optimizer=opt)
        causes[dtype, eps] = [f.cause for f in diag.findings]
        if causes[dtype, eps]:
            top = diag.top
            assert "eps=1e-08" in top.remedy and "torch.autocast" in top.remedy
            assert top.severity == "error" and top.evidence["dtype"] == "float16"
        loss(model(x), y).backward()
        opt.step()  # the truth: NaN weights after one real step, at eps 1e-8 in float16 only
        nan = any(p.isnan().any() for p in model.parameters())
        assert nan == bool(causes[dtype, eps]), (dtype, eps)
    assert causes == {(torch.float16, 1e-8): ["half_precision_overflow"],
                      (torch.float16, 1e-4): [], (torch.float32, 1e-8): []}


def test_a_batch_whose_labels_are_all_ignored_is_named_not_the_model():
    """Found by a stranger: every label -100 (a masking bug) makes the mean loss 0/0; the
    doctor told a GPT-2 to clamp a log at ``(model)`` ("|x| <= 0"), and with the loss in
    ``loss_fn`` to use F.cross_entropy on logits, which it did."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 50))
    x = torch.randint(0, 50, (4, 8))

    def loss(o, t):
        return F.cross_entropy(o.flatten(0, 1), t.flatten())

    diag = gg.doctor(model, (x, torch.full((4, 8), -100)), loss)
    assert [(f.cause, f.where) for f in diag.findings] == [("nonfinite_loss", "batch")]
    assert "every label of the batch (targets, shape (4, 8)) is -100" in diag.top.remedy
    assert "label masking" in diag.top.remedy
    some = torch.full((4, 8), -100)
    some[0, :3] = 1  # a few labels left: finite, healthy
    assert gg.doctor(model, (x, some), loss).findings == []

    class HFLike(nn.Module):  # labels inside the inputs, the loss computed by the model
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, input_ids, labels):
            return loss(self.net(input_ids), labels)

    diag = gg.doctor(HFLike(), ({"input_ids": x, "labels": torch.full((4, 8), -100)}, None),
                     lambda out: out)
    assert diag.top.where == "batch" and "(labels, shape (4, 8))" in diag.top.remedy


def test_a_classifier_drawn_overconfident_is_named_at_its_head():
    """Found by a stranger: a GPT-2 whose embedding was re-created as ``nn.Embedding``
    (N(0, 1)) and tied to its head started at a loss of 45 against ln 128 = 4.85, ended 33%
    worse, and the doctor said healthy. Logits far from 0 at the start, the loss many
    times that of a uniform guess: ``init_too_large`` at the head."""
    torch.manual_seed(0)
    x = torch.randint(0, 128, (4, 16))
    y = torch.randint(0, 128, (4, 16))

    def loss(o, t):
        return F.cross_entropy(o.flatten(0, 1), t.flatten())

    def lm(std):
        model = nn.Sequential(nn.Embedding(128, 64), nn.LayerNorm(64), nn.Linear(64, 128))
        if std is not None:
            nn.init.normal_(model[2].weight, std=std)
        return model

    diag = gg.doctor(lm(1.0), (x, y), loss)
    assert [(f.cause, f.where) for f in diag.findings] == [("init_too_large", "2")]
    assert diag.top.evidence["classes"] == 128 and diag.top.evidence["loss"] > 2 * math.log(128)
    assert "Initialise `2`" in diag.top.remedy
    assert gg.doctor(lm(None), (x, y), loss).findings == []  # torch's own init
    assert gg.doctor(lm(0.02), (x, y), loss).findings == []  # Hugging Face's


@pytest.mark.parametrize("arch, scale", [("llama", 0.0125), ("vit", 0.02)])
def test_blocks_a_hundred_times_too_small_are_inert_in_llama_and_vit(arch, scale):
    """Found by a stranger: transformers' Llama and ViT with every weight matrix x0.01 sat at
    |f(x)|/|x| of 1.0-1.4e-3 per block, and were "healthy" under the rule's 1e-3 (GPT-2, at
    3e-4, was caught); the ViT's held-out loss after 300 steps was 2.19/1.24 against
    0.87/0.94. These configurations are scaled to sit there too (1.4e-3); their own init
    (0.1-0.7) stays healthy."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if arch == "llama":
        cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=4, num_attention_heads=4,
                                       num_key_value_heads=4, max_position_embeddings=64)
        make = lambda: transformers.LlamaForCausalLM(cfg)  # noqa: E731
        ids = torch.randint(0, 128, (4, 32))
        batch, loss = ({"input_ids": ids, "labels": ids}, None), (lambda out: out.loss)
    else:
        cfg = transformers.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=64,
                                     num_hidden_layers=4, num_attention_heads=4,
                                     intermediate_size=128, num_labels=10)
        make = lambda: transformers.ViTForImageClassification(cfg)  # noqa: E731
        x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
        batch, loss = ({"pixel_values": x, "labels": y}, None), (lambda out: out.loss)
    healthy = make()
    assert not [f for f in gg.doctor(healthy, batch, loss).findings if f.severity != "info"]
    small = make()
    with torch.no_grad():
        for p in small.parameters():
            if p.ndim >= 2:
                p.mul_(scale)
    diag = gg.doctor(small, batch, loss)
    assert diag.top is not None and diag.top.cause == "init_too_small", diag
    assert 1e-3 < diag.top.evidence["median_update_ratio"] < 2e-3


def test_an_untied_t5_head_drawn_at_std_one_is_named_beside_the_deeper_finding():
    """Found by a stranger: a T5 with untied embeddings (the T5 v1.1 / flan-T5 config), whose
    ``lm_head`` transformers draws at std 1, starts at a loss of 25 against ln 128 = 4.85;
    the doctor named only a signal growing through 49 layers, at a layer 1.02x its
    recommended std. The head is named too, ranked after it."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=3,
                                num_heads=4, decoder_start_token_id=0, pad_token_id=0,
                                tie_word_embeddings=False)
    model = transformers.T5ForConditionalGeneration(cfg)
    ids = torch.randint(1, 128, (4, 16))
    diag = gg.doctor(model, ({"input_ids": ids, "labels": ids.flip(1)}, None), lambda o: o.loss)
    head = [f for f in diag.findings if f.where == "lm_head"]
    assert [(f.cause, f.confidence) for f in head] == [("init_too_large", 0.6)]
    assert head[0].evidence["loss"] > 2 * head[0].evidence["uniform_loss"]
    assert diag.top is not None and diag.top.cause == "init_too_large"
