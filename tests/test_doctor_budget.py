"""The doctor's time budget and its LR probe: steps taken on the model in place and undone,
the user's optimizer never stepped, what the budget cut reported."""

from __future__ import annotations

import time

import pytest
import torch
from tests.test_doctor import _assert_same, _snapshot
from tests.zoo.broken import lr_slow_deep_mlp
from tests.zoo.cases import tokens
from tests.zoo.models import TinyGPT, lm_loss
from torch import nn

import gradguard as gg
from gradguard.doctor import Diagnosis
from gradguard.doctor._budget import DEFAULT_BUDGET_S, Budget, default_budget
from gradguard.doctor._steps import MIN_STEPS, FirstStep, StepRunner


def test_default_budget_is_5s_up_to_30m_parameters_and_grows_with_the_square_root():
    resnet50 = 25_557_032
    assert default_budget(1_000) == default_budget(resnet50) == default_budget(30_000_000) == DEFAULT_BUDGET_S == 5.0
    assert default_budget(120_000_000) == pytest.approx(10.0)
    assert default_budget(124_000_000) == pytest.approx(5.0 * (124 / 30) ** 0.5)


def test_budget_counts_from_its_start_and_records_each_cut_once():
    b = Budget(1.0, start=time.perf_counter() - 0.5)
    assert 0.4 < b.left() <= 0.5
    assert b.allows(0.3) and not b.allows(0.6)
    b.note("sharpness: not run")
    b.note("sharpness: not run")
    assert b.cut == ["sharpness: not run"]


def test_doctor_rejects_a_budget_that_is_not_a_positive_number():
    model, batch, loss_fn, _ = lr_slow_deep_mlp()
    with pytest.raises(ValueError, match=r"doctor budget_s=0: must be a number of seconds > 0"):
        gg.doctor(model, batch, loss_fn, budget_s=0)


def test_a_spent_budget_cuts_the_optional_work_and_reports_it():
    model, batch, loss_fn, opt = lr_slow_deep_mlp()
    diag = gg.doctor(model, batch, loss_fn, opt, budget_s=1e-6)
    assert diag.budget_s == 1e-6
    assert "sharpness: not run" in diag.cut
    assert f"lr: {MIN_STEPS} of 4 steps at lr x 1" in diag.cut  # the steps at the user's LR still ran
    d = diag.to_dict()
    assert d["budget_s"] == 1e-6 and d["cut_by_budget"] == diag.cut
    assert Diagnosis.from_dict(d).cut == diag.cut


def test_the_default_budget_runs_every_probe_on_a_small_model():
    model, batch, loss_fn, opt = lr_slow_deep_mlp()
    diag = gg.doctor(model, batch, loss_fn, opt)
    assert diag.cut == [] and diag.budget_s == DEFAULT_BUDGET_S
    assert diag.top is not None and "sharpness" in diag.top.evidence


def _net_and_sgd():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.2), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()  # a momentum buffer to keep
    nn.functional.mse_loss(model(x), y).backward()  # and a .grad to keep
    return model, opt, (x, y)


def test_step_runner_undoes_its_steps_and_never_steps_the_users_optimizer():
    model, opt, (x, y) = _net_and_sgd()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    before = _snapshot(model, opt)
    grads = [p.grad for p in model.parameters()]
    with StepRunner(model, opt) as runner:
        losses = runner.losses(lambda m: nn.functional.mse_loss(m(x), y), scale=1.0, steps=3)
    assert len(losses) == 4 and losses[-1] < losses[0]
    _assert_same(before, _snapshot(model, opt))
    assert all(p.grad is g for p, g in zip(model.parameters(), grads))  # the same tensors, untouched
    assert calls == [] and sched.last_epoch == 0 and not getattr(opt, "_opt_called", False)


def test_the_first_step_can_reuse_a_pass_already_made():
    model, opt, (x, y) = _net_and_sgd()

    def loss(m):
        return nn.functional.mse_loss(m(x), y)

    torch.manual_seed(0)  # the runner's seed: the same dropout mask
    first = loss(model)
    grads = torch.autograd.grad(first, list(model.parameters()))
    start = FirstStep(float(first.detach()), {id(p): g for p, g in zip(model.parameters(), grads)})
    with StepRunner(model, opt) as runner:
        fresh = runner.losses(loss, scale=0.5, steps=3)
        reused = runner.losses(loss, scale=0.5, steps=3, start=start)
    assert reused == pytest.approx(fresh, rel=1e-6)
    assert start.grads is None and start.take() is None  # taken once, then released


def test_more_steps_are_taken_when_asked_after_the_first_ones():
    model, opt, (x, y) = _net_and_sgd()
    with StepRunner(model, opt) as runner:
        out = runner.losses(lambda m: nn.functional.mse_loss(m(x), y), 1.0, 2, more=lambda losses: 3)
    assert len(out) == 2 + 3 + 1


def test_doctor_leaves_tied_weights_adamw_state_and_a_scheduler_as_they_were():
    torch.manual_seed(0)
    model = TinyGPT(layers=2)
    model.head.weight = model.tok.weight  # tied, as GPT-2's lm_head
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    x, y = tokens()
    lm_loss(model(x), y).backward()
    opt.step()
    sched.step()
    before = _snapshot(model, opt)
    last_lr = sched.get_last_lr()
    gg.doctor(model, (x, y), lm_loss, opt)
    _assert_same(before, _snapshot(model, opt))
    assert sched.get_last_lr() == last_lr and sched.last_epoch == 1
    assert model.head.weight is model.tok.weight


def test_a_rise_the_budget_left_uncompared_is_said_not_passed_over():
    """Found by a stranger: a ViT at AdamW 100x its LR was "healthy: no finding" under the
    default budget, word for word as its twin, the rise at its LR never compared with a
    smaller one. It is now an info finding that says what was seen and how to judge it."""
    def diag(budget_s):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        opt = torch.optim.Adam(net.parameters(), lr=0.15)
        x, y = torch.randn(128, 64), torch.randint(0, 10, (128,))
        return gg.doctor(net, (x, y), nn.CrossEntropyLoss(), opt, budget_s=budget_s)

    cut = diag(1e-3)
    [f] = cut.findings
    assert (f.cause, f.severity, f.evidence["compared"]) == ("lr_too_high", "info", False)
    assert f.evidence["loss_max_at_lr"] > f.evidence["loss_start"]
    assert "rerun with a larger budget" in f.remedy and cut.healthy
    # with the time to look further, this rise is a healthy high LR's catapult (it falls
    # below where it started): judged, nothing said
    full = diag(60.0)
    assert full.findings == [] and full.cut == []


def test_the_cli_takes_a_budget(tmp_path, capsys):
    import json

    from gradguard.cli import main

    spec = tmp_path / "spec.py"
    spec.write_text(
        "import torch\nfrom torch import nn\n\ndef setup():\n    torch.manual_seed(0)\n"
        "    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))\n"
        "    opt = torch.optim.SGD(net.parameters(), lr=0.01)\n"
        "    return net, (torch.randn(32, 8), torch.randn(32, 1)), nn.MSELoss(), opt\n")
    assert main(["doctor", str(spec), "--budget", "0.001", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["budget_s"] == 0.001
