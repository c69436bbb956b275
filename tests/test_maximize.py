"""An optimizer with ``maximize=True`` ascends the value passed to ``guard.step``: the guard
judges its negation, a loss like any other (tried as a stranger: a healthy run that
maximised 5 - cross-entropy was rolled back twice "for a loss that rose", its held-out loss
3.7x the unguarded run's)."""

from __future__ import annotations

import json

import pytest
import torch
from benchmarks import rescue_cases as rc
from torch import nn

import gradguard as gg


def _maximised_run(steps, *, guarded, lr=1e-3, plunge_at=None, sink_dir=None):
    """The digits MLP on Adam(maximize=True) ascending 5 - cross-entropy (positive, rising
    as it learns). At ``plunge_at`` the objective falls a thousandfold with its gradient
    (a poisoned batch). Returns (guard or None, the model's held-out cross-entropy)."""
    torch.manual_seed(0)
    model = rc.mlp(64, 10)
    opt = torch.optim.Adam(model.parameters(), lr=lr, maximize=True)
    guard = None
    if guarded:
        sinks = [gg.JsonlSink(sink_dir)] if sink_dir is not None else []
        guard = gg.Guard(model, opt, clip=gg.ZClip(), recovery=gg.Recovery(), sinks=sinks)
    batch = rc.digits_batches(0)
    for step in range(steps):
        x, y = batch(step)
        ce = nn.functional.cross_entropy(model(x), y)
        objective = 5 - ce * (1000 if step == plunge_at else 1)
        opt.zero_grad()
        objective.backward()
        guard.step(objective.detach()) if guard else opt.step()
    if guard is not None:
        guard.close()
    x, y = rc.digits_eval()
    with torch.no_grad():
        return guard, nn.functional.cross_entropy(model(x), y).item()


def test_a_healthy_maximising_run_is_left_alone():
    _, unguarded = _maximised_run(300, guarded=False)
    guard, guarded = _maximised_run(300, guarded=True)
    assert [e for e in guard.events if e.severity != "info"] == []
    assert guarded == pytest.approx(unguarded, rel=0.02)


def test_the_guard_records_the_negated_objective(tmp_path):
    _maximised_run(20, guarded=True, sink_dir=tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r.get("loss") is not None]
    assert len(losses) == 20
    # 5 - CE ascended: its negation CE - 5 lies in (-5, -2.6) for a 10-class model
    assert all(-5 < v < -2.5 for v in losses)


def test_a_plunging_objective_is_skipped_and_named_as_a_loss():
    guard, _ = _maximised_run(60, guarded=True, plunge_at=40)
    skips = [e for e in guard.events if e.kind == "skip"]
    assert [e.step for e in skips] == [40]
    # the gradient's spike skips it; the loss it names is the negated objective, ~1000 x CE
    assert "spiked (norm" in skips[0].message and "loss 89" in skips[0].message
    assert all(torch.isfinite(p).all() for p in guard.model.parameters())


def test_param_groups_that_disagree_about_maximize_warn_at_construction():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    opt = torch.optim.SGD([{"params": model[0].parameters(), "maximize": True},
                           {"params": model[1].parameters()}], lr=0.1)
    with pytest.warns(gg.GradGuardWarning, match="mix maximize=True and maximize=False"):
        gg.Guard(model, opt)
