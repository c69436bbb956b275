"""The doctor names the right cause on the zoo of broken setups and stays quiet on healthy ones."""

from __future__ import annotations

from collections import Counter

import pytest
from tests.zoo import BROKEN, HEALTHY

import gradguard as gg
from gradguard.events import CAUSES


def _verdict(case):
    model, batch, loss_fn, opt = case.build()
    diag = gg.doctor(model, batch, loss_fn, opt)
    top = diag.top.cause if diag.top is not None and not diag.healthy else None
    return diag, top


def test_zoo_covers_every_cause_twice_and_ten_healthy_models():
    per_cause = Counter(c.cause for c in BROKEN)
    assert set(per_cause) == set(CAUSES)
    assert min(per_cause.values()) >= 2
    assert len(HEALTHY) >= 10


def test_top_cause_right_on_at_least_90_percent_of_broken_setups():
    wrong = []
    for case in BROKEN:
        diag, top = _verdict(case)
        if top != case.cause:
            wrong.append((case.name, case.cause, [(f.cause, f.severity) for f in diag.findings]))
    assert len(wrong) <= 0.1 * len(BROKEN), wrong


@pytest.mark.parametrize("case", HEALTHY, ids=lambda c: c.name)
def test_healthy_setup_gets_no_warning(case):
    diag, _ = _verdict(case)
    assert diag.healthy, str(diag)


@pytest.mark.parametrize(
    "case",
    [c for c in BROKEN if c.cause in ("init_too_large", "saturating_activation", "dead_units", "recurrent_vanishing")][::2],
    ids=lambda c: c.name,
)
def test_broken_finding_carries_evidence_and_a_specific_remedy(case):
    diag, _ = _verdict(case)
    top = diag.top
    assert top is not None and top.severity in ("warning", "error")
    assert top.evidence and all(isinstance(k, str) for k in top.evidence)
    assert top.where is not None and top.where in top.remedy  # names the layer it is about
    assert any(ch.isdigit() for ch in top.remedy)  # quotes a measured number
