"""GradGuardCallback with a real transformers Trainer on a tiny GPT-2 built from a config."""

from __future__ import annotations

import math
import os

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

NAN_STEP = 2


class Tokens(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, 128, (16,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


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
    with pytest.warns(GradGuardWarning, match="max_grad_norm=0"):
        t.train()
    assert t.args.max_grad_norm == 0.0
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


def test_without_gradguard_clip_trainer_clipping_is_kept(tmp_path, recwarn):
    cb = GradGuardCallback(clip=None, run_dir=tmp_path / "rd", report=False)
    t = make_trainer(tmp_path, [cb], max_steps=2, max_grad_norm=0.5)
    t.train()
    assert t.args.max_grad_norm == 0.5
    assert not [w for w in recwarn if issubclass(w.category, GradGuardWarning)]
    steps = [r for r in read_jsonl(tmp_path / "rd" / "metrics.jsonl") if r["type"] == "step"]
    # the Trainer clipped before the hook: gradguard measures the clipped gradients
    assert len(steps) == 2 and all(r["grad_norm"] <= 0.5 + 1e-4 for r in steps)


def test_gradient_accumulation_one_guard_step_per_optimizer_step(tmp_path):
    cb = GradGuardCallback(clip=gg.NormClip(1.0), run_dir=tmp_path / "rd", report=False)
    make_trainer(tmp_path, [cb], max_steps=2, max_grad_norm=0.0, accum=3).train()
    assert cb.guard is not None and cb.guard.step_count == 2


def test_unsupported_version_message():
    with pytest.raises(ImportError, match=r"transformers >=4.40,<6; found 4.30.2.*gradguard\[hf\]"):
        check_version("transformers", "4.30.2", "4.40", "6")
    check_version("transformers", transformers.__version__, "4.40", "6")


def test_bad_arguments():
    with pytest.raises(ValueError, match="on_nonfinite='nope'"):
        GradGuardCallback(on_nonfinite="nope")
