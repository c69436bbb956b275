"""`gradguard demo`, the main job: the unguarded run breaks, the guarded one recovers, and
the report is written and its path printed."""

from __future__ import annotations

import math

import pytest

from gradguard.cli import main
from gradguard.cli.demo import fault_schedule, run_demo
from gradguard.events import read_jsonl

STEPS = 160


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    a, b = run_demo(out=out, steps=STEPS, seed=0)
    return out, a, b


def test_unguarded_run_breaks(demo):
    _, a, _ = demo
    assert a.broke and not a.weights_finite and math.isnan(a.final_loss)
    assert a.first_nan_step is not None and a.first_nan_step <= min(fault_schedule(STEPS)) + 2


def test_guarded_run_recovers(demo):
    _, _, b = demo
    assert not b.broke and b.weights_finite and not b.aborted
    assert b.final_loss < 0.05, b  # as good as a clean run of this length
    # the corrupted shard's 4 NaN batches, and the two x1e4 batches: the per-step spike
    # verdict skips them at their step (clipped first, they took no clipped update: the
    # count of clipped steps is checked against metrics.jsonl below)
    assert b.skips == 6
    assert sum("spiked" in m for m in b.events) == 2
    assert b.lr_backoffs >= 1  # Recovery reacted to consecutive skips


def test_guarded_run_writes_events_and_metrics(demo):
    out, _, b = demo
    steps = [r for r in read_jsonl(out / "metrics.jsonl") if r["type"] == "step"]
    assert [r["step"] for r in steps] == list(range(STEPS))
    # "clipped steps" are clipped updates taken: a step clipped, then skipped, took none
    # (found as a stranger: "skipped 6, clipped 5", 2 of the 5 skipped)
    clipped = [r for r in steps if r["clip_coef"] is not None and r["clip_coef"] < 1.0]
    assert any(r["skipped"] for r in clipped)
    assert b.clipped_steps == sum(not r["skipped"] for r in clipped)
    kinds = {r["kind"] for r in read_jsonl(out / "events.jsonl")}
    assert {"nonfinite_grad", "skip", "lr_backoff"} <= kinds


def test_demo_is_reproducible_for_a_seed(demo, tmp_path):
    _, a, b = demo
    a2, b2 = run_demo(out=tmp_path, steps=STEPS, seed=0)
    assert b2.final_loss == b.final_loss and a2.first_nan_step == a.first_nan_step


def test_cli_demo_prints_summary_and_report_path(tmp_path, capsys):
    out = tmp_path / "runs" / "demo"
    assert main(["demo", "--out", str(out), "--steps", "120", "--seed", "1"]) == 0
    text = capsys.readouterr().out
    for row in ("final loss", "first NaN step", "skipped steps", "rollbacks", "LR back-offs"):
        assert row in text
    assert "BROKE" in text and "recovered" in text
    report = out / "report.html"
    assert f"report: {report.resolve()}" in text
    page = report.read_text()
    assert ">Summary</h2>" in page and "training recovered" in page


def test_cli_demo_rejects_too_few_steps(capsys):
    assert main(["demo", "--steps", "10"]) == 2
    assert "--steps 10" in capsys.readouterr().err


def test_run_demo_rejects_bad_steps(tmp_path):
    with pytest.raises(ValueError, match="steps=5"):
        run_demo(out=tmp_path, steps=5)
