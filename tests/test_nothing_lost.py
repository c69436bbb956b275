"""Nothing lost (issue 14): snapshots own their memory, a resumed guard continues exactly,
a full disk degrades instead of killing, a failing rank never enters a collective, sinks
close after an abort, and constructor mistakes fail at construction."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import gradguard as gg
from dist_launch import GLOO_TEARDOWN, empty_dir, free_port
from helpers import assert_same_run, assert_same_tree, batches, mlp

ROOT = Path(__file__).resolve().parents[1]


def train(guard, model, opt, data, bad=(), start=0, scaler=None):
    for i, (x, y) in enumerate(data):
        step = start + i
        if scaler is not None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
            loss = nn.functional.mse_loss(out.float(), y)
        else:
            loss = nn.functional.mse_loss(model(x), y)
        if step in bad:
            loss = loss * math.nan
        (loss if scaler is None else scaler.scale(loss)).backward()
        guard.step(loss, scaler=scaler)
        if scaler is not None:
            scaler.update()
        opt.zero_grad()


# ---- snapshots own their memory --------------------------------------------------------
def test_two_rollbacks_restore_the_same_state_bit_for_bit():
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    rec = gg.Recovery(skip_patience=1, snapshot_every=5, patience=3, restore_steps=3,
                      max_rollbacks=5, reset_moments="none", keep=1)  # one snapshot, twice
    guard = gg.Guard(model, opt, recovery=rec, every=5)
    data = batches(40, seed=3)
    train(guard, model, opt, data[:10])  # snapshots at steps 4 and 9
    restored = []
    for k in range(2):
        start = 10 + 6 * k  # the chunk's last two steps are bad: a back-off, then a rollback
        train(guard, model, opt, data[start:start + 6], bad={start + 4, start + 5}, start=start)
        rb = [e for e in guard.events if e.kind == "rollback"]
        assert len(rb) == k + 1
        restored.append((rb[-1].data["snapshot_step"],
                         [p.detach().clone() for p in model.parameters()],
                         {i: {n: v.clone() for n, v in s.items()}
                          for i, s in opt.state_dict()["state"].items()}))
        # the rollback is followed by steps that move on
        train(guard, model, opt, data[30:32], start=100 + k)
    (step_a, params_a, state_a), (step_b, params_b, state_b) = restored
    assert step_a == step_b == 9  # unhealthy windows in between: no newer snapshot
    for a, b in zip(params_a, params_b):
        assert torch.equal(a, b)
    # the optimizer state restored the second time is the snapshot's, not what the steps
    # after the first rollback did to it (the live state once aliased the stored one)
    assert state_a.keys() == state_b.keys()
    for i in state_a:
        for n, v in state_a[i].items():
            assert torch.equal(v, state_b[i][n]), (i, n)


# ---- resume mid-window ---------------------------------------------------------------------
def make_run(tmp_path, seed=0, patience=8):
    model = mlp(seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    rec = gg.Recovery(skip_patience=2, snapshot_every=4, patience=patience,
                      snapshot_dir=tmp_path / "snaps")
    guard = gg.Guard(model, opt, clip=gg.ZClip(warmup_steps=5), recovery=rec, every=6,
                     watch_activations=True)
    return model, opt, scaler, guard, rec


RESUMES = {
    # a back-off and a rollback (9-12); a back-off (21-22, past ``patience``) saved
    # undecided at the resume and undone after it (23 is finite on the same weights); a skip
    "undo": ({9, 10, 11, 12, 21, 22, 27}, 8, {"lr_backoff", "rollback", "skip",
                                             "nonfinite_input"}),
    # a second rollback in a row right after the resume goes one snapshot further back:
    # to the weights before the first step, which must be on disk too (they were kept in
    # memory only, and a resumed run went to step 5's instead)
    "second_rollback": ({9, 10, 11, 12, 21, 22, 23, 27}, 100, {"lr_backoff", "rollback", "skip"}),
}


@pytest.mark.parametrize("name", RESUMES)
def test_a_guard_resumed_mid_window_continues_exactly(tmp_path, name):
    data = batches(40, seed=11)
    bad, patience, kinds = RESUMES[name]
    model, opt, scaler, guard, _ = make_run(tmp_path / "a", patience=patience)
    train(guard, model, opt, data, bad=bad, scaler=scaler)
    guard.close()
    full_events = [e.to_json() for e in guard.events]

    model, opt, scaler, guard, rec = make_run(tmp_path / "b", patience=patience)
    train(guard, model, opt, data[:22], bad=bad, scaler=scaler)  # 22 % 6 != 0: mid-window
    assert guard.telemetry.pending == 4
    rec.wait()
    ckpt = {"model": model.state_dict(), "opt": opt.state_dict(),
            "scaler": scaler.state_dict(), "guard": guard.state_dict()}
    torch.save(ckpt, tmp_path / "ckpt.pt")
    del model, opt, scaler, guard, rec
    ckpt = torch.load(tmp_path / "ckpt.pt", map_location="cpu", weights_only=False)
    model, opt, scaler, guard, _ = make_run(tmp_path / "b", seed=1,  # another init
                                            patience=patience)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    scaler.load_state_dict(ckpt["scaler"])
    guard.load_state_dict(ckpt["guard"])
    train(guard, model, opt, data[22:], bad=bad, start=22, scaler=scaler)
    guard.close()
    resumed = [e.to_json() for e in guard.events]
    assert [(e["kind"], e["step"]) for e in resumed] == [(e["kind"], e["step"]) for e in full_events]
    assert resumed == full_events
    assert {e["kind"] for e in full_events} >= kinds
    ref_model, ref_opt, _, _, _ = make_run(tmp_path / "c", patience=patience)
    # the uninterrupted run, once more, for the parameters and the optimizer state
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    ref_guard = gg.Guard(ref_model, ref_opt, clip=gg.ZClip(warmup_steps=5), every=6,
                         watch_activations=True,
                         recovery=gg.Recovery(skip_patience=2, snapshot_every=4,
                                              patience=patience, snapshot_dir=tmp_path / "d"))
    train(ref_guard, ref_model, ref_opt, data, bad=bad, scaler=ref_scaler)
    ref_guard.close()
    assert_same_run(model, opt, ref_model, ref_opt)



def test_a_resumed_guard_weighs_its_first_update_as_the_run_it_continues():
    """The size of the first update from the weights (the run's first, or a rollback's) is
    what a later rollback caps the LR by. A resumed guard took its own first step for it:
    an SGD run with an LR x100 burst, resumed at step 123, rolled back at step 136 with no
    LR cap where the uninterrupted run set one (ceilings 1.0 against 0.0122), and the two
    runs parted. The record is in the checkpoint now."""
    data = batches(30, seed=11)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    guard = gg.Guard(model, opt, recovery=gg.Recovery(), every=5)
    train(guard, model, opt, data[:12])
    saved = {"model": model.state_dict(), "opt": opt.state_dict(), "guard": guard.state_dict()}
    first = guard._sampler.first
    assert guard._sampler.first_step == 0 and first is not None and not guard._sampler.first_due
    guard.close()
    model = mlp(seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    guard = gg.Guard(model, opt, recovery=gg.Recovery(), every=5)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    guard.load_state_dict(saved["guard"])
    train(guard, model, opt, data[12:], start=12)
    guard.close()
    assert guard._sampler.first_step == 0 and not guard._sampler.first_due
    assert torch.equal(guard._sampler.first, first)
    old = dict(saved["guard"])
    del old["updates"]  # a checkpoint of gradguard before it: no first update, not a wrong one
    guard = gg.Guard(model, opt, recovery=gg.Recovery(), every=5)
    guard.load_state_dict(old)
    assert not guard._sampler.first_due and guard._sampler.first is None
    guard.close()


def _resumed_at_an_lr_too_high(tmp_path, snapshot_dir, bad=()):
    """20 healthy steps (snapshots at 14 and 19, and the weights before the first step; the
    ``bad`` steps of them NaN), a checkpoint, and a resume into fresh objects at Adam lr 3,
    which wrecks the MLP."""
    def make(lr):
        model = mlp()
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        rec = gg.Recovery(snapshot_every=4, snapshot_dir=snapshot_dir)
        return model, opt, gg.Guard(model, opt, recovery=rec, every=5)

    data = batches(200, seed=11)
    model, opt, guard = make(1e-2)
    train(guard, model, opt, data[:20], bad=bad)
    guard.recovery.wait()
    torch.save({"model": model.state_dict(), "guard": guard.state_dict()}, tmp_path / "ckpt.pt")
    guard.close()
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    model, opt, guard = make(3.0)
    model.load_state_dict(ckpt["model"])
    return model, opt, guard, ckpt["guard"], data[20:]


def test_a_resume_without_snapshot_dir_keeps_the_weights_it_resumed_with(tmp_path):
    """The in-memory snapshots are no part of a checkpoint. A checkpoint taken while the
    ladder was calm holds weights as sound as its last snapshot: the resumed run keeps them
    at its first step, says nothing, and rolls back to them (it warned at every resume, and
    this run, with nothing to restore, backed off three times and raised
    ``TrainingDiverged``)."""
    model, opt, guard, state, data = _resumed_at_an_lr_too_high(tmp_path, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", gg.GradGuardWarning)
        guard.load_state_dict(state)
        train(guard, model, opt, data, start=20)
    rolled = [e.data["snapshot_step"] for e in guard.events if e.kind == "rollback"]
    assert rolled == [19]  # the weights of the checkpoint, after step 19's update
    assert not [e for e in guard.events if e.kind == "abort"]
    assert guard.recovery.lr_factor < 0.01  # the wreck's cap: lr 3 was far too high
    for p in model.parameters():
        assert torch.isfinite(p).all()


def test_a_resume_mid_incident_says_its_snapshots_stayed_behind(tmp_path):
    """A checkpoint taken while the ladder was at work (NaN steps 17-19 backed the LR off, the
    next step to tell whether the weights are sound) holds weights of the incident, kept as no
    snapshot: the resume
    says the snapshots stayed behind, and the abort of rollbacks that had nothing to restore
    says they backed off instead (it said "after 3 rollback(s)" when no weights were
    restored)."""
    model, opt, guard, state, data = _resumed_at_an_lr_too_high(tmp_path, None, bad={17, 18, 19})
    with pytest.warns(gg.GradGuardWarning, match=r"at work on an incident.*snapshots from "
                      r"before it \(the weights before its first step and step\(s\) 9, 14\) "
                      r"were kept in memory only.*snapshot_dir") as caught:
        guard.load_state_dict(state)
    assert caught[0].filename == __file__  # the line that resumed, not one of gradguard's
    with pytest.raises(gg.TrainingDiverged, match="found no snapshot to restore, each a back-off"):
        train(guard, model, opt, data, start=20)
    assert not [e for e in guard.events if e.kind == "rollback"]
    abort = [e for e in guard.events if e.kind == "abort"][-1]
    assert abort.data["unrestored"] == abort.data["rollbacks"] == 3
    # the remedy names the missing snapshots, not the LR (found by a stranger: a checkpoint
    # inside an LR burst, resumed, stopped, was told to lower the base LR, at which the
    # run without the restart recovered)
    assert abort.remedy is not None and "Recovery(snapshot_dir=...)" in abort.remedy
    assert "lower the learning rate" not in abort.remedy.lower()
    for p in model.parameters():
        assert torch.isfinite(p).all()


def _adam_guard():
    """A fresh MLP on Adam 1e-2 under a guard with recovery (snapshots every 4 steps)."""
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    return model, opt, gg.Guard(model, opt, recovery=gg.Recovery(snapshot_every=4), every=5)


def _resumed(guard, model, opt):
    """Checkpoint ``guard``'s run, close it, and build a fresh one loaded with the model's
    and optimizer's state; returns it with the guard's state, still to load."""
    state = guard.state_dict()
    ckpt = {"model": model.state_dict(), "opt": opt.state_dict()}
    guard.close()
    model, opt, guard = _adam_guard()
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    return model, opt, guard, state


def test_a_checkpoint_taken_after_the_weights_went_wrong_unjudged_is_no_stand_in(tmp_path):
    """A checkpoint taken a few steps after an LR burst wrecked the weights, before the flush
    that would have judged those steps: the ladder was calm and its last flush healthy, yet
    the losses since (in the checkpoint's telemetry window) are far above the last
    snapshot's. Its weights are kept as no snapshot, and the resume says why (they were the
    stand-in: the resumed run rolled back to them, each time at a lower LR; a digits MLP
    resumed so ended at 8.6 held-out, 0.19 uninterrupted)."""
    data = batches(60, seed=11)
    model, opt, guard = _adam_guard()
    train(guard, model, opt, data[:20])  # flushes (and snapshots) up to step 19
    opt.param_groups[0]["lr"] = 1.0  # a burst: steps 20-22 (100x) wreck the weights
    train(guard, model, opt, data[20:23], start=20)
    opt.param_groups[0]["lr"] = 1e-2
    train(guard, model, opt, data[23:24], start=23)
    assert guard.telemetry.pending == 4 and not [
        e for e in guard.events if e.kind in ("rollback", "lr_backoff")]  # nothing judged yet
    model, opt, guard, state = _resumed(guard, model, opt)
    with pytest.warns(gg.GradGuardWarning, match=r"over the 4 steps since its last flush, "
                      r"above the level of its last snapshot.*kept in memory only"):
        guard.load_state_dict(state)
    train(guard, model, opt, data[24:26], start=24)
    assert 23 not in guard.recovery.store.steps()  # the wrecked weights: no stand-in


@pytest.mark.parametrize("after", [1, 2])
def test_a_checkpoint_one_or_two_steps_after_an_lr_burst_is_no_stand_in(after):
    """Found by a stranger: a checkpoint taken one or two steps after an LR burst, before any
    flush judged them, was kept as the stand-in snapshot without a word (one or two losses
    were "noise"); every rollback of the resumed run restored the wrecked weights
    (``TrainingDiverged``, or 49.9 held-out against 0.27 uninterrupted). The jump since the
    last flush, or the worst of so few losses, now says the weights may be the trouble's."""
    data = batches(30, seed=11)
    model, opt, guard = _adam_guard()
    train(guard, model, opt, data[:20])  # flushed (and snapshotted) up to step 19
    opt.param_groups[0]["lr"] = 3.0  # x300 from step 20: the jump is reported at once
    train(guard, model, opt, data[20:20 + after], start=20)
    assert guard.telemetry.pending == after and guard.monitor.lr_tracker.last_jump == 20
    model, opt, guard, state = _resumed(guard, model, opt)
    why = (r"after 1 step\(s\) at an LR that jumped at step 20, before a flush had judged "
           r"them" if after == 1 else r"over the 2 steps since its last flush, above")
    with pytest.warns(gg.GradGuardWarning, match=why + r".*kept in memory only"):
        guard.load_state_dict(state)
    train(guard, model, opt, data[20 + after:22 + after], start=20 + after)
    assert 19 + after not in guard.recovery.store.steps()  # no stand-in


def test_a_checkpoint_taken_soon_after_a_flush_is_judged_on_its_steps_alone():
    """The steps since the last flush say how the weights do: their median from
    ``UNJUDGED_MIN`` of them on, the worst of fewer (none right after a flush)."""
    from gradguard.recovery._checkpoint import UNJUDGED_MIN, unjudged_level

    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    guard = gg.Guard(model, opt, recovery=gg.Recovery(), every=5)
    data = batches(8, seed=11)
    train(guard, model, opt, data[:5])
    assert unjudged_level(guard) is None  # just flushed
    train(guard, model, opt, data[5:5 + UNJUDGED_MIN], start=5)
    level, n = unjudged_level(guard)
    assert n == UNJUDGED_MIN and math.isfinite(level)


def test_a_resume_with_snapshot_dir_rolls_back_to_the_snapshots_before_it(tmp_path):
    model, opt, guard, state, data = _resumed_at_an_lr_too_high(tmp_path, tmp_path / "snaps")
    with warnings.catch_warnings():
        warnings.simplefilter("error", gg.GradGuardWarning)
        guard.load_state_dict(state)
    train(guard, model, opt, data[:20], start=20)
    rolled = [e.data["snapshot_step"] for e in guard.events if e.kind == "rollback"]
    assert rolled and rolled[0] == 19  # the newest snapshot before the checkpoint

def test_another_runs_snapshots_in_the_directory_are_never_restored_nor_win_the_pruning(tmp_path):
    """Found by a stranger: an experiment run again into the same ``snapshot_dir`` found the
    other run's snapshots there (steps 249 and 349); pruned by step, the new run's own
    files were deleted as soon as they were written, and its resumed run rolled back "to
    the snapshot of step 349", another experiment's weights, or stopped on their shapes.
    They are now left alone, said once, and the run's own are kept and restored."""
    snaps = tmp_path / "snaps"
    snaps.mkdir()
    for step in (249, 349):  # another run's, of another model
        torch.save({"step": step, "model": {"0.weight": torch.zeros(3, 3)}},
                   snaps / f"snapshot-{step:010d}.pt")
    with pytest.warns(gg.GradGuardWarning, match=r"holds 2 snapshot file\(s\) of another run "
                      r"\(steps 249, 349\): they are never restored nor deleted"):
        model, opt, guard, state, data = _resumed_at_an_lr_too_high(tmp_path, snaps)
    assert sorted(p.name for p in snaps.glob("snapshot-*.pt")) == [
        "snapshot-0000000014.pt", "snapshot-0000000019.pt", "snapshot-0000000249.pt",
        "snapshot-0000000349.pt"]
    guard.load_state_dict(state)
    train(guard, model, opt, data[:20], start=20)
    rolled = [e.data["snapshot_step"] for e in guard.events if e.kind == "rollback"]
    assert rolled and rolled[0] == 19  # the run's own newest before its checkpoint
    assert (snaps / "snapshot-0000000349.pt").exists()


# ---- a full disk ------------------------------------------------------------------------------
@pytest.fixture
def tiny_disk(tmp_path):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a 64k tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_full_disk_warns_once_and_training_goes_on(tiny_disk):
    model = mlp(width=64)  # ~5 k parameters: a snapshot is ~60 kB, two do not fit
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    rec = gg.Recovery(skip_patience=1, snapshot_every=5, snapshot_dir=tiny_disk)
    guard = gg.Guard(model, opt, recovery=rec, every=5)
    data = batches(32, seed=2)
    with pytest.warns(gg.GradGuardWarning, match="writing a snapshot .* failed") as caught:
        train(guard, model, opt, data[:25])
        rec.wait()
        train(guard, model, opt, data[25:27], bad={25, 26}, start=25)
        guard.close()
    assert len([w for w in caught if "writing a snapshot" in str(w.message)]) == 1
    assert not [p for p in tiny_disk.iterdir() if p.name.endswith(".tmp")]
    good_files = rec.disk.steps()
    assert len(good_files) <= 1  # the one that fitted (if any) is intact and loadable
    for s in good_files:
        assert rec.disk.load_path(rec.disk.path(s))["step"] == s
    kinds = [e.kind for e in guard.events]
    assert "rollback" in kinds  # from the in-memory snapshot
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_snapshot_write_that_fails_last_is_warned_at_close(tmp_path, monkeypatch):
    """The one snapshot handed to the writer fails on a disk that filled after
    construction: nothing polls the writer before the run ends, so the warning must come
    from close() (it used to drop the writer, and with it the error, before warning)."""
    from gradguard.recovery.snapshots import DiskSnapshotStore

    def full(self, step, state):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(DiskSnapshotStore, "save", full)
    model = mlp(width=16)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    rec = gg.Recovery(snapshot_every=5, snapshot_dir=tmp_path / "snaps")
    guard = gg.Guard(model, opt, recovery=rec, every=5)
    train(guard, model, opt, batches(32, seed=2)[:1])  # one snapshot: before step 0
    with pytest.warns(gg.GradGuardWarning, match="writing a snapshot .* failed .*No space"):
        guard.close()


# ---- sinks after an abort -----------------------------------------------------------------------
class RecordingSink:
    def __init__(self):
        self.closed = 0
        self.aborted = []
        self.flushes = 0

    def write(self, flush):
        self.flushes += 1

    def close(self):
        self.closed += 1

    def on_abort(self, error):
        self.aborted.append(type(error).__name__)


def test_every_sink_is_closed_after_an_abort(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    rec = gg.Recovery(skip_patience=1, snapshot_every=2, max_rollbacks=1, patience=10)
    sinks = [RecordingSink(), gg.JsonlSink(tmp_path / "run"), RecordingSink()]
    with pytest.raises(gg.TrainingDiverged):
        with gg.Guard(model, opt, recovery=rec, every=2, sinks=sinks) as guard:
            train(guard, model, opt, batches(40), bad=set(range(4, 40)))
    assert sinks[0].closed == sinks[2].closed == 1
    assert sinks[0].aborted == ["TrainingDiverged"]
    assert sinks[1]._events.closed and sinks[1]._metrics.closed
    assert "abort" in [r["kind"] for r in gg.read_jsonl(tmp_path / "run" / "events.jsonl")]


# ---- construction --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda m, o: gg.Guard(m, o, clip=gg.ZClip), TypeError, r"clip=.*ZClip.*ZClip\(\)"),
        (lambda m, o: gg.Guard(m, o, recovery=gg.Recovery), TypeError, r"recovery=.*Recovery\(\)"),
        (lambda m, o: gg.Guard(m, o, sinks=gg.JsonlSink), TypeError, r"sinks=.*JsonlSink\(\)"),
        (lambda m, o: gg.Guard(m, o, sinks=["runs/x"]), TypeError, "sinks="),
        (lambda m, o: gg.Guard(m, o, every="5"), ValueError, "every='5'"),
        (lambda m, o: gg.Guard(m, o, bogus=1), TypeError, r"unknown option\(s\) \['bogus'\]"),
        (lambda m, o: gg.Recovery(snapshot_dir=123), TypeError, "snapshot_dir=123"),
    ],
)
def test_constructor_mistakes_fail_at_construction(make, error, match):
    model = mlp()
    with pytest.raises(error, match=match):
        make(model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_one_sink_or_none_and_numpy_losses_are_accepted(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, opt, sinks=gg.JsonlSink(tmp_path), every=2)
    assert len(guard.sinks) == 1
    assert gg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), sinks=None).sinks == []
    for x, y in batches(2):
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        guard.step(np.float32(loss.item()))
        opt.zero_grad()
    guard.step(np.array([0.5]))
    guard.close()
    losses = [r["loss"] for r in gg.read_jsonl(tmp_path / "metrics.jsonl") if r["type"] == "step"]
    assert losses[-1] == 0.5 and len(losses) == 3


# ---- a failing rank ------------------------------------------------------------------------
WORKER = r"""
import math, os, sys, time, torch, torch.distributed as dist
from datetime import timedelta
import gradguard as gg
sys.path.insert(0, os.path.join(sys.argv[2], "tests"))
from helpers import mlp, batches
scenario, root, out = sys.argv[1], sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", timeout=timedelta(seconds=300))  # longer than the test waits
rank = dist.get_rank()
torch.manual_seed(rank)
model = mlp(seed=rank)  # each rank its own parameters (no DDP): the snapshots differ
opt = torch.optim.SGD(model.parameters(), lr=0.05)
if scenario == "crash":
    # under DDP the next collective of the healthy rank is a gradient all-reduce: a
    # flush on the failing rank would be a mismatched collective (a hang)
    model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = gg.Guard(model, opt, every=3)
    try:
        with guard:
            for step, (x, y) in enumerate(batches(20, seed=rank)):
                if rank == 1 and step == 4:
                    raise RuntimeError("rank 1 fails mid-training")
                loss = torch.nn.functional.mse_loss(model(x), y)
                loss.backward(); guard.step(loss); opt.zero_grad()
    finally:
        torch.save([(e.rank, e.message) for e in guard.events if e.kind == "abort"],
                   os.path.join(out, f"abort{rank}.pt"))
elif scenario == "desync":  # a NaN written into rank 1's gradient after the all-reduce
    model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gg.Guard(model, opt, every=3) as guard:
        for step, (x, y) in enumerate(batches(9, seed=rank)):
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            if rank == 1 and step == 4:
                next(model.parameters()).grad[0, 0] = math.nan
            guard.step(loss); opt.zero_grad()
    torch.save([(e.kind, e.step, e.data) for e in guard.events], os.path.join(out, f"ev{rank}.pt"))
elif scenario == "spike":  # rank 1's batch at x100 after the warm-up, the default guard
    model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gg.Guard(model, opt, clip=gg.ZClip(), recovery=gg.Recovery(), every=10) as guard:
        for step, (x, y) in enumerate(batches(60, seed=rank)):
            if rank == 1 and step == 45:
                x = x * 100
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward(); guard.step(loss); opt.zero_grad()
    torch.save([(e.kind, e.step, e.rank, e.message) for e in guard.events],
               os.path.join(out, f"ev{rank}.pt"))
elif scenario == "sinks":  # every rank builds the same sinks, as the docs show
    model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sinks = [gg.JsonlSink(os.path.join(out, "run")), gg.TensorBoardSink(os.path.join(out, "tb")),
             gg.WandbSink(mode="offline", dir=os.path.join(out, "wb"), project="p")]
    with gg.Guard(model, opt, every=3, sinks=sinks) as guard:
        for step, (x, y) in enumerate(batches(6, seed=rank)):
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward(); guard.step(loss); opt.zero_grad()
else:  # shared snapshot directory, a rollback on every rank
    rec = gg.Recovery(skip_patience=1, snapshot_every=3, patience=10,
                      snapshot_dir=os.path.join(out, "shared"))
    guard = gg.Guard(model, opt, recovery=rec, every=3)
    for step, (x, y) in enumerate(batches(12, seed=rank)):
        loss = torch.nn.functional.mse_loss(model(x), y)
        if step in (7, 8):
            loss = loss * math.nan
        loss.backward(); guard.step(loss); opt.zero_grad()
        if step == 8:
            torch.save([p.detach().clone() for p in model.parameters()],
                       os.path.join(out, f"end{rank}.pt"))
        if step == 5:
            rec.wait()
            torch.save([p.detach().clone() for p in model.parameters()],
                       os.path.join(out, f"good{rank}.pt"))
            rec.store.clear()  # roll back from the shared directory, as after a restart
    guard.close()
    assert [e.kind for e in guard.events if e.kind == "rollback"] == ["rollback"], guard.events
    torch.save(sorted(os.listdir(os.path.join(out, "shared"))), os.path.join(out, f"files{rank}.pt"))
dist.barrier()  # no rank tears down while another still has work on the wire
dist.destroy_process_group()
"""


def run_ranks(tmp_path, scenario, timeout_s):
    """Run ``scenario`` on two ranks; once more when a rank aborted in gloo's teardown after
    its work (``dist_launch.GLOO_TEARDOWN``)."""
    codes, logs, took = _run_ranks(tmp_path, scenario, timeout_s)
    if codes != [0, 0] and all(c == 0 or GLOO_TEARDOWN in log for c, log in zip(codes, logs)):
        empty_dir(tmp_path)  # the first run's files (append-only records would hold both)
        codes, logs, took = _run_ranks(tmp_path, scenario, timeout_s)
    return codes, logs, took


def _run_ranks(tmp_path, scenario, timeout_s):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = free_port()  # a fresh port per run: the same one for every scenario of a process
    # left the next run's ranks to abort in gloo's teardown now and then
    procs = []
    for r in range(2):
        env = {**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
        procs.append(subprocess.Popen([sys.executable, str(script), scenario, str(ROOT), str(tmp_path)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    t0 = time.monotonic()
    logs, codes = [], []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, timeout_s - (time.monotonic() - t0)))
            logs.append(out)
            codes.append(p.returncode)
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"{scenario}: a rank hung past {timeout_s}s")
    return codes, logs, time.monotonic() - t0


def test_sinks_every_rank_builds_open_one_wandb_run_and_one_event_file(tmp_path):
    """Found by a stranger: every rank builds the same sinks (docs/distributed.md) and the
    guard writes from rank 0, yet every other rank started a W&B run of its own (an N-GPU
    job added N-1 empty runs to the project) and opened a TensorBoard event file."""
    pytest.importorskip("wandb")
    pytest.importorskip("tensorboard")
    codes, logs, _ = run_ranks(tmp_path, "sinks", timeout_s=240)
    assert codes == [0, 0], logs
    runs = [p for p in (tmp_path / "wb" / "wandb").iterdir() if p.name.startswith("offline-run")]
    assert len(runs) == 1, runs
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 1
    steps = [r for r in gg.read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["type"] == "step"]
    assert [r["step"] for r in steps] == list(range(6))


def test_ranks_that_took_different_skip_decisions_are_told_their_replicas_diverged(tmp_path):
    """Found by a stranger: a NaN written into one rank's gradient after DDP's all-reduce
    (a hook on one rank, a faulty device) was skipped there alone, the other rank stepped,
    and nothing said that the replicas now differ: both ranks' records showed no skip."""
    codes, logs, _ = run_ranks(tmp_path, "desync", timeout_s=240)
    assert codes == [0, 0], logs
    for r in range(2):
        events = torch.load(tmp_path / f"ev{r}.pt", weights_only=False)
        [split] = [e for e in events if e[0] == "ranks_diverged"]
        assert split[1] == 4 and split[2]["skipped_ranks"] == [1] and split[2]["steps"] == [4]


def test_a_spike_in_one_ranks_batch_names_that_rank(tmp_path):
    """Found by a stranger: a x100 batch on rank 1 under DDP gave spike events with
    ``rank=None`` on every rank (the all-reduced gradients spike alike); the rank's own
    loss, gathered at the flush, tells where it came from."""
    codes, logs, _ = run_ranks(tmp_path, "spike", timeout_s=240)
    assert codes == [0, 0], "\n".join(x[-2000:] for x in logs)
    ev0, ev1 = (torch.load(tmp_path / f"ev{r}.pt", weights_only=False) for r in range(2))
    assert ev0 == ev1
    at = [e for e in ev0 if e[1] == 45 and e[0] in ("skip", "grad_spike", "loss_spike")]
    assert at, ev0
    assert all(e[2] == 1 and "rank 1" in e[3] for e in at), at


def test_a_failing_rank_makes_the_other_fail_not_hang(tmp_path):
    codes, logs, seconds = run_ranks(tmp_path, "crash", timeout_s=60)
    assert codes[1] != 0 and "rank 1 fails mid-training" in logs[1]
    # rank 1 left without entering a collective; rank 0's next one sees the closed peer
    assert codes[0] != 0, logs[0][-2000:]
    assert seconds < 60
    # each rank's abort names its rank (found by a stranger: rank 0's "Connection closed by
    # peer" was told for every rank, rank 1's own error nowhere)
    [(rank, message)] = torch.load(tmp_path / "abort1.pt")
    assert rank == 1 and "rank 1 fails mid-training" in message and "on rank 1" in message
    assert all(r == 0 and "on rank 0" in m for r, m in torch.load(tmp_path / "abort0.pt"))


def test_ranks_sharing_a_snapshot_directory_roll_back_to_their_own_parameters(tmp_path):
    codes, logs, _ = run_ranks(tmp_path, "shared", timeout_s=120)
    assert codes == [0, 0], "\n".join(x[-2000:] for x in logs)
    files = torch.load(tmp_path / "files0.pt")
    assert files and all("-rank" in f for f in files)
    assert {f.rsplit("-rank", 1)[1] for f in files} == {"0.pt", "1.pt"}
    for r in range(2):
        good, end = torch.load(tmp_path / f"good{r}.pt"), torch.load(tmp_path / f"end{r}.pt")
        other = torch.load(tmp_path / f"good{1 - r}.pt")
        assert all(torch.equal(a, b) for a, b in zip(good, end))  # its own snapshot
        assert not torch.equal(good[0], other[0])


@pytest.mark.parametrize("saved, loaded", [("ZClip", "AutoClip"), ("AutoClip", "ZClip")])
def test_a_state_saved_with_another_clip_policy_is_refused_naming_both(saved, loaded):
    """Found by a stranger: ZClip's state loaded into a guard with AutoClip was accepted,
    and the next ``guard.step`` raised ``KeyError: 'bin_count'``, far from the mistake; the
    other way round it was a bare ``KeyError: 'buffer'``."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = gg.Guard(model, opt, clip=getattr(gg, saved)())
    train(guard, model, opt, batches(12, seed=3))
    state = guard.state_dict()
    other = gg.Guard(model, opt, clip=getattr(gg, loaded)())
    with pytest.raises(ValueError, match=rf"saved by a guard with clip={saved}, this guard's is "
                                         rf"{loaded}: .* build the guard with the clip policy"):
        other.load_state_dict(state)
    same = gg.Guard(model, opt, clip=getattr(gg, saved)())
    same.load_state_dict(state)  # the same policy loads
    train(same, model, opt, batches(4, seed=4))


@pytest.mark.parametrize("change", ["every", "model", "width"])
def test_a_state_that_does_not_fit_is_refused_naming_what_differs_before_loading_anything(
        change):
    """Found by a stranger: another ``every`` failed with "telemetry state_dict buffer
    shape (10, 14) != (25, 14)", and another model with "saved for different parameters",
    neither naming the option, after the step count and the clip statistics were loaded
    already. And a model of other widths, the same names, loaded unsaid."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = gg.Guard(model, opt, clip=gg.ZClip(), every=5)
    train(guard, model, opt, batches(12, seed=3))
    state = guard.state_dict()
    if change == "every":
        other_model, why = model, r"saved by a guard with every=5, this guard's is every=10: " \
                                  r"build the guard with every=5"
    elif change == "width":
        other_model = mlp(width=32)
        why = (r"saved over parameters of other shapes \(the first: '0.weight', \(16, 8\) "
               r"saved, \(32, 8\) here\)")
    else:
        other_model = nn.Sequential(*mlp(), nn.Linear(1, 1))
        why = (r"saved over other parameters \(6 parameter tensors saved, 8 in this guard's "
               r"model\).*start a new guard")
    other_opt = torch.optim.SGD(other_model.parameters(), lr=0.01)
    other = gg.Guard(other_model, other_opt, clip=gg.ZClip(),
                     every=10 if change == "every" else 5)
    clip_before = other.clip.state_dict()
    with pytest.raises(gg.StateMismatch, match=why):
        other.load_state_dict(state)
    assert other.step_count == 0  # nothing was loaded
    assert_same_tree(other.clip.state_dict(), clip_before, "clip")


@pytest.mark.parametrize("state, error, match", [
    (None, TypeError, r"expected the dict Guard.state_dict\(\) returns, got NoneType"),
    ("x", TypeError, r"got str"),
    ({}, ValueError, r"this is not a Guard state \(no 'version'"),
    ({"version": 1}, ValueError, r"the state lacks \['step_count', 'telemetry'\]"),
])
def test_load_state_dict_of_what_is_no_guard_state_says_so(state, error, match):
    """Found by a stranger: ``load_state_dict(None)`` raised "'NoneType' object has no
    attribute 'get'", ``load_state_dict({})`` "unsupported version None", and a state
    missing a key a bare ``KeyError: 'step_count'``."""
    model = mlp()
    guard = gg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.01))
    with pytest.raises(error, match=match):
        guard.load_state_dict(state)
    assert guard.step_count == 0


def test_a_resume_with_snapshot_dir_before_an_lr_jump_continues_exactly(tmp_path):
    """Found by a stranger: resumed (with ``snapshot_dir``) from the step before an LR jump,
    the run kept that step's weights again, in memory, the jump's step already in the
    clip statistics, since its memory held no snapshot yet (the uninterrupted run's
    held that one), and its rollback restored that copy rather than the snapshot on
    disk. The snapshot on disk is the newest kept: the resumed run continues exactly."""
    data = batches(45, seed=11)

    def make(d, seed=0):
        model = mlp(seed=seed)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        rec = gg.Recovery(snapshot_every=4, snapshot_dir=d)
        return model, opt, gg.Guard(model, opt, clip=gg.ZClip(warmup_steps=5), recovery=rec,
                                    every=5)

    def run(model, opt, guard, start, stop):
        for step in range(start, stop):
            opt.param_groups[0]["lr"] = 30.0 if 20 <= step < 23 else 1e-2  # a burst x3000
            train(guard, model, opt, data[step:step + 1], start=step)

    ref_model, ref_opt, ref = make(tmp_path / "a")
    run(ref_model, ref_opt, ref, 0, 45)
    ref.close()
    assert [e for e in ref.events if e.kind == "rollback"]

    model, opt, guard = make(tmp_path / "b")
    run(model, opt, guard, 0, 20)
    guard.recovery.wait()
    ckpt = {"model": model.state_dict(), "opt": opt.state_dict(), "guard": guard.state_dict()}
    guard.close()
    model, opt, guard = make(tmp_path / "b", seed=1)  # another init: the checkpoint's wins
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    guard.load_state_dict(ckpt["guard"])
    run(model, opt, guard, 20, 45)
    guard.close()
    assert [e.to_json() for e in guard.events] == [e.to_json() for e in ref.events][
        -len(guard.events):]
    assert_same_run(model, opt, ref_model, ref_opt)
    assert_same_tree(guard.clip.state_dict(), ref.clip.state_dict(), "clip")
