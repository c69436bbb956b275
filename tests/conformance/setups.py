"""The axes of the conformance matrix: optimizers, schedulers, precisions, layouts.

Each factory builds what a user's training script builds; ``Cell`` is one combination.
The model is a tiny language model (embedding -> linear -> LayerNorm -> head) so that the
layouts people use (decay/no-decay groups, tied head, frozen layers, a group added later)
all apply to it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

VOCAB, DIM = 11, 8


class TinyLM(nn.Module):
    def __init__(self, tied: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.body = nn.Linear(DIM, DIM)
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(nn.functional.gelu(self.body(self.emb(tokens)))))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randint(0, VOCAB, (4, 6), generator=g)
    return x, torch.roll(x, -1, dims=1)


def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.float().reshape(-1, VOCAB), y.reshape(-1))


Groups = list[dict[str, Any]]
OPTIMIZERS: dict[str, Callable[[Groups], torch.optim.Optimizer]] = {
    "sgd": lambda g: torch.optim.SGD(g, lr=0.1),
    "sgd_momentum": lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9),
    "sgd_nesterov": lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9, nesterov=True),
    "sgd_fused": lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9, fused=True),
    "adam": lambda g: torch.optim.Adam(g, lr=1e-2, foreach=False),
    "adam_foreach": lambda g: torch.optim.Adam(g, lr=1e-2, foreach=True),
    "adam_fused": lambda g: torch.optim.Adam(g, lr=1e-2, fused=True),
    "adamw": lambda g: torch.optim.AdamW(g, lr=1e-2, foreach=False),
    "adamw_foreach": lambda g: torch.optim.AdamW(g, lr=1e-2, foreach=True),
    "adamw_fused": lambda g: torch.optim.AdamW(g, lr=1e-2, fused=True),
    "adagrad": lambda g: torch.optim.Adagrad(g, lr=0.1),
    "rmsprop": lambda g: torch.optim.RMSprop(g, lr=1e-2),
    "adafactor": lambda g: torch.optim.Adafactor(g, lr=1e-2),
    "lbfgs": lambda g: torch.optim.LBFGS(g, lr=0.5, max_iter=3),
}


def _hf_linear(opt: torch.optim.Optimizer) -> Any:
    from transformers import get_linear_schedule_with_warmup

    return get_linear_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=12)


#: name -> (factory, steps per epoch or None for a per-step schedule, needs a metric)
SCHEDULERS: dict[str, tuple[Callable[[torch.optim.Optimizer], Any] | None, int | None]] = {
    "none": (None, None),
    "step": (lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5), None),
    "lambda_per_step": (lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1 / (1 + s)), None),
    "lambda_per_epoch": (lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: 0.5**e), 4),
    "one_cycle": (lambda o: torch.optim.lr_scheduler.OneCycleLR(
        o, max_lr=[g["lr"] for g in o.param_groups], total_steps=40,
        cycle_momentum="momentum" in o.defaults or "betas" in o.defaults), None),
    "linear_warmup": (lambda o: torch.optim.lr_scheduler.LinearLR(
        o, start_factor=1e-3, total_iters=4), None),
    "cosine_restarts": (lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        o, T_0=4), None),
    "plateau": (lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=1), None),
    # torchvision's reference recipe: a linear warm-up handed over to a cosine decay
    "sequential_warmup_cosine": (lambda o: torch.optim.lr_scheduler.SequentialLR(
        o, [torch.optim.lr_scheduler.LinearLR(o, start_factor=0.01, total_iters=3),
            torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=9)], milestones=[3]), None),
    # the LR (and, where the optimizer has one, the momentum) cycled every step
    "cyclic": (lambda o: torch.optim.lr_scheduler.CyclicLR(
        o, base_lr=[g["lr"] / 10 for g in o.param_groups], max_lr=[g["lr"] for g in o.param_groups],
        step_size_up=3, cycle_momentum="momentum" in o.defaults or "betas" in o.defaults), None),
    "hf_linear_warmup": (_hf_linear, None),
}
PRECISIONS = ("fp32", "fp64", "bf16", "scaler")
LAYOUTS = ("one_group", "decay_groups", "added_later", "frozen", "tied")
#: combinations torch itself does not run (checked: the unguarded reference raises too)
NOT_IN_TORCH = {
    ("lbfgs", "decay_groups"), ("lbfgs", "added_later"), ("lbfgs", "scaler"),
    # torch 2.13's CPU fused SGD leaves parts of bf16 momentum buffers uninitialised: two
    # identical unguarded runs already disagree (seen here), so no reference exists
    ("sgd_fused", "bf16"),
}
#: torch's schedulers keep per-group lists from their construction: a param group added
#: later breaks every one of them (a strict zip, an index error), so that layout runs
#: without a scheduler
SCHEDULERS_AFTER_ADD = {"none"}


@dataclass(frozen=True)
class Cell:
    optimizer: str
    scheduler: str
    precision: str
    layout: str

    @property
    def id(self) -> str:
        return f"{self.optimizer}-{self.scheduler}-{self.precision}-{self.layout}"

    def applicable(self) -> bool:
        if self.layout == "added_later" and self.scheduler not in SCHEDULERS_AFTER_ADD:
            return False
        return not any((a, b) in NOT_IN_TORCH for a in (self.optimizer, self.scheduler)
                       for b in (self.precision, self.layout))


def sample() -> list[Cell]:
    """Every optimizer with every scheduler (the pairs that interact: the LR back-off and
    first-step skips), precision and layout cycling through them so each value of each
    axis meets many optimizers and schedulers."""
    cells = []
    prec, lay = itertools.cycle(PRECISIONS), itertools.cycle(LAYOUTS)
    for opt, sched in itertools.product(OPTIMIZERS, SCHEDULERS):
        for _ in range(len(PRECISIONS) * len(LAYOUTS)):  # the next pair that applies
            cell = Cell(opt, sched, next(prec), next(lay))
            if cell.applicable():
                break
        cells.append(cell)
    return cells


# ---- building one run -----------------------------------------------------------------
@dataclass
class Run:
    model: TinyLM
    optimizer: torch.optim.Optimizer
    scheduler: Any
    per_epoch: int | None
    scaler: torch.amp.GradScaler | None
    late: list[nn.Parameter]  # the head's params, added at step LATE_STEP ("added_later")


LATE_STEP = 2
DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16,
          "scaler": torch.float32}


def build(cell: Cell) -> Run:
    torch.manual_seed(0)
    model = TinyLM(tied=cell.layout == "tied").to(DTYPES[cell.precision])
    params = list(model.parameters())
    late: list[nn.Parameter] = []
    if cell.layout == "frozen":
        model.body.requires_grad_(False)  # frozen, but in the optimizer (grad is None)
    if cell.layout == "decay_groups":
        groups: Groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.01},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
    elif cell.layout == "added_later":
        late = list(model.head.parameters())
        groups = [{"params": [p for p in params if all(p is not q for q in late)]}]
    else:
        groups = [{"params": params}]
    opt = OPTIMIZERS[cell.optimizer](groups)
    factory, per_epoch = SCHEDULERS[cell.scheduler]
    sched = None if factory is None else factory(opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if cell.precision == "scaler" else None
    return Run(model, opt, sched, per_epoch, scaler, late)


def forward_loss(run: Run, step: int) -> torch.Tensor:
    x, y = batch(step)
    if run.scaler is not None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = run.model(x)
    else:
        logits = run.model(x)
    return loss_fn(logits, y)


def poison_grads(optimizer: torch.optim.Optimizer) -> None:
    """A NaN born in the head's backward: every gradient the optimizer steps goes NaN (the
    loss does not)."""
    for g in optimizer.param_groups:
        for p in g["params"]:
            if p.grad is not None:
                p.grad.view(-1)[0] = math.nan


def after_step(run: Run, step: int) -> None:
    """What the user's loop does after the optimizer step: the scheduler, a late group."""
    s = run.scheduler
    if s is not None:
        if isinstance(s, torch.optim.lr_scheduler.ReduceLROnPlateau):
            s.step(1.0)  # a metric that never improves: the LR drops on the plateau
        elif run.per_epoch is None or (step + 1) % run.per_epoch == 0:
            s.step()
    if run.late and step + 1 == LATE_STEP:
        run.optimizer.add_param_group({"params": run.late})
