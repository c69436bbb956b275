"""GradGuardCallback with a real transformers Trainer on a tiny GPT-2 built from a config."""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch

import gradguard as gg
from gradguard.events import read_jsonl

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from gradguard.guard import GradGuardWarning  # noqa: E402
from gradguard.integrations._hooked import check_version  # noqa: E402
from gradguard.integrations.hf import GradGuardCallback  # noqa: E402
from helpers import Tokens  # noqa: E402

NAN_STEP = 2


class InjectNaN(TrainerCallback):
    """Puts a NaN into one gradient at NAN_STEP and records the weights around that step."""

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kw):
        if state.global_step == NAN_STEP:
            p = model.transformer.h[0].mlp.c_fc.weight
            p.grad[0, 0] = math.nan
            self.before = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self.adam = {k: v.clone() for k, v in optimizer.optimizer.state[p].items()}
            self.p = p

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kw):
        if state.global_step == NAN_STEP:
            self.after = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self.adam_after = {k: v.clone() for k, v in optimizer.optimizer.state[self.p].items()}


def make_trainer(tmp_path, callbacks, max_steps=5, max_grad_norm=1.0, accum=1):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=128, n_positions=32))
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=max_steps,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=accum,
        learning_rate=1e-3,
        max_grad_norm=max_grad_norm,
        report_to=[],
        logging_steps=100,
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
    )
    return Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=callbacks)


def test_nan_step_skipped_and_max_grad_norm_enforced(tmp_path):
    inject = InjectNaN()
    cb = GradGuardCallback(clip=gg.ZClip(), every=4)
    t = make_trainer(tmp_path, [inject, cb])
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradGuardWarning)  # nothing for the user to act on
        t.train()
    assert t.args.max_grad_norm == 1.0  # the user's arguments, as they were
    assert repr(cb.guard.clip).startswith("chain(ZClip(")  # with the Trainer's clip
    run_dir = tmp_path / "out" / "gradguard"
    steps = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["type"] == "step"]
    assert [r["step"] for r in steps] == list(range(5))
    assert [r["step"] for r in steps if r["skipped"]] == [NAN_STEP]
    assert all(3.0 < r["loss"] < 6.0 for r in steps)  # ln(128) ~ 4.85: the model's loss
    events = read_jsonl(run_dir / "events.jsonl")
    assert ("skip", NAN_STEP) in {(e["kind"], e["step"]) for e in events}
    for k, v in inject.before.items():
        assert torch.equal(v, inject.after[k]), k
    for k, v in inject.adam.items():
        assert torch.equal(v, inject.adam_after[k]), k
    assert all(torch.isfinite(p).all() for p in t.model.parameters())
    if hasattr(gg, "report"):
        assert cb.report_path == str(run_dir / "report.html")


def test_without_a_gradguard_clip_the_trainers_clip_is_taken_over(tmp_path):
    """max_grad_norm (1.0 by default) would clip before the hook and hide every spike:
    gradguard measures first, then applies the same clip; the weights are the same as a run
    without gradguard, and the recorded norms are the true, unclipped ones."""
    cb = GradGuardCallback(clip=None, run_dir=tmp_path / "rd", report=False)
    t = make_trainer(tmp_path, [cb], max_steps=3, max_grad_norm=0.5)
    t.train()
    assert t.args.max_grad_norm == 0.5 and repr(cb.guard.clip).startswith("NormClip(max_norm=0.5")
    ref = make_trainer(tmp_path / "ref", [], max_steps=3, max_grad_norm=0.5)
    ref.train()
    for (n, a), b in zip(t.model.named_parameters(), ref.model.parameters()):
        assert torch.equal(a, b), n
    steps = [r for r in read_jsonl(tmp_path / "rd" / "metrics.jsonl") if r["type"] == "step"]
    assert len(steps) == 3 and max(r["grad_norm"] for r in steps) > 0.5  # unclipped
    assert all(r["clip_coef"] < 1.0 for r in steps if r["grad_norm"] > 0.5)


def test_a_gradguard_clip_composes_with_the_trainers_clip(tmp_path):
    """Found as a stranger: GradGuardCallback(clip=gg.ZClip()) with the Trainer's default
    max_grad_norm=1.0 switched that clip off (with a warning), and a healthy GPT-2 ended
    3% worse than without gradguard (gradguard run --clip zclip composed the two, and was
    bit-identical). The two compose: the smallest coefficient wins, after measuring; a
    healthy run is the Trainer's, weight for weight."""
    cb = GradGuardCallback(clip=gg.ZClip(), run_dir=tmp_path / "rd", report=False)
    t = make_trainer(tmp_path, [cb], max_steps=4, max_grad_norm=0.5)
    t.train()
    assert t.args.max_grad_norm == 0.5
    ref = make_trainer(tmp_path / "ref", [], max_steps=4, max_grad_norm=0.5)
    ref.train()
    for (n, a), b in zip(t.model.named_parameters(), ref.model.parameters()):
        assert torch.equal(a, b), n
    steps = [r for r in read_jsonl(tmp_path / "rd" / "metrics.jsonl") if r["type"] == "step"]
    assert max(r["grad_norm"] for r in steps) > 0.5  # the true norms, clipped after


def test_the_recorded_loss_is_the_trainers_under_gradient_accumulation(tmp_path):
    cb = GradGuardCallback(clip=gg.NormClip(1.0), run_dir=tmp_path / "rd", report=False)
    t = make_trainer(tmp_path, [cb], max_steps=3, max_grad_norm=0.0, accum=4)
    t.args.logging_steps = 1
    t.train()
    logged = [h["loss"] for h in t.state.log_history if "loss" in h]
    steps = [r for r in read_jsonl(tmp_path / "rd" / "metrics.jsonl") if r["type"] == "step"]
    assert len(logged) == len(steps) == 3
    for mine, theirs in zip([r["loss"] for r in steps], logged):
        assert mine == pytest.approx(theirs, rel=1e-3)  # not a quarter of it


def test_gradient_accumulation_one_guard_step_per_optimizer_step(tmp_path):
    cb = GradGuardCallback(clip=gg.NormClip(1.0), run_dir=tmp_path / "rd", report=False)
    make_trainer(tmp_path, [cb], max_steps=2, max_grad_norm=0.0, accum=3).train()
    assert cb.guard is not None and cb.guard.step_count == 2


def test_unsupported_version_message():
    with pytest.raises(ImportError, match=r"transformers >=4.40,<6; found 4.30.2.*gradguard\[hf\]"):
        check_version("transformers", "4.30.2", "4.40", "6")
    check_version("transformers", transformers.__version__, "4.40", "6")


def test_the_callback_recovers_by_default():
    """As ``gradguard run`` does: a ``gg.Recovery()`` unless ``recovery=`` or a ``config``
    says otherwise, one per callback."""
    a, b = GradGuardCallback(), GradGuardCallback()
    assert isinstance(a.recovery, gg.Recovery) and a.recovery is not b.recovery
    assert GradGuardCallback(recovery=None).recovery is None
    assert GradGuardCallback(config=gg.GuardConfig(every=10)).recovery is None


def test_bad_arguments():
    with pytest.raises(ValueError, match="on_nonfinite='nope'"):
        GradGuardCallback(on_nonfinite="nope")


def assert_same(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape, path
        assert torch.allclose(a, b, rtol=0, atol=0, equal_nan=True), path  # bit-identical
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def checkpointing_trainer(out, callbacks, max_steps):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=128, n_positions=32,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))  # no RNG
    args = TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=8,
        learning_rate=1e-3, lr_scheduler_type="constant",  # the same LR whatever max_steps
        max_grad_norm=0.0, report_to=[], logging_steps=100,
        save_strategy="steps", save_steps=2, disable_tqdm=True, use_cpu=True, seed=0,
    )
    return Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=callbacks)


def test_resume_from_checkpoint_restores_the_guard_state(tmp_path):
    full = GradGuardCallback(clip=gg.ZClip(warmup_steps=1), every=3, report=False)
    full_t = checkpointing_trainer(tmp_path / "full", [full], max_steps=4)
    full_t.train()
    first = GradGuardCallback(clip=gg.ZClip(warmup_steps=1), every=3, report=False)
    checkpointing_trainer(tmp_path / "split", [first], max_steps=2).train()
    saved = torch.load(tmp_path / "split" / "checkpoint-2" / "gradguard_state.pt", weights_only=True)
    assert saved["step_count"] == 2
    assert_same(saved["clip"], first.guard.clip.state_dict(), "checkpointed clip")
    with pytest.raises(AssertionError):  # the statistics had moved: a lost state would show
        assert_same(saved["clip"], gg.ZClip(warmup_steps=1).state_dict())
    resumed = GradGuardCallback(clip=gg.ZClip(warmup_steps=1), every=3, report=False)
    resumed_t = checkpointing_trainer(tmp_path / "split", [resumed], max_steps=4)
    resumed_t.train(resume_from_checkpoint=str(tmp_path / "split" / "checkpoint-2"))
    assert resumed.guard.step_count == 4
    assert_same(resumed.guard.clip.state_dict(), full.guard.clip.state_dict(), "clip")
    assert_same(resumed.guard.state_dict(), full.guard.state_dict(), "guard")
    for (name, a), b in zip(full_t.model.state_dict().items(), resumed_t.model.state_dict().values()):
        assert torch.equal(a, b), name
    steps = [r["step"] for r in read_jsonl(tmp_path / "split" / "gradguard" / "metrics.jsonl")
             if r["type"] == "step"]
    assert steps == list(range(4))  # every step once, across both runs


class Interrupt(TrainerCallback):
    """Raises KeyboardInterrupt once, at the end of step ``at`` (a user's Ctrl-C)."""

    def __init__(self, at):
        self.at = at

    def on_step_end(self, args, state, control, **kw):
        if self.at is not None and state.global_step == self.at:
            self.at = None
            raise KeyboardInterrupt


def test_a_run_resumed_in_the_same_process_continues_from_the_checkpoints_guard_state(tmp_path):
    """``trainer.train(resume_from_checkpoint=True)`` on the same Trainer after an
    interruption (a notebook): the guard is built again from the checkpoint's state, as in
    a new process. It kept the interrupted run's guard: 3 steps counted past the Trainer's,
    the checkpoint's state ignored."""
    full = GradGuardCallback(clip=gg.ZClip(warmup_steps=1), every=3, report=False)
    full_t = checkpointing_trainer(tmp_path / "full", [full], max_steps=6)
    full_t.train()
    cb = GradGuardCallback(clip=gg.ZClip(warmup_steps=1), every=3, report=False)
    t = checkpointing_trainer(tmp_path / "split", [cb, Interrupt(at=5)], max_steps=6)
    with pytest.raises(KeyboardInterrupt):
        t.train()
    interrupted = cb.guard
    assert interrupted.step_count == 5
    t.train(resume_from_checkpoint=True)  # checkpoint-4
    assert cb.guard is not interrupted and cb.guard.step_count == 6
    assert_same(cb.guard.state_dict(), full.guard.state_dict(), "guard")
    for (name, a), b in zip(full_t.model.state_dict().items(), t.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_trainer_trained_twice_guards_the_second_run_too(tmp_path):
    """A second ``trainer.train()`` on the same Trainer (a cell run again, a second stage):
    a guard of its own, in ``gradguard/train1``. The closed guard of the first was
    stepped: ``RuntimeError: guard.step() called after guard.close()``."""
    class NaNOnSecond(TrainerCallback):
        calls = 0

        def on_train_begin(self, *a, **k):
            self.calls += 1

        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            if self.calls == 2 and state.global_step == NAN_STEP:
                model.transformer.h[0].mlp.c_fc.weight.grad[0, 0] = math.nan

    cb = GradGuardCallback(report=False)
    t = make_trainer(tmp_path, [NaNOnSecond(), cb], max_grad_norm=0.0)
    t.train()
    first = cb.guard
    t.train()
    assert cb.guard is not first and first.step_count == cb.guard.step_count == 5
    assert cb.guard.skipped_steps == 1 and first.skipped_steps == 0
    for p in t.model.parameters():
        assert torch.isfinite(p).all()
    base = tmp_path / "out" / "gradguard"
    second = [r for r in read_jsonl(base / "train1" / "events.jsonl") if r["kind"] == "skip"]
    assert [r["step"] for r in second] == [NAN_STEP]
    assert not [r for r in read_jsonl(base / "events.jsonl") if r["kind"] == "skip"]


def test_resume_without_saved_guard_state_warns(tmp_path):
    checkpointing_trainer(tmp_path / "out", [], max_steps=2).train()  # no gradguard file
    cb = GradGuardCallback(clip=gg.ZClip(warmup_steps=1), report=False)
    t = checkpointing_trainer(tmp_path / "out", [cb], max_steps=3)
    with pytest.warns(GradGuardWarning, match="starts afresh"):
        t.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert cb.guard is not None and cb.guard.step_count == 1


def test_adafactor_with_its_own_relative_step_is_backed_off_through_its_update():
    """Adafactor as its docs set it up for T5 (``lr=None, relative_step=True``) has no LR in
    its param groups: a back-off crashed the first step after it (``None * 0.1``). Now the
    step under a back-off moves each weight by the factor times what the same optimizer
    state and gradient move it unguarded, and the LR stays None."""
    from transformers.optimization import Adafactor

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    make = lambda m: Adafactor(m.parameters(), lr=None, relative_step=True,  # noqa: E731
                               scale_parameter=True, warmup_init=True)
    opt = make(model)
    rec = gg.Recovery(skip_patience=1, undo_backoff=False)  # the back-off stands
    guard = gg.Guard(model, opt, recovery=rec, every=5)

    def loss_of(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.mse_loss(m(x), x[:, :1].sin())

    g = torch.Generator().manual_seed(0)
    for step in range(4):
        x = torch.randn(16, 6, generator=g)
        if step == 3:
            x[0, 0] = float("nan")  # skipped, and backed off (skip_patience=1)
        loss_of(model, x).backward()
        guard.step(loss_of(model, x).detach())
        opt.zero_grad()
    assert [e.kind for e in guard.events if e.kind == "lr_backoff"] == ["lr_backoff"]
    twin = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    twin.load_state_dict(model.state_dict())
    twin_opt = make(twin)
    twin_opt.load_state_dict(opt.state_dict())
    x = torch.randn(16, 6, generator=g)
    before = [p.detach().clone() for p in model.parameters()]
    for m in (model, twin):
        loss_of(m, x).backward()
    guard.step(loss_of(model, x).detach())
    twin_opt.step()
    factor = rec.lr_factor
    assert 0.0 < factor < 1.0
    for p0, p, q in zip(before, model.parameters(), twin.parameters()):
        torch.testing.assert_close(p - p0, factor * (q - p0))
        assert torch.isfinite(p).all()
    assert opt.param_groups[0]["lr"] is None
    guard.close()


def _accelerated(accumulate: int = 1, scaler: object = None):
    """A model and optimizer prepared by accelerate (CPU), and an unprepared twin."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.state import AcceleratorState, GradientState

    # accelerate's state is process-wide: a Trainer of an earlier test leaves its
    # dataloader registered, and accumulate() then syncs every batch
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    acc = Accelerator(cpu=True, gradient_accumulation_steps=accumulate)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    twin = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    twin.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    if scaler is None:
        model, opt = acc.prepare(model, opt)
    else:
        opt = AcceleratedOptimizer(opt, scaler=scaler)
    return acc, model, opt, twin, torch.optim.AdamW(twin.parameters(), lr=1e-2)


def _batches(n: int, nan_at: int = -1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(16, 6, generator=g) for _ in range(n)]
    if nan_at >= 0:
        xs[nan_at][0, 0] = float("nan")
    return xs


def _loss(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(m(x), x[:, :1].sin())


def test_an_accelerate_prepared_optimizer_is_guarded_through_the_one_inside_it():
    """``Guard(model, accelerator.prepare(opt))`` failed at construction (the wrapper has no
    step hooks of its own). The guard now guards the optimizer inside: a NaN step is
    skipped, the back-off slows the steps after it, and the healthy steps before are the
    unguarded optimizer's, bit for bit."""
    acc, model, opt, twin, twin_opt = _accelerated()
    rec = gg.Recovery(skip_patience=1, undo_backoff=False)  # the back-off stands
    guard = gg.Guard(model, opt, clip=None, recovery=rec, every=4)
    assert guard.wrapper is opt and guard.optimizer is opt.optimizer
    xs = _batches(8, nan_at=5)
    for i, x in enumerate(xs):
        before = [p.detach().clone() for p in model.parameters()]
        acc.backward(_loss(model, x))
        guard.step(_loss(model, x).detach())
        opt.zero_grad()
        if i < 5:  # the twin, unguarded, on the same batches
            _loss(twin, x).backward()
            twin_opt.step()
            twin_opt.zero_grad()
            for p, q in zip(model.parameters(), twin.parameters()):
                torch.testing.assert_close(p, q, rtol=0, atol=0)
        elif i == 5:
            assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    guard.close()
    assert [e.kind for e in guard.events if e.severity != "info"].count("lr_backoff") == 1
    assert rec.lr_factor < 1.0 and all(torch.isfinite(p).all() for p in model.parameters())


def test_accelerates_gradient_accumulation_steps_once_per_synced_batch():
    """Under ``accelerator.accumulate`` the prepared optimizer's step does nothing on the
    micro-batches: the guard does nothing there either (a NaN norm returned, nothing
    measured), and steps once per four batches, as the unguarded loop does."""
    acc, model, opt, twin, twin_opt = _accelerated(accumulate=4)
    guard = gg.Guard(model, opt, clip=None, every=2)
    xs = _batches(12)
    norms = []
    for x in xs:
        with acc.accumulate(model):
            acc.backward(_loss(model, x))
            norms.append(guard.step(_loss(model, x).detach()))
            opt.zero_grad()
    for k in range(0, 12, 4):  # the twin: four micro-batches, each loss / 4, one step
        for x in xs[k:k + 4]:
            (_loss(twin, x) / 4).backward()
        twin_opt.step()
        twin_opt.zero_grad()
    guard.close()
    assert guard.step_count == 3
    assert [bool(torch.isnan(n)) for n in norms] == [True, True, True, False] * 3
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q)


def test_the_wrappers_grad_scaler_is_used_and_updated_as_the_wrapper_would():
    """A prepared optimizer with fp16 mixed precision steps through its ``GradScaler`` and
    updates it. ``guard.step(loss)`` with no ``scaler=`` does the same: the weights and the
    scale match the wrapper's own steps, including an overflow step (skipped, scale
    halved) and the growth after ``growth_interval`` clean steps."""
    scaler_kw = {"init_scale": 2.0**4, "growth_interval": 2}
    _acc, model, opt, twin, _ = _accelerated(scaler=torch.amp.GradScaler("cpu", **scaler_kw))
    from accelerate.optimizer import AcceleratedOptimizer

    twin_opt = AcceleratedOptimizer(torch.optim.AdamW(twin.parameters(), lr=1e-2),
                                    scaler=torch.amp.GradScaler("cpu", **scaler_kw))
    guard = gg.Guard(model, opt, clip=None, every=3)
    for i, x in enumerate(_batches(6)):
        big = 1e38 if i == 2 else 1.0  # an overflow in the scaled gradients at step 2
        for m, o in ((model, opt), (twin, twin_opt)):
            o.scaler.scale(_loss(m, x) * big).backward()
        guard.step((_loss(model, x) * big).detach())
        twin_opt.step()
        opt.zero_grad()
        twin_opt.zero_grad()
        assert opt.scaler.get_scale() == twin_opt.scaler.get_scale()
        assert opt.step_was_skipped == twin_opt.step_was_skipped == (i == 2)
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p, q)
    guard.close()
    assert opt.scaler.get_scale() != 2.0**4
    assert any(e.kind == "skip" for e in guard.events)


def test_a_train_that_raised_gives_the_next_one_its_max_grad_norm_back(tmp_path):
    """Found by a stranger: the callback takes the Trainer's clip over by setting
    ``max_grad_norm`` to 0 and puts it back in ``on_train_end``, which a ``train()`` that
    raises never reaches: the next ``train()`` ran unclipped, and every checkpoint's
    ``training_args.bin`` held 0."""
    cb = GradGuardCallback(report=False)
    t = make_trainer(tmp_path, [cb, Interrupt(at=2)], max_steps=4, max_grad_norm=0.25)
    with pytest.raises(KeyboardInterrupt):
        t.train()
    assert t.args.max_grad_norm == 0.0  # the takeover, left behind by the interruption
    t.train()
    assert t.args.max_grad_norm == 0.25
    assert "NormClip(max_norm=0.25" in repr(cb.guard.clip)  # clipped as the user asked
    cb = GradGuardCallback(report=False)
    t = checkpointing_trainer(tmp_path / "ck", [cb], max_steps=2)
    t.args.max_grad_norm = 0.5
    t.train()
    saved = torch.load(tmp_path / "ck" / "checkpoint-2" / "training_args.bin", weights_only=False)
    assert saved.max_grad_norm == 0.5 and t.args.max_grad_norm == 0.5


def test_fp16_gradients_already_unscaled_by_the_trainer_are_not_unscaled_again(tmp_path):
    """Found by a stranger: on a GPU the fp16 Trainer's accelerator holds a GradScaler, and
    transformers 5 unscales the gradients to log their norm even when it does not clip
    (``max_grad_norm`` 0, as the callback sets it): the callback's own ``unscale_`` then
    raised "unscale_() has already been called" at the first step. Simulated on the CPU
    with the scaler accelerate gives the Trainer on CUDA."""
    results = []
    for callbacks in ([], [GradGuardCallback(clip=None, report=False)]):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=128,
                                           n_positions=32))
        args = TrainingArguments(
            output_dir=str(tmp_path / str(len(callbacks))), max_steps=3,
            per_device_train_batch_size=8, learning_rate=1e-3, max_grad_norm=1.0, fp16=True,
            report_to=[], logging_steps=100, save_strategy="no", disable_tqdm=True,
            use_cpu=True)
        t = Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=callbacks)
        t.accelerator.native_amp = True
        t.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        t.train()
        results.append({k: v.detach().clone() for k, v in t.model.state_dict().items()})
    for name, a in results[0].items():
        assert torch.equal(results[1][name], a), name


def test_a_model_that_returns_no_loss_is_said_and_its_run_not_judged_on_a_loss(tmp_path):
    """Found by a stranger: with the Trainer's ``label_smoothing_factor`` the model returns
    no loss (the Trainer computes it), every step was recorded with none, the warning said
    to "pass guard.step(loss)" (a callback user never calls it), and a run whose LR jumped
    30x was "training recovered"."""
    cb = GradGuardCallback(report=False)
    t = make_trainer(tmp_path, [cb], max_steps=6)
    t.args.label_smoothing_factor = 0.1
    from transformers.trainer_pt_utils import LabelSmoother

    t.label_smoother = LabelSmoother(epsilon=0.1)
    with pytest.warns(GradGuardWarning, match="the model returned no loss .*label_smoothing_factor"):
        t.train()
    from gradguard.report._data import load_run
    from gradguard.report._outcome import judge

    data = load_run(cb.resolved_run_dir)
    data.events.append({"kind": "lr_too_high", "step": 3, "severity": "warning"})
    out = judge(data)
    assert out.status == "unjudged" and "no finite loss was recorded" in out.clause
    assert "label_smoothing_factor" in out.remedy


def test_a_fresh_run_into_an_output_dir_with_an_earlier_runs_records_writes_its_own(tmp_path):
    """Found by a stranger: a script run twice into the same ``output_dir``, first with a
    NaN batch, then healthy: the second run's verdict was the first's NaN, "recovered",
    its steps "recorded twice". A fresh ``train()`` (no checkpoint resumed) into a directory
    that holds records writes a directory of its own and says so."""
    first = GradGuardCallback(report=False)
    t = make_trainer(tmp_path, [first, InjectNaN()], max_steps=4)
    t.train()
    assert first.guard.skipped_steps == 1
    second = GradGuardCallback(report=False)
    t = make_trainer(tmp_path, [second], max_steps=4)
    with pytest.warns(GradGuardWarning, match="holds the records of an earlier run"):
        t.train()
    assert second.resolved_run_dir.parent == first.resolved_run_dir
    from gradguard.report._data import load_run
    from gradguard.report._outcome import judge

    assert judge(load_run(second.resolved_run_dir)).status == "healthy"
    steps = [r["step"] for r in read_jsonl(first.resolved_run_dir / "metrics.jsonl")
             if r["type"] == "step"]
    assert steps == list(range(4))  # the earlier run's records, left as they were


def test_a_train_that_raised_has_its_steps_and_report_written_when_the_process_ends(tmp_path):
    """Found by a stranger: a Trainer stopped by an exception at step 5 (the Trainer tells
    its callbacks nothing then) left no step record in ``metrics.jsonl`` and no report: the
    callback writes them at ``on_train_end`` and ``on_save`` only. The process's end now
    finishes the run directory."""
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "train.py"
    script.write_text(f"""
import os, sys, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
os.environ["HF_HUB_OFFLINE"] = "1"
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments
from gradguard.integrations.hf import GradGuardCallback
from helpers import Tokens

class Boom(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 3:
            raise RuntimeError("boom")

torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=128, n_positions=32))
args = TrainingArguments(output_dir={str(tmp_path / "out")!r}, max_steps=8,
                         per_device_train_batch_size=8, report_to=[], save_strategy="no",
                         disable_tqdm=True, use_cpu=True)
Trainer(model=model, args=args, train_dataset=Tokens(),
        callbacks=[GradGuardCallback(every=50), Boom()]).train()
""")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(gg.__file__).resolve().parents[1])}
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode != 0 and "boom" in r.stderr
    run_dir = tmp_path / "out" / "gradguard"
    steps = [s["step"] for s in read_jsonl(run_dir / "metrics.jsonl") if s["type"] == "step"]
    assert steps == [0, 1, 2]
    if importlib.util.find_spec("matplotlib") is not None:
        assert (run_dir / "report.html").is_file()
    # and it is told stopped, by what (found by a stranger: it was "No gradient trouble")
    from gradguard.report import load_run
    from gradguard.report._outcome import judge

    out = judge(load_run(run_dir))
    assert out.status == "stopped" and "stopped at step 2 by RuntimeError (boom)" in out.clause


def test_a_new_callback_on_the_arguments_an_interrupted_train_left_gives_back_max_grad_norm(
        tmp_path):
    """Found by a stranger: after a ``train()`` interrupted with the callback, a new Trainer
    and a new callback built on the same ``TrainingArguments`` (``max_grad_norm`` left at 0)
    trained unclipped."""
    first = make_trainer(tmp_path, [GradGuardCallback(report=False), Interrupt(at=2)],
                         max_steps=4, max_grad_norm=0.25)
    with pytest.raises(KeyboardInterrupt):
        first.train()
    cb = GradGuardCallback(report=False)
    second = Trainer(model=first.model, args=first.args, train_dataset=Tokens(), callbacks=[cb])
    second.train()
    assert "NormClip(max_norm=0.25" in repr(cb.guard.clip) and second.args.max_grad_norm == 0.25


def test_a_model_that_returns_a_tuple_has_its_loss_recorded(tmp_path):
    """Found by a stranger: a model returning ``(loss, logits)`` (``return_dict=False``), whose
    loss the Trainer reads as ``outputs[0]``, was told it returned no loss."""
    class AsTuple(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, labels=None):
            out = self.inner(input_ids=input_ids, labels=labels)
            return (out.loss, out.logits)

    cb = GradGuardCallback(report=False)
    t = make_trainer(tmp_path, [cb], max_steps=3)
    t = Trainer(model=AsTuple(t.model), args=t.args, train_dataset=Tokens(), callbacks=[cb])
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradGuardWarning)
        t.train()
    losses = [r["loss"] for r in read_jsonl(cb.resolved_run_dir / "metrics.jsonl")
              if r["type"] == "step"]
    assert len(losses) == 3 and all(isinstance(v, float) for v in losses)


def test_a_run_of_its_own_resumed_in_a_new_process_goes_on_in_its_own_directory(tmp_path):
    """Found by a stranger: a fresh run that found records and wrote ``gradguard/<time>``,
    resumed from its checkpoint in a new process, went back to ``gradguard/`` and into the
    records of the run before it. It goes on where ``gradguard/latest`` points."""
    checkpointing_trainer(tmp_path, [GradGuardCallback(report=False)], max_steps=4).train()
    cb = GradGuardCallback(report=False)
    t = checkpointing_trainer(tmp_path, [cb, Interrupt(at=3)], max_steps=6)
    with pytest.raises(KeyboardInterrupt), pytest.warns(GradGuardWarning, match="earlier run"):
        t.train()
    own = cb.resolved_run_dir
    assert own is not None and own.parent == tmp_path / "gradguard"
    resumed = GradGuardCallback(report=False)
    checkpointing_trainer(tmp_path, [resumed], max_steps=6).train(resume_from_checkpoint=True)
    assert resumed.resolved_run_dir.resolve() == own.resolve()
    base = [r["step"] for r in read_jsonl(tmp_path / "gradguard" / "metrics.jsonl")
            if r["type"] == "step"]
    assert base == list(range(4))  # the first run's records, untouched
