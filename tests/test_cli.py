"""The command line: demo breaks unguarded and recovers guarded; usage errors exit 2."""

from __future__ import annotations

import subprocess
import sys

import gradguard as gg
from gradguard.cli import main
from gradguard.cli.demo import fault_schedule, run_demo
from gradguard.events import read_jsonl


def test_demo_unguarded_breaks_and_guarded_recovers(tmp_path):
    a, b = run_demo(out=tmp_path, steps=200, seed=0)
    assert a.broke, a
    assert not b.broke and b.final_loss < 0.05, b
    spikes = [s for s, f in fault_schedule(200).items() if f == "spike"]
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["type"] == "step"]
    clipped = {r["step"] for r in rows if r["clip_coef"] is not None and r["clip_coef"] < 1.0}
    skipped = {r["step"] for r in rows if r["skipped"]}
    # both spikes clipped, then skipped: "clipped steps" counts the clipped updates taken
    assert set(spikes) <= clipped & skipped and b.clipped_steps == len(clipped - skipped)
    assert (tmp_path / "metrics.jsonl").stat().st_size > 0
    assert (tmp_path / "events.jsonl").exists()


def test_cli_demo_exit_0_and_summary(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--steps", "120"]) == 0
    out = capsys.readouterr().out
    assert "unguarded" in out and "guarded" in out and "first NaN step" in out


def test_cli_demo_refuses_another_runs_directory_and_replaces_its_own(tmp_path, capsys):
    """Found by a stranger: ``gradguard demo --out`` a run directory deleted its metrics,
    events and report without a word, and left its run.json and guard state beside the
    demo's files."""
    run = tmp_path / "run"
    run.mkdir()
    files = {"metrics.jsonl": "{}\n", "events.jsonl": "", "run.json": "{}", "guard_state.pt": "x"}
    for name, text in files.items():
        (run / name).write_text(text)
    assert main(["demo", "--out", str(run), "--steps", "40"]) == 2
    err = capsys.readouterr().err
    assert f"--out {run}" in err and "guard_state.pt, run.json" in err and "of its own" in err
    assert {p.name: p.read_text() for p in run.iterdir()} == files  # nothing touched
    own = tmp_path / "demo"
    assert main(["demo", "--out", str(own), "--steps", "40"]) == 0
    assert main(["demo", "--out", str(own), "--steps", "40"]) == 0  # its own: replaced
    assert sorted(p.name for p in own.iterdir()) == ["demo.json", "events.jsonl", "guard.json",
                                                      "metrics.jsonl", "report.html"]
    # found by a stranger: the README's loop writes the demo's three file names
    loop = tmp_path / "exp1"
    loop.mkdir()
    for name in ("metrics.jsonl", "events.jsonl", "report.html"):
        (loop / name).write_text("{}\n")
    capsys.readouterr()
    assert main(["demo", "--out", str(loop), "--steps", "40"]) == 2
    assert "did not write (events.jsonl, metrics.jsonl)" in capsys.readouterr().err
    assert all((loop / n).read_text() == "{}\n" for n in ("metrics.jsonl", "report.html"))


def test_cli_usage_errors_exit_2(capsys, tmp_path):
    assert main([]) == 2
    assert main(["demo", "--steps", "5"]) == 2
    assert "--steps 5" in capsys.readouterr().err
    # found by a stranger: a window too long for the guard was a traceback and exit 1
    script = tmp_path / "train.py"
    script.write_text("print('never run')\n")
    assert main(["run", "--every", "1000000", str(script)]) == 2
    assert "--every 1000000: must be from 1 to 100000" in capsys.readouterr().err


def test_version_and_module_entry_point():
    r = subprocess.run(
        [sys.executable, "-m", "gradguard", "--version"], capture_output=True, text=True, check=True
    )
    assert r.stdout.strip() == f"gradguard {gg.__version__}"
    r = subprocess.run(
        [sys.executable, "-m", "gradguard", "demo", "--bogus"], capture_output=True, text=True
    )
    assert r.returncode == 2


def test_cli_demo_out_that_is_a_file_is_usage_error(tmp_path, capsys):
    """Found by a stranger: ``gradguard demo --out`` an existing file ended in a
    FileExistsError traceback and exit 1 (``report -o``, ``run --out`` and ``lab --out``
    give exit 2 and one line)."""
    (tmp_path / "afile").write_text("x")
    assert main(["demo", "--out", str(tmp_path / "afile"), "--steps", "40"]) == 2
    err = capsys.readouterr().err
    assert f"--out {tmp_path / 'afile'}" in err and "Traceback" not in err
    assert (tmp_path / "afile").read_text() == "x"
