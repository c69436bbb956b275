"""gg.gradcheck: finite differences in float64 against autograd, per input and parameter."""

from __future__ import annotations

import pytest
import torch
from tests.zoo.models import BadSquare, BadSwish, GoodSwish, SwishMLP
from torch import nn

import gradguard as gg


class _Square(nn.Module):
    def forward(self, x):
        return BadSquare.apply(x)


def test_correct_module_passes_with_tiny_errors():
    torch.manual_seed(0)
    rep = gg.gradcheck(nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2)), torch.randn(3, 5))
    assert rep.ok
    assert [e.name for e in rep.entries] == ["input[0]", "0.weight", "0.bias", "2.weight", "2.bias"]
    assert all(e.max_abs_err < 1e-7 for e in rep.entries)
    assert all(e.checked == min(32, n) for e, n in zip(rep.entries, [15, 35, 7, 14, 2]))


def test_wrong_backward_is_caught_with_the_relative_error_it_makes():
    x = torch.randn(4, 3)
    rep = gg.gradcheck(_Square(), x)
    assert not rep.ok
    (e,) = rep.entries
    # backward returns 3x where d(x²)/dx = 2x: relative error |3x - 2x| / |3x| = 1/3
    assert e.max_rel_err == pytest.approx(1 / 3, rel=1e-4)
    assert "MISMATCH" in str(rep)


def test_custom_function_inside_a_model_checks_parameters_too():
    torch.manual_seed(0)
    bad = gg.gradcheck(SwishMLP(BadSwish), torch.randn(2, 16))
    good = gg.gradcheck(SwishMLP(GoodSwish), torch.randn(2, 16))
    assert good.ok and not bad.ok
    assert {e.name for e in bad.entries if not e.ok} >= {"l1.weight", "input[0]"}


def test_dropout_is_reseeded_so_finite_differences_stay_exact():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 6), nn.Dropout(0.5), nn.Linear(6, 1))
    assert gg.gradcheck(m, torch.randn(4, 6)).ok


def test_gradcheck_leaves_module_and_inputs_untouched():
    m = nn.Linear(3, 3)
    x = torch.randn(2, 3)
    w, x0 = m.weight.clone(), x.clone()
    gg.gradcheck(m, x)
    assert m.weight.dtype == torch.float32 and torch.equal(m.weight, w) and torch.equal(x, x0)
    assert m.weight.grad is None


def test_gradcheck_rejects_bad_arguments():
    with pytest.raises(TypeError, match="gradcheck module=function"):
        gg.gradcheck(lambda x: x, torch.randn(2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_checks=0"):
        gg.gradcheck(nn.Linear(2, 2), torch.randn(1, 2), max_checks=0)
    # found by a stranger: eps=0 raised ZeroDivisionError; a negative or NaN eps or
    # tolerance called a correct model's gradients wrong on every entry
    for kw in ({"eps": 0.0}, {"eps": -1.0}, {"eps": float("nan")}, {"atol": -1.0},
               {"rtol": -1.0}, {"atol": float("nan")}):
        name = next(iter(kw))
        with pytest.raises(ValueError, match=rf"gradcheck {name}=.*must be a finite number"):
            gg.gradcheck(nn.Linear(2, 2), torch.randn(1, 2), **kw)
    with pytest.raises(TypeError, match=r"gradcheck seed=0.5: expected an int"):
        gg.gradcheck(nn.Linear(2, 2), torch.randn(1, 2), seed=0.5)  # type: ignore[arg-type]


def test_doctor_locates_the_custom_function_module():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), _Square(), nn.Linear(8, 1))
    diag = gg.doctor(model, (torch.randn(8, 4), torch.randn(8, 1)), nn.MSELoss())
    f = diag.top
    assert f is not None and f.cause == "wrong_gradient" and f.where == "1"
    assert f.evidence["function"] == "BadSquare"
    assert f.evidence["max_rel_err"] == pytest.approx(1 / 3, rel=1e-3)
