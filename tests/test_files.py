"""The run directory's JSONL files: resuming after a kill, a streaming reader, and
``gradguard report`` on every kind of bad input (exit 2, one line naming file and line)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import tracemalloc
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tests.helpers import batches, guarded_steps, mlp

import gradguard as gg
from gradguard.cli import main
from gradguard.events import Flush, iter_jsonl, read_jsonl
from gradguard.report import ReportError, load_run


def _flush(steps: range, loss: float = 1.0) -> Flush:
    recs = [{"step": s, "loss": loss, "grad_norm": 2.0, "clip_coef": 1.0, "skipped": False,
             "finite": True} for s in steps]
    layers = {"step": steps[-1], "first_step": steps[0], "layers": ["a", "b"],
              "grad_norm": [loss, 2 * loss], "grad_norm_max": [1.5 * loss, 2.5 * loss]}
    return Flush(steps=recs, layers=layers, events=[])


def _write(run: Path, *flushes: Flush) -> None:
    sink = gg.JsonlSink(run, fsync=False)
    for f in flushes:
        sink.write(f)
    sink.close()


def _read_warned(path: Path) -> tuple[list[dict], list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recs = read_jsonl(path)
    return recs, [str(w.message) for w in caught]


def _report(capsys, run: Path) -> tuple[int, str, str]:
    rc = main(["report", str(run)])
    out, err = capsys.readouterr()
    return rc, out, err


# ---- a killed run, resumed ------------------------------------------------------------------
def test_resumed_sink_terminates_the_partial_line_of_a_killed_run(tmp_path, capsys):
    _write(tmp_path, _flush(range(0, 5)))
    metrics = tmp_path / "metrics.jsonl"
    n_lines = len(metrics.read_text().splitlines())
    with open(metrics, "a") as fh:  # killed half-way through a line
        fh.write('{"v": 1, "type": "step", "step": 5, "lo')
    _write(tmp_path, _flush(range(5, 10), loss=0.5))  # the resumed run appends

    recs, warned = _read_warned(metrics)
    assert [r["step"] for r in recs if r["type"] == "step"] == list(range(10))
    assert len(warned) == 1
    assert f"{metrics}:{n_lines + 1}: " in warned[0] and "partial line" in warned[0]
    rc, out, err = _report(capsys, tmp_path)
    assert rc == 0 and out.strip() == str(tmp_path / "report.html")
    assert f"metrics.jsonl:{n_lines + 1}: " in err
    assert load_run(tmp_path).loss.tolist() == [1.0] * 5 + [0.5] * 5


def test_a_line_cut_just_before_its_newline_is_kept(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    _write(tmp_path, _flush(range(0, 3)))
    metrics.write_bytes(metrics.read_bytes()[:-1])  # the record is whole, the "\n" is not
    _write(tmp_path, _flush(range(3, 6)))
    recs, warned = _read_warned(metrics)
    assert warned == []
    assert [r["step"] for r in recs if r["type"] == "layers"] == [2, 5]


def test_a_killed_run_resumed_twice_skips_each_partial_line(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    lines = []
    for k in range(3):
        _write(tmp_path, _flush(range(3 * k, 3 * k + 3)))
        lines.append(len(metrics.read_bytes().splitlines()) + 1)
        if k < 2:
            with open(metrics, "ab") as fh:
                fh.write(b'{"v": 1, "type": "la')
    recs, warned = _read_warned(metrics)
    assert [r["step"] for r in recs if r["type"] == "step"] == list(range(9))
    assert [w.split(": ", 1)[0] for w in warned] == [f"{metrics}:{n}" for n in lines[:2]]


def test_a_torn_line_not_followed_by_a_resume_is_still_an_error(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    _write(tmp_path, _flush(range(0, 3)))
    with open(metrics, "a") as fh:
        fh.write('{"v": 1, "type": "st\n')  # terminated by someone else, no marker
    _write(tmp_path, _flush(range(3, 6)))
    with pytest.raises(ValueError, match=r"metrics.jsonl:5: corrupt JSON line"):
        read_jsonl(metrics)


def test_resume_after_a_kill_through_the_guard(tmp_path):
    def train(steps: range, nan_step: int) -> None:
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        with gg.Guard(model, opt, every=5, sinks=[gg.JsonlSink(tmp_path)]) as guard:
            guard.step_count = steps[0]
            guarded_steps(guard, model, opt, len(steps), nan_steps={nan_step}, start=steps[0])

    train(range(0, 10), nan_step=3)
    events = tmp_path / "events.jsonl"
    n_lines = len(events.read_text().splitlines())
    with open(events, "a") as fh:  # killed while writing the events of step 9
        fh.write('{"v": 1, "type": "event", "kind": "sk')
    train(range(10, 20), nan_step=13)
    data = load_run(tmp_path)
    assert data.step.tolist() == list(range(20))
    assert {(e["kind"], e["step"]) for e in data.events} >= {("skip", 3), ("skip", 13)}
    assert len(data.warnings) == 1 and f"events.jsonl:{n_lines + 1}: " in data.warnings[0]


def test_a_run_started_afresh_in_an_earlier_runs_directory_is_reported_alone(tmp_path):
    """Found by a stranger: the README's loop run twice into ``runs/exp1``, first at an LR
    that blew up, then at a healthy one, was reported as one run "resumed": the healthy run
    with the first run's NaN skip and its events."""
    from gradguard.report._summary import summary_sentence

    def train(nan_steps: set[int]) -> None:
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        with gg.Guard(model, opt, every=5, sinks=[gg.JsonlSink(tmp_path)]) as guard:
            guarded_steps(guard, model, opt, 20, nan_steps=nan_steps)

    train({3, 13})
    train(set())  # the same script again, fixed, into the same directory
    data = load_run(tmp_path)
    assert data.step.tolist() == list(range(20)) and not data.skipped.any()
    assert not any(e["kind"] == "skip" for e in data.events)
    assert summary_sentence(data).startswith("No gradient trouble in 20 steps")
    assert any("1 earlier run" in w and "only the latest run is shown" in w
               for w in data.warnings), data.warnings
    starts = [r for r in iter_jsonl(tmp_path / "metrics.jsonl", starts=True)
              if r["type"] == "start"]
    assert [r["step"] for r in starts] == [0]  # the first run, into an empty dir, wrote none
    assert all(r["type"] == "event" for r in read_jsonl(tmp_path / "events.jsonl"))


def test_a_resume_from_an_earlier_checkpoint_shows_each_replayed_event_once(tmp_path):
    """Found by strangers: a run killed after the flush that followed its last checkpoint,
    resumed from that checkpoint into the same directory, replays the steps in between;
    their steps were shown once, their events twice ("rolled back 2 times" for one)."""
    from gradguard.report._summary import summary_sentence

    def train(steps: range) -> None:
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        with gg.Guard(model, opt, every=5, sinks=[gg.JsonlSink(tmp_path)]) as guard:
            guard.step_count = steps[0]
            guarded_steps(guard, model, opt, len(steps), nan_steps={13}, start=steps[0])

    train(range(0, 20))  # its checkpoint was at step 10; killed at 20
    train(range(10, 20))  # resumed from it: steps 10-19 again, the NaN at 13 again
    raw = [(e["kind"], e["step"]) for e in read_jsonl(tmp_path / "events.jsonl")]
    assert raw.count(("skip", 13)) == 2
    data = load_run(tmp_path)
    assert [(e["kind"], e["step"]) for e in data.events].count(("skip", 13)) == 1
    assert any("10 step records from before a resume" in w for w in data.warnings), data.warnings
    assert "skipped 1 step" in summary_sentence(data)


def test_the_events_of_a_stretch_a_resume_abandoned_are_not_shown(tmp_path):
    """Found by a stranger: a run killed at step 30 after NaN steps at 22-24, resumed from
    its checkpoint of step 15 on clean batches, was told of "3 non-finite steps" and a
    back-off that no step of the run shown had: those came from the stretch the resume
    abandoned. The resumed sink's start record says where it went on from."""
    from gradguard.report._summary import summary_sentence

    def train(steps: range, nan_steps: set[int]) -> None:
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        with gg.Guard(model, opt, every=5, sinks=[gg.JsonlSink(tmp_path)]) as guard:
            guard.step_count = steps[0]
            guarded_steps(guard, model, opt, len(steps), nan_steps=nan_steps, start=steps[0])

    train(range(0, 30), {22, 23, 24})
    train(range(15, 40), set())  # resumed from step 15, the bad shard gone
    data = load_run(tmp_path)
    assert data.step.tolist() == list(range(40)) and not data.skipped.any()
    assert not [e for e in data.events if e["kind"] in ("nonfinite_grad", "skip")]
    assert summary_sentence(data).startswith("No gradient trouble in 40 steps")


def _crashing_run(run_dir, steps: range, crash_at: int | None) -> None:
    """Steps ``steps`` into ``run_dir`` in a ``with`` block that a ``RuntimeError`` leaves
    at ``crash_at`` (before that step)."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gg.Guard(model, opt, every=5, sinks=[gg.JsonlSink(run_dir)]) as guard:
        guard.step_count = steps[0]
        for step, (x, y) in enumerate(batches(len(steps)), start=steps[0]):
            if step == crash_at:
                raise RuntimeError("dataloader worker died")
            loss = (model(x) - y).pow(2).mean()
            loss.backward()
            guard.step(loss)
            opt.zero_grad()


def test_a_run_resumed_after_a_crash_and_finished_is_not_told_stopped(tmp_path):
    """Found by a stranger: Ctrl-C at step 40, the checkpoint saved on the way out, and the
    run resumed from it to its end was still "stopped at step 39": the abort was kept
    because it is dated at the last step taken, before the resume's first."""
    from gradguard.report._outcome import judge

    with pytest.raises(RuntimeError):
        _crashing_run(tmp_path, range(0, 60), 40)
    assert judge(load_run(tmp_path)).status == "stopped"
    _crashing_run(tmp_path, range(40, 60), None)  # resumed at step 40, to the end
    data = load_run(tmp_path)
    assert data.step.tolist() == list(range(60))
    assert not [e for e in data.events if e["kind"] == "abort"]
    assert judge(data).status == "healthy"


def test_a_run_that_crashes_before_its_first_step_starts_its_own_records(tmp_path):
    """Found by a stranger: a healthy run, then the same script re-run into its directory
    with a bug that raised before the first step: the new sink's start record said
    ``"step": null``, and the report showed the first run's steps "stopped at step 0". A
    resumed run that died on its first batch kept the stretch it abandoned alike."""
    from gradguard.report._outcome import judge

    _crashing_run(tmp_path, range(0, 20), None)
    with pytest.raises(RuntimeError):
        _crashing_run(tmp_path, range(0, 20), 0)
    starts = [r for r in iter_jsonl(tmp_path / "events.jsonl", starts=True)
              if r["type"] == "start"]
    assert [r["step"] for r in starts] == [0]
    with pytest.raises(ReportError, match=r"the run stopped before its first step "
                                          r"\(RuntimeError \(dataloader worker died\)\)"):
        load_run(tmp_path)
    _crashing_run(tmp_path / "b", range(0, 20), None)
    with pytest.raises(RuntimeError):
        _crashing_run(tmp_path / "b", range(10, 20), 10)  # resumed at 10, died at once
    data = load_run(tmp_path / "b")
    assert data.step.tolist() == list(range(10))
    out = judge(data)
    assert out.status == "stopped" and "stopped at step 9 by RuntimeError" in out.clause


# ---- the reader streams ---------------------------------------------------------------------
def test_iter_jsonl_yields_before_reading_the_whole_file(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"v": 1, "type": "step", "step": 0}\n{corrupt\n{"v": 1, "type": "step", "step": 1}\n')
    it = iter_jsonl(p)
    assert isinstance(it, Iterator)
    assert next(it)["step"] == 0  # the corrupt line 2 is not read yet
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: corrupt JSON line"):
        next(it)


def test_iter_jsonl_memory_does_not_grow_with_the_file(tmp_path):
    p = tmp_path / "metrics.jsonl"
    line = json.dumps({"v": 1, "type": "layers", "step": 0, "layers": [f"l{i}" for i in range(200)],
                       "grad_norm": [0.1] * 200}) + "\n"
    p.write_text(line * 300)  # ~1 MB
    tracemalloc.start()
    n = sum(1 for _ in iter_jsonl(p))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert n == 300
    assert peak < 20 * len(line)  # a few lines' worth, not the file


def test_read_jsonl_is_the_list_of_iter_jsonl(tmp_path):
    _write(tmp_path, _flush(range(0, 4)))
    p = tmp_path / "metrics.jsonl"
    assert read_jsonl(p) == list(iter_jsonl(p))
    assert [r["type"] for r in read_jsonl(p)] == ["step"] * 4 + ["layers"]


def test_utf8_bom_is_accepted(tmp_path):
    _write(tmp_path, _flush(range(0, 4)))
    for name in ("metrics.jsonl", "events.jsonl"):
        p = tmp_path / name
        p.write_bytes(b"\xef\xbb\xbf" + p.read_bytes())
    (tmp_path / "diagnosis.json").write_bytes(b"\xef\xbb\xbf" + b'{"findings": []}')
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")][:2] == [0, 1]
    data = load_run(tmp_path)
    assert data.step.tolist() == [0, 1, 2, 3] and data.diagnosis == {"findings": []}


def test_duplicate_steps_of_a_run_resumed_from_a_checkpoint_keep_the_later_records(tmp_path):
    # killed after step 9, resumed from the checkpoint of step 4: steps 5..9 are written twice
    _write(tmp_path, _flush(range(0, 5)), _flush(range(5, 10)))
    _write(tmp_path, _flush(range(5, 10), loss=0.5), _flush(range(10, 12), loss=0.5))
    data = load_run(tmp_path)
    assert data.step.tolist() == list(range(12))
    assert data.loss.tolist() == [1.0] * 5 + [0.5] * 7
    assert data.layer_step.tolist() == [4, 9, 11]
    assert data.layer_mean[:, 0].tolist() == [1.0, 0.5, 0.5]
    assert any("5 step records from before a resume" in w for w in data.warnings), data.warnings


# ---- gradguard report: bad input is exit 2 and one line ------------------------------------
STEP = '{"v": 1, "type": "step", "step": 2, "loss": 1.0, "grad_norm": 1.0, "clip_coef": 1.0, "skipped": false, "finite": true}'
BAD_LINES = {
    "string version": ('{"v": "1", "type": "step", "step": 2}', "'v' must be an integer"),
    "bool version": ('{"v": true, "type": "step", "step": 2}', "'v' must be an integer"),
    "no version": ('{"type": "step", "step": 2}', "no schema version 'v'"),
    "newer version": ('{"v": 2, "type": "step", "step": 2}', "schema version 2 is newer"),
    "missing step": ('{"v": 1, "type": "step", "loss": 1.0}', "'step' is missing"),
    "string step": ('{"v": 1, "type": "step", "step": "2"}', "'step' must be an integer"),
    "float step": ('{"v": 1, "type": "step", "step": 2.5}', "'step' must be an integer"),
    # found by a stranger: an OverflowError traceback from the report
    "huge step": ('{"v": 1, "type": "step", "step": 99999999999999999999999}',
                  "'step' 99999999999999999999999 is out of range"),
    "not an object": ("[1, 2]", "not a gradguard record"),
    "corrupt": ('{"v": 1, "type": "step", "st', "corrupt JSON line"),
    "layers not a list": ('{"v": 1, "type": "layers", "step": 2, "layers": "a", "grad_norm": [1.0]}',
                          "'layers' must be a list"),
    "layer norms of another length": (
        '{"v": 1, "type": "layers", "step": 2, "layers": ["a", "b"], "grad_norm": [1.0]}',
        "'grad_norm' has 1 values for 2 layers"),
}


def _run_with_bad_line(d: Path, bad: bytes) -> Path:
    lines = [STEP.replace('"step": 2', f'"step": {s}').encode() for s in range(4)]
    lines[2] = bad
    (d / "metrics.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (d / "events.jsonl").write_bytes(b"")
    return d / "metrics.jsonl"


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_report_bad_line_exits_2_naming_file_and_line(tmp_path, capsys, case):
    bad, message = BAD_LINES[case]
    path = _run_with_bad_line(tmp_path, bad.encode())
    rc, out, err = _report(capsys, tmp_path)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"gradguard report: error: {path}:3: ")
    assert message in err


def test_report_non_utf8_bytes_exit_2_naming_file_line_and_byte(tmp_path, capsys):
    path = _run_with_bad_line(tmp_path,
                              b'{"v": 1, "type": "step", "step": 2, "note": "caf\xe9"}')
    rc, _, err = _report(capsys, tmp_path)
    assert rc == 2 and err.count("\n") == 1
    assert f"{path}:3: not UTF-8 text: byte 0xe9 at column 49" in err


def test_report_bad_event_line_names_events_jsonl(tmp_path, capsys):
    _write(tmp_path, _flush(range(0, 4)))
    (tmp_path / "events.jsonl").write_text(
        '{"v": 1, "type": "event", "kind": "skip", "step": 1, "severity": "warning", "message": "m"}\n'
        '{"v": 1, "type": "event", "kind": "skip", "step": "1", "severity": "warning", "message": "m"}\n')
    rc, _, err = _report(capsys, tmp_path)
    assert rc == 2 and f"{tmp_path / 'events.jsonl'}:2: 'step' must be an integer" in err


def test_report_diagnosis_with_a_string_version_exits_2(tmp_path, capsys):
    _write(tmp_path, _flush(range(0, 4)))
    (tmp_path / "diagnosis.json").write_text('{"v": "2", "findings": []}')
    rc, _, err = _report(capsys, tmp_path)
    assert rc == 2 and "diagnosis.json: schema version 'v' must be an integer, got '2'" in err


def test_report_unwritable_output_exits_2(tmp_path, capsys):
    _write(tmp_path / "run", _flush(range(0, 4)))
    (tmp_path / "file").write_text("")
    rc = main(["report", str(tmp_path / "run"), "-o", str(tmp_path / "file" / "r.html")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "r.html" in err and "cannot be written" in err


def test_step_values_are_numbers_or_null_in_the_report(tmp_path):
    _write(tmp_path, _flush(range(0, 2)))
    p = tmp_path / "metrics.jsonl"
    p.write_text(p.read_text().replace('"loss": 1.0', '"loss": null', 1))
    data = load_run(tmp_path)
    assert math.isnan(data.loss[0]) and data.loss[1] == 1.0


@pytest.mark.skipif(not hasattr(os, "fchmod"), reason="POSIX file modes")
def test_atomic_writes_get_the_mode_open_would_give_them(tmp_path):
    """Found as a stranger: report.html, run.json and diagnosis.json were written 0600 (a
    temp file's mode, kept by the rename), whatever the umask: the page meant to be shared
    could not be read by others. They get 0666 less the umask, as ``open`` gives."""
    from gradguard.doctor import Diagnosis
    from gradguard.rundir import write_atomic

    old = os.umask(0o022)
    try:
        assert write_atomic(tmp_path / "run.json", "{}").stat().st_mode & 0o777 == 0o644
        diag = gg.doctor(torch.nn.Linear(4, 1), (torch.randn(8, 4), torch.randn(8, 1)),
                         torch.nn.MSELoss())
        assert isinstance(diag, Diagnosis)
        assert diag.save(tmp_path / "d" / "diagnosis.json").stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        assert write_atomic(tmp_path / "private.json", "{}").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_two_open_sinks_on_one_run_directory_are_refused(tmp_path):
    """Found as a stranger: two guards given JsonlSink on the same directory wrote one pair
    of files; the report took the second guard's steps for a resume ("60 steps were recorded
    twice") and kept them alone, the first guard's skip lost from the summary. A second
    open sink on the directory is refused, naming what to do; once the first is closed the
    directory is appended to (a resumed run)."""
    first = gg.JsonlSink(tmp_path / "run")
    with pytest.raises(ValueError, match="written by another open JsonlSink"):
        gg.JsonlSink(tmp_path / "run" / ".." / "run")
    first.close()
    gg.JsonlSink(tmp_path / "run").close()


def test_events_jsonl_is_in_step_order_within_a_flush(tmp_path):
    """A flush's skips are recorded after the back-off the recovery took for them at that
    flush; the file (and ``guard.events``) lists them in step order, each skip before what
    was done at its step."""
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = gg.Guard(model, opt, recovery=gg.Recovery(), every=10, sinks=[gg.JsonlSink(tmp_path)])
    for step in range(20):
        x = torch.randn(16, 8)
        if 4 <= step <= 6:
            x[0, 0] = float("nan")
        model(x).pow(2).mean().backward()
        guard.step()
        opt.zero_grad()
    guard.close()
    lines = [(e["step"], e["kind"]) for e in read_jsonl(tmp_path / "events.jsonl")]
    assert [k for _, k in lines].count("skip") == 3 and "lr_backoff" in [k for _, k in lines]
    assert lines == sorted(lines, key=lambda s_k: (s_k[0], s_k[1] == "lr_backoff")), lines
    assert [(e.step, e.kind) for e in guard.events] == lines


@contextlib.contextmanager
def _held_by_another_process(run_dir):
    """Another process's JsonlSink writing ``run_dir`` (its lock held) for the block."""
    import subprocess
    import sys

    holder = (
        "import sys, time, gradguard as gg\n"
        "from gradguard.events import Flush\n"
        "sink = gg.JsonlSink(sys.argv[1])\n"
        "sink.write(Flush(steps=[{'step': 0, 'loss': 1.0}], layers={}, events=[]))\n"
        "print('written', flush=True)\n"
        "time.sleep(60)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(gg.__file__).resolve().parents[1]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", holder, str(run_dir)], env=env,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "written"
        yield
    finally:
        proc.kill()
        proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()


def _ten_refused_steps(run_dir, model, opt):
    """Ten guarded steps whose sink into ``run_dir`` (another process's) is refused."""
    with pytest.warns(RuntimeWarning, match="written by another process"):
        with gg.Guard(model, opt, every=5, sinks=[gg.JsonlSink(run_dir)]) as guard:
            guarded_steps(guard, model, opt, 10)
    return guard


def test_a_second_process_writing_the_same_run_directory_is_refused(tmp_path):
    """Found by a stranger: two processes writing one run directory (a job relaunched while
    its old process still ran) were not refused; the report showed one run's steps with
    the other's events and called it a resume. The second process's first write fails,
    and its guard stops feeding the sink with a warning; the first run's files are its own."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with _held_by_another_process(tmp_path):
        guard = _ten_refused_steps(tmp_path, model, opt)
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [0]
    with gg.Guard(model, opt, every=5, sinks=[gg.JsonlSink(tmp_path)]) as guard:
        guard.step_count = 10
        guarded_steps(guard, model, opt, 5, start=10)  # its process gone: the lock with it
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")
            if r["type"] == "step"] == [0, 10, 11, 12, 13, 14]


def test_a_zero_code_run_whose_directory_another_process_writes_is_not_judged_on_it(tmp_path):
    """Found by a stranger: two ``gradguard run --resume-from`` of one directory at once:
    the second, its sink refused, printed the first run's verdict as its own, overwrote
    its ``guard.json`` and passed ``--fail-on-divergence``. A guard whose records were
    refused writes nothing there, is "not recorded", and fails the gate."""
    from gradguard.integrations._summary import RunResult, finish_run_dir, format_summary

    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with _held_by_another_process(tmp_path):
        guard = _ten_refused_steps(tmp_path, model, opt)
        row = finish_run_dir(tmp_path, guard.clip, gg.GuardConfig(), guard.state_dict(), guard,
                             {"index": 0, "kind": "optimizer", "name": "opt"}, {}, False)
    assert row["refused"] and row["outcome"] is None and row["steps"] == 10
    assert not (tmp_path / "guard.json").exists() and not (tmp_path / "guard_state.pt").exists()
    result = RunResult("train.py", [], 0, tmp_path, [row])
    assert not result.ok
    assert "NOT JUDGED: not recorded: another process writes" in format_summary(result)
    result.write(tmp_path, None, 0.0, resumed=False, clips_applied_at_once={})
    assert not (tmp_path / "run.json").exists()  # the other process's directory


def test_a_run_with_steps_no_record_reached_says_so(tmp_path):
    """Found by a stranger: after a full disk and a resume, 102 of 400 steps had no record
    and the report said nothing of the gap. The reader now notes it."""
    lines = [{"v": 1, "type": "step", "step": s, "loss": 1.0} for s in (*range(5), *range(9, 12))]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (tmp_path / "events.jsonl").write_text("")
    data = load_run(tmp_path)
    assert data.step.tolist() == [0, 1, 2, 3, 4, 9, 10, 11]
    [note] = data.warnings
    assert "4 steps between 0 and 11 have no record (the first from step 5)" in note
    full = tmp_path / "full"
    full.mkdir()
    (full / "metrics.jsonl").write_text("".join(json.dumps({**r, "step": i})
                                                 + "\n" for i, r in enumerate(lines)))
    (full / "events.jsonl").write_text("")
    assert load_run(full).warnings == []
