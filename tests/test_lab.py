"""gradguard lab: the fast mode of every experiment reproduces the direction of every claim.

Each experiment's claims carry their own margin (see the ``criterion`` of each claim); a
test fails when any claim does not hold, naming the claim and its measured figures.
"""

from __future__ import annotations

import json
import sys

import pytest

import gradguard as gg
from gradguard import cli

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")


def _failed(result):
    return [(c.name, c.measured, c.criterion) for c in result.claims if not c.passed]


@pytest.mark.parametrize("exp_id", list(gg.lab.ORDER))
def test_fast_mode_reproduces_every_claim(exp_id, tmp_path):
    result = gg.lab.run(exp_id, out=tmp_path, fast=True)
    assert result.claims, f"{exp_id} checks no claim"
    assert not _failed(result), f"{exp_id}: {_failed(result)}"
    written = json.loads((tmp_path / exp_id / "result.json").read_text())
    assert written["id"] == exp_id and written["mode"] == "fast" and written["passed"] is True
    assert len(written["claims"]) == len(result.claims)
    for plot in result.plots:
        assert (tmp_path / exp_id / plot).stat().st_size > 1000
    if result.guard:  # a failing configuration, rerun under the default guard
        g = result.guard
        assert "ZClip" in g["guard"]
        assert g["within_2x"] == (g["finite"] and g["ratio_to_healthy"] <= 2.0)
    if exp_id in ("T1", "T5", "T6", "T7"):  # the healthy twin under the same guard
        h = result.guard["healthy_guarded"]
        assert h["within_2pct"] == (h["ratio"] <= 1.02) and isinstance(h["warnings"], list)
        assert h["unguarded_final_loss"] == pytest.approx(
            written["guard"]["healthy_guarded"]["unguarded_final_loss"], rel=1e-4)


def test_unknown_id_names_the_allowed_values(tmp_path):
    with pytest.raises(ValueError, match="T11"):
        gg.lab.run("T99", out=tmp_path)
    with pytest.raises(ValueError, match="run_all"):
        gg.lab.run("all", out=tmp_path)


def test_id_aliases():
    assert gg.lab.title("t3") == gg.lab.title("3") == gg.lab.EXPERIMENTS["T3"][1]


def test_cli_lab_runs_one_experiment(tmp_path, capsys):
    rc = cli.main(["lab", "T0", "--out", str(tmp_path), "--fast"])
    assert rc == 0
    assert (tmp_path / "T0" / "result.json").exists()
    assert "T0" in (tmp_path / "summary.md").read_text()


def test_the_lab_says_what_the_default_guard_did_on_a_failing_configuration(tmp_path, capsys):
    """Found by a stranger: the CLI and summary.md showed the claims alone, and what the
    default guard did on the failing side (the lab's point) was only in result.json."""
    from gradguard.lab import Result, guard_outcome, summary_table

    assert cli.main(["lab", "T5", "--out", str(tmp_path), "--fast"]) == 0
    got = capsys.readouterr()
    out = got.out + got.err  # the progress lines go to stderr with rich
    ratio = json.loads((tmp_path / "T5" / "result.json").read_text())["guard"]["ratio_to_healthy"]
    said = f"default guard {ratio:.3g}x its healthy twin"
    assert said in out and said in (tmp_path / "summary.md").read_text()
    r = Result("T7", "t", fast=True, guard={"ratio_to_healthy": 32.6, "finite": True,
                                            "within_2x": False, "fix_in_reach_of_a_guard": True})
    assert guard_outcome(r) == ("default guard 32.6x its healthy twin, NOT within 2x in --fast "
                                "mode (too few steps to judge a rescue: run without it)")
    assert guard_outcome(Result("T0", "t", fast=False)) is None
    assert "| T7 | default guard 32.6x" in summary_table([r])


def test_cli_lab_bad_id_is_usage_error(tmp_path):
    assert cli.main(["lab", "T42", "--out", str(tmp_path)]) == 2


def test_cli_lab_out_that_is_a_file_is_usage_error(tmp_path, capsys):
    """Found by a stranger: ``--out`` naming a file ended in a NotADirectoryError
    traceback after the experiment had run."""
    (tmp_path / "afile").write_text("")
    assert cli.main(["lab", "T0", "--fast", "--out", str(tmp_path / "afile")]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "cannot be created" in err and "Traceback" not in err


def test_import_gradguard_does_not_load_lab_extras():
    import subprocess

    code = (
        "import sys, gradguard; "
        "print(any(m in sys.modules for m in ('matplotlib', 'sklearn', 'gradguard.lab')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
