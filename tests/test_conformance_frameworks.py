"""The conformance promises through the trainer integrations (issue 13): the Lightning and
Hugging Face callbacks, and ``gradguard run``. The plain loop's matrix is in
tests/test_conformance.py; here one cell per optimizer/scheduler/precision pairing each
driver meets in practice.

Each cell: a NaN step is skipped with parameters and optimizer state bit-identical across
it; after the back-off (``Recovery(skip_patience=1, undo_backoff=False)``: kept, though the
next step proves the weights sound) the LR the optimizer uses is <= the
schedule's x 0.1 at once and never above the schedule afterwards; no NaN reaches a weight.
"""

from __future__ import annotations

import math
import sys
import textwrap
from typing import Any

import pytest
import torch

import gradguard as gg
from helpers import assert_same_tree

BAD = 3
STEPS = 9


def spy_used_lr(opt: torch.optim.Optimizer, used: list[float]) -> None:
    """Registered after the guard's own step hooks: sees the LR the update really uses."""
    opt.register_step_pre_hook(lambda o, a, k: used.append(float(o.param_groups[0]["lr"])))


def check_lrs(schedule: list[float], used: list[float], bad: int, every: int) -> None:
    """Never above the schedule; backed off x0.1 at the next step (the skip flag was read on
    the host) or after the next flush (a fused optimizer: the flag stayed on the device)."""
    assert len(schedule) == len(used)
    for s, u in zip(schedule, used):
        assert u <= s * (1 + 1e-6), (s, u)  # never above the schedule
    after = [(s, u) for s, u in list(zip(schedule, used))[bad + 1:]]
    lowered = [i for i, (s, u) in enumerate(after) if u < s * (1 - 1e-6)]
    assert lowered and lowered[0] <= every, after
    s, u = after[lowered[0]]
    assert u <= s * 0.1 * (1 + 1e-6), after


def snapshot(model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[Any, Any]:
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            {i: {n: (v.clone() if torch.is_tensor(v) else v) for n, v in st.items()}
             for i, st in opt.state_dict()["state"].items()})


# ---- Lightning --------------------------------------------------------------------------------
pl = pytest.importorskip("lightning.pytorch")
from gradguard.integrations.lightning import GradGuardCallback as LightningCallback  # noqa: E402

LIGHTNING_CELLS = {
    "sgd_momentum-lambda_per_step-32": ("sgd", "lambda", "32-true"),
    "adamw_decay_groups-cosine_restarts-bf16_mixed": ("adamw", "cosine", "bf16-mixed"),
}


class LitNet(pl.LightningModule):
    def __init__(self, opt: str, sched: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(),
                                       torch.nn.LayerNorm(16), torch.nn.Linear(16, 1))
        self.opt_name, self.sched_name = opt, sched
        self.around: dict[str, Any] = {}

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x).float(), y)
        return loss * math.nan if self.global_step == BAD else loss

    def configure_optimizers(self):
        ps = list(self.parameters())
        if self.opt_name == "sgd":
            opt = torch.optim.SGD(ps, lr=0.05, momentum=0.9)
        else:
            opt = torch.optim.AdamW([{"params": [p for p in ps if p.dim() > 1]},
                                     {"params": [p for p in ps if p.dim() <= 1],
                                      "weight_decay": 0.0}], lr=1e-2)
        if self.sched_name == "lambda":
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.1 * s))
        else:
            sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=4)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class Spy(pl.Callback):
    def __init__(self) -> None:
        self.schedule: list[float] = []
        self.used: list[float] = []

    def on_train_start(self, trainer, pl_module):  # after the guard's: its hooks come first
        spy_used_lr(trainer.optimizers[0], self.used)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        # Lightning runs this inside optimizer.step(closure), after the step pre-hooks: the
        # group's LR is already multiplied here; the schedule's own is the scheduler's
        self.schedule.append(float(trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0]))
        if trainer.global_step == BAD:
            pl_module.around["before"] = snapshot(pl_module, optimizer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == BAD + 1 and "after" not in pl_module.around:
            pl_module.around["after"] = snapshot(pl_module, trainer.optimizers[0])
        for p in pl_module.parameters():
            assert torch.isfinite(p).all()


@pytest.mark.parametrize("cell", LIGHTNING_CELLS)
def test_lightning_cell(tmp_path, cell):
    opt, sched, precision = LIGHTNING_CELLS[cell]
    model, spy = LitNet(opt, sched), Spy()
    cb = LightningCallback(recovery=gg.Recovery(skip_patience=1, restore_steps=4, undo_backoff=False), every=3,
                           report=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8 * STEPS, 4, generator=g)
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)
    pl.Trainer(max_steps=STEPS, callbacks=[cb, spy], logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
               precision=precision, default_root_dir=tmp_path).fit(model, data)
    before, after = model.around["before"], model.around["after"]
    assert_same_tree(before[0], after[0], "params")
    assert_same_tree(before[1], after[1], "optimizer state")
    assert [e.kind for e in cb.recovery.decisions] == ["backoff"]
    # the schedule stepped on the skipped step too (as after a GradScaler skip)
    check_lrs(spy.schedule, spy.used, BAD, every=3)


# ---- Hugging Face Trainer ------------------------------------------------------------------------
transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from gradguard.integrations.hf import GradGuardCallback as HFCallback  # noqa: E402

HF_CELLS = {
    "adamw-linear_warmup_default-fp32": {"lr_scheduler_type": "linear", "warmup_steps": 3},
    "adamw-cosine-max_grad_norm_default": {"lr_scheduler_type": "cosine", "max_grad_norm": 1.0},
}


class Tokens(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 8 * STEPS

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, 64, (12,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


class InjectNaN(TrainerCallback):
    """Before the guard: a NaN born in the backward, and the state around that step."""

    def __init__(self) -> None:
        self.around: dict[str, Any] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kw):
        if state.global_step == BAD:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.view(-1)[0] = math.nan
            self.around["before"] = snapshot(model, optimizer.optimizer)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
        if state.global_step == BAD + 1:
            self.around["after"] = snapshot(model, optimizer.optimizer)
        for p in model.parameters():
            assert torch.isfinite(p).all()


class LrSpy(TrainerCallback):
    """After the guard (its step hooks exist by then): the schedule's LR before the step,
    and the LR the update uses."""

    def __init__(self) -> None:
        self.schedule: list[float] = []
        self.used: list[float] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kw):
        if not self.schedule:
            spy_used_lr(optimizer.optimizer, self.used)
        self.schedule.append(float(optimizer.optimizer.param_groups[0]["lr"]))


@pytest.mark.parametrize("cell", HF_CELLS)
def test_hf_cell(tmp_path, cell):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64,
                                       n_positions=16))
    inject, spy = InjectNaN(), LrSpy()
    cb = HFCallback(recovery=gg.Recovery(skip_patience=1, restore_steps=4, undo_backoff=False), every=3,
                    report=False)
    kw = {"max_grad_norm": 0.0, **HF_CELLS[cell]}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=STEPS,
                             per_device_train_batch_size=8, learning_rate=1e-3, report_to=[],
                             save_strategy="no", disable_tqdm=True, use_cpu=True, **kw)
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[inject, cb, spy])
    trainer.train()
    assert args.max_grad_norm == kw["max_grad_norm"]  # the user's arguments, as they were
    before, after = inject.around["before"], inject.around["after"]
    assert_same_tree(before[0], after[0], "params")
    assert_same_tree(before[1], after[1], "optimizer state")
    assert [e.kind for e in cb.recovery.decisions] == ["backoff"]
    check_lrs(spy.schedule, spy.used, BAD, every=3)


# ---- gradguard run ---------------------------------------------------------------------------
SCRIPT = textwrap.dedent(f"""
    import math, torch
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.05)  # plain SGD: update = lr * grad
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps={STEPS},
                                                cycle_momentum=False)  # keep update = lr * grad
    schedule, used, snaps = [], [], []
    g = torch.Generator().manual_seed(0)
    for step in range({STEPS}):
        x = torch.randn(8, 4, generator=g)
        loss = torch.nn.functional.mse_loss(net(x), x.sum(1, keepdim=True))
        if step == {BAD}:
            loss = loss * math.nan
        loss.backward()
        w = net[2].weight
        before, grad = w.detach().clone(), w.grad.detach().clone()
        schedule.append(opt.param_groups[0]["lr"])
        snaps.append([p.detach().clone() for p in net.parameters()])
        opt.step()
        # the LR the update really used (gradguard run guards this step from outside)
        used.append(float((before - w.detach()).norm() / grad.norm()) if step != {BAD} else 0.0)
        opt.zero_grad()
        sched.step()
        assert all(torch.isfinite(p).all() for p in net.parameters())
    snaps.append([p.detach().clone() for p in net.parameters()])
    torch.save({{"schedule": schedule, "used": used, "snaps": snaps}}, "{{out}}")
""")


def test_gradguard_run_cell(tmp_path, monkeypatch):
    from gradguard.integrations.run import run_script

    out = tmp_path / "record.pt"
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.replace("{out}", str(out)))
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    result = run_script(script, out=tmp_path / "runs", quiet=True, report=False,
                        recovery=gg.Recovery(skip_patience=1, restore_steps=4, undo_backoff=False), every=3)
    assert result.exit_code == 0
    rec = torch.load(out, weights_only=False)
    before, after = rec["snaps"][BAD], rec["snaps"][BAD + 1]
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # the NaN step changed nothing
    used = [u * (1 - 1e-5) for u in rec["used"]]  # measured from float32 weights
    used[BAD] = 0.0
    check_lrs(rec["schedule"], used, BAD, every=3)
