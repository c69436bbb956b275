"""The doctor on real architectures (transformers configs with their own random init, and
torch.nn models written as torchvision/timm write them): no false alarm on healthy models,
the right cause first on broken ones. The slow cases (GPT-2 at its 50257-token vocabulary,
broken three ways) run in benchmarks/doctor_zoo.py, which records the whole zoo."""

from __future__ import annotations

import pytest
from tests.zoo.real import REAL_BROKEN, REAL_HEALTHY

import gradguard as gg
from gradguard.events import CAUSES

pytest.importorskip("transformers")  # the zoo's models come from transformers configs

#: the acceptance of issue 17: no warning on >= 96 % of healthy models, the right top cause
#: on >= 90 % of broken ones
HEALTHY_SHARE = 0.96
BROKEN_SHARE = 0.90


def _top(case):
    diag = gg.doctor(*case.build())
    return diag, (diag.top.cause if diag.top is not None and not diag.healthy else None)


def test_real_zoo_has_25_healthy_and_25_broken_models_with_known_causes():
    assert len(REAL_HEALTHY) >= 25 and len(REAL_BROKEN) >= 25
    assert all(c.cause is None for c in REAL_HEALTHY)
    assert {c.cause for c in REAL_BROKEN} <= set(CAUSES)
    assert len({c.name for c in REAL_HEALTHY + REAL_BROKEN}) == len(REAL_HEALTHY) + len(REAL_BROKEN)


def test_no_warning_on_96_percent_of_healthy_real_models():
    alarms = []
    for case in [c for c in REAL_HEALTHY if not c.slow]:
        diag, top = _top(case)
        if top is not None:
            alarms.append((case.name, [(f.cause, f.severity, f.where) for f in diag.findings]))
    n = len([c for c in REAL_HEALTHY if not c.slow])
    assert len(alarms) <= (1 - HEALTHY_SHARE) * n, alarms


def test_top_cause_right_on_90_percent_of_broken_real_models():
    wrong = []
    for case in [c for c in REAL_BROKEN if not c.slow]:
        diag, top = _top(case)
        if top != case.cause:
            wrong.append((case.name, case.cause, [(f.cause, f.severity) for f in diag.findings]))
    n = len([c for c in REAL_BROKEN if not c.slow])
    assert len(wrong) <= (1 - BROKEN_SHARE) * n, wrong
