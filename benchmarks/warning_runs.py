"""The training runs of the early-warning evaluation (``benchmarks/warning.py``).

Small CPU models on data that ships with the environment (sklearn's ``load_digits``,
synthetic regression and sequence tasks, characters of Python's own ``argparse`` source).
Each :class:`Spec` builds a fresh :class:`Run` from a seed. Divergent runs blow up late and
gradually (slow LR ramps, tiny transformers without qk-norm, weight growth in float16,
recurrences that sharpen, SGD past the edge of stability); healthy runs use warm-ups,
cosine restarts, one-cycle schedules and several optimizers.

``split="tune"`` runs were used while choosing the detector's defaults; ``split="heldout"``
runs were written before the defaults were frozen and scored only afterwards. Their
schedules were adjusted only so that the diverging ones diverge within their step budget
(the label), never by what the detector said.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from benchmarks.warning_models import (
    Batch,
    Half,
    LinearRNN,
    SeqNet,
    TinyLM,
    Widen,
    ce,
    cnn,
    const,
    corpus,
    cosine_restarts,
    digits_batch,
    exp_ramp,
    linear_ramp,
    mlp,
    mse,
    one_cycle,
    sequence_batch,
    step_decay,
    teacher_batch,
    text_batch,
    warmup_cosine,
)


@dataclass
class Run:
    """One training run: the model, its optimizer, the LR of each step, the data."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    lr: Callable[[int], float]
    batch: Callable[[int], Batch]
    loss: Callable[[nn.Module, Batch], Tensor]


@dataclass(frozen=True)
class Spec:
    name: str
    expect: Literal["diverge", "healthy"]
    split: Literal["tune", "heldout"]
    steps: int
    make: Callable[[int], Run]
    note: str
    seed: int = 0


Optim = Callable[[Any], torch.optim.Optimizer]


def _run(model: nn.Module, opt: Optim, lr: Callable[[int], float], batch: Callable[[int], Batch],
         loss: Callable[[nn.Module, Batch], Tensor]) -> Run:
    return Run(model, opt(model.parameters()), lr, batch, loss)


def _adam(**kw: Any) -> Optim:
    return lambda p: torch.optim.Adam(p, **kw)


def _adamw(wd: float = 0.0, **kw: Any) -> Optim:
    return lambda p: torch.optim.AdamW(p, weight_decay=wd, **kw)


def _sgd(momentum: float = 0.0, **kw: Any) -> Optim:
    return lambda p: torch.optim.SGD(p, lr=0.01, momentum=momentum, **kw)


def _opt(cls: type[torch.optim.Optimizer], **kw: Any) -> Optim:
    return lambda p: cls(p, **kw)


def _lm(seed: int, opt: Optim, lr: Callable[[int], float], **kw: Any) -> Run:
    return _run(TinyLM(corpus()[1], **kw), opt, lr, text_batch(seed), ce)


def _specs() -> list[Spec]:
    out: list[Spec] = []

    def add(name: str, expect: Any, split: Any, steps: int, make: Callable[[int], Run],
            note: str, seed: int = 0) -> None:
        out.append(Spec(name, expect, split, steps, make, note, seed))

    # ---- diverging, used for tuning -------------------------------------------------
    add("reg_sgd_lr_ramp", "diverge", "tune", 2500, lambda s: _run(
        mlp(16, 64, 2, 1), _sgd(), exp_ramp(3e-3, 1 / 400), teacher_batch(s, size=128), mse),
        "SGD, LR ramped x e every 400 steps: crosses the edge of stability (Cohen 2021)")
    add("reg_adam_lr_ramp", "diverge", "tune", 3000, lambda s: _run(
        mlp(16, 64, 2, 1), _adam(), exp_ramp(1e-4, 1 / 300), teacher_batch(s), mse),
        "Adam, slow exponential LR ramp")
    add("reg_sgdm_tanh_lr_ramp", "diverge", "tune", 3000, lambda s: _run(
        mlp(16, 64, 3, 1, nn.Tanh), _sgd(0.9), exp_ramp(3e-4, 1 / 350), teacher_batch(s + 1),
        mse), "SGD momentum 0.9, tanh MLP, slow LR ramp")
    add("lm_noqk_fp16_attn", "diverge", "tune", 2000, lambda s: _lm(
        s, _adamw(), warmup_cosine(0.1, 100, 10**9), half=True),
        "tiny transformer, high LR, no qk-norm, float16 attention logits (Wortsman 2023)")
    add("linrnn_mean_lr_ramp", "diverge", "tune", 2500, lambda s: _run(
        LinearRNN(1, 32), _adam(), exp_ramp(1e-3, 1 / 800), sequence_batch(s, 30, task="mean"),
        mse), "linear RNN whose recurrence sharpens past spectral radius 1")
    add("reg_rmsprop_deep_lr_ramp", "diverge", "tune", 3000, lambda s: _run(
        mlp(16, 64, 4, 1, nn.Tanh), _opt(torch.optim.RMSprop), exp_ramp(1e-4, 1 / 300),
        teacher_batch(s + 7), mse), "5-layer tanh MLP, RMSprop, slow LR ramp")
    add("lstm_adding_sgd_lr_ramp", "diverge", "tune", 3000, lambda s: _run(
        SeqNet("lstm", 2, 32), _sgd(0.9), exp_ramp(1e-3, 1 / 400), sequence_batch(s), mse),
        "LSTM on the adding problem, SGD momentum, slow LR ramp")
    add("resmlp_adam_linear_ramp", "diverge", "tune", 3000, lambda s: _run(
        mlp(16, 64, 4, 1, residual=True), _adam(), linear_ramp(1e-4, 0.1, 3000),
        teacher_batch(s + 2), mse), "residual MLP without normalisation, linear LR ramp")
    add("reg_sgd_warmup_too_high", "diverge", "tune", 3000, lambda s: _run(
        mlp(16, 128, 2, 1), _sgd(), warmup_cosine(0.6, 2000, 10**9), teacher_batch(s + 3), mse),
        "SGD warm-up over 2000 steps to a peak LR past the edge of stability")
    add("mlp_fp16_hidden_lr_ramp", "diverge", "tune", 3000, lambda s: _run(
        nn.Sequential(nn.Linear(16, 64), nn.ReLU(), Half(nn.Linear(64, 64)), nn.ReLU(),
                      Widen(), nn.Linear(64, 1)), _adam(), exp_ramp(1e-4, 1 / 350),
        teacher_batch(s + 4), mse),
        "float16 hidden layer whose activations grow with the weights under an LR ramp")

    # ---- healthy, used for tuning ---------------------------------------------------
    add("reg_adam_warmup_cosine", "healthy", "tune", 2000, lambda s: _run(
        mlp(16, 64, 2, 1), _adam(), warmup_cosine(3e-3, 200, 2000), teacher_batch(s), mse),
        "Adam, linear warm-up then cosine decay")
    add("reg_sgdm_cosine_restarts", "healthy", "tune", 2000, lambda s: _run(
        mlp(16, 64, 2, 1), _sgd(0.9), cosine_restarts(0.03, 400), teacher_batch(s), mse),
        "SGD momentum, cosine with warm restarts every 400 steps (SGDR)")
    add("digits_cnn_adamw_warmup", "healthy", "tune", 1500, lambda s: _run(
        cnn(), _adamw(0.01), warmup_cosine(3e-3, 300, 1500), digits_batch(s, image=True), ce),
        "CNN, AdamW, warm-up then cosine")
    add("lm_qk_fp16_attn", "healthy", "tune", 1200, lambda s: _lm(
        s, _adamw(), warmup_cosine(0.1, 100, 10**9), half=True, qk_norm=True),
        "the diverging transformer's LR (0.1) and float16 logits, with qk-LayerNorm")
    add("lstm_adding_adam", "healthy", "tune", 2000, lambda s: _run(
        SeqNet("lstm", 2, 32), _adam(), const(3e-3), sequence_batch(s), mse),
        "LSTM on the adding problem, Adam, constant LR")
    add("digits_mlp_rmsprop", "healthy", "tune", 2000, lambda s: _run(
        mlp(64, 128, 2, 10), _opt(torch.optim.RMSprop, lr=1e-3), const(1e-3), digits_batch(s),
        ce), "MLP, RMSprop, constant LR")
    add("reg_sgd_step_decay", "healthy", "tune", 2000, lambda s: _run(
        mlp(16, 64, 3, 1), _sgd(), step_decay(0.05, 600), teacher_batch(s + 5), mse),
        "SGD, step decay")
    add("digits_mlp_adagrad", "healthy", "tune", 2000, lambda s: _run(
        mlp(64, 64, 2, 10), _opt(torch.optim.Adagrad, lr=0.03), const(0.03), digits_batch(s),
        ce), "MLP, Adagrad")
    add("reg_nadam_one_cycle", "healthy", "tune", 2000, lambda s: _run(
        mlp(16, 64, 2, 1), _opt(torch.optim.NAdam), one_cycle(5e-3, 2000), teacher_batch(s + 6),
        mse), "NAdam, one-cycle (the LR rises for 30 % of the run)")
    add("reg_sgd_edge_of_stability", "healthy", "tune", 2000, lambda s: _run(
        mlp(16, 128, 2, 1), _sgd(), const(0.25), teacher_batch(s + 3), mse),
        "SGD at a constant LR near the edge of stability (self-stabilising, Cohen 2021)")
    add("linrnn_mean_adam", "healthy", "tune", 1500, lambda s: _run(
        LinearRNN(1, 32), _adam(), const(1e-3), sequence_batch(s, 30, task="mean"), mse),
        "linear RNN, Adam, constant LR")

    # ---- held out: written before the defaults were chosen, run once they were frozen ----
    add("ho_reg_silu_adam_linear_ramp", "diverge", "heldout", 3000, lambda s: _run(
        mlp(16, 96, 3, 1, nn.SiLU), _adam(), linear_ramp(1e-4, 0.06, 3000),
        teacher_batch(s + 11), mse), "SiLU MLP, Adam, linear LR ramp", seed=1)
    add("ho_gru_adding_rmsprop_lr_ramp", "diverge", "heldout", 3000, lambda s: _run(
        SeqNet("gru", 2, 32), _opt(torch.optim.RMSprop), exp_ramp(3e-4, 1 / 400),
        sequence_batch(s), mse), "GRU on the adding problem, RMSprop, slow LR ramp", seed=1)
    add("ho_lm_noqk_fp16_attn_wide", "diverge", "heldout", 1500, lambda s: _lm(
        s, _adamw(), warmup_cosine(0.08, 150, 10**9), half=True, d=48, heads=4),
        "wider transformer, high LR, no qk-norm, float16 attention logits", seed=1)
    add("ho_resmlp_sgdm_lr_ramp", "diverge", "heldout", 3000, lambda s: _run(
        mlp(16, 64, 3, 1, residual=True), _sgd(0.9), exp_ramp(1e-3, 1 / 300),
        teacher_batch(s + 12), mse), "residual MLP, SGD momentum, slow LR ramp", seed=1)
    add("ho_linrnn_adding_sgdm_lr_ramp", "diverge", "heldout", 3000, lambda s: _run(
        LinearRNN(2, 32), _sgd(0.9), exp_ramp(3e-4, 1 / 300), sequence_batch(s, 30), mse),
        "linear RNN on the adding problem, SGD momentum, slow LR ramp", seed=1)
    add("ho_reg_adamw_warmup_too_high", "diverge", "heldout", 3000, lambda s: _run(
        mlp(16, 64, 2, 1), _adamw(0.01), warmup_cosine(0.3, 1500, 10**9), teacher_batch(s + 13),
        mse), "AdamW warm-up over 1500 steps to an LR that is too high", seed=1)
    add("ho_reg_nesterov_deep_lr_ramp", "diverge", "heldout", 3000, lambda s: _run(
        mlp(16, 64, 4, 1), _sgd(0.9, nesterov=True), exp_ramp(3e-4, 1 / 350),
        teacher_batch(s + 14), mse), "5-layer ReLU MLP, Nesterov SGD, slow LR ramp", seed=1)
    add("ho_reg_adagrad_lr_ramp", "diverge", "heldout", 3000, lambda s: _run(
        mlp(16, 64, 2, 1, nn.GELU), _opt(torch.optim.Adagrad), exp_ramp(1e-2, 1 / 300),
        teacher_batch(s + 15), mse), "GELU MLP, Adagrad, slow LR ramp", seed=1)
    add("ho_lm_qk_cosine_restarts", "healthy", "heldout", 1000, lambda s: _lm(
        s, _adamw(0.1), cosine_restarts(3e-3, 300), qk_norm=True),
        "transformer with qk-norm, AdamW, cosine restarts", seed=1)
    add("ho_gru_adding_adam_warmup", "healthy", "heldout", 2000, lambda s: _run(
        SeqNet("gru", 2, 32), _adam(), warmup_cosine(3e-3, 300, 2000), sequence_batch(s), mse),
        "GRU, Adam, warm-up then cosine", seed=1)
    add("ho_digits_cnn_nesterov_step", "healthy", "heldout", 1500, lambda s: _run(
        cnn(), _sgd(0.9, nesterov=True), step_decay(0.05, 500), digits_batch(s, image=True), ce),
        "CNN, Nesterov SGD, step decay", seed=1)
    add("ho_resmlp_adamw_cosine", "healthy", "heldout", 2000, lambda s: _run(
        mlp(16, 64, 3, 1, residual=True), _adamw(0.05), warmup_cosine(2e-3, 200, 2000),
        teacher_batch(s + 12), mse), "residual MLP, AdamW, warm-up then cosine", seed=1)
    add("ho_digits_mlp_adamax", "healthy", "heldout", 2000, lambda s: _run(
        mlp(64, 64, 2, 10), _opt(torch.optim.Adamax, lr=2e-3), const(2e-3), digits_batch(s), ce),
        "MLP, Adamax, constant LR", seed=1)
    add("ho_reg_radam_one_cycle", "healthy", "heldout", 2000, lambda s: _run(
        mlp(16, 64, 2, 1), _opt(torch.optim.RAdam), one_cycle(1e-2, 2000), teacher_batch(s + 13),
        mse), "RAdam, one-cycle", seed=1)
    add("ho_linrnn_adding_adam_warmup", "healthy", "heldout", 2000, lambda s: _run(
        LinearRNN(2, 32), _adam(), warmup_cosine(2e-3, 300, 10**9), sequence_batch(s, 30), mse),
        "linear RNN on the adding problem, Adam, warm-up then constant", seed=1)
    add("ho_reg_sgd_long_warmup", "healthy", "heldout", 2000, lambda s: _run(
        mlp(16, 128, 2, 1), _sgd(), warmup_cosine(0.1, 1000, 2000), teacher_batch(s + 14), mse),
        "SGD, 1000-step warm-up then cosine", seed=1)
    add("ho_lm_noqk_moderate_lr", "healthy", "heldout", 1000, lambda s: _lm(
        s, _adamw(0.1), warmup_cosine(3e-3, 100, 1000)),
        "transformer without qk-norm at a moderate LR, warm-up then cosine", seed=1)
    return out


SPECS: list[Spec] = _specs()
