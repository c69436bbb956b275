"""A clip_grad_norm_ of the user's own before guard.step blinds the guard (it measures the
clipped norms): it says so, once, and names the cap (gradguard/detectors/capped.py)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.detectors import DetectorState, detect_capped
from test_detectors import noisy, window


def norms_window(norms, start=0):
    return window([[x] for x in norms], start=start)


@pytest.mark.parametrize(("ties", "expected"), [(0, False), (4, False), (5, True), (50, True)])
def test_five_norms_tied_with_the_largest_are_a_cap(ties, expected):
    norms = noisy(50, sigma=0.5, seed=1)
    cap = 2.0
    norms = [x * cap / max(norms) for x in norms]
    # clip_grad_norm_'s trace: max_norm * total / (total + 1e-6), a hair under the cap
    norms = [cap * (1 - 1e-6 * (i % 3)) if i < ties else x * 0.9 for i, x in enumerate(norms)]
    st = DetectorState()
    events = detect_capped(norms_window(norms), st)
    assert bool(events) == expected
    if expected:
        ev = events[0]
        assert ev.kind == "clip" and ev.severity == "info" and ev.data["cap"] == ev.value
        assert ev.data["steps_at_cap"] == ties and ev.value == pytest.approx(cap)
        assert f"max_norm={cap:.3g}" in ev.remedy
        # once per run
        assert detect_capped(norms_window(norms, start=50), st) == []


@pytest.mark.parametrize(("norm", "expected"), [(0.1, True), (0.25, True), (1.0, True),
                                             (3.0 ** 0.5, False), (0.1234, False)])
def test_every_norm_at_one_value_is_a_cap_when_a_person_chose_it(norm, expected):
    # a clip under all of the run's norms leaves every step at max_norm; a gradient constant
    # by construction (a linear model's sum() over fixed inputs) is as flat, at no round value
    norms = [norm * (1 - 1e-7 * (i % 2)) for i in range(50)]
    assert bool(detect_capped(norms_window(norms), DetectorState())) == expected


def test_natural_norms_even_from_a_tight_distribution_do_not_tie():
    st = DetectorState()
    for seed in range(200):  # 10,000 steps of norms within a few percent of each other
        assert detect_capped(norms_window(noisy(50, sigma=0.03, seed=seed)), st) == []


def test_nonfinite_and_zero_norms_are_not_a_cap():
    norms = [math.nan] * 10 + [0.0] * 10 + noisy(30, seed=2)
    assert detect_capped(norms_window(norms), DetectorState()) == []


def digits_loop(user_clip, guard_clip, steps=120):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    guard = gg.Guard(model, opt, clip=guard_clip, recovery=gg.Recovery())
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(512, 64, generator=g) * 3, torch.randint(0, 10, (512,), generator=g)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            idx = torch.randint(0, 512, (32,), generator=g)
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            if user_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), user_clip)
            guard.step(loss)
            opt.zero_grad()
        guard.close()
    ours = [w for w in caught if issubclass(w.category, gg.GradGuardWarning)]
    # at the line of the loop that called guard.step (it named monitor.py's own line)
    assert all(w.filename == __file__ for w in ours), [(w.filename, w.lineno) for w in ours]
    said = [str(w.message) for w in ours]
    return [e for e in guard.events if e.kind == "clip" and "cap" in e.data], said


@pytest.mark.parametrize("max_norm", [0.05, 1.0])
def test_a_users_own_clip_before_guard_step_is_reported_once_with_its_cap(max_norm):
    events, said = digits_loop(max_norm, gg.ZClip())
    assert len(events) == 1 and len(said) == 1
    assert events[0].value == pytest.approx(max_norm, rel=1e-4)
    assert f"clip_grad_norm_(max_norm={max_norm:.3g})" in said[0]
    assert f"clip=gg.NormClip(max_norm={max_norm:.3g})" in said[0]


@pytest.mark.parametrize("guard_clip", [None, "norm", "zclip"])
def test_the_guards_own_clip_or_none_is_not_reported(guard_clip):
    # the same cap done by the guard comes after its measurement: no trace
    clip = {None: None, "norm": gg.NormClip(max_norm=0.05), "zclip": gg.ZClip()}[guard_clip]
    events, said = digits_loop(None, clip)
    assert events == [] and said == []


def test_the_report_says_the_norms_it_shows_were_capped(tmp_path):
    from gradguard.report._data import load_run
    from gradguard.report._summary import summary_sentence

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    guard = gg.Guard(model, opt, clip=gg.ZClip(), sinks=[gg.JsonlSink(tmp_path)])
    g = torch.Generator().manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gg.GradGuardWarning)
        for step in range(100):
            x = torch.randn(32, 64, generator=g) * (100 if step == 80 else 3)
            loss = nn.functional.cross_entropy(model(x), torch.randint(0, 10, (32,), generator=g))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            guard.step(loss)
            opt.zero_grad()
        guard.close()
    text = summary_sentence(load_run(tmp_path))
    assert "The gradients reached gradguard already clipped to 1 (seen by step 49" in text
