"""The rescue benchmark's harness runs end to end and writes results of the documented
shape (benchmarks/rescue.py; the outcomes themselves are the benchmark's business)."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def rescue(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(ROOT))
    return importlib.import_module("benchmarks.rescue")


def test_rescue_harness_writes_records_of_the_documented_shape(
    rescue: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "rescue.json"
    rescue.main(["--case", "bad_inputs_regression_adam",
                 "--case", "healthy_regression_adamw_restarts",
                 "--steps", "12", "--healthy-seeds", "2", "--out", str(out)])
    assert "bad_inputs_regression_adam" in capsys.readouterr().out  # the table was printed
    res = json.loads(out.read_text())
    assert {"environment", "summary", "rescue", "healthy", "targets", "seconds"} <= set(res)
    assert {"torch", "threads", "time", "git_commit"} <= set(res["environment"])
    assert res["summary"]["rescue_cases"] == 1 and res["summary"]["healthy_cases"] == 1
    assert res["summary"]["held_out_cases"] == 0  # reported apart, none chosen here
    assert res["summary"]["healthy_steps"] == 24  # 12 steps x 2 seeds

    (case,) = res["rescue"]
    assert case["name"] == "bad_inputs_regression_adam" and case["steps"] == 12
    assert {"unguarded", "guarded", "twin", "guarded_over_twin", "gap_closed",
            "within_2x", "unguarded_over_twin"} <= set(case)
    for arm in ("unguarded", "guarded", "twin"):
        assert {"eval_loss", "train_loss", "finite", "aborted", "curve"} <= set(case[arm])
        assert len(case[arm]["curve"]) == 12
    assert {"skips", "backoffs", "rollbacks", "settled_lr", "lr_factor", "first_incident",
            "warnings", "events"} <= set(case["guarded"])
    assert "skips" not in case["twin"]  # unguarded arms carry no guard fields

    (h,) = res["healthy"]
    assert {"guarded_over_unguarded", "warnings", "within_2pct", "ok"} <= set(h)
    assert isinstance(h["guarded_over_unguarded"], float)
    assert [r["seed"] for r in h["per_seed"]] == [0, 1] and h["seeds"] == 2
    mean = lambda arm: sum(r[arm] for r in h["per_seed"]) / 2  # noqa: E731
    assert h["guarded_over_unguarded"] == pytest.approx(mean("guarded") / mean("unguarded"))
    assert math.isfinite(h["guarded"]["eval_loss"])


def test_rescue_seeds_records_every_seed_and_counts_them(
    rescue: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "rescue.json"
    rescue.main(["--case", "bad_inputs_regression_adam", "--steps", "12", "--rescue-seeds", "2",
                 "--out", str(out)])
    assert "over 2 seeds" in capsys.readouterr().out
    res = json.loads(out.read_text())
    (case,) = res["rescue"]
    assert [r["seed"] for r in case["seeds"]] == [0, 1]
    assert case["seeds"][0]["guarded_over_twin"] == case["guarded_over_twin"]  # seed 0's record
    assert case["within_2x_seeds"] == sum(r["within_2x"] for r in case["seeds"])
    again = rescue.Runner(seed=1).rescue(rescue.RESCUE_CASES[4], 12)  # the same case, seed 1
    assert again["name"] == "bad_inputs_regression_adam"
    assert case["seeds"][1]["guarded_over_twin"] == pytest.approx(again["guarded_over_twin"], rel=1e-3)
    assert res["summary"]["rescue_seed_runs_within_2x"] == [case["within_2x_seeds"], 2]
    assert res["environment"]["rescue_seeds"] == 2
    with pytest.raises(SystemExit):
        rescue.main(["--rescue-seeds", "0"])


def test_bad_inputs_corrupts_the_seeded_fraction_and_reports_which(rescue: ModuleType) -> None:
    bad_inputs = rescue.rc.BadInputs(fraction=0.05)

    def clean(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ones(4, 3), torch.zeros(4)

    get, bad = bad_inputs.batches(clean, 2000, seed=0)
    assert 60 <= len(bad) <= 140  # ~5% of 2000
    assert bad == bad_inputs.batches(clean, 2000, seed=0)[1]  # seeded
    xs = [get(s)[0] for s in sorted(bad)]
    assert any(bool(x.isnan().all()) for x in xs) and any(float(x.max()) == 1e4 for x in xs)
    good = next(s for s in range(2000) if s not in bad)
    assert torch.equal(get(good)[0], torch.ones(4, 3))


def test_train_tail_leaves_corrupted_batches_and_unfinished_runs_out(rescue: ModuleType) -> None:
    # the last 10% of 20 steps are steps 18 and 19; step 18's batch was corrupted
    out = rescue.Outcome(losses=[1.0] * 18 + [float("nan"), 3.0], excluded=frozenset({18}))
    assert rescue.train_tail(out, 20) == 3.0
    assert math.isnan(rescue.train_tail(rescue.Outcome(losses=[1.0] * 5), 20))


def test_probe_arms_forks_both_arms_from_the_runs_weights(
    rescue: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """benchmarks/probe_arms.py: both arms start from the run's weights at the fork, the
    trial at FACTOR times the LR, and they train copies: the run's own model takes no arm
    step."""
    arms = importlib.import_module("benchmarks.probe_arms")
    task, recipe = rescue.rc.REGRESSION_MLP, rescue.rc.Recipe(torch.optim.Adam, 1e-2)
    seen: list[tuple[int, int, float, float]] = []  # model id, step, factor, weight sum before
    step = arms._step

    def spy(task_, recipe_, model, opt, batch, s, factor):  # type: ignore[no-untyped-def]
        seen.append((id(model), s, factor, float(next(model.parameters()).detach().sum())))
        return step(task_, recipe_, model, opt, batch, s, factor)

    monkeypatch.setattr(arms, "_step", spy)
    out = arms.arms(task, recipe, 12, (10,), seed=0)
    fork = out["forks"][0]
    assert fork["step"] == 10 and fork["ratio"] == pytest.approx(fork["trial"] / fork["control"], rel=1e-3)
    run = seen[0][0]
    mine = [x for x in seen if x[0] == run]
    assert [x[1] for x in mine] == list(range(12)) and {x[2] for x in mine} == {1.0}
    others = [x for x in seen if x[0] != run]
    control, trial = others[:arms.TRIAL], others[arms.TRIAL:]
    assert len(trial) == arms.TRIAL and {x[2] for x in control} == {1.0}
    assert {x[2] for x in trial} == {arms.FACTOR}
    assert control[0][3] == trial[0][3] == mine[10][3]  # the run's weights at the fork
    assert out["nonfinite_at"] is None


def test_probe_arms_trial_factor_is_the_one_asked_for(
    rescue: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    arms = importlib.import_module("benchmarks.probe_arms")
    task, recipe = rescue.rc.REGRESSION_MLP, rescue.rc.Recipe(torch.optim.Adam, 1e-2)
    factors: list[float] = []
    step = arms._step

    def spy(task_, recipe_, model, opt, batch, s, factor):  # type: ignore[no-untyped-def]
        factors.append(factor)
        return step(task_, recipe_, model, opt, batch, s, factor)

    monkeypatch.setattr(arms, "_step", spy)
    arms.arms(task, recipe, 11, (10,), seed=0, factor=0.25)
    assert factors.count(0.25) == arms.TRIAL and factors.count(arms.FACTOR) == 0
    with pytest.raises(SystemExit):
        arms.main(["--factor", "1.5"])


def test_rescue_beyond_takes_the_best_of_its_sweep_as_the_twin(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """benchmarks/rescue_beyond.py: the twin is the sweep's best held-out loss, the ratio is
    the guarded run's over it, and the targets of the unit-error case are x1000."""
    monkeypatch.syspath_prepend(str(ROOT))
    beyond = importlib.import_module("benchmarks.rescue_beyond")
    out = tmp_path / "beyond.json"
    res = beyond.main(["--case", "regression_targets_x1000_sgd", "--steps", "8", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    (row,) = res["rows"]
    assert len(row["sweep"]) == len(beyond.SWEEP)
    assert row["twin"] == min(row["sweep"].values())
    assert math.isclose(row["twin_lr"], 1e-3 * min(beyond.SWEEP, key=lambda f: row["sweep"][f"{1e-3 * f:.3g}"]))
    if row["finite"]:
        assert math.isclose(row["guarded_over_twin"], row["guarded"] / row["twin"])
    assert res["summary"]["cases"] == 1
    task, _ = beyond._cases()["regression_targets_x1000_sgd"]
    _, y = task.held_out()
    assert float(y.std()) > 100  # the targets are in the wrong unit
