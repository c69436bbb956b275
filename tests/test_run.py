"""Zero-code `gradguard run`: example scripts, exit codes, one guard step per optimizer step,
run directories, the script's own clipping, the GRADGUARD switch."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import gradguard
import gradguard as gg
from gradguard.cli import main
from gradguard.events import read_jsonl
from gradguard.integrations._hooked import LossTracker, hooked_guard, parse_clip
from gradguard.integrations.run import ZeroCodeSession, run_script
from helpers import ema_run, quadrant_loss, quadrant_net

ROOT = Path(__file__).resolve().parents[1]
EX = ROOT / "examples"


def steps_of(run_dir: Path) -> list[dict]:
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["type"] == "step"]


def latest(out: Path) -> Path:
    """The run directory ``out/latest`` points at."""
    return (out / "latest").resolve()


def check_report(run_dir: Path) -> None:
    if hasattr(gradguard, "report"):
        assert (run_dir / "report.html").stat().st_size > 0


def test_plain_loop_nan_is_skipped_and_run_dir_written(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["run", "--clip", "zclip", "--every", "16", "--out", str(out),
               str(EX / "plain_loop.py"), "--steps", "30", "--nan-at", "12"])
    assert rc == 0
    assert "parameters finite: True" in capsys.readouterr().out  # the script's own check
    out = latest(out)
    steps = steps_of(out)
    assert [r["step"] for r in steps] == list(range(30))
    assert [r["step"] for r in steps if r["skipped"]] == [12]
    assert steps[0]["loss"] is not None
    kinds = {(e["kind"], e["step"]) for e in read_jsonl(out / "events.jsonl")}
    assert ("skip", 12) in kinds
    info = json.loads((out / "run.json").read_text())
    assert info["exit_code"] == 0 and info["optimizers"][0]["model"] == "model"
    layers = next(r for r in read_jsonl(out / "metrics.jsonl") if r["type"] == "layers")
    assert layers["layers"] == ["0", "2", "4"]  # names from the script's `model`
    check_report(out)


def test_a_script_that_changes_directory_finds_its_files_and_the_run_dir_stays(
        tmp_path, monkeypatch, capsys):
    """Found as a stranger: a script that changes directory (to an output folder) and reads
    a file next to it through ``__file__``. Under ``python script.py`` its ``__file__`` is
    absolute (Python 3.9+); under ``gradguard run`` it was the relative path given, so the
    script failed with FileNotFoundError. And the run directory, relative too, landed
    under the new directory, the announced one left empty."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "cfg.txt").write_text("0.1")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "sub" / "train.py").write_text(
        "import os, pathlib, torch\n"
        "cfg = pathlib.Path(__file__).parent / 'cfg.txt'\n"
        f"os.chdir({str(tmp_path / 'elsewhere')!r})\n"
        "lr = float(cfg.read_text())\n"
        "torch.manual_seed(0)\n"
        "m = torch.nn.Linear(2, 1)\n"
        "o = torch.optim.SGD(m.parameters(), lr)\n"
        "for _ in range(5):\n"
        "    loss = m(torch.ones(4, 2)).square().mean()\n"
        "    o.zero_grad(); loss.backward(); o.step()\n"
        "print('lr', lr)\n")
    monkeypatch.chdir(tmp_path)
    rc = main(["run", "--out", "runs/x", "--no-report", "sub/train.py"])
    assert rc == 0 and "lr 0.1" in capsys.readouterr().out
    out = latest(tmp_path / "runs" / "x")
    assert [r["step"] for r in steps_of(out)] == list(range(5))
    assert (out / "run.json").is_file()
    assert not (tmp_path / "elsewhere" / "runs").exists()


def test_a_script_that_steps_only_with_a_closure_is_told_so_not_that_it_never_stepped(
        tmp_path, capsys):
    """``optimizer.step(closure)`` computes its gradients inside the step, after the hook:
    not guarded, and a warning says so. The run's last line said the script "never called
    optimizer.step()", which it had, a hundred times."""
    script = tmp_path / "closure.py"
    script.write_text(
        "import torch\n"
        "torch.manual_seed(0)\n"
        "m = torch.nn.Linear(4, 1)\n"
        "opt = torch.optim.Adam(m.parameters(), lr=1e-2)\n"
        "x = torch.randn(16, 4)\n"
        "def closure():\n"
        "    opt.zero_grad(); loss = m(x).square().mean(); loss.backward(); return loss\n"
        "for _ in range(10):\n"
        "    opt.step(closure)\n")
    with pytest.warns(RuntimeWarning, match="step\\(closure\\) computes its gradients"):
        rc = main(["run", "--out", str(tmp_path / "run"), "--no-report", str(script)])
    assert rc == 0
    err = capsys.readouterr().err
    assert "stepped its optimizers only in a form gradguard cannot guard (Adam: step(closure)" \
        in err and "never called" not in err
    info = json.loads((latest(tmp_path / "run") / "run.json").read_text())
    assert list(info["unguarded"]) == ["Adam"] and info["optimizers"] == []


def test_an_optimizer_step_with_no_gradient_at_all_is_no_guard_step(tmp_path):
    """``optimizer.step()`` when every gradient is None (before the first backward, or an
    extra call right after ``zero_grad()``) does nothing in torch. It was counted as a guard
    step, with a gradient norm of 0 and the loss of the step before it recorded again."""
    script = tmp_path / "noop.py"
    script.write_text(
        "import torch\n"
        "torch.manual_seed(0)\n"
        "m = torch.nn.Linear(4, 1)\n"
        "opt = torch.optim.AdamW(m.parameters(), lr=1e-2)\n"
        "opt.step()  # before any backward\n"
        "for step in range(20):\n"
        "    loss = m(torch.randn(16, 4)).square().mean()\n"
        "    loss.backward(); opt.step(); opt.zero_grad()\n"
        "    if step % 5 == 0:\n"
        "        opt.step()  # an extra one, every gradient None\n")
    assert main(["run", "--out", str(tmp_path / "run"), "--no-report", str(script)]) == 0
    steps = steps_of(latest(tmp_path / "run"))
    assert [r["step"] for r in steps] == list(range(20))
    assert min(r["grad_norm"] for r in steps) > 0
    losses = [r["loss"] for r in steps]
    assert len(set(losses)) == len(losses)  # none recorded twice


def test_a_lightning_clip_of_one_optimizer_is_reported_for_that_optimizer_only(tmp_path):
    """Lightning manual optimisation, two optimizers, the script clipping the first only
    (``self.clip_gradients(oe, 0.5)``): the second's row said it was clipped by the script's
    ``clip_grad_norm_(max_norm=0.5)`` on every step (the first guard's clip policy was
    reported for every optimizer); its clip coefficients were all 1. Each row names its
    optimizer: both were titled ``Trainer (lightning, model AE)``."""
    pytest.importorskip("lightning.pytorch")
    script = tmp_path / "ae.py"
    script.write_text(
        "import torch, torch.nn as nn\n"
        "import lightning.pytorch as pl\n"
        "class AE(pl.LightningModule):\n"
        "    def __init__(self):\n"
        "        super().__init__(); self.automatic_optimization = False\n"
        "        self.enc = nn.Linear(8, 4); self.dec = nn.Linear(4, 8)\n"
        "    def training_step(self, batch, i):\n"
        "        (x,) = batch; oe, od = self.optimizers()\n"
        "        loss = 100 * nn.functional.mse_loss(self.dec(self.enc(x)), x)\n"
        "        oe.zero_grad(); od.zero_grad(); self.manual_backward(loss)\n"
        "        self.clip_gradients(oe, gradient_clip_val=0.5, gradient_clip_algorithm='norm')\n"
        "        oe.step(); od.step()\n"
        "    def configure_optimizers(self):\n"
        "        return (torch.optim.Adam(self.enc.parameters(), 1e-3),\n"
        "                torch.optim.SGD(self.dec.parameters(), 1e-3))\n"
        "torch.manual_seed(0)\n"
        "data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, 8)), batch_size=16)\n"
        "pl.Trainer(max_epochs=2, accelerator='cpu', logger=False, enable_checkpointing=False,\n"
        "           enable_progress_bar=False, enable_model_summary=False,\n"
        f"           default_root_dir={str(tmp_path)!r}).fit(AE(), data)\n")
    assert main(["run", "--out", str(tmp_path / "run"), "--no-report", str(script)]) == 0
    out = latest(tmp_path / "run")
    info = json.loads((out / "run.json").read_text())
    assert [r["clip"] for r in info["optimizers"]] == [
        "the script's clip_grad_norm_(max_norm=0.5)", "none"]
    second = json.loads((out / "optimizer1" / "guard.json").read_text())
    assert second["script_clip_calls"] == {}
    assert [r["optimizer"] for r in info["optimizers"]] == ["optimizer 0: Adam",
                                                            "optimizer 1: SGD"]


def test_gradient_accumulation_guards_once_per_optimizer_step(tmp_path):
    out = tmp_path / "acc"
    rc = main(["run", "--clip", "autoclip", "--out", str(out), "--no-report",
               str(EX / "grad_accumulation.py"), "--steps", "5", "--accum", "4"])
    assert rc == 0
    steps = steps_of(latest(out))
    assert len(steps) == 5  # 20 backward passes, 5 optimizer steps
    assert not (latest(out) / "report.html").exists()


def test_two_optimizers_each_guarded_in_own_run_dir(tmp_path):
    out = tmp_path / "two"
    rc = main(["run", "--out", str(out), str(EX / "two_optimizers.py"),
               "--steps", "10", "--nan-at", "4"])
    assert rc == 0
    out = latest(out)
    body, head = steps_of(out), steps_of(out / "optimizer1")
    assert len(body) == len(head) == 10
    # the inf input poisons the body's first-layer gradient only: only the body skips
    assert [r["step"] for r in body if r["skipped"]] == [4]
    assert not any(r["skipped"] for r in head)
    # one backward shared by both steps: both record the same loss
    assert [r["loss"] for r in body] == [r["loss"] for r in head]
    info = json.loads((out / "run.json").read_text())
    assert [o["name"] for o in info["optimizers"]] == ["opt_body", "opt_head"]


def test_gan_alternating_optimizers(tmp_path):
    out = tmp_path / "gan"
    rc = main(["run", "--clip", "norm:1.0", "--out", str(out), "--no-report",
               str(EX / "gan.py"), "--steps", "8"])
    assert rc == 0
    out = latest(out)
    info = json.loads((out / "run.json").read_text())
    assert [(o["name"], o["model"], o["steps"]) for o in info["optimizers"]] == [
        ("opt_d", "disc", 8), ("opt_g", "gen", 8)]
    d, g = steps_of(out), steps_of(out / "optimizer1")
    assert len(d) == len(g) == 8
    assert d[0]["loss"] != g[0]["loss"]  # each step records its own backward's loss


def test_skip_leaves_params_and_adam_state_bit_identical():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    guard = hooked_guard(model, opt, gg.GuardConfig(every=5))
    model(torch.randn(4, 3)).sum().backward()
    guard.step()
    opt.step()
    opt.zero_grad()
    w, state = model.weight.detach().clone(), {k: v.clone() for k, v in opt.state[model.weight].items()}
    model(torch.randn(4, 3)).sum().backward()
    model.weight.grad[0, 0] = float("nan")
    guard.step()
    opt.step()
    assert torch.equal(model.weight, w)
    for k, v in opt.state[model.weight].items():
        assert torch.equal(v, state[k]), k
    assert model.weight.grad is not None and model.weight.grad.isnan().any()  # restored
    guard.close()
    assert guard.skipped_steps == 1


def test_fused_optimizer_skips_without_host_sync(sync_counter):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    guard = hooked_guard(model, opt, gg.GuardConfig(every=50))
    model(torch.randn(4, 3)).sum().backward()  # the first step creates the state: on the host
    guard.step()
    opt.step()
    opt.zero_grad()
    model(torch.randn(4, 3)).sum().backward()
    model.weight.grad[0, 0] = float("inf")
    w = model.weight.detach().clone()
    with sync_counter:
        guard.step()
        opt.step()
    assert sync_counter.calls == []
    assert torch.equal(model.weight, w)
    assert not hasattr(opt, "found_inf")  # handed over for one step only
    guard.close()
    assert guard.skipped_steps == 1


def test_session_names_from_optimizer_when_no_module_in_reach(tmp_path):
    params = [torch.nn.Parameter(torch.randn(3))]

    def train(ps):  # no nn.Module anywhere in the frames
        opt = torch.optim.SGD(ps, lr=0.1)
        for _ in range(2):
            (ps[0] ** 2).sum().backward()
            opt.step()
            opt.zero_grad()

    with ZeroCodeSession(tmp_path, report=False) as s:
        train(params)
    assert s.units[0].model_name is None
    assert s.units[0].guard.names == ["param_group0.p0"]
    assert s.units[0].guard.step_count == 2


def test_session_uninstalls_hooks(tmp_path):
    patched = [(torch.Tensor, "backward"), (torch.optim.Optimizer, "__init__"),
               (torch.amp.GradScaler, "step"), (torch.amp.GradScaler, "scale"),
               (torch.nn.utils, "clip_grad_norm_"), (torch.nn.utils, "clip_grad_value_"),
               (torch.nn.utils.clip_grad, "clip_grad_norm_")]
    orig = [getattr(o, n) for o, n in patched]
    with ZeroCodeSession(tmp_path, report=False):
        assert all(getattr(o, n) is not f for (o, n), f in zip(patched, orig))
    assert all(getattr(o, n) is f for (o, n), f in zip(patched, orig))
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.ones(1, 2)).sum().backward()
    opt.step()  # no guard is created any more
    assert not (tmp_path / "metrics.jsonl").exists() or steps_of(tmp_path) == []


def test_script_exception_is_reraised_after_writing_run_dir(tmp_path):
    script = tmp_path / "boom.py"
    script.write_text(
        "import torch\n"
        "m = torch.nn.Linear(2, 1)\n"
        "opt = torch.optim.SGD(m.parameters(), lr=0.1)\n"
        "for i in range(3):\n"
        "    m(torch.ones(4, 2)).sum().backward()\n"
        "    opt.step()\n"
        "raise KeyError('boom')\n"
    )
    out = tmp_path / "out"
    with pytest.raises(KeyError, match="boom"):
        run_script(script, out=out, report=False, quiet=True)
    out = latest(out)
    assert len(steps_of(out)) == 3
    info = json.loads((out / "run.json").read_text())
    assert info["exit_code"] == 1 and "KeyError" in info["error"]
    # the optimizer's run is told stopped (found by a stranger: "healthy / ok")
    [row] = info["optimizers"]
    assert row["outcome"]["status"] == "stopped" and "by KeyError" in row["summary"], row


def test_keyboard_interrupt_still_writes_run_dir(tmp_path):
    script = tmp_path / "ctrlc.py"
    script.write_text(
        "import torch\n"
        "m = torch.nn.Linear(2, 1)\n"
        "opt = torch.optim.SGD(m.parameters(), lr=0.1)\n"
        "m(torch.ones(4, 2)).sum().backward()\n"
        "opt.step()\n"
        "raise KeyboardInterrupt\n"
    )
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_script(script, out=out, report=False, quiet=True)
    assert len(steps_of(latest(out))) == 1
    assert json.loads((latest(out) / "run.json").read_text())["exit_code"] == 130


FREED_SCRIPT = (
    "import weakref, torch\n"
    "def main():\n"
    "    m = torch.nn.Linear(2, 1)\n"
    "    opt = torch.optim.SGD(m.parameters(), lr=0.1)\n"
    "    for i in range(3):\n"
    "        m(torch.ones(4, 2)).sum().backward()\n"
    "        opt.step()\n"
    "    weakref.finalize(m, print, 'model freed', flush=True).atexit = False\n"
    "    return weakref.ref(m)\n"
    "import builtins\n"
    "builtins._gg_model_ref = main()\n"
)


def test_the_scripts_model_is_freed_before_run_script_returns(tmp_path):
    """The guards' hooks tie the script's model into reference cycles; left to the cycle
    collector it lived on until interpreter shutdown, after the script had destroyed its
    process group (a DDP model torn down then aborted a gloo rank now and then). With the
    collector off, the model is gone when ``run_script`` returns, as it is after a plain
    ``main()`` returns."""
    import builtins
    import gc

    script = tmp_path / "freed.py"
    script.write_text(FREED_SCRIPT)
    enabled = gc.isenabled()
    gc.disable()
    try:
        run_script(script, out=tmp_path / "out", report=False, quiet=True)
        assert builtins._gg_model_ref() is None  # type: ignore[attr-defined]
    finally:
        del builtins._gg_model_ref  # type: ignore[attr-defined]
        if enabled:
            gc.enable()
    assert len(steps_of(latest(tmp_path / "out"))) == 3


def test_the_environment_switch_frees_the_scripts_model_before_interpreter_shutdown(tmp_path):
    """The same under ``GRADGUARD=...``: the exit hook that closes the guards lets go of
    them and collects, so the model is freed while the interpreter is alive (its
    finalizer, kept out of the exit-time run of finalizers, prints); before, it was never
    freed at all and the finalizer never ran."""
    from gradguard.integrations.auto import SITE_DIR

    script = tmp_path / "freed.py"
    script.write_text("import atexit, gc\n"
                      "gc.disable()\n"
                      "atexit.register(print, 'last exit hook', flush=True)\n" + FREED_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADGUARD": "--no-report",
           "PYTHONPATH": os.pathsep.join([str(SITE_DIR), str(ROOT / "src")])}
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       env=env, timeout=180, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    # atexit runs hooks last-registered first: gradguard's (registered before the
    # script ran) comes after the script's, and the model is freed inside it
    assert r.stdout.splitlines() == ["last exit hook", "model freed"], r.stdout


def test_sys_exit_code_and_argv_pass_through(tmp_path):
    script = tmp_path / "code.py"
    script.write_text("import sys\nsys.exit(int(sys.argv[1]))\n")
    assert main(["run", "--out", str(tmp_path / "o"), str(script), "7"]) == 7


def test_missing_script_is_usage_error(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.py")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("spec", ["bogus", "norm:-1", "norm:x", "value:"])
def test_bad_clip_spec_is_usage_error(tmp_path, spec, capsys):
    script = tmp_path / "s.py"
    script.write_text("pass\n")
    assert main(["run", "--clip", spec, str(script)]) == 2
    assert "--clip" in capsys.readouterr().err


@pytest.mark.parametrize(
    "spec, kind",
    [("zclip", "ZClip"), ("autoclip", "AutoClip"), ("norm:2.5", "NormClip"),
     ("value:0.5", "ValueClip"), ("agc", "AGC"), ("none", "NoneType")],
)
def test_parse_clip(spec, kind):
    assert type(parse_clip(spec)).__name__ == kind


def test_loss_tracker_mean_mode():
    t = LossTracker(mean=True)
    t.add(torch.tensor(1.0))
    t.add(torch.tensor(3.0))
    t.add(torch.ones(2))  # not a scalar loss: ignored
    assert t.take().item() == 2.0


def test_python_dash_m_gradguard_run_returns_script_exit_code(tmp_path):
    script = tmp_path / "s.py"
    script.write_text(
        "import sys, torch\n"
        "m = torch.nn.Linear(2, 1)\n"
        "opt = torch.optim.SGD(m.parameters(), lr=0.1)\n"
        "m(torch.ones(4, 2)).sum().backward()\n"
        "opt.step()\n"
        "sys.exit(3)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    r = subprocess.run(
        [sys.executable, "-m", "gradguard", "run", "--no-report", "--out", str(tmp_path / "o"), str(script)],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert r.returncode == 3, r.stderr
    assert "1 steps, 0 skipped" in r.stderr
    assert len(steps_of(latest(tmp_path / "o"))) == 1


# ---- the script's own clipping ----------------------------------------------------------
def _train(steps: int = 3, *, clip=None, accum: int = 1, manual: bool = False, seed: int = 0):
    """A tiny loop; ``clip(params)`` is called where a script clips. Returns the weights."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    params = list(model.parameters())
    opt = None if manual else torch.optim.SGD(params, lr=0.1, momentum=0.9)
    for _ in range(steps):
        for _ in range(accum):
            (model(torch.randn(16, 4)) * 10).pow(2).mean().backward()
            if clip is not None and accum > 1:
                clip(params)  # clipping each micro-batch, before the next backward
        if clip is not None and accum == 1:
            clip(params)
        if manual:  # a hand-written update: no torch.optim optimizer holds the parameters
            with torch.no_grad():
                for p in params:
                    p -= 0.1 * p.grad
                    p.grad = None
        else:
            opt.step()
            opt.zero_grad()
    return [p.detach().clone() for p in params]


def _guarded(tmp_path, **kw):
    with ZeroCodeSession(tmp_path, report=False, every=2) as session:
        weights = _train(**kw)
    return weights, session


def _norm(max_norm):
    return lambda ps: torch.nn.utils.clip_grad_norm_(ps, max_norm)


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("user, script_clip, effective", [
    ("norm:0.5", "compose", 0.5),   # smallest wins: the user's
    ("norm:5.0", "compose", 1.0),   # smallest wins: the script's
    ("norm:5.0", "replace", 5.0),   # the script's clip only measures
])
def test_user_clip_composes_with_or_replaces_the_scripts_clip(tmp_path, user, script_clip, effective):
    with ZeroCodeSession(tmp_path, report=False, every=2, clip=user, script_clip=script_clip) as s:
        got = _train(clip=_norm(1.0))
    ref = _train(clip=_norm(effective))  # unguarded, clipped once at the effective threshold
    assert all(torch.allclose(x, y, rtol=1e-6, atol=1e-7) for x, y in zip(got, ref))
    assert not _same(got, _train(clip=_norm(1.0 if effective != 1.0 else 0.5)))
    calls = s.units[0].guard.clip.counts
    assert calls == {f"clip_grad_norm_(max_norm=1) {'replaced' if script_clip == 'replace' else 'applied'}": 3}


def test_clip_without_a_torch_optimizer_is_applied_at_once(tmp_path):
    ref = _train(clip=_norm(0.5), manual=True)
    got, session = _guarded(tmp_path, clip=_norm(0.5), manual=True)
    assert _same(got, ref) and session.units == []
    assert session.interceptor.immediate == {"parameters no torch.optim optimizer holds": 3}


def test_clip_per_micro_batch_keeps_torch_order(tmp_path):
    ref = _train(clip=_norm(0.5), accum=2)
    got, session = _guarded(tmp_path, clip=_norm(0.5), accum=2)
    assert _same(got, ref)  # the first micro-batch's clip ran before the second backward
    assert session.interceptor.immediate == {"clipped before another backward": 3}


def test_intercepted_clip_returns_torchs_norm_and_errors(tmp_path):
    w = torch.nn.Parameter(torch.ones(3))
    with ZeroCodeSession(tmp_path, report=False):
        opt = torch.optim.SGD([w], lr=0.1)  # it holds w: the clip can wait for its step
        w.grad = torch.tensor([3.0, 4.0, 0.0])
        assert torch.nn.utils.clip_grad_norm_([w], 1.0).item() == 5.0
        assert torch.equal(w.grad, torch.tensor([3.0, 4.0, 0.0]))  # deferred to the step
        w.grad = torch.tensor([math.nan, 1.0, 1.0])
        with pytest.raises(RuntimeError, match="non-finite"):
            torch.nn.utils.clip_grad_norm_([w], 1.0, error_if_nonfinite=True)
        del opt


def test_plain_tensor_parameters_are_guarded_and_restored_by_name(tmp_path):
    w = torch.randn(4, 2, requires_grad=True)  # a plain tensor, not an nn.Parameter
    opt = torch.optim.SGD([w], lr=0.1)
    with ZeroCodeSession(tmp_path, report=False, every=2) as s:
        for i in range(3):
            (w.sum() * (math.nan if i == 1 else 1.0)).backward()
            opt.step()
            opt.zero_grad()
    g = s.units[0].guard
    assert g.names == ["param_group0.p0"] and g.telemetry.params[0] is w
    assert bool(torch.isfinite(w).all()) and g.skipped_steps == 1


# ---- the command line and the environment switch ---------------------------------------
def test_run_help_says_what_is_clipped_by_default(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "gradguard adds no clipping" in text and "--fail-on-divergence" in text
    assert "the script's own clip_grad_norm_/clip_grad_value_ calls" in text


def test_gradguard_environment_switch_guards_a_plain_python_launch(tmp_path):
    from gradguard.integrations.auto import SITE_DIR

    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADGUARD": "--every 4 --no-report",
           "PYTHONPATH": os.pathsep.join([str(SITE_DIR), str(ROOT / "src")])}
    r = subprocess.run([sys.executable, str(EX / "plain_loop.py"), "--steps", "6", "--nan-at", "2"],
                       capture_output=True, text=True, env=env, timeout=180, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    steps = steps_of(latest(tmp_path / "runs" / "plain_loop"))
    assert [s["step"] for s in steps if s["skipped"]] == [2] and len(steps) == 6
    assert "RECOVERED" in r.stderr
    r = subprocess.run([sys.executable, "-c", "print('x')"], capture_output=True, text=True,
                       env=env, timeout=180, cwd=tmp_path)  # not a script: left alone
    assert r.stdout == "x\n" and "gradguard" not in r.stderr


def test_scaler_fused_step_with_script_clip_costs_no_host_sync(tmp_path, sync_counter):
    """The zero-code path adds no sync: GradScaler + fused AdamW + the script's clip +
    recovery, after the first (state-creating) step."""
    model = torch.nn.Linear(3, 2)
    with ZeroCodeSession(tmp_path, report=False, every=50, recovery=gg.Recovery()) as s:
        opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
        scaler = torch.amp.GradScaler("cpu")

        def step(bad: bool) -> None:
            loss = model(torch.randn(4, 3)).pow(2).mean() * (math.inf if bad else 1.0)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()

        step(False)
        w = model.weight.detach().clone()
        with sync_counter:
            step(True)
            step(False)
        assert sync_counter.calls == []
        assert not torch.equal(model.weight, w)  # the second step ran, clipped
    g = s.units[0].guard
    assert g.skipped_steps == 1 and g.step_count == 3


DRIFTING = """
import torch
from torch import nn
torch.manual_seed(0)
model = nn.Linear(4, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.05)
g = torch.Generator().manual_seed(0)
for step in range(400):
    x = torch.randn(16, 4, generator=g)
    # from step 40 a drift no weight can undo (a GAN's generator against a sharper critic)
    loss = nn.functional.mse_loss(model(x), x[:, :1]) + 0.02 * max(0, step - 40)
    loss.backward()
    opt.step()
    opt.zero_grad()
"""


def test_a_loss_that_does_not_answer_the_weights_under_gradguard_run(tmp_path, capsys):
    """The default recovery rolls back and finds the restored weights at the loss it rolled
    back from (`data_shift`); the drift goes on, the next rollback finds the same, and a
    change of the batches twice in a row says the loss moves by itself: it turns its loss
    tests off (`loss_level_off`; three rollbacks before the shift test), and the run is
    judged `unjudged`: no failure under --fail-on-divergence, and the remedy is the CLI's
    `--no-loss-rise`, which leaves such a loss alone. (No snapshot is taken on the drift,
    its last ten losses at twice the best: both rollbacks go to the weights before the
    first step. With a snapshot of the drift's first steps, the second rollback went there
    and the loss tests went off 40 steps later, when it did not come back.)"""
    script = tmp_path / "drift.py"
    script.write_text(DRIFTING)
    out = tmp_path / "runs"
    rc = main(["run", "--fail-on-divergence", "--no-report", "--out", str(out), str(script)])
    text = capsys.readouterr().err
    assert rc == 0 and "UNJUDGED" in text and "--no-loss-rise" in text
    kinds = [e["kind"] for e in read_jsonl(latest(out) / "events.jsonl")]
    assert kinds.count("rollback") == 2 and kinds.count("data_shift") == 2
    assert "loss_level_off" in kinds and "abort" not in kinds

    rc = main(["run", "--no-loss-rise", "--no-report", "--out", str(out), str(script)])
    assert rc == 0
    run = latest(out)
    assert not [e for e in read_jsonl(run / "events.jsonl")
                if e["kind"] in ("rollback", "lr_backoff", "loss_level_off")]
    assert json.loads((run / "guard.json").read_text())["loss_rise"] is False
    assert main(["run", "--no-loss-rise", "--no-recovery", str(script)]) == 2
    assert "--no-loss-rise: recovery is off" in capsys.readouterr().err


def _epochs(session_out: Path | None, *, skip: frozenset[int] = frozenset(),
            nan: frozenset[int] = frozenset(), make=None, gan: bool = False,
            reset: bool = False, growth: bool = True):
    """A digits-like MLP trained five epochs of 40 steps, with a new SGD optimizer built
    each epoch (its LR decayed by hand), as some scripts do; ``nan``: steps whose loss is
    NaN; ``skip``: steps the loop itself leaves out (the unguarded reference). ``gan``:
    a second model with its own optimizer, also built anew each epoch, stepped in turn."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    other = torch.nn.Linear(16, 4)
    gen = torch.Generator().manual_seed(1)
    step = 0
    session = (ZeroCodeSession(session_out, recovery=gg.Recovery(early_growth=growth), report=False)
               if session_out is not None else None)
    if session is not None:
        session.install()
    try:
        for epoch in range(5):
            if reset:  # k-fold style: the same model, its weights drawn anew
                for m in model.modules():
                    if isinstance(m, torch.nn.Linear):
                        m.reset_parameters()
            opt = (make or (lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9)))(
                model.parameters(), 0.1 * 0.7 ** epoch)
            opt_other = torch.optim.SGD(other.parameters(), lr=0.05) if gan else None
            for _ in range(40):
                x = torch.randn(32, 16, generator=gen)
                y = (x[:, :4] > 0).long().argmax(1)
                loss = torch.nn.functional.cross_entropy(model(x), y)
                if step in nan:
                    loss = loss * float("nan")
                opt.zero_grad()
                loss.backward()
                if step not in skip:
                    opt.step()
                if opt_other is not None:
                    opt_other.zero_grad()
                    torch.nn.functional.cross_entropy(other(x), y).backward()
                    opt_other.step()
                step += 1
    finally:
        if session is not None:
            session.close()
    return model, session


def test_a_new_optimizer_each_epoch_is_one_run_numbered_by_the_scripts_steps(tmp_path):
    """Found as a stranger: a script that builds a new optimizer over the same model each
    epoch got one guard per epoch under ``gradguard run``: five summaries, each counting
    from step 0 (a NaN at the script's step 150 was "step 30"), the later ones calling a
    converged model "not learning". A new optimizer over exactly the parameters of one that
    has not stepped since it was built takes over that one's run: its guard loads the old
    guard's state (the step count, clip statistics, the pending window, the ladder) and
    its snapshots, and writes the same run directory. The NaN steps are skipped as if the
    loop never took them (the weights equal an unguarded loop's that left them out)."""
    nan = frozenset({30, 150})
    model, session = _epochs(tmp_path / "run", nan=nan)
    reference, _ = _epochs(None, skip=nan)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    [row] = session.rows
    assert (row["steps"], row["skipped_steps"], row["replaced"]) == (200, 2, 4)
    steps = steps_of(tmp_path / "run")
    assert [r["step"] for r in steps] == list(range(200))
    assert [r["step"] for r in steps if r["skipped"]] == [30, 150]
    events = [(e["step"], e["kind"]) for e in read_jsonl(tmp_path / "run" / "events.jsonl")]
    assert events == [(30, "nonfinite_grad"), (30, "skip"), (150, "nonfinite_grad"), (150, "skip")]
    # the last optimizer's guard holds snapshots from before it was built (step 160)
    assert min(session.units[0].guard.recovery.store.steps()) < 160
    assert not (tmp_path / "run" / "optimizer1").exists()
    from gradguard.integrations._summary import RunResult, format_summary

    text = format_summary(RunResult(script="train.py", argv=[], run_dir=str(tmp_path / "run"),
                                    exit_code=0, optimizers=session.rows))
    assert "built anew 4 times" in text and "not learning" not in text


def test_optimizers_stepped_in_turn_and_built_anew_each_epoch_stay_two_runs(tmp_path):
    """Two models, each with its own optimizer built anew every epoch and stepped in turn:
    two runs, each taking over its own predecessor (never the other's, whose parameters
    differ); an optimizer of another kind over the same parameters (Adam after SGD) takes
    over the run too, with the weights at the handover standing in for the snapshots."""
    _, session = _epochs(tmp_path / "run", gan=True)
    assert [(r["steps"], r["replaced"]) for r in session.rows] == [(200, 4), (200, 4)]
    kinds = iter([torch.optim.SGD, torch.optim.Adam] * 3)

    def make(ps, lr):
        cls = next(kinds)
        return cls(ps, lr=lr if cls is torch.optim.SGD else lr / 100)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "checkpoint ... left behind": there is none
        _, session = _epochs(tmp_path / "switch", make=make)
    [row] = session.rows
    assert (row["steps"], row["replaced"], row["optimizer"]) == (200, 4, "SGD")


def test_a_model_whose_weights_are_drawn_anew_with_each_new_optimizer_is_a_new_run(tmp_path):
    """A k-fold loop that resets the same model's weights and builds a new optimizer for
    each fold trains five models, not one: each fold is its own run (its own directory and
    summary, counted from step 0), never the continuation of the last fold's."""
    _, session = _epochs(tmp_path / "run", reset=True)
    assert [(r["steps"], r["replaced"]) for r in session.rows] == [(40, 0)] * 5


def test_a_script_that_builds_its_own_guard_is_left_to_it(tmp_path):
    """Found as a stranger: a script that already uses ``gg.Guard`` (the README's loop) run
    under ``gradguard run`` was guarded twice: the session guarded the optimizer.step()
    that the script's guard makes, saw only the steps that guard took ("99 steps, 0 skipped:
    HEALTHY" for a run whose guard skipped a NaN batch), on gradients already clipped. An
    optimizer a ``gg.Guard`` is stepping is left to it, noted once, as a trainer's own
    gradguard callback is."""
    from gradguard.integrations._summary import RunResult, format_summary

    model = quadrant_net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with ZeroCodeSession(tmp_path / "run", recovery=gg.Recovery(), report=False) as session:
        guard = gg.Guard(model, opt, clip=gg.ZClip(), recovery=gg.Recovery())
        gen = torch.Generator().manual_seed(1)
        for step in range(40):
            loss = quadrant_loss(model, gen)
            if step == 30:
                loss = loss * float("nan")
            opt.zero_grad()
            loss.backward()
            guard.step(loss)
        guard.close()
    assert [(e.kind, e.step) for e in guard.events if e.severity != "info"] == [
        ("nonfinite_grad", 30), ("skip", 30)]
    [row] = session.rows
    assert row["external"] and row["name"] == "Adam"
    assert all(u.guard is None for u in session.units)
    text = format_summary(RunResult(script="train.py", argv=[], run_dir=str(tmp_path / "run"),
                                    exit_code=0, optimizers=session.rows))
    assert "Adam: guarded by the gg.Guard the script built itself" in text


def test_the_loss_of_a_backward_whose_gradients_were_zeroed_is_behind_no_step(tmp_path):
    """Found as a stranger: SAM (sharpness-aware minimisation, as people copy it) runs two
    backwards per step, the first only to perturb the weights, zeroing its gradients
    before the second; ``gradguard run`` recorded the sum of both losses, twice the loss
    (a run summary of "loss 0.1073 at the end" for a training loss of 0.05). A
    ``zero_grad()`` drops the losses before it: the step's loss is the second one, whose
    gradient it applies. Gradient accumulation (no zero_grad between micro-batches) still
    sums."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    second, summed = [], []
    with ZeroCodeSession(tmp_path / "run", report=False):
        for step in range(6):
            x = torch.randn(32, 16, generator=gen)
            y = (x[:, :4] > 0).long().argmax(1)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            old = [p.detach().clone() for p in model.parameters()]
            with torch.no_grad():  # SAM's first step: climb to the worst nearby weights
                for p in model.parameters():
                    p.add_(0.05 * p.grad)
            (model.zero_grad if step % 2 else opt.zero_grad)()
            loss2 = torch.nn.functional.cross_entropy(model(x), y)
            loss2.backward()
            with torch.no_grad():
                for p, o in zip(model.parameters(), old):
                    p.copy_(o)
            opt.step()
            opt.zero_grad()
            second.append(loss2.item())
        for _ in range(3):  # accumulation: two halves, no zero_grad between
            x = torch.randn(32, 16, generator=gen)
            y = (x[:, :4] > 0).long().argmax(1)
            halves = [torch.nn.functional.cross_entropy(model(x[i::2]), y[i::2]) / 2
                      for i in range(2)]
            for h in halves:
                h.backward()
            opt.step()
            opt.zero_grad()
            summed.append(sum(h.item() for h in halves))
    recorded = [r["loss"] for r in steps_of(tmp_path / "run")]
    assert recorded == pytest.approx(second + summed, rel=1e-6)


def test_the_lr_the_ladder_found_carries_over_to_the_next_epochs_optimizer(tmp_path):
    """The same loop with its LR 10x too high: the ladder rolls back in the second epoch
    and settles on x0.1, and the optimizers built for the later epochs train at x0.1 of
    their own LR, with no trouble of their own. With a guard per optimizer, each epoch
    started at x1 again (a digits MLP at SGD 3.0 x 0.7**epoch, 30x too high, under
    ``gradguard run``: five runs, each with its own rollback, a held-out loss of 0.445
    against 0.332 now; 0.320 at the right LR, 2.35 unguarded)."""
    model, session = _epochs(tmp_path / "run", make=lambda ps, lr: torch.optim.SGD(
        ps, lr=10 * lr, momentum=0.9), growth=False)  # the rollback of the 2nd epoch
    assert len(session.rows) == 1
    guard = session.units[0].guard
    acted = [(e.kind, e.step) for e in guard.events if e.kind in ("rollback", "lr_backoff")]
    assert acted and all(step < 80 for _, step in acted)  # nothing after the third epoch began
    assert guard.recovery.lr_factor == pytest.approx(0.1)
    assert any(e.kind == "lr_settled" for e in guard.events)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _staged(out: Path | None, *, nan: int | None = None, skip: int | None = None):
    """A head trained alone for 40 steps on a frozen trunk, then the whole model with a new
    optimizer at a lower LR for 60 more (a common fine-tune)."""
    torch.manual_seed(0)
    trunk = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU())
    head = torch.nn.Linear(64, 4)
    model = torch.nn.Sequential(trunk, head)
    trunk.requires_grad_(False)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    session = (ZeroCodeSession(out, recovery=gg.Recovery(), report=False)
               if out is not None else None)
    if session is not None:
        session.install()
    try:
        for step in range(100):
            if step == 40:
                trunk.requires_grad_(True)
                opt = torch.optim.Adam(model.parameters(), lr=1e-3)
            loss = quadrant_loss(model, gen)
            if step == nan:
                loss = loss * float("nan")
            opt.zero_grad()
            loss.backward()
            if step != skip:
                opt.step()
    finally:
        if session is not None:
            session.close()
    return model, session


def test_a_whole_model_trained_after_its_head_with_a_new_optimizer_is_one_run(tmp_path):
    """A head trained first, then the whole model with a new optimizer: one run numbered
    by the script's steps (the NaN at step 60 is step 60, not step 20 of `optimizer1`),
    named after the whole model; the head's window is flushed at the handover and the
    gradient norm learnt anew, as after ``add_param_group``. The NaN step is skipped as if
    the loop never took it."""
    model, session = _staged(tmp_path / "run", nan=60)
    reference, _ = _staged(None, skip=60)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    [row] = session.rows
    assert (row["steps"], row["skipped_steps"], row["replaced"], row["model"]) == (
        100, 1, 1, "model")
    steps = steps_of(tmp_path / "run")
    assert [r["step"] for r in steps] == list(range(100))
    assert [r["step"] for r in steps if r["skipped"]] == [60]
    events = [(e["step"], e["kind"]) for e in read_jsonl(tmp_path / "run" / "events.jsonl")
              if e["severity"] != "info"]
    assert events == [(60, "nonfinite_grad"), (60, "skip")]
    layers = [r["layers"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")
              if r["type"] == "layers"]
    assert layers[0] == ["(root)"] and layers[-1] == ["0.0", "1"]


def test_two_optimizers_built_before_the_session_and_stepped_in_turn_stay_two_runs(tmp_path):
    """Optimizers built before the session was installed (``ZeroCodeSession`` used in
    process) have no known birth: they count as built before every step, so two of them
    over the same parameters, stepped in turn, are two runs, not one handed back and forth
    at every step."""
    model = quadrant_net()
    first = torch.optim.SGD(model.parameters(), lr=0.01)
    second = torch.optim.Adam(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    with ZeroCodeSession(tmp_path / "run", report=False) as session:
        for step in range(20):
            opt = first if step % 2 else second
            loss = quadrant_loss(model, gen)
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert sorted((r["steps"], r["replaced"]) for r in session.rows) == [(10, 0), (10, 0)]



def test_an_average_of_the_weights_the_script_keeps_is_rolled_back_with_them():
    """An EMA built by the script (``AveragedModel``, before its optimizer) is handed to
    the ladder of the guard ``gradguard run`` builds over the same parameters, before that
    guard's first snapshot: the rollback restores it with the weights (under a hand-built
    guard it takes ``Recovery(also=ema)``, tests/test_real_loops.py). The snapshot is taken
    in the optimizer's pre-step hook, after the EMA took the previous step's weights."""
    rollback, weights, averages, held_out, guard = ema_run("run")
    snap, at = rollback.data["snapshot_step"], rollback.step
    assert 0 <= snap < 150 < at
    assert len(guard.recovery.also.objs) == 1
    torch.testing.assert_close(weights[at], weights[snap], rtol=0, atol=0)
    torch.testing.assert_close(averages[at], 0.99 * averages[snap] + 0.01 * weights[snap])
    assert (averages[at - 1] - averages[snap]).abs().max() > 0.01  # the damage it undid
    assert held_out < 0.2  # 0.156 without the LR fault


def test_fail_on_divergence_fails_a_script_that_guarded_nothing(tmp_path, capsys):
    """Found by a stranger: ``--fail-on-divergence`` exited 0 for a script that never
    stepped an optimizer ("nothing was guarded"): a CI gate passed a training loop that
    silently trained nothing."""
    script = tmp_path / "notrain.py"
    script.write_text("import torch\nm = torch.nn.Linear(2, 1)\nprint(m(torch.ones(1, 2)))\n")
    out = tmp_path / "runs"
    assert main(["run", "--no-report", "--out", str(out), str(script)]) == 0
    rc = main(["run", "--fail-on-divergence", "--no-report", "--out", str(out), str(script)])
    assert rc == 1 and "nothing was guarded" in capsys.readouterr().err


def test_a_zero_code_run_killed_mid_run_is_reported_as_unfinished(tmp_path):
    """Found by a stranger: a ``gradguard run`` killed with SIGKILL mid-run was reported
    "training recovered" with no word that it never finished. Its directory has no
    ``guard.json`` written at the end (``finished``): the report notes it; a finished
    run's has none."""
    from gradguard.report import load_run

    script = tmp_path / "s.py"
    script.write_text(
        "import os, signal, sys, torch\n"
        "m = torch.nn.Linear(2, 1)\n"
        "opt = torch.optim.SGD(m.parameters(), lr=0.1)\n"
        "for step in range(int(sys.argv[1])):\n"
        "    if step == 30 and sys.argv[2] == 'kill':\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    m(torch.ones(4, 2)).pow(2).sum().backward()\n"
        "    opt.step()\n"
        "    opt.zero_grad()\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    for how in ("kill", "end"):
        subprocess.run([sys.executable, "-m", "gradguard", "run", "--no-report", "--every", "5",
                        "--out", str(tmp_path / how), str(script), "40", how],
                       capture_output=True, text=True, env=env, timeout=120)
    [note] = [w for w in load_run(latest(tmp_path / "kill")).warnings if "did not finish" in w]
    assert "its records end at step 24" in note  # the flush of steps 20-24
    assert not [w for w in load_run(latest(tmp_path / "end")).warnings if "did not finish" in w]
