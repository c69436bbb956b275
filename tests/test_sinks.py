"""TensorBoard, W&B and console sinks: values read back from the real files; failures
are reported once and never stop training; sinks see data only at flush."""

from __future__ import annotations

import glob
import io
import json
import math
import struct
import sys
import time
import warnings

import pytest
import torch
from tests.helpers import batches, guarded_steps, mlp

import gradguard as gg
from gradguard.events import Flush
from gradguard.sinks import LAYERS_PER_SECTION, layer_sections

NAN_STEP = 3


def _train(sinks, steps: int = 12, every: int = 5, nan_step: int | None = NAN_STEP) -> gg.Guard:
    model = mlp(depth=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = gg.Guard(model, opt, clip=gg.NormClip(0.5), every=every, sinks=sinks)
    guarded_steps(guard, model, opt, steps, nan_steps=() if nan_step is None else {nan_step})
    guard.close()
    return guard


def _jsonl_steps(run_dir) -> list[dict]:
    return [r for r in gg.read_jsonl(run_dir / "metrics.jsonl") if r["type"] == "step"]


class Recorder:
    def __init__(self) -> None:
        self.flushes: list[Flush] = []
        self.closed = False

    def write(self, flush: Flush) -> None:
        self.flushes.append(flush)

    def close(self) -> None:
        self.closed = True


class Broken:
    def __init__(self) -> None:
        self.calls = 0

    def write(self, flush: Flush) -> None:
        self.calls += 1
        raise OSError(28, "No space left on device")

    def close(self) -> None:
        pass


# ---- TensorBoard ---------------------------------------------------------------------
def test_tensorboard_sink_values_match_jsonl(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    guard = _train([gg.TensorBoardSink(tmp_path / "tb"), gg.JsonlSink(tmp_path / "run")])
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    ref = _jsonl_steps(tmp_path / "run")

    norms = {e.step: e.value for e in acc.Scalars("gradguard/grad_norm")}
    expected = {r["step"]: r["grad_norm"] for r in ref if r["grad_norm"] is not None}
    assert set(norms) == set(expected) and NAN_STEP not in norms
    for s, v in expected.items():
        assert norms[s] == pytest.approx(v, rel=1e-6)
    losses = {e.step: e.value for e in acc.Scalars("gradguard/loss")}
    assert losses[7] == pytest.approx(next(r["loss"] for r in ref if r["step"] == 7), rel=1e-6)
    coefs = [e.value for e in acc.Scalars("gradguard/clip_coef")]
    assert min(coefs) < 1.0  # NormClip(0.5) clipped something
    skips = acc.Scalars("gradguard/skips")
    assert [e.value for e in skips][-1] == guard.skipped_steps == 1
    assert skips[NAN_STEP - 1].value == 0 and skips[NAN_STEP].value == 1

    layer_tags = [t for t in tags["scalars"] if t.startswith("grad_norm_layers.")]
    assert sorted(t.rsplit("/", 1)[1] for t in layer_tags) == ["0", "2", "4"]
    assert "gradguard/layer_grad_norms_log10" in tags["histograms"]
    texts = [t for t in tags["tensors"] if t.startswith("gradguard/events")]
    assert texts
    text = b" ".join(
        v for t in texts for e in acc.Tensors(t) for v in e.tensor_proto.string_val
    ).decode()
    assert "nonfinite_grad" in text and f"step {NAN_STEP}" in text


def test_layer_sections_keep_every_section_small():
    names = [f"blocks.{i}.mlp" for i in range(150)] + ["embed", "head"]
    sec = layer_sections(names)
    sizes: dict[str, int] = {}
    for s in sec.values():
        sizes[s] = sizes.get(s, 0) + 1
    assert max(sizes.values()) <= LAYERS_PER_SECTION
    assert sec["embed"] == "embed" and sec["head"] == "head"
    assert sec["blocks.0.mlp"] == "blocks[0]" and sec["blocks.149.mlp"] == "blocks[4]"
    assert len(sec) == len(names)


# ---- W&B (offline) --------------------------------------------------------------------
def _wandb_records(path: str) -> list:
    """Parse a ``.wandb`` transaction log (LevelDB log format framing, protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, block, buf, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, typ = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and typ == 0:
            pos += left
            continue
        if pos + 7 + length > len(data):
            break  # wandb's service process is still writing this record: read it later
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        buf = chunk if typ in (1, 2) else buf + chunk
        if typ in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def test_wandb_sink_offline_run_files(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    sink = gg.WandbSink(project="gradguard-test", dir=str(tmp_path), mode="offline")
    guard = _train([sink, gg.JsonlSink(tmp_path / "run")])
    ref = {r["step"]: r for r in _jsonl_steps(tmp_path / "run")}
    (path,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    # wandb's service process may still be writing the log when finish() returns
    deadline = time.monotonic() + 60
    records = _wandb_records(path)
    while not any(r.WhichOneof("record_type") == "exit" for r in records):
        assert time.monotonic() < deadline, "wandb never wrote the exit record"
        time.sleep(0.2)
        records = _wandb_records(path)
    hist: dict[int, dict] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            hist.setdefault(row["_step"], {}).update(row)
    assert sorted(hist) == list(range(12))
    for s, r in ref.items():
        if r["grad_norm"] is None:
            assert "gradguard/grad_norm" not in hist[s]
        else:
            assert hist[s]["gradguard/grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-6)
        assert hist[s]["gradguard/loss"] == pytest.approx(r["loss"], rel=1e-6)
    assert hist[11]["gradguard/skips"] == guard.skipped_steps == 1
    assert hist[NAN_STEP]["gradguard/events/nonfinite_grad"] == 1
    assert any(k.startswith("grad_norm_layers.") for k in hist[4])
    # the per-layer norms also go out as a wandb.Histogram of log10 norms at every flush
    layer_rows = [r for r in gg.read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["type"] == "layers"]
    assert [r["step"] for r in layer_rows] == [4, 9, 11]
    key = "gradguard/layer_grad_norms_log10"
    for lr in layer_rows:
        h = hist[lr["step"]]
        assert h[f"{key}/_type"] == "histogram"
        logs = [math.log10(v) for v in lr["grad_norm"]]
        assert sum(h[f"{key}/values"]) == len(logs) == 3
        bins = h[f"{key}/bins"]
        assert bins[0] == pytest.approx(min(logs), abs=1e-6)
        assert bins[-1] == pytest.approx(max(logs), abs=1e-6)
    assert not any(k.startswith(key) for s in (0, 5, 10) for k in hist[s])
    (table,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "files" / "media" / "table" / "**" / "*.json"), recursive=True)
    rows = json.load(open(table))["data"]
    assert [r[2] for r in rows] == [e.kind for e in guard.events]


# ---- console --------------------------------------------------------------------------
def test_console_sink_plain_lines_when_not_a_terminal():
    buf = io.StringIO()
    guard = _train([gg.ConsoleSink(file=buf)])
    lines = buf.getvalue().splitlines()
    status = [ln for ln in lines if ln.startswith("step ")]
    assert len(status) == 3  # flushes at steps 4, 9 and close (11)
    assert status[-1].startswith("step 11 | loss ")
    assert "skips 1" in status[-1] and "last event: skip @ 3" in status[-1]
    assert "\x1b[" not in buf.getvalue()  # no ANSI codes in a pipe
    # every event printed exactly once, with its remedy
    for e in guard.events:
        assert sum(f"step {e.step} {e.kind}" in ln for ln in lines) == 1
    assert any("Remedy:" in ln for ln in lines)


def test_console_sink_rich_table_on_a_terminal():
    pytest.importorskip("rich")
    buf = io.StringIO()
    _train([gg.ConsoleSink(file=buf, force_terminal=True)])
    out = buf.getvalue()
    assert "\x1b[" in out  # styled output
    for col in ("step", "loss", "grad norm", "clip", "skips", "last event"):
        assert col in out
    assert out.count("nonfinite_grad") == 1


# ---- failure handling and flush-only delivery ------------------------------------------
def test_failing_sink_is_reported_once_and_training_continues(tmp_path):
    broken, rec = Broken(), Recorder()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        guard = _train([broken, rec, gg.JsonlSink(tmp_path)], steps=20, every=5)
    reports = [w for w in caught if "Broken failed" in str(w.message)]
    assert len(reports) == 1 and "No space left" in str(reports[0].message)
    assert broken.calls == 1
    assert guard.step_count == 20
    assert len(_jsonl_steps(tmp_path)) == 20 and rec.closed


def test_sinks_receive_data_only_at_flush():
    rec = Recorder()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = gg.Guard(model, opt, every=4, sinks=[rec])
    for i, (x, y) in enumerate(batches(10)):
        (model(x) - y).pow(2).mean().backward()
        guard.step()
        opt.zero_grad()
        assert len(rec.flushes) == (i + 1) // 4
    guard.close()
    assert [len(f.steps) for f in rec.flushes] == [4, 4, 2]


@pytest.mark.parametrize(
    "module, make, extra",
    [
        ("wandb", lambda: gg.WandbSink(mode="offline"), "gradguard[wandb]"),
        ("torch.utils.tensorboard", lambda: gg.TensorBoardSink("unused"), "gradguard[tensorboard]"),
        ("rich.console", lambda: gg.ConsoleSink(file=io.StringIO(), force_terminal=True), "gradguard[report]"),
    ],
)
def test_missing_extra_names_the_extra(monkeypatch, module, make, extra):
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match=extra.replace("[", r"\[").replace("]", r"\]")):
        make()


# ---- abort ----------------------------------------------------------------------------------
def _train_until_abort(sinks) -> gg.Guard:
    """NaN gradients from step 10 until recovery gives up (no rollback allowed)."""
    model = mlp(depth=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rec = gg.Recovery(skip_patience=2, snapshot_every=5, max_rollbacks=0)
    guard = gg.Guard(model, opt, recovery=rec, every=5, sinks=sinks)
    with pytest.raises(gg.TrainingDiverged):
        guarded_steps(guard, model, opt, 60, nan_steps=range(10, 60))
    return guard


def _wandb_exit_records(tmp_path) -> list:
    (path,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    deadline = time.monotonic() + 60  # the service process may still be writing
    while True:
        records = _wandb_records(path)
        exits = [r for r in records if r.WhichOneof("record_type") == "exit"]
        if exits or time.monotonic() > deadline:
            return exits
        time.sleep(0.2)


def test_wandb_sink_finishes_its_run_and_logs_the_events_table_on_abort(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    sink = gg.WandbSink(project="gradguard-test", dir=str(tmp_path), mode="offline")
    guard = _train_until_abort([sink])
    # no guard.close(): the abort alone must finish the run and log what led to it
    assert len(_wandb_exit_records(tmp_path)) == 1
    tables = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "files" / "media" / "table" / "**" / "*.json"), recursive=True)
    assert len(tables) == 1
    rows = json.load(open(tables[0]))["data"]
    assert [r[2] for r in rows] == [e.kind for e in guard.events]
    assert "abort" in [r[2] for r in rows]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        guard.close()  # closing after the abort is a no-op for the finished run
    assert [str(w.message) for w in caught if "gradguard" in str(w.message)] == []
    assert len(glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "files" / "media" / "table" / "**" / "*.json"), recursive=True)) == 1


def test_every_sink_is_closed_after_an_abort(tmp_path):
    pytest.importorskip("tensorboard")
    buf = io.StringIO()
    console = gg.ConsoleSink(file=buf, force_terminal=True)
    tb, jsonl = gg.TensorBoardSink(tmp_path / "tb"), gg.JsonlSink(tmp_path / "run")
    _train_until_abort([console, tb, jsonl])
    # no guard.close(): each sink has reacted to the abort on its own
    assert console.closed and tb.closed and jsonl.closed
    assert "abort" in buf.getvalue()
    assert (tmp_path / "run" / "report.html").exists()


def test_wandb_sink_in_a_run_the_loop_logs_to_keeps_every_row(tmp_path, monkeypatch):
    """Found as a stranger: ``WandbSink(run=run)`` with the loop's own ``run.log`` each step
    logged its window at the window's steps, which W&B's step had passed: 45 of 50
    ``gradguard/loss`` rows were dropped ("this data will be ignored"). In a shared run the
    rows go at W&B's next steps, on gradguard's own axis ``gradguard/step``."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = wandb.init(project="gradguard-test", dir=str(tmp_path), mode="offline")
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gg.Guard(model, opt, every=10, sinks=[gg.WandbSink(run=run)]) as guard:
        for s in range(50):
            x = torch.randn(16, 8)
            loss = (model(x) - x[:, :1]).pow(2).mean()
            loss.backward()
            guard.step(loss)
            opt.zero_grad()
            run.log({"acc": float(s)})  # the loop's own metric, at W&B's own step
    run.finish()
    assert _wandb_exit_records(tmp_path)
    (path,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    rows = []
    for r in _wandb_records(path):
        if r.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                         for i in r.history.item})
    ours = [r for r in rows if "gradguard/loss" in r]
    assert sorted(r["gradguard/step"] for r in ours) == list(range(50))
    assert sum("acc" in r for r in rows) == 50


def test_jsonl_sink_given_no_path_names_the_argument():
    """Found by a stranger: ``JsonlSink(None)`` said "expected str, bytes or os.PathLike
    object, not NoneType" from inside pathlib."""
    with pytest.raises(TypeError, match=r"JsonlSink run_dir must be a directory path .* NoneType"):
        gg.JsonlSink(None)  # type: ignore[arg-type]


def test_one_jsonl_sink_given_to_two_guards_is_refused(tmp_path):
    """Found by a stranger: a model with two optimizers, one guard each, both given the
    same ``JsonlSink`` object: their records merged, and the report, taking them for a
    resume, showed the head guard's step where the trunk's had skipped a NaN."""
    model = mlp()
    trunk = torch.optim.SGD(model[0].parameters(), lr=0.01)
    head = torch.optim.Adam(model[2].parameters(), lr=1e-3)
    sink = gg.JsonlSink(tmp_path)
    g1 = gg.Guard(model, trunk, sinks=[sink])
    with pytest.raises(ValueError, match=r"given to a second guard .* its own JsonlSink"):
        gg.Guard(model, head, sinks=[sink])
    g2 = gg.Guard(model, head, sinks=[gg.JsonlSink(tmp_path / "head")])  # as it says
    g1.close(), g2.close()
    gg.Guard(model, trunk, sinks=[gg.JsonlSink(tmp_path)]).close()  # the first one closed


@pytest.mark.parametrize("make, error, match", [
    (lambda: gg.JsonlSink(123), TypeError, r"JsonlSink run_dir must be a directory path .* int"),
    (lambda: gg.JsonlSink(""), ValueError, r"JsonlSink run_dir='': give a directory"),
    (lambda: gg.JsonlSink("runs/x", fsync="no"), TypeError, r"JsonlSink\(fsync='no'\): must be"),
    (lambda: gg.report(None), TypeError, r"run_dir must be a directory path .* NoneType"),
    (lambda: gg.Guard(mlp(), torch.optim.SGD(mlp().parameters(), lr=0.1), every=10**9),
     ValueError, r"Guard\(every=1000000000\): must be an int from 1 to 100000"),
    # found by a stranger: these gave a bare pathlib TypeError, an AttributeError, or wrote
    # and rotated snapshots in the current directory
    (lambda: gg.Recovery(snapshot_dir=""), ValueError, r"Recovery snapshot_dir.*='': give a"),
    (lambda: gg.ConsoleSink(file="log.txt"), TypeError, r"ConsoleSink\(file='log.txt'\): "
     "expected a text stream"),
    (lambda: gg.TensorBoardSink(None), TypeError, r"TensorBoardSink log_dir must be a "
     "directory path"),
    (lambda: gg.DiskSnapshotStore(None), TypeError, r"DiskSnapshotStore directory must be"),
    (lambda: gg.read_jsonl(None), TypeError, r"read_jsonl\(path=None\): expected a file path"),
    (lambda: __import__("gradguard.integrations.lightning", fromlist=["x"]).GradGuardCallback(
        run_dir=3), TypeError, r"GradGuardCallback run_dir must be a directory path"),
])
def test_bad_sink_report_and_guard_arguments_name_the_argument(make, error, match, tmp_path,
                                                               monkeypatch):
    """Found by a stranger: these gave a pathlib TypeError, wrote into the current
    directory, kept fsync on, or died in the allocator (a 40 GB window)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error, match=match):
        make()
    assert not list(tmp_path.iterdir())  # nothing written
