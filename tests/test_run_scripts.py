"""`gradguard run` on real-style training scripts (tests/scripts/), each against the same
script run unguarded: a nanoGPT-like loop with its own GradScaler and grad_clip, a
Lightning script with gradient_clip_val, a Hugging Face Trainer on a small GPT-2, a loop
over plain tensors with value clipping.

Each script dumps what it saw (the true pre-clip norm from ``get_total_norm`` right before
its own clip, its loss, a digest of the final weights). Asserted: the recorded norms are
the true pre-clip norms, the recorded clip coefficient is the script's, the weights are
bit-identical to the unguarded run's (the clip happened exactly once), NaN steps are
skipped, and the run is judged on its loss.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest

import gradguard as gg
from dist_launch import free_port, torchrun_job
from gradguard.cli import main
from gradguard.events import read_jsonl
from gradguard.integrations.run import format_summary, run_script
from gradguard.report import load_run

SCRIPTS = Path(__file__).resolve().parent / "scripts"
NANOGPT = ["--iters", "14", "--accum", "1", "--batch", "4"]


def run_plain(script: str, args: list[str], tmp: Path) -> dict:
    """The script run unguarded in this process; returns its --dump."""
    dump = tmp / f"plain-{script}.json"
    saved = sys.argv[:]
    sys.argv = [str(SCRIPTS / script), *args, "--dump", str(dump)]
    try:
        runpy.run_path(str(SCRIPTS / script), run_name="__main__")
    finally:
        sys.argv = saved
    return json.loads(dump.read_text())


def run_guarded(script: str, args: list[str], tmp: Path, **options) -> tuple:
    """The script under gradguard run, with recovery on as on the command line (snapshots
    every 5 steps, so that they happen in these short runs: they must change nothing);
    returns (RunResult, its --dump, step records)."""
    dump = tmp / f"guarded-{script}.json"
    options.setdefault("report", False)
    options.setdefault("recovery", gg.Recovery(snapshot_every=5))
    result = run_script(SCRIPTS / script, [*args, "--dump", str(dump)], out=tmp / "runs",
                        quiet=True, every=5, **options)
    steps = [r for r in read_jsonl(result.run_dir / "metrics.jsonl") if r["type"] == "step"]
    return result, json.loads(dump.read_text()), steps


def assert_true_norms(steps: list[dict], ref: dict) -> None:
    """Recorded = the script's own pre-clip norm, step by step (the order of the sum over
    parameters may differ: float32 rounding)."""
    assert len(steps) == len(ref["steps"])
    for rec, want in zip(steps, ref["steps"]):
        assert rec["grad_norm"] == pytest.approx(want["true_norm"], rel=1e-5)


def assert_clip_recorded(steps: list[dict], ref: dict, max_norm: float) -> None:
    """The recorded coefficient is the one torch's clip_grad_norm_ applied."""
    clipped = 0
    for rec, want in zip(steps, ref["steps"]):
        coef = min(1.0, max_norm / (want["true_norm"] + 1e-6))
        assert rec["clip_coef"] == pytest.approx(coef, rel=1e-5)
        clipped += coef < 1
    assert clipped > 0  # the scripts are set up so that their clip bites


# ---- nanoGPT-like: own GradScaler, grad_clip, decay/no-decay groups --------------------
def test_nanogpt_like_records_true_preclip_norms_and_clips_once(tmp_path):
    ref = run_plain("nanogpt_like.py", NANOGPT, tmp_path)
    result, got, steps = run_guarded("nanogpt_like.py", NANOGPT, tmp_path)
    assert got["digest"] == ref["digest"]  # bit-identical weights: the clip happened once
    assert_true_norms(steps, ref)
    assert_clip_recorded(steps, ref, max_norm=1.0)
    # the unscaled loss (the script divides by --accum 1), not loss * 65536
    assert [r["loss"] for r in steps] == pytest.approx([s["loss"] for s in ref["steps"]], rel=1e-5)
    row = result.optimizers[0]
    assert row["clip"] == "the script's clip_grad_norm_(max_norm=1)"
    assert row["outcome"]["status"] == "healthy"


@pytest.mark.parametrize("fused", [False, True], ids=["adamw", "fused-adamw"])
def test_nanogpt_like_nan_step_skipped_and_counted_under_its_scaler(tmp_path, fused):
    args = [*NANOGPT, "--nan-at", "6"] + (["--fused"] if fused else [])
    ref = run_plain("nanogpt_like.py", args, tmp_path)
    result, got, steps = run_guarded("nanogpt_like.py", args, tmp_path)
    # the scaler skipped the NaN step in both runs: gradguard counts it and changes no
    # weight; the loss was NaN, which no loss scale causes or cures, so the scale is left
    # at 2**16 where the bare scaler halves it (docs/guard.md, mixed precision)
    assert got["digest"] == ref["digest"] and (got["scale"], ref["scale"]) == (65536.0, 32768.0)
    assert [r["step"] for r in steps if r["skipped"]] == [6]
    assert steps[6]["grad_norm"] is None and steps[6]["loss"] is None
    events = read_jsonl(result.run_dir / "events.jsonl")
    assert ("nonfinite_grad", 6) in {(e["kind"], e["step"]) for e in events}
    assert result.optimizers[0]["outcome"]["status"] == "recovered"


def test_nanogpt_like_without_scaler_nan_step_is_skipped_by_gradguard(tmp_path):
    args = [*NANOGPT, "--nan-at", "6", "--no-scaler"]
    ref = run_plain("nanogpt_like.py", args, tmp_path)
    assert not ref["finite"]  # unguarded: clip_grad_norm_ spreads the NaN, AdamW applies it
    _, got, steps = run_guarded("nanogpt_like.py", args, tmp_path)
    assert got["finite"] and [r["step"] for r in steps if r["skipped"]] == [6]


@pytest.mark.parametrize("fault", ["--nan-at", "--spike-at"])
def test_a_step_the_script_skipped_itself_is_reported_not_called_healthy(tmp_path, fault):
    """The script reads its clip_grad_norm_'s norm and, when it is non-finite or too large,
    zeroes the gradients without optimizer.step() (nanoGPT-style self-guarding). The guard
    never saw that step: a NaN there was reported "HEALTHY: No gradient trouble". Now the
    pending clip request, dropped at zero_grad, is recorded: a nonfinite_grad error for a
    NaN norm, an info skip for a finite one. The weights are the unguarded script's."""
    args = [*NANOGPT, fault, "6", "--no-scaler", "--skip-above", "1000"]
    ref = run_plain("nanogpt_like.py", args, tmp_path)
    result, got, steps = run_guarded("nanogpt_like.py", args, tmp_path)
    assert ref["finite"] and got["digest"] == ref["digest"]
    assert len(steps) == 13 and not any(r["skipped"] for r in steps)  # one iteration unstepped
    events = list(read_jsonl(result.run_dir / "events.jsonl"))
    row = result.optimizers[0]
    if fault == "--nan-at":
        bad = [e for e in events if e["kind"] == "nonfinite_grad"]
        assert [(e["step"], e["severity"], e["data"]["script_skipped"]) for e in bad] == [
            (6, "error", True)]
        assert "measured a NaN gradient norm before step 6, and the script skipped that step " \
               "itself" in row["summary"]
        assert row["outcome"]["status"] != "healthy"
    else:
        skip = [e for e in events if e["kind"] == "skip"]
        assert [(e["step"], e["severity"], e["data"]["reason"]) for e in skip] == [
            (6, "info", "script")]
        assert skip[0]["value"] == pytest.approx(got["steps"][6]["returned_norm"], rel=1e-5)
        assert row["outcome"]["status"] == "healthy"


def test_diverging_run_is_called_diverged_lr_too_high_and_can_fail_the_run(tmp_path, capsys):
    # AdamW at 30 with no recovery: the loss explodes from 4.4 to thousands and ends
    # 5228, 1983, 2997; judged on that spread in absolute terms it had not "risen" and the
    # run was called HEALTHY (the rise is now judged in log units)
    args = ["--out", str(tmp_path / "runs"), "--no-report", "--every", "5", "--no-recovery",
            str(SCRIPTS / "nanogpt_like.py"), *NANOGPT, "--lr", "30"]
    assert main(["run", *args]) == 0  # the script's own exit code by default
    err = capsys.readouterr().err
    assert "DIVERGED: The loss rose from" in err and "(`lr_too_high`)" in err
    info = json.loads((tmp_path / "runs" / "latest" / "run.json").read_text())
    outcome = info["optimizers"][0]["outcome"]
    assert (outcome["status"], outcome["cause"], outcome["ok"]) == ("diverged", "lr_too_high", False)
    assert main(["run", "--fail-on-divergence", *args]) == 1
    assert "--fail-on-divergence: 1 guarded run(s) did not recover" in capsys.readouterr().err
    assert len([d for d in (tmp_path / "runs").iterdir() if d.name != "latest"]) == 2


def test_a_wrecking_lr_of_any_size_is_cut_to_one_that_trains(tmp_path, capsys):
    """The same script at AdamW 30 and 3000 under recovery: its first update moves the
    weights by hundreds of times their norm, and the rollback cuts the LR by that size
    (docs/recovery.md, "Act at the step"), whatever it was: the run recovers. Halving it
    per relapse, it had diverged at 30."""
    for lr in ("30", "3000"):
        args = ["--out", str(tmp_path / lr), "--no-report", "--every", "5",
                str(SCRIPTS / "nanogpt_like.py"), *NANOGPT, "--lr", lr]
        assert main(["run", "--fail-on-divergence", *args]) == 0
        err = capsys.readouterr().err
        assert "RECOVERED: " in err and "wrecked the weights (the first update from the weights " \
            "restored moved them by" in err
        assert " times their norm)" in err  # 31,041% of it at 30
        info = json.loads((tmp_path / lr / "latest" / "run.json").read_text())
        assert info["optimizers"][0]["outcome"]["status"] == "recovered"


@pytest.mark.parametrize("scale, recovery", [(100.0, False), (1000.0, True), (1.0, True)])
def test_a_network_that_died_is_not_called_healthy(tmp_path, capsys, scale, recovery):
    """A script whose ReLUs die (inputs at 100x, SGD momentum): no NaN, no spike, the loss
    at chance under its first loss. Without recovery the verdict names the dead layers and
    the run fails under --fail-on-divergence. With it (inputs at 1000x, where every layer
    but the head dies again after the first rollback) the guard rolls the dead network
    back to its fresh weights at a lower LR, timing each stall from the weights it
    restored, until it trains; the same script on normalised inputs is healthy."""
    args = ["--fail-on-divergence", "--no-report", "--out", str(tmp_path),
            *([] if recovery else ["--no-recovery"]),
            str(SCRIPTS / "dead_relu.py"), "--scale", str(scale)]
    code = main(["run", *args])
    err = capsys.readouterr().err
    run = tmp_path / "latest"
    outcome = json.loads((run / "run.json").read_text())["optimizers"][0]["outcome"]
    if scale == 1.0:
        assert code == 0 and (outcome["status"], outcome["cause"]) == ("healthy", None), err
        return
    if recovery:
        from gradguard.recovery.dead import STALL_STEPS

        assert code == 0 and outcome["status"] == "recovered" and outcome["final"] < 1.0, err
        died = [e["step"] for e in read_jsonl(run / "events.jsonl")
                if e["kind"] == "rollback" and "the network died" in e["message"]]
        assert len(died) >= 2 and min(b - a for a, b in itertools.pairwise(died)) >= STALL_STEPS
        return
    assert code == 1, err
    assert (outcome["status"], outcome["cause"], outcome["ok"]) == ("not_recovered", "dead_units", False), err
    assert "NOT RECOVERED: " in err and "the network died at step" in err
    assert "normalise the inputs" in err and "Stable at lr" not in err  # it did not train


@pytest.mark.parametrize("depth", [12, 1])
def test_a_run_whose_gradients_vanished_and_never_learnt_is_stalled_not_healthy(
        tmp_path, capsys, depth):
    """A deep sigmoid MLP at chance for 300 steps (its first layers' gradients ~1e-9 of the
    last's) was "HEALTHY ... Training recovered"; now it is stalled, names the cause, and
    fails under --fail-on-divergence. One sigmoid layer learns: healthy."""
    args = ["--fail-on-divergence", "--no-report", "--out", str(tmp_path),
            str(SCRIPTS / "deep_sigmoid.py"), "--depth", str(depth)]
    code = main(["run", *args])
    err = capsys.readouterr().err
    outcome = json.loads((tmp_path / "latest" / "run.json").read_text())["optimizers"][0]["outcome"]
    if depth == 1:
        assert code == 0 and (outcome["status"], outcome["flat"]) == ("healthy", False), err
        return
    assert code == 1, err
    assert (outcome["status"], outcome["cause"], outcome["ok"]) == ("stalled", "vanishing_grad", False)
    assert "STALLED: Gradients vanished in `0` from step 49. Training stalled: the loss did not " \
           "fall" in err and "He init" in err


def test_batches_on_another_scale_behind_batch_norm_are_found_and_skipped(tmp_path, capsys):
    """A script where 5% of the batches missed their /16 (tests/scripts/unscaled_bn.py): a
    BatchNorm CNN trains on them as on any other, and only its running variance takes the
    scale in: unguarded, the eval() model's held-out loss ends 16 times the clean run's.
    Under ``gradguard run`` each such batch is skipped by the statistics alone, the held-out
    loss is the clean run's within 10%, and the summary says what the batches were."""
    def held_out(argv):
        saved = sys.argv[:]
        sys.argv = [str(SCRIPTS / "unscaled_bn.py"), *argv]
        try:
            runpy.run_path(str(SCRIPTS / "unscaled_bn.py"), run_name="__main__")
        finally:
            sys.argv = saved
        return float(capsys.readouterr().out.split("held-out loss")[-1])

    clean, unguarded = held_out(["--bad", "0"]), held_out([])
    assert unguarded > 10 * clean
    assert main(["run", "--no-report", "--out", str(tmp_path),
                 str(SCRIPTS / "unscaled_bn.py")]) == 0
    out = capsys.readouterr()
    assert float(out.out.split("held-out loss")[-1]) < 1.1 * clean
    assert "RECOVERED: 6 batches from step 15 on were on another scale" in out.err
    assert "unit error" in out.err
    steps = [r for r in read_jsonl(tmp_path / "latest" / "metrics.jsonl") if r["type"] == "step"]
    assert [r["step"] for r in steps if r["skipped"]] == [15, 19, 28, 33, 106, 135]


def test_a_curriculums_next_stage_under_gradguard_run_is_learnt(tmp_path, capsys):
    """A script whose batches change at step 250 (tests/scripts/curriculum.py: the digits
    0-4, then all ten). Under ``gradguard run`` the guard's first rollback finds the
    restored weights at the new loss (``data_shift``), learns the new level and the script
    ends as unguarded (within 30%); ``--fail-on-divergence`` does not fail it, and the
    verdict names the step to check the data at."""
    saved = sys.argv[:]
    sys.argv = [str(SCRIPTS / "curriculum.py")]
    try:
        runpy.run_path(str(SCRIPTS / "curriculum.py"), run_name="__main__")
    finally:
        sys.argv = saved
    plain = float(capsys.readouterr().out.split("held-out loss")[-1])
    assert main(["run", "--fail-on-divergence", "--no-report", "--out", str(tmp_path),
                 str(SCRIPTS / "curriculum.py")]) == 0
    out = capsys.readouterr()
    assert float(out.out.split("held-out loss")[-1]) < 1.3 * plain
    assert "UNJUDGED" in out.err and "batches changed" in out.err
    kinds = [e["kind"] for e in read_jsonl(tmp_path / "latest" / "events.jsonl")]
    assert kinds.count("data_shift") == 1 and kinds.count("rollback") == 1
    assert "abort" not in kinds and "loss_level_off" not in kinds


def test_healthy_run_with_fail_on_divergence_exits_0(tmp_path):
    assert main(["run", "--fail-on-divergence", "--no-report", "--out", str(tmp_path),
                 str(SCRIPTS / "plain_tensor.py"), "--steps", "12"]) == 0


# ---- re-runs and --resume ---------------------------------------------------------------
def test_rerun_writes_a_separate_run_dir_and_resume_continues_one(tmp_path):
    out = tmp_path / "runs"
    cli = ["run", "--no-report", "--every", "4", "--out", str(out),
           str(SCRIPTS / "plain_tensor.py"), "--steps", "6"]
    assert main(cli) == 0
    first = (out / "latest").resolve()
    assert main(cli) == 0
    second = (out / "latest").resolve()
    assert first != second and first.parent == second.parent == out.resolve()
    for d in (first, second):  # never two runs in one directory
        assert [r["step"] for r in read_jsonl(d / "metrics.jsonl") if r["type"] == "step"] == list(range(6))
    # continues runs/latest; this script trains from scratch (its SGD momentum holds no
    # state at its first step), so its guard is a run of its own there (the test below)
    with pytest.warns(RuntimeWarning, match="starts afresh at step 0"):
        assert main(["run", "--resume", *cli[1:]]) == 0
    assert (out / "latest").resolve() == second
    steps = [r["step"] for r in read_jsonl(second / "metrics.jsonl") if r["type"] == "step"]
    assert steps == list(range(6)) * 2 and load_run(second).step.tolist() == list(range(6))
    info = json.loads((second / "run.json").read_text())
    assert len(info["sessions"]) == 2
    assert main(["run", "--resume-from", str(tmp_path / "nope"), *cli[1:]]) == 2
    # found by a stranger: both accepted, the error about the directory's contents
    assert main(["run", "--resume", "--resume-from", str(first), *cli[1:]]) == 2
    # found by a stranger: accepted, and nothing would have been clipped
    assert main(["run", "--script-clip", "replace", *cli[1:]]) == 2
    with pytest.warns(RuntimeWarning, match="starts afresh at step 0"):
        assert main(["run", "--resume-from", str(first), *cli[1:]]) == 0
    assert load_run(first).step.tolist() == list(range(6))


def test_resume_after_the_model_changed_starts_the_guard_afresh_and_the_script_trains(
        tmp_path, capsys):
    """Found by a stranger: a layer added, then ``gradguard run --resume``: the script died
    at its first step inside gradguard (the saved state was for other parameters), the
    summary said it "never called optimizer.step()", and the earlier run's run.json was
    replaced by that failure. The guard now starts afresh, its steps numbered on, and says
    why."""
    script = tmp_path / "train.py"
    script.write_text(
        "import sys, torch\n"
        "torch.manual_seed(0)\n"
        "depth = int(sys.argv[1])\n"
        "m = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(depth)])\n"
        "opt = torch.optim.SGD(m.parameters(), lr=0.01)\n"
        "for s in range(6):\n"
        "    m(torch.randn(8, 4)).pow(2).mean().backward(); opt.step(); opt.zero_grad()\n"
        "print('done', flush=True)\n")
    out = tmp_path / "runs"
    cli = ["run", "--no-report", "--every", "3", "--out", str(out), str(script)]
    assert main([*cli, "2"]) == 0
    capsys.readouterr()
    with pytest.warns(RuntimeWarning, match=r"its guard state does not fit: the state was saved "
                      r"over other parameters \(4 parameter tensors saved, 6 in this guard's "
                      r"model.*starts afresh, its steps numbered on from 6"):
        assert main(["run", "--resume", *cli[1:], "3"]) == 0
    assert "done" in capsys.readouterr().out
    latest = (out / "latest").resolve()
    steps = [r["step"] for r in read_jsonl(latest / "metrics.jsonl") if r["type"] == "step"]
    assert steps == list(range(12))
    info = json.loads((latest / "run.json").read_text())
    assert len(info["sessions"]) == 2 and info["exit_code"] == 0 and info["optimizers"]


@pytest.mark.parametrize("nan_at", [26, 21])
def test_resume_of_a_script_back_at_its_own_checkpoint_numbers_steps_from_it(tmp_path, capsys,
                                                                             nan_at):
    """Found by a stranger: a script that checkpoints itself every 50 steps, preempted 23
    steps after its checkpoint and resumed from it with ``gradguard run --resume``, was
    numbered on from the guard's own count: its NaN batch at step 260 was "NaN at step
    283", the stretch it ran again recorded twice. The optimizer's own step count says
    where the script went back to; and a script that starts from scratch is a run of its
    own (it was judged against the earlier run's loss level: "a loss spike at step 300",
    its LR cut, +9-15% held-out). A NaN batch skipped in the stretch run again (step 21)
    did not count in the optimizer's steps: numbered back by the optimizer's count alone,
    the guard was late by one (found by a regression hunt); the records say which steps
    were taken."""
    script = tmp_path / "train.py"
    ckpt = tmp_path / "ck.pt"
    script.write_text(
        "import os, sys, torch\n"
        "torch.manual_seed(0)\n"
        "m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))\n"
        "opt = torch.optim.AdamW(m.parameters(), lr=1e-2)\n"
        "start, stop, ck = 0, int(sys.argv[1]), sys.argv[2]\n"
        "if ck != 'none' and os.path.exists(ck):\n"
        "    state = torch.load(ck)\n"
        "    m.load_state_dict(state['m']); opt.load_state_dict(state['opt']); start = state['step']\n"
        "for s in range(start, stop):\n"
        "    g = torch.Generator().manual_seed(s)\n"
        "    x = torch.randn(16, 4, generator=g)\n"
        f"    if s == {nan_at}:\n"
        "        x[0, 0] = float('nan')\n"
        "    m(x).sub(x.sum(1, keepdim=True)).pow(2).mean().backward(); opt.step(); opt.zero_grad()\n"
        "    if ck != 'none' and s + 1 == 20:\n"
        "        torch.save({'m': m.state_dict(), 'opt': opt.state_dict(), 'step': 20}, ck)\n")
    out = tmp_path / "runs"
    cli = ["run", "--no-report", "--every", "5", "--out", str(out), str(script)]
    assert main([*cli, "23", str(ckpt)]) == 0  # "preempted" at 23, its checkpoint at 20
    ended = 23 if nan_at > 23 else 22  # the skipped step is no step of AdamW's
    with pytest.warns(RuntimeWarning, match=rf"optimizer 0's own step count is 20, {ended - 20} "
                      rf"behind the {ended} the earlier session ended with.*numbered from 20"):
        assert main(["run", "--resume", *cli[1:], "40", str(ckpt)]) == 0
    latest = (out / "latest").resolve()
    data = load_run(latest)
    assert data.step.tolist() == list(range(40))
    assert {e["step"] for e in data.events if e["kind"] == "nonfinite_grad"} == {nan_at}
    assert data.skipped.tolist() == [s == nan_at for s in range(40)]
    capsys.readouterr()
    with pytest.warns(RuntimeWarning, match=r"optimizer 0 has taken no step yet over weights "
                      r"other than.*starts from scratch.*starts afresh at step 0"):
        assert main(["run", "--resume", *cli[1:], "30", "none"]) == 0
    data = load_run(latest)
    assert data.step.tolist() == list(range(30))  # the run of its own, alone


@pytest.mark.parametrize("resume", ["optimizer", "weights only", "bfloat16 weights only"])
def test_resume_of_a_script_at_its_last_checkpoint_keeps_every_step(tmp_path, resume):
    """Found by a regression hunt: a run with a NaN batch (a skipped step does not count in
    Adam's own step) resumed from its checkpoint of its last step was numbered back by
    one, its last record "replaced" and a false "went back" warning; a script that reloads
    its weights and builds a new optimizer was called "from scratch" and its first
    session hidden; so was one whose weights were saved in bfloat16 (norms moved by the
    rounding, 1e-3, where 1e-5 was asked)."""
    script = tmp_path / "train.py"
    ckpt = tmp_path / "ck.pt"
    script.write_text(
        "import os, sys, torch\n"
        "torch.manual_seed(0)\n"
        "m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))\n"
        "opt = torch.optim.Adam(m.parameters(), lr=1e-2)\n"
        "start, ck = 0, sys.argv[1]\n"
        "if os.path.exists(ck):\n"
        "    state = torch.load(ck)\n"
        "    m.load_state_dict(state['m']); start = state['step']\n"
        f"    if {resume == 'optimizer'}:\n"
        "        opt.load_state_dict(state['opt'])\n"
        "for s in range(start, start + 12):\n"
        "    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(s))\n"
        "    if s == 5:\n"
        "        x[0, 0] = float('nan')\n"
        "    m(x).sub(x.sum(1, keepdim=True)).pow(2).mean().backward(); opt.step(); opt.zero_grad()\n"
        f"sd = {{k: v.bfloat16() for k, v in m.state_dict().items()}} if {'bfloat16' in resume} "
        "else m.state_dict()\n"
        "torch.save({'m': sd, 'opt': opt.state_dict(), 'step': start + 12}, ck)\n")
    out = tmp_path / "runs"
    cli = ["run", "--no-report", "--every", "5", "--out", str(out), str(script), str(ckpt)]
    assert main(cli) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "went back", no "from scratch"
        assert main(["run", "--resume", *cli[1:]]) == 0
    data = load_run((out / "latest").resolve())
    assert data.step.tolist() == list(range(24))
    assert [e["step"] for e in data.events if e["kind"] == "nonfinite_grad"] == [5]


def test_resume_of_a_gentle_fine_tune_from_bfloat16_weights_rerun_is_a_run_of_its_own(tmp_path):
    """Found by a regression hunt: a fine-tune that starts again from the same pretrained
    weights, saved in bfloat16 and loaded into a float32 model (AdamW at 1e-5: its norms
    move under the roundoff of bfloat16, 0.4%), was taken for the run going on by the first
    form of the half-precision rule, and judged against its first session. The weights a
    session ended with are compared rounded as a checkpoint in bfloat16 would hold them."""
    script = tmp_path / "train.py"
    script.write_text(
        "import torch\n"
        "torch.manual_seed(0)\n"
        "m = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))\n"
        "m.load_state_dict({k: v.bfloat16() for k, v in m.state_dict().items()})  # 'pretrained'\n"
        "opt = torch.optim.AdamW(m.parameters(), lr=1e-5)\n"
        "for s in range(30):\n"
        "    x = torch.randn(16, 16, generator=torch.Generator().manual_seed(s))\n"
        "    m(x).sub(x[:, :1]).pow(2).mean().backward(); opt.step(); opt.zero_grad()\n")
    _rerun_is_a_run_of_its_own(tmp_path, script)


def _rerun_is_a_run_of_its_own(tmp_path, script):
    """Run ``script`` (30 steps), then ``--resume`` it: it starts from scratch, and its
    guard is a run of its own in that directory; the run's records."""
    out = tmp_path / "runs"
    cli = ["run", "--no-report", "--every", "5", "--out", str(out), str(script)]
    assert main(cli) == 0
    with pytest.warns(RuntimeWarning, match=r"optimizer 0 has taken no step yet over weights "
                      r"other than.*starts afresh at step 0"):
        assert main(["run", "--resume", *cli[1:]]) == 0
    data = load_run((out / "latest").resolve())
    assert data.step.tolist() == list(range(30))
    return data


def test_resume_of_a_from_scratch_rmsprop_script_is_a_run_of_its_own(tmp_path):
    """Found by a regression hunt: RMSprop keeps no ``betas`` nor momentum to say it keeps a
    step count, so a fresh one under ``--resume`` of a script that trains from scratch was
    taken for the run going on: the earlier run's loss level made its first loss "a loss
    spike", its LR was cut, and the healthy script was stopped by TrainingDiverged."""
    script = tmp_path / "train.py"
    script.write_text(
        "import torch\n"
        "torch.manual_seed(0)\n"
        "m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))\n"
        "opt = torch.optim.RMSprop(m.parameters(), lr=1e-3)\n"
        "for s in range(30):\n"
        "    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(s))\n"
        "    m(x).sub(x.sum(1, keepdim=True)).pow(2).mean().backward(); opt.step(); opt.zero_grad()\n")
    data = _rerun_is_a_run_of_its_own(tmp_path, script)
    assert not [e for e in data.events if e["severity"] != "info"], data.events


# ---- plain tensors ----------------------------------------------------------------------
def test_plain_tensor_script_value_clip_and_nan_skip(tmp_path):
    ref = run_plain("plain_tensor.py", ["--steps", "12"], tmp_path)
    result, got, steps = run_guarded("plain_tensor.py", ["--steps", "12"], tmp_path)
    assert got["digest"] == ref["digest"]
    assert_true_norms(steps, ref)
    assert all(r["clip_coef"] < 1 for r in steps)  # clip_grad_value_(0.05) bites every step
    assert result.optimizers[0]["clip"] == "the script's clip_grad_value_(clip_value=0.05)"
    result, got, steps = run_guarded("plain_tensor.py", ["--steps", "12", "--nan-at", "4"], tmp_path)
    assert got["finite"] and [r["step"] for r in steps if r["skipped"]] == [4]


# ---- the trainers: the native callback, attached with no edit -------------------------
def check_trainer_script(script, args, tmp, *, max_norm, kind, model, nan_at, **options):
    """Guarded vs unguarded: same weights, true pre-clip norms, the trainer's clip recorded;
    then a NaN step is skipped. Returns the first run's result row."""
    ref = run_plain(script, args, tmp)
    result, got, steps = run_guarded(script, args, tmp, **options)
    assert got["digest"] == ref["digest"]
    assert_true_norms(steps, ref)  # measured before the trainer's own clip
    assert_clip_recorded(steps, ref, max_norm=max_norm)
    row = result.optimizers[0]
    assert (row["kind"], row["model"]) == (kind, model)
    _, got, steps = run_guarded(script, [*args, "--nan-at", str(nan_at)], tmp)
    assert got["finite"] and [r["step"] for r in steps if r["skipped"]] == [nan_at]
    return row


def test_lightning_script_gets_the_callback_and_its_clip_is_recorded(tmp_path, monkeypatch):
    pytest.importorskip("lightning")
    monkeypatch.chdir(tmp_path)
    row = check_trainer_script("lightning_script.py", ["--steps", "12"], tmp_path, max_norm=0.5,
                               kind="lightning", model="Regressor", nan_at=5)
    assert row["clip"] == "the script's Trainer(gradient_clip_val=0.5)"


def test_a_callback_added_by_hand_is_left_to_guard_alone(tmp_path, monkeypatch, recwarn):
    pytest.importorskip("lightning")
    monkeypatch.chdir(tmp_path)
    result = run_script(SCRIPTS / "lightning_script.py", ["--steps", "6", "--own-callback"],
                        out=tmp_path / "runs", quiet=True, report=False)
    [row] = result.optimizers
    assert row["external"] and row["run_dir"] == "lightning_logs/gradguard"
    steps = [r for r in read_jsonl(tmp_path / row["run_dir"] / "metrics.jsonl") if r["type"] == "step"]
    assert len(steps) == 6  # guarded once, by the script's own callback
    assert not (result.run_dir / "metrics.jsonl").exists()
    assert not [w for w in recwarn if "not guarded" in str(w.message)]
    assert "lightning trainer: guarded by the GradGuardCallback the script added itself" in \
        format_summary(result)


def test_hf_trainer_script_gets_the_callback_and_true_norms(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    # the Trainer clips (max_grad_norm=1.0) *before* gradguard's hook: still the true norms
    row = check_trainer_script("hf_script.py", ["--steps", "10"], tmp_path, max_norm=1.0,
                               kind="transformers", model="GPT2LMHeadModel", nan_at=4,
                               report=True)
    # said by the setting that makes it (it was "the script's clip_grad_norm_", which the
    # script never calls: found by a stranger)
    assert row["clip"] == "the script's TrainingArguments(max_grad_norm=1)"
    render_in_chromium(Path(row["report"]))


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def render_in_chromium(page: Path) -> None:
    """The report of a zero-code run renders in a real browser, summary and plots."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed")
    with tempfile.TemporaryDirectory() as profile:
        r = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
            capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert ">Summary</h2>" in r.stdout and r.stdout.count("<img") == 4
    assert "No gradient trouble in 10 steps" in r.stdout


def test_true_norm_helper_is_not_vacuous():
    """assert_true_norms fails on post-clip norms (what gradguard recorded before)."""
    ref = {"steps": [{"true_norm": 3.0}]}
    with pytest.raises(AssertionError):
        assert_true_norms([{"grad_norm": 1.0}], ref)
    assert math.isclose(min(1.0, 1.0 / (3.0 + 1e-6)), 1 / 3, rel_tol=1e-5)


# ---- torchrun ---------------------------------------------------------------------------
def test_torchrun_two_ranks_every_rank_skips_rank_0_writes(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed next to this python")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    r = torchrun_job(
        [str(torchrun), "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "gradguard",
         "run", "--no-report", "--every", "4", str(SCRIPTS / "ddp_plain.py"), "--nan-at", "3"],
        env=env, timeout=300, cwd=tmp_path, clean=("runs",))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("weights finite: True") == 2  # every rank skipped the NaN step
    runs = [d for d in (tmp_path / "runs" / "ddp_plain").iterdir() if d.name != "latest"]
    assert len(runs) == 1  # rank 1 writes nothing
    steps = [s for s in read_jsonl(runs[0] / "metrics.jsonl") if s["type"] == "step"]
    assert [s["step"] for s in steps if s["skipped"]] == [3] and len(steps) == 12
    events = read_jsonl(runs[0] / "events.jsonl")
    assert any(e["kind"] == "nonfinite_grad" and e.get("rank") == 1 for e in events)


def test_torchrun_an_fsdp2_script_with_its_own_clip_trains_as_without_gradguard(tmp_path):
    """Found by a stranger: under ``torchrun -m gradguard run`` every FSDP2 script that
    called ``clip_grad_norm_`` died at its first step ("got mixed torch.Tensor and
    DTensor": torch's norm is a DTensor there). It now trains to the same weights as the
    script run alone."""
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed next to this python")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(gg.__file__).resolve().parents[1])}
    digests = []
    for args in ([], ["-m", "gradguard", "run", "--no-report"]):
        r = torchrun_job([str(torchrun), "--nproc-per-node", "2", "--master-port", str(free_port()),
                          *args, str(SCRIPTS / "fsdp_plain.py")],
                         env=env, timeout=300, cwd=tmp_path, clean=("runs",))
        assert r.returncode == 0, r.stderr[-3000:]
        digests += [line for line in r.stdout.splitlines() if line.startswith("weights")]
    assert len(digests) == 2 and digests[0] == digests[1]


def test_torchrun_a_rank_that_raises_fails_the_job_rather_than_hanging_it(tmp_path):
    """Found as a stranger: under ``torchrun -m gradguard run`` a DDP rank that raised
    closed its guard with the last flush's collective while the other rank waited in
    DDP's backward: the job hung until killed. A script that raised closes its guards
    without a collective (docs/distributed.md, rule 2)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed next to this python")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(gg.__file__).resolve().parents[1])}
    import signal

    p = subprocess.Popen(
        [str(torchrun), "--nproc-per-node", "2", "--master-port", str(free_port()), "-m",
         "gradguard", "run", "--every", "4", str(SCRIPTS / "ddp_plain.py"),
         "--raise-at", "6"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env, cwd=tmp_path, start_new_session=True)
    try:
        out, err = p.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # the ranks too, not torchrun alone
        p.communicate()
        pytest.fail("the job hung")
    assert p.returncode != 0 and "rank 1 fails at step 6" in out + err
    # found by a stranger: torchrun's SIGTERM to rank 0, once rank 1 had failed, came while
    # rank 0 finished its run directory, and the failed run had no run.json and no report
    [run] = [d for d in (tmp_path / "runs" / "ddp_plain").iterdir() if d.name != "latest"]
    info = json.loads((run / "run.json").read_text())
    assert info["exit_code"] == 1 and info["error"]
    if importlib.util.find_spec("matplotlib") is not None:
        assert (run / "report.html").is_file()


def test_sigterm_finishes_the_run_dir_and_resume_goes_on_from_its_state(tmp_path):
    """Found as a stranger: ``gradguard run`` killed by SIGTERM (a scheduler's time limit)
    left only the JSONL files, no guard state, and ``--resume`` started the guard from step
    0 again, its steps recorded twice. Now SIGTERM finishes the run directory first (exit
    143, as a shell reports it), and a session killed outright (SIGKILL: nothing saved)
    is said so on ``--resume``, its steps numbered on."""
    import signal

    script = tmp_path / "slow.py"
    script.write_text(
        "import time, torch\n"
        "torch.manual_seed(0)\n"
        "m = torch.nn.Linear(4, 1); opt = torch.optim.SGD(m.parameters(), lr=0.01)\n"
        "for s in range(10000):\n"
        "    m(torch.randn(8, 4)).pow(2).mean().backward(); opt.step(); opt.zero_grad()\n"
        "    if s == 30: print('half', flush=True)\n"
        "    time.sleep(0.005)\n")
    src = str(Path(gg.__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": src}
    out = tmp_path / "runs"

    def start(*extra):
        return subprocess.Popen(
            [sys.executable, "-m", "gradguard", "run", "--no-report", "--out", str(out),
             *extra, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=env)

    def stop(p, sig):
        for line in p.stdout:
            if "half" in line:
                break
        p.send_signal(sig)
        _, err = p.communicate(timeout=120)
        return p.returncode, err

    rc, err = stop(start(), signal.SIGTERM)
    run = (out / "latest").resolve()
    assert rc == 143, err
    assert (run / "guard_state.pt").is_file() and (run / "run.json").is_file()
    info = json.loads((run / "run.json").read_text())
    assert info["exit_code"] == 143 and "SIGTERM" in json.dumps(info)
    first = [r["step"] for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "step"]
    rc, err = stop(start("--resume"), signal.SIGKILL)
    steps = [r["step"] for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "step"]
    assert steps[:len(first)] == first and steps == sorted(set(steps))  # went on from its state
    (run / "guard_state.pt").unlink()  # as a session killed before it could save it
    rc, err = stop(start("--resume"), signal.SIGTERM)
    assert "holds no saved guard state" in err, err
    again = [r["step"] for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "step"]
    assert again == sorted(set(again))  # numbered on, none recorded twice


def test_what_the_last_flush_decides_after_the_script_ended_is_said_not_applied(tmp_path):
    """Found by a stranger: ``gradguard run`` closes its guards after the script has ended,
    so trouble in the last window (an LR raised 30x by the script 50 steps before its end)
    was rolled back in memory after the script had saved and evaluated its weights; the
    report said "rolled back 1 time; training recovered" with the loss 16x its level, and
    --fail-on-divergence exited 0. Now the decision is recorded as not applied (the
    weights stay the script's, as an atexit handler saves them), and the run is judged on
    its loss: not recovered."""
    import torch

    out = tmp_path / "w"
    args = ["run", "--fail-on-divergence", "--no-report", "--out", str(tmp_path / "runs"),
            str(SCRIPTS / "late_trouble.py"), "--out", str(out)]
    # a process of its own: its atexit handler runs after gradguard run closed the guards
    done = subprocess.run([sys.executable, "-m", "gradguard", *args], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 1, done.stderr
    err = done.stderr
    assert "NOT RECOVERED: At step 299, the loss rose to" in err
    assert "what it decided at step 299 (roll back) was not applied" in err
    events = list(read_jsonl(tmp_path / "runs" / "latest" / "events.jsonl"))
    [late] = [e for e in events if e["kind"] == "rollback"]
    assert late["step"] == 299 and late["data"]["applied"] is False
    assert "not applied; the weights the script saved are from before it" in late["message"]
    final, at_exit = torch.load(out / "final.pt"), torch.load(out / "atexit.pt")
    assert all(torch.equal(final[k], at_exit[k]) for k in final)  # nothing restored after it


def test_a_script_that_stops_itself_on_a_nan_loss_is_reported_stopped(tmp_path, capsys):
    """Found by a stranger: a script that backpropagated a NaN loss, saw it and exited 3
    before ``optimizer.step()`` was "HEALTHY: No gradient trouble", ``"ok": true``: the
    guard never saw that step. The backward no step took is now recorded as a stop."""
    args = ["run", "--no-report", "--every", "5", "--out", str(tmp_path / "runs"),
            str(SCRIPTS / "stop_on_nan.py")]
    assert main(args) == 3  # the script's own exit code
    err = capsys.readouterr().err
    assert "STOPPED: The script stopped after a backward whose loss was NaN, before any " \
           "optimizer step took it. Training was stopped at step 6." in err
    info = json.loads((tmp_path / "runs" / "latest" / "run.json").read_text())
    outcome = info["optimizers"][0]["outcome"]
    assert (outcome["status"], outcome["ok"]) == ("stopped", False)
    assert main([*args, "--nan-at", "99"]) == 0  # no NaN: healthy, nothing recorded
    assert "HEALTHY" in capsys.readouterr().err


def test_a_step_the_lr_probe_voided_is_no_step_the_script_skipped(tmp_path):
    """Found by a stranger: a script clipping with ``clip_grad_norm_(1.0)`` on AdamW at 30x,
    under ``gradguard run``: the LR probe forked its trial after step 250's backward and
    voided that step; the script's clip request, carried out by no one, was read at the
    next ``zero_grad`` as "the script then zeroed the gradients without optimizer.step():
    it skipped the step itself". The voided step's request is its own."""
    script = tmp_path / "loop.py"
    script.write_text(
        "import torch\n"
        "from sklearn.datasets import load_digits\n"
        "D = load_digits(); X = torch.tensor(D.data / 16.0, dtype=torch.float32)\n"
        "Y = torch.tensor(D.target)\n"
        "tr = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))[:1400]\n"
        "torch.manual_seed(1)\n"
        "net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(),\n"
        "                          torch.nn.Linear(128, 128), torch.nn.GELU(), torch.nn.Linear(128, 10))\n"
        "opt = torch.optim.AdamW(net.parameters(), lr=0.03)\n"
        "sch = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.09, total_steps=400)\n"
        "g = torch.Generator().manual_seed(1)\n"
        "for s in range(400):\n"
        "    idx = tr[torch.randint(0, len(tr), (32,), generator=g)]\n"
        "    loss = torch.nn.functional.cross_entropy(net(X[idx]), Y[idx])\n"
        "    opt.zero_grad(); loss.backward()\n"
        "    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)\n"
        "    opt.step(); sch.step()\n")
    result = run_script(script, out=tmp_path / "out", report=False, quiet=True,
                        config=gg.GuardConfig(recovery=gg.Recovery()))  # the CLI's default
    events = list(read_jsonl(result.run_dir / "events.jsonl"))
    voided = [e for e in events if (e.get("data") or {}).get("reason") == "rolled_back"]
    assert voided, [e["kind"] for e in events]  # the probe voided a step
    assert not [e for e in events if "skipped the step itself" in e["message"]], events
