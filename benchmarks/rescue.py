"""Rescue benchmark: does the default guard bring failing runs back to health, and does it
leave healthy runs alone? (issue 16)

Run:  OMP_NUM_THREADS=1 python benchmarks/rescue.py [--quick] [--case NAME ...] [--steps N]
Writes benchmarks/results/rescue.json (a full run) or rescue.partial.json (``--quick``,
``--case`` or ``--steps``; ``--out`` overrides). Prints a table; always exits 0.

The guard is ``gg.Guard(model, opt, clip=gg.ZClip(), recovery=gg.Recovery())`` with every
option at its default. The loop is a user's: ``zero_grad``, ``backward``, the injected
fault, the user's own ``clip_grad_norm_`` (if the recipe has one), ``guard.step(loss)``
(``opt.step()`` unguarded), ``scheduler.step()``.

**Rescue cases** (failing configuration vs its healthy twin). Each is run (a) unguarded, (b)
under the default guard, (c) the twin unguarded. The twin is the same model, data, seed,
steps and schedule with the one setting a user would fix: the LR that trains (the best
held-out loss of a half-decade sweep, 300 steps, one thread), no fault, or the clipping
the recipe is missing. Models are small and the data ships with Python / scikit-learn
(see ``rescue_cases.py``).

- ``transformer_sgd_lr10``: a 2-layer d=64 char transformer, SGD momentum 0.9 at lr 1.0,
  10x the lr 0.1 that trains; the loss goes NaN within ~20 steps. Twin: lr 0.1.
- ``transformer_adamw_lr10``: the same model, AdamW at 0.1, 10x the best 0.01; no NaN,
  the loss stalls at ~3.2 nats from step ~50 on, near the unigram model's 3.34 (the
  twin reaches 2.3). Twin: AdamW 0.01.
- ``spike_storm_cnn_sgd``: a digits CNN, SGD momentum 0.9 at its best lr 0.03; every
  gradient x100 for 20 consecutive steps from 30% of the run (a stretch of bad batches):
  the weights are thrown far away and the ReLUs die. Twin: no storm.
- ``spike_storm_transformer_adamw``: the same storm on the char transformer with AdamW
  0.01: the training loss rises from 2.5 to 3.0 nats, and the inflated second moments
  then hold the updates small (2.6 at the end against the twin's 2.3). Twin: no storm
  (the twin of ``transformer_adamw_lr10``).
- ``bad_inputs_regression_adam``: a tabular regression MLP (16 features, 2x64 ReLU), Adam
  at its best lr 1e-2; 5% of the batches (seeded) have all-NaN inputs (a missing sensor
  column, half of them) or inputs x1e4 (a unit error, the other half). One NaN batch makes
  every parameter NaN. Twin: clean data. The corrupted batches' own training loss is left
  out of the final loss (it says nothing about the model).
- ``warmup_peak5x_cnn_sgd``: the digits CNN with SGD momentum, linear warm-up over 10%
  then cosine, peak lr 0.15, 5x the 0.03 that trains (a linear-scaling rule applied to a
  batch size that does not need it); it learns during the warm-up, then the loss jumps
  back to chance at ~step 80 and never recovers. Twin: peak 0.03.
- ``warmup_peak5x_transformer_adamw``: the char transformer with AdamW, warm-up + cosine
  to a peak of 0.25, 5x the best peak 0.05; the loss stops improving at ~3.2 nats during
  the warm-up and ends near the unigram loss. Twin: peak 0.05.
- ``rnn_tanh_exploding``: a char-level tanh ``nn.RNN`` (128 units, 32 steps of BPTT),
  plain SGD at lr 3 without gradient clipping: the gradient norm grows ~60x within the
  first 5 steps (before ZClip's warm-up ends) and the loss jumps to ~30 nats and stays
  above 10. Twin: the same with ``clip_grad_norm_(1.0)``, the standard RNN recipe
  (Pascanu et al. 2013).
- ``cnn_sgd_lr10``: the digits CNN, SGD momentum at lr 0.3, 10x its best 0.03: no NaN,
  the network dies (chance-level loss). Twin: lr 0.03.
- ``cnn_adamw_lr100``: the digits CNN, AdamW at lr 0.3, 100x the 3e-3 of the twin (Adam's
  first step moves every weight by the LR): the first update blows the loss up to ~200
  nats, and the ReLUs die within ~20 steps (chance-level loss, no NaN). Found by hand
  after the suite (2026-11-30); the dead-network rule was widened on it (a network dead
  before it learnt anything). Twin: AdamW 3e-3 (the CNN's Adam LR of the held-out case,
  not swept).

**Healthy check**: well-tuned configurations run unguarded and under the default guard;
the guard should change the final held-out loss by less than 2% and raise no warning or
error event. Several are the twins above (their unguarded runs are shared).

- ``healthy_transformer_adamw_warmup``: the char transformer, AdamW, warm-up + cosine to 0.05.
- ``healthy_transformer_sgd``: the char transformer, SGD momentum 0.9 at 0.1, constant.
- ``healthy_lstm_adam``: a char LSTM (128 units), Adam 1e-2, constant.
- ``healthy_rnn_tanh_clipped``: the RNN twin (SGD 3, the user's own clip at 1.0).
- ``healthy_cnn_rmsprop``: the digits CNN, RMSprop 1e-3 with warm-up + cosine.
- ``healthy_mlp_sgd_nesterov``: the digits MLP, SGD Nesterov 0.03 with StepLR.
- ``healthy_mlp_adam``: the digits MLP (2x128 ReLU), Adam 1e-3.
- ``healthy_regression_adamw_restarts``: a regression MLP, AdamW 1e-2 with cosine restarts.

**Measures.** Final loss: the held-out loss of the final model (the figure the targets
use) and the mean training loss over the last 10% of the steps (reported next to it; on
digits it is near 0 and its ratios are noisy). Per rescue case: guarded/twin and
unguarded/twin held-out ratios, ``gap_closed`` = (unguarded - guarded) / (unguarded -
twin) (1: the twin's loss, 0: no better than unguarded; absent when the unguarded loss is
not finite), finite, aborted (``gg.TrainingDiverged``), skipped steps, back-offs (of
them ``probe_lowered``: the LR probe's, ``gradguard.recovery.probe``) and rollbacks
(events), the settled LR (an ``lr_settled`` event's value when the guard
reports one, else group 0's final LR x ``recovery.lr_factor``) next to the twin's, the
first warning/error step, wall seconds, and each arm's training loss in 30 bins
(``curve``). Per healthy case, over ``HEALTHY_SEEDS`` (5) seeds, each run guarded and
unguarded: the mean guarded held-out loss over the mean unguarded one (the figure the target
uses), the seed-0 ratio, how many seeds the guard made worse, warning/error events in all
of them, and ``seed_spread``: an unguarded run with seed+1 over the seed-0 one, the
run-to-run variation to read the 2% against (up to 6% here: one seed cannot resolve 2%).
Targets: every rescue case finite and within 2x of its twin; every healthy case within 2%
(mean over the seeds) with 0 warnings. Cross-entropy ratios are compressed: a
char model that learns nothing beyond letter frequencies is only ~1.3x its twin, so read
``unguarded_over_twin`` and ``gap_closed`` too. In the table, "settled lr" is the
recipe's (peak) LR x ``lr_factor``, next to the twin's LR.

**Held-out cases** (``HELD_OUT_CASES``, reported apart: ``held_out_*`` in the summary):
seven failing configurations written after the mechanism was built, on the same tasks with
other optimizers and LRs (LSTM/Adam, MLP/SGD Nesterov, MLP/Adam, regression/AdamW,
CNN/RMSprop, regression/SGD at 10-30x the healthy recipe's LR, and a ReLU RNN without its
clip), to see how the guard does on cases it was not shaped on, and one found by hand
later and added because it failed (CNN/fused Adam at 10x). Their twins are the suite's
healthy recipes (the CNN's Adam twin: 3e-3), not swept best LRs.

Extend by appending a :class:`RescueCase` or :class:`HealthyCase` to ``RESCUE_CASES`` /
``HEALTHY_CASES`` (tasks, recipes and faults are in ``rescue_cases.py``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim import SGD, Adam, AdamW, RMSprop

import gradguard as gg
from gradguard.lab._common import _num

try:  # as a script (benchmarks/ is on sys.path) or as the module benchmarks.rescue
    import rescue_cases as rc
except ModuleNotFoundError:
    from benchmarks import rescue_cases as rc

RESULTS = Path(__file__).parent / "results"
#: A rescued run's held-out loss is at most this multiple of its twin's (issue 16).
WITHIN = 2.0
#: A guarded healthy run's held-out loss is at most this multiple of the unguarded one's.
HEALTHY_WITHIN = 1.02
#: seeds each healthy case runs (paired: the same seed guarded and unguarded). One seed
#: cannot resolve 2%: two unguarded seeds differ by up to 6% on these runs
HEALTHY_SEEDS = 5
#: ``--quick`` runs this fraction of each case's steps.
QUICK = 0.2
#: Points in each arm's recorded (binned) loss curve.
CURVE_POINTS = 30
STEPS = 300


# ---- cases ------------------------------------------------------------------------------
@dataclass(frozen=True)
class RescueCase:
    """A failing configuration and its healthy twin (same task, seed and steps)."""

    name: str
    task: rc.Task
    failing: rc.Recipe
    twin: rc.Recipe
    what: str  # what fails, and why the twin is healthy (one line, kept in the JSON)
    steps: int = STEPS
    #: written after the mechanism was built, to try it on cases it was not shaped on;
    #: reported apart, not in the rescue target (``HELD_OUT_CASES``)
    held_out: bool = False


@dataclass(frozen=True)
class HealthyCase:
    """A well-tuned configuration the guard must leave alone."""

    name: str
    task: rc.Task
    recipe: rc.Recipe
    what: str
    steps: int = STEPS


MOMENTUM = {"momentum": 0.9}
TF_SGD = rc.Recipe(SGD, 0.1, MOMENTUM)
TF_ADAMW = rc.Recipe(AdamW, 0.01)
TF_ADAMW_WARMUP = rc.Recipe(AdamW, 0.05, schedule=rc.WarmupCosine())
CNN_SGD = rc.Recipe(SGD, 0.03, MOMENTUM)
CNN_SGD_WARMUP = rc.Recipe(SGD, 0.03, MOMENTUM, schedule=rc.WarmupCosine())
RNN_CLIPPED = rc.Recipe(SGD, 3.0, clip_norm=1.0)
STORM = rc.GradStorm(factor=100.0, length=20, start=0.3)

RESCUE_CASES: list[RescueCase] = [
    RescueCase("transformer_sgd_lr10", rc.CHAR_TRANSFORMER, rc.Recipe(SGD, 1.0, MOMENTUM), TF_SGD,
               "char transformer, SGD momentum at 10x the LR that trains: NaN within ~20 steps"),
    RescueCase("transformer_adamw_lr10", rc.CHAR_TRANSFORMER, rc.Recipe(AdamW, 0.1), TF_ADAMW,
               "char transformer, AdamW at 10x the best LR: stalls near the unigram loss"),
    RescueCase("spike_storm_cnn_sgd", rc.DIGITS_CNN, rc.Recipe(SGD, 0.03, MOMENTUM, fault=STORM),
               CNN_SGD, "digits CNN, SGD momentum, gradients x100 for 20 steps: the ReLUs die"),
    RescueCase("spike_storm_transformer_adamw", rc.CHAR_TRANSFORMER,
               rc.Recipe(AdamW, 0.01, fault=STORM), TF_ADAMW,
               "char transformer, AdamW, gradients x100 for 20 steps: inflated second "
               "moments hold the updates small afterwards"),
    RescueCase("bad_inputs_regression_adam", rc.REGRESSION_MLP,
               rc.Recipe(Adam, 1e-2, fault=rc.BadInputs()), rc.Recipe(Adam, 1e-2),
               "tabular regression MLP, Adam, 5% of batches all-NaN or x1e4 inputs"),
    RescueCase("warmup_peak5x_cnn_sgd", rc.DIGITS_CNN,
               rc.Recipe(SGD, 0.15, MOMENTUM, schedule=rc.WarmupCosine()), CNN_SGD_WARMUP,
               "digits CNN, SGD momentum, warm-up + cosine to a peak 5x the LR that trains"),
    RescueCase("warmup_peak5x_transformer_adamw", rc.CHAR_TRANSFORMER,
               rc.Recipe(AdamW, 0.25, schedule=rc.WarmupCosine()), TF_ADAMW_WARMUP,
               "char transformer, AdamW, warm-up + cosine to a peak 5x the best peak"),
    RescueCase("rnn_tanh_exploding", rc.CHAR_RNN_TANH, rc.Recipe(SGD, 3.0), RNN_CLIPPED,
               "char tanh RNN, SGD lr 3 without clipping: the gradient explodes from step 0; "
               "the twin clips at 1.0"),
    RescueCase("cnn_sgd_lr10", rc.DIGITS_CNN, rc.Recipe(SGD, 0.3, MOMENTUM), CNN_SGD,
               "digits CNN, SGD momentum at 10x the LR that trains: the network dies"),
    RescueCase("cnn_adamw_lr100", rc.DIGITS_CNN, rc.Recipe(AdamW, 0.3), rc.Recipe(AdamW, 3e-3),
               "digits CNN, AdamW at 100x: the first update blows the loss up, the ReLUs die"),
]

NESTEROV = {"momentum": 0.9, "nesterov": True}
CHAR_RNN_RELU = rc.Task("char_rnn_relu", lambda: rc.CharRNN(rc.corpus()[1], "relu"),
                        rc.lm_batches, rc.lm_eval, rc.lm_loss)
#: Failing configurations written after the mechanism, on the same tasks with other
#: optimizers and LRs; each twin is the suite's healthy recipe for that task (an
#: LR 10-30x lower), not a swept best.
DIGITS_GELU_MLP = rc.Task("digits_gelu_mlp", lambda: rc.mlp(64, 10, width=256, act=nn.GELU),
                          lambda seed: rc.digits_batches(seed, bs=64), rc.digits_eval, rc.CE)

HELD_OUT_CASES: list[RescueCase] = [
    RescueCase("held_out_lstm_adam_lr10", rc.CHAR_LSTM, rc.Recipe(Adam, 0.1),
               rc.Recipe(Adam, 1e-2), "char LSTM, Adam at 10x", held_out=True),
    RescueCase("held_out_mlp_nesterov_lr10", rc.DIGITS_MLP, rc.Recipe(SGD, 0.3, NESTEROV),
               rc.Recipe(SGD, 0.03, NESTEROV), "digits MLP, SGD Nesterov at 10x: dies",
               held_out=True),
    RescueCase("held_out_mlp_adam_lr30", rc.DIGITS_MLP, rc.Recipe(Adam, 0.03),
               rc.Recipe(Adam, 1e-3), "digits MLP, Adam at 30x: trains, noisily",
               held_out=True),
    RescueCase("held_out_regression_adamw_lr10", rc.REGRESSION_MLP, rc.Recipe(AdamW, 0.1),
               rc.Recipe(AdamW, 1e-2), "regression MLP, AdamW at 10x", held_out=True),
    RescueCase("held_out_cnn_rmsprop_lr10", rc.DIGITS_CNN, rc.Recipe(RMSprop, 1e-2),
               rc.Recipe(RMSprop, 1e-3), "digits CNN, RMSprop at 10x", held_out=True),
    RescueCase("held_out_regression_sgd_lr10", rc.REGRESSION_MLP, rc.Recipe(SGD, 0.3, MOMENTUM),
               rc.Recipe(SGD, 0.03, MOMENTUM), "regression MLP, SGD momentum at 10x: trains, "
               "slowly and noisily", held_out=True),
    RescueCase("held_out_rnn_relu_sgd_unclipped", CHAR_RNN_RELU, rc.Recipe(SGD, 1.0),
               rc.Recipe(SGD, 1.0, clip_norm=1.0), "char ReLU RNN, SGD 1.0 without the clip",
               held_out=True),
    # found by hand after the suite was run (2026-11-30), added as it failed
    RescueCase("held_out_cnn_adam_fused_lr10", rc.DIGITS_CNN, rc.Recipe(Adam, 0.03, {"fused": True}),
               rc.Recipe(Adam, 3e-3, {"fused": True}), "digits CNN, fused Adam at 10x: trains, "
               "noisily", held_out=True),
    # found by hand (2026-12-01), added as it failed
    RescueCase("held_out_mlp_gelu_adam_lr100", DIGITS_GELU_MLP, rc.Recipe(Adam, 0.1),
               rc.Recipe(Adam, 1e-3), "digits GELU MLP (2x256, batch 64), Adam at 100x: learns "
               "to about 1 nat, then wanders back up towards chance", steps=800,
               held_out=True),
]

HEALTHY_CASES: list[HealthyCase] = [
    HealthyCase("healthy_transformer_adamw_warmup", rc.CHAR_TRANSFORMER, TF_ADAMW_WARMUP,
                "char transformer, AdamW, warm-up + cosine"),
    HealthyCase("healthy_transformer_sgd", rc.CHAR_TRANSFORMER, TF_SGD,
                "char transformer, SGD momentum, constant LR"),
    HealthyCase("healthy_lstm_adam", rc.CHAR_LSTM, rc.Recipe(Adam, 1e-2), "char LSTM, Adam"),
    HealthyCase("healthy_rnn_tanh_clipped", rc.CHAR_RNN_TANH, RNN_CLIPPED,
                "char tanh RNN, SGD with the user's clip_grad_norm_(1.0)"),
    HealthyCase("healthy_cnn_rmsprop", rc.DIGITS_CNN,
                rc.Recipe(RMSprop, 1e-3, schedule=rc.WarmupCosine()),
                "digits CNN, RMSprop, warm-up + cosine"),
    HealthyCase("healthy_mlp_sgd_nesterov", rc.DIGITS_MLP,
                rc.Recipe(SGD, 0.03, {"momentum": 0.9, "nesterov": True}, schedule=rc.StepDecay()),
                "digits MLP, SGD Nesterov, StepLR"),
    HealthyCase("healthy_mlp_adam", rc.DIGITS_MLP, rc.Recipe(Adam, 1e-3), "digits MLP, Adam"),
    HealthyCase("healthy_regression_adamw_restarts", rc.REGRESSION_MLP,
                rc.Recipe(AdamW, 1e-2, schedule=rc.CosineRestarts()),
                "regression MLP, AdamW, cosine warm restarts"),
    # found by hand (2026-12-02), added as it failed: rolled back at step 49 or 99
    HealthyCase("healthy_mlp_finetune_adam", rc.DIGITS_MLP_PRETRAINED, rc.Recipe(Adam, 1e-4),
                "a converged digits MLP fine-tuned, Adam 1e-4: its loss starts at its best"),
]


# ---- one run ----------------------------------------------------------------------------
@dataclass
class Outcome:
    """What one training run did (guard fields stay at their defaults unguarded)."""

    losses: list[float] = field(default_factory=list)
    excluded: frozenset[int] = frozenset()
    eval_loss: float = math.nan
    params_finite: bool = True
    aborted: str | None = None  # gg.TrainingDiverged
    error: str | None = None  # any other exception (a bug: printed with its traceback)
    stopped_at: int | None = None  # an unguarded run stopped once its weights were NaN
    first_nonfinite: int | None = None
    lr_end: float = math.nan
    seconds: float = 0.0
    events: list[gg.Event] = field(default_factory=list)
    skips: int = 0
    lr_factor: float = 1.0
    lr_ceiling: float = 1.0
    decisions: list[tuple[str, int]] = field(default_factory=list)


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _params_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def train(task: rc.Task, recipe: rc.Recipe, steps: int, *, guarded: bool, seed: int = 0) -> Outcome:
    """Train ``task`` with ``recipe`` for ``steps`` steps, under the default guard or not."""
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = task.model()
    opt = recipe.make_optimizer(model)
    sched = recipe.schedule(opt, steps) if recipe.schedule is not None else None
    batch = task.batches(seed)
    out = Outcome()
    if recipe.fault is not None:
        batch, out.excluded = recipe.fault.batches(batch, steps, seed)
    rec = gg.Recovery(**RECOVERY_OPTIONS) if guarded else None
    guard = gg.Guard(model, opt, clip=gg.ZClip(), recovery=rec) if rec is not None else None
    try:
        for step in range(steps):
            x, y = batch(step)
            loss = task.loss(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if recipe.fault is not None:
                recipe.fault.after_backward(step, steps, model)
            if recipe.clip_norm is not None:
                nn.utils.clip_grad_norm_(model.parameters(), recipe.clip_norm)
            if guard is not None:
                guard.step(loss.detach())
            else:
                opt.step()
            if sched is not None:
                sched.step()
            v = loss.item()
            out.losses.append(v)
            if out.first_nonfinite is None and not math.isfinite(v) and step not in out.excluded:
                out.first_nonfinite = step
            # an unguarded run with NaN weights has nothing left to show: save the time
            if guard is None and step % 10 == 9 and not _params_finite(model):
                out.stopped_at = step
                break
    except gg.TrainingDiverged as e:
        out.aborted = _first_line(e)
    except Exception as e:  # a crash in one run must not lose the others: recorded, printed
        traceback.print_exc()
        out.error = _first_line(e)
    finally:
        if guard is not None:
            try:
                guard.close()  # idempotent; its last flush may still give up
            except gg.TrainingDiverged as e:
                out.aborted = out.aborted or _first_line(e)
    out.params_finite = _params_finite(model)
    if out.params_finite:
        with torch.no_grad():
            x, y = task.held_out()
            out.eval_loss = float(task.loss(model(x), y))
    out.lr_end = float(opt.param_groups[0]["lr"])
    if guard is not None and rec is not None:
        out.events = list(guard.events)
        out.skips = guard.skipped_steps
        out.lr_factor, out.lr_ceiling = rec.lr_factor, rec.lr_ceiling
        out.decisions = [(a.kind, a.step) for a in rec.decisions]
    out.seconds = time.perf_counter() - t0
    return out


# ---- records ----------------------------------------------------------------------------
def train_tail(out: Outcome, steps: int) -> float:
    """Mean training loss over the last 10% of the steps, corrupted batches left out (NaN
    when the run did not get there)."""
    lo = steps - max(1, steps // 10)
    tail = [v for i, v in enumerate(out.losses[lo:steps], lo) if i not in out.excluded]
    if len(out.losses) < steps or not tail:
        return math.nan
    return sum(tail) / len(tail)


def curve(out: Outcome, steps: int) -> list[float]:
    """The training loss averaged over ``CURVE_POINTS`` equal bins (corrupted batches left
    out; NaN where the run had stopped)."""
    bins = min(CURVE_POINTS, steps)
    pts = []
    for b in range(bins):
        lo, hi = b * steps // bins, (b + 1) * steps // bins
        vals = [out.losses[i] for i in range(lo, min(hi, len(out.losses)))
                if i not in out.excluded]
        pts.append(sum(vals) / len(vals) if vals and hi <= len(out.losses) else math.nan)
    return pts


def describe(recipe: rc.Recipe) -> dict[str, Any]:
    return {
        "optimizer": recipe.optimizer.__name__, "lr": recipe.lr, "options": dict(recipe.options),
        "schedule": None if recipe.schedule is None else repr(recipe.schedule),
        "clip_norm": recipe.clip_norm,
        "fault": None if recipe.fault is None else repr(recipe.fault),
    }


def arm(out: Outcome, recipe: rc.Recipe, steps: int, *, guarded: bool = False) -> dict[str, Any]:
    """One run's record; a guarded run's adds what the guard did."""
    tail = train_tail(out, steps)
    finite = (out.aborted is None and out.error is None and out.params_finite and math.isfinite(out.eval_loss)
              and math.isfinite(tail))
    d: dict[str, Any] = {
        "eval_loss": out.eval_loss, "train_loss": tail, "finite": finite,
        "aborted": out.aborted, "error": out.error, "stopped_at": out.stopped_at,
        "first_nonfinite": out.first_nonfinite, "lr": recipe.lr, "lr_end": out.lr_end,
        "seconds": round(out.seconds, 2), "curve": curve(out, steps),
    }
    if guarded:
        d.update(guard_fields(out, recipe))
    return d


def guard_fields(out: Outcome, recipe: rc.Recipe) -> dict[str, Any]:
    kinds = Counter(e.kind for e in out.events)
    alarms = [e for e in out.events if e.severity != "info"]
    settled = [e for e in out.events if e.kind == "lr_settled" and "lr" in (e.data or {})]
    return {
        "skips": out.skips,
        "backoffs": kinds["lr_backoff"],
        # of them, the LR probe's (gradguard.recovery.probe): the loss followed the LR
        "probe_lowered": sum(1 for e in out.events
                             if e.kind == "lr_backoff" and (e.data or {}).get("probe")),
        "rollbacks": kinds["rollback"],
        "events": dict(sorted(kinds.items())),
        "decisions": [f"{k}@{s}" for k, s in out.decisions],
        "warnings": len(alarms),
        "warning_events": [f"{e.kind}@{e.step}" for e in alarms[:30]],
        "first_incident": min((e.step for e in alarms), default=None),
        "lr_factor": out.lr_factor,
        "lr_ceiling": out.lr_ceiling,
        # data["lr"] holds every param group's LR; value is the first group's
        "settled_lr": (float(settled[-1].value) if settled
                       else out.lr_end * out.lr_factor),
        "settled_lr_source": "lr_settled event" if settled else "final lr x lr_factor",
        # the LR advised for the config: half the settled one (gradguard.recovery.tally)
        "advised_lr": (float(((settled[-1].data or {}).get("advise") or [settled[-1].value])[0])
                       if settled else None),
        "settled_peak_lr": recipe.lr * out.lr_factor,
    }


def _ratio(a: float, b: float) -> float:
    return a / b if math.isfinite(a) and math.isfinite(b) and b > 0 else math.nan


class Runner:
    """Runs arms, sharing unguarded runs that are the same (task, recipe, steps, seed)."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._cache: dict[tuple[str, str, int, int], Outcome] = {}

    def unguarded(self, task: rc.Task, recipe: rc.Recipe, steps: int, *, offset: int = 0
                  ) -> Outcome:
        seed = self.seed + offset
        key = (task.name, repr(recipe), steps, seed)
        if key not in self._cache:
            self._cache[key] = train(task, recipe, steps, guarded=False, seed=seed)
        return self._cache[key]

    def guarded(self, task: rc.Task, recipe: rc.Recipe, steps: int, *, offset: int = 0
                ) -> Outcome:
        return train(task, recipe, steps, guarded=True, seed=self.seed + offset)

    def rescue(self, case: RescueCase, steps: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        fail_u = arm(self.unguarded(case.task, case.failing, steps), case.failing, steps)
        fail_g = arm(self.guarded(case.task, case.failing, steps), case.failing, steps,
                     guarded=True)
        twin = arm(self.unguarded(case.task, case.twin, steps), case.twin, steps)
        u, g, t = fail_u["eval_loss"], fail_g["eval_loss"], twin["eval_loss"]
        ratio = _ratio(g, t)
        gap = (u - g) / (u - t) if math.isfinite(u) and math.isfinite(g) and u > t else math.nan
        train_ratio = _ratio(fail_g["train_loss"], twin["train_loss"])
        return {
            "name": case.name, "kind": "rescue", "held_out": case.held_out, "what": case.what,
            "task": case.task.name,
            "steps": steps, "failing": describe(case.failing), "twin_recipe": describe(case.twin),
            "unguarded": fail_u, "guarded": fail_g, "twin": twin,
            "guarded_over_twin": ratio, "guarded_over_twin_train": train_ratio,
            "unguarded_over_twin": _ratio(u, t), "gap_closed": gap,
            "within_2x": bool(fail_g["finite"] and ratio <= WITHIN),
            "within_2x_train": bool(fail_g["finite"] and train_ratio <= WITHIN),
            "unguarded_within_2x": bool(fail_u["finite"] and _ratio(u, t) <= WITHIN),
            "seconds": round(time.perf_counter() - t0, 2),
        }

    def rescue_seeds(self, case: RescueCase, steps: int, seeds: int) -> dict[str, Any]:
        """:meth:`rescue` at this runner's seed, and the outcome at ``seeds - 1`` more (one
        seed is one draw: where a run that trains noisily ends is partly chance)."""
        first = self.rescue(case, steps)
        records = [first] + [Runner(seed=self.seed + k).rescue(case, steps)
                             for k in range(1, seeds)]
        first["seeds"] = [{
            "seed": self.seed + k, "guarded_over_twin": r["guarded_over_twin"],
            "within_2x": r["within_2x"], "unguarded_over_twin": r["unguarded_over_twin"],
            "unguarded_within_2x": r["unguarded_within_2x"],
            **{key: r["guarded"].get(key, 0) for key in ("skips", "backoffs", "rollbacks")},
        } for k, r in enumerate(records)]
        first["within_2x_seeds"] = sum(r["within_2x"] for r in records)
        first["unguarded_within_2x_seeds"] = sum(r["unguarded_within_2x"] for r in records)
        first["seconds"] = round(sum(r["seconds"] for r in records), 2)
        return first

    def healthy(self, case: HealthyCase, steps: int, seeds: int = HEALTHY_SEEDS) -> dict[str, Any]:
        t0 = time.perf_counter()
        plain = arm(self.unguarded(case.task, case.recipe, steps), case.recipe, steps)
        guarded = arm(self.guarded(case.task, case.recipe, steps), case.recipe, steps,
                      guarded=True)
        per_seed = [{"seed": self.seed, "unguarded": plain["eval_loss"],
                     "guarded": guarded["eval_loss"], "warnings": guarded["warnings"],
                     "skips": guarded["skips"], "finite": guarded["finite"]}]
        for offset in range(1, seeds):
            u = self.unguarded(case.task, case.recipe, steps, offset=offset)
            g = arm(self.guarded(case.task, case.recipe, steps, offset=offset), case.recipe,
                    steps, guarded=True)
            per_seed.append({"seed": self.seed + offset, "unguarded": u.eval_loss,
                             "guarded": g["eval_loss"], "warnings": g["warnings"],
                             "skips": g["skips"], "finite": g["finite"]})
        for r in per_seed:
            r["ratio"] = _ratio(r["guarded"], r["unguarded"])
        finite = all(r["finite"] for r in per_seed)
        ratio = _ratio(statistics.fmean(r["guarded"] for r in per_seed),
                       statistics.fmean(r["unguarded"] for r in per_seed))
        train_ratio = _ratio(guarded["train_loss"], plain["train_loss"])
        warnings = sum(r["warnings"] for r in per_seed)
        spread = (_ratio(per_seed[1]["unguarded"], per_seed[0]["unguarded"]) if seeds > 1
                  else _ratio(self.unguarded(case.task, case.recipe, steps, offset=1).eval_loss,
                              plain["eval_loss"]))
        return {
            "name": case.name, "kind": "healthy", "what": case.what, "task": case.task.name,
            "steps": steps, "seeds": seeds, "recipe": describe(case.recipe),
            "unguarded": plain, "guarded": guarded, "per_seed": per_seed,
            "guarded_over_unguarded": ratio,
            "guarded_over_unguarded_seed0": _ratio(guarded["eval_loss"], plain["eval_loss"]),
            "guarded_over_unguarded_train": train_ratio,
            "worse_seeds": sum(r["ratio"] > 1 for r in per_seed),
            "seed_spread": spread,
            "warnings": warnings,
            "within_2pct": bool(finite and ratio <= HEALTHY_WITHIN),
            "ok": bool(finite and ratio <= HEALTHY_WITHIN and warnings == 0),
            "seconds": round(time.perf_counter() - t0, 2),
        }


# ---- the report ---------------------------------------------------------------------------
def _seed_runs(records: list[dict[str, Any]], key: str) -> list[int]:
    """``[runs for which key holds, runs]`` over every seed of ``records`` (one run each
    when they were run on one seed)."""
    return [sum(r.get(f"{key}_seeds", r[key]) for r in records),
            sum(len(r.get("seeds", [0])) for r in records)]


def summary(rescue: list[dict[str, Any]], healthy: list[dict[str, Any]]) -> dict[str, Any]:
    held = [r for r in rescue if r.get("held_out")]
    rescue = [r for r in rescue if not r.get("held_out")]
    return {
        "rescue_cases": len(rescue),
        "rescue_within_2x": sum(r["within_2x"] for r in rescue),
        "rescue_within_2x_train": sum(r["within_2x_train"] for r in rescue),
        "rescue_finite": sum(r["guarded"]["finite"] for r in rescue),
        "rescue_unguarded_within_2x": sum(r["unguarded_within_2x"] for r in rescue),
        "rescue_not_within_2x": [r["name"] for r in rescue if not r["within_2x"]],
        "healthy_cases": len(healthy),
        "healthy_within_2pct": sum(r["within_2pct"] for r in healthy),
        "healthy_zero_warnings": sum(r["warnings"] == 0 for r in healthy),
        "healthy_ok": sum(r["ok"] for r in healthy),
        "healthy_not_ok": [r["name"] for r in healthy if not r["ok"]],
        "healthy_steps": sum(r["steps"] * r["seeds"] for r in healthy),
        "healthy_warnings": sum(r["warnings"] for r in healthy),
        "held_out_cases": len(held),
        "held_out_within_2x": sum(r["within_2x"] for r in held),
        "held_out_unguarded_within_2x": sum(r["unguarded_within_2x"] for r in held),
        "held_out_not_within_2x": [r["name"] for r in held if not r["within_2x"]],
        # over every seed (--rescue-seeds): [runs within 2x of their twin, runs]
        "rescue_seed_runs_within_2x": _seed_runs(rescue, "within_2x"),
        "rescue_unguarded_seed_runs_within_2x": _seed_runs(rescue, "unguarded_within_2x"),
        "held_out_seed_runs_within_2x": _seed_runs(held, "within_2x"),
        "held_out_unguarded_seed_runs_within_2x": _seed_runs(held, "unguarded_within_2x"),
    }


def _f(x: Any, spec: str = ".3g") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _seeds(r: dict[str, Any]) -> str:
    """``within/seeds`` over the seeds run (``-`` for one)."""
    return f"{r['within_2x_seeds']}/{len(r['seeds'])}" if "seeds" in r else "-"


def table(rescue: list[dict[str, Any]], healthy: list[dict[str, Any]]) -> str:
    lines = []
    if rescue:
        lines.append(f"{'rescue case':32} {'twin':>6} {'unguard':>8} {'guarded':>8} {'g/twin':>7} "
                     f"{'train':>6} {'gap':>5} {'fin':>3} {'skip':>4} {'bo':>3} {'rb':>3} "
                     f"{'settled lr':>10} {'twin lr':>8} {'1st':>4} {'seeds':>5} {'sec':>5}")
        for r in rescue:
            g, u, t = r["guarded"], r["unguarded"], r["twin"]
            fin = ("err" if g["error"] else "ab" if g["aborted"]
                   else "yes" if g["finite"] else "no")
            lines.append(
                f"{r['name']:32} {_f(t['eval_loss']):>6} {_f(u['eval_loss']):>8} "
                f"{_f(g['eval_loss']):>8} {_f(r['guarded_over_twin'], '.2f'):>7} "
                f"{_f(r['guarded_over_twin_train'], '.2f'):>6} {_f(r['gap_closed'], '.2f'):>5} "
                f"{fin:>3} {g.get('skips', 0):>4} {g.get('backoffs', 0):>3} "
                f"{g.get('rollbacks', 0):>3} {_f(g.get('settled_peak_lr'), '.3g'):>10} "
                f"{_f(t['lr'], '.3g'):>8} {_f(g.get('first_incident'), 'd'):>4} "
                f"{_seeds(r):>5} {r['seconds']:>5.0f}")
    if healthy:
        lines.append("")
        lines.append(f"{'healthy case':36} {'unguard':>8} {'guarded':>8} {'ratio':>6} "
                     f"{'seed0':>6} {'worse':>5} {'seed+1':>6} {'warn':>4} {'skip':>4} {'ok':>3} "
                     f"{'sec':>5}")
        for r in healthy:
            g, u = r["guarded"], r["unguarded"]
            lines.append(
                f"{r['name']:36} {_f(u['eval_loss'], '.4g'):>8} {_f(g['eval_loss'], '.4g'):>8} "
                f"{_f(r['guarded_over_unguarded'], '.3f'):>6} "
                f"{_f(r['guarded_over_unguarded_seed0'], '.3f'):>6} "
                f"{r['worse_seeds']:>2}/{r['seeds']:<2} "
                f"{_f(r['seed_spread'], '.3f'):>6} {r['warnings']:>4} "
                f"{g.get('skips', 0):>4} {'yes' if r['ok'] else 'no':>3} {r['seconds']:>5.0f}")
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                               timeout=10, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    status = git("status", "--porcelain", "--", "src")
    return {
        "torch": torch.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "threads": torch.get_num_threads(),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git("rev-parse", "HEAD"),
        "src_modified": None if status is None else bool(status),
        "guard": "gg.Guard(model, opt, clip=gg.ZClip(), recovery=gg.Recovery())",
    }


#: Options of the guarded arm's Recovery (every one at its default unless --no-lr-probe).
RECOVERY_OPTIONS: dict[str, Any] = {}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    names = [c.name for c in RESCUE_CASES + HELD_OUT_CASES] + [c.name for c in HEALTHY_CASES]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help=f"run {QUICK * 100:.0f}%% of each case's steps (a smoke run)")
    ap.add_argument("--case", action="append", choices=names, metavar="NAME",
                    help="run only this case (repeatable): " + ", ".join(names))
    ap.add_argument("--steps", type=int, default=None, help="steps for every case (override)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--healthy-seeds", type=int, default=HEALTHY_SEEDS,
                    help=f"seeds per healthy case (default {HEALTHY_SEEDS})")
    ap.add_argument("--rescue-seeds", type=int, default=1,
                    help="seeds per failing case (default 1; the committed results: 3)")
    ap.add_argument("--no-lr-probe", action="store_true",
                    help="guard with Recovery(lr_probe=False): what the LR probe adds")
    ap.add_argument("--out", default=None, help="results file (default: results/rescue.json "
                    "for a full run, results/rescue.partial.json otherwise)")
    args = ap.parse_args(argv)
    if args.healthy_seeds < 1:
        ap.error(f"--healthy-seeds {args.healthy_seeds}: must be >= 1")
    if args.rescue_seeds < 1:
        ap.error(f"--rescue-seeds {args.rescue_seeds}: must be >= 1")
    if args.steps is not None and args.steps < 10:
        ap.error(f"--steps {args.steps}: must be >= 10")
    RECOVERY_OPTIONS.clear()
    if args.no_lr_probe:
        RECOVERY_OPTIONS["lr_probe"] = False
    partial = bool(args.quick or args.case or args.steps or args.no_lr_probe
                   or args.healthy_seeds != HEALTHY_SEEDS)
    default = RESULTS / ("rescue.partial.json" if partial else "rescue.json")
    out = Path(args.out) if args.out else default
    torch.set_num_threads(1)

    def steps_of(n: int) -> int:
        if args.steps is not None:
            return int(args.steps)
        return max(20, int(n * QUICK)) if args.quick else n

    chosen = set(args.case or names)
    runner = Runner(seed=args.seed)
    t0 = time.perf_counter()
    rescue, healthy = [], []
    for case in RESCUE_CASES + HELD_OUT_CASES:
        if case.name in chosen:
            rescue.append(runner.rescue_seeds(case, steps_of(case.steps), args.rescue_seeds))
            print(f"  {case.name}: {rescue[-1]['seconds']:.0f} s", file=sys.stderr, flush=True)
    for hcase in HEALTHY_CASES:
        if hcase.name in chosen:
            healthy.append(runner.healthy(hcase, steps_of(hcase.steps), args.healthy_seeds))
            print(f"  {hcase.name}: {healthy[-1]['seconds']:.0f} s", file=sys.stderr, flush=True)
    s = summary(rescue, healthy)
    res: dict[str, Any] = {
        "environment": environment() | {"quick": args.quick, "seed": args.seed,
                                        "recovery_options": dict(RECOVERY_OPTIONS),
                                        "rescue_seeds": args.rescue_seeds,
                                        "steps_override": args.steps},
        "targets": {"rescue": f"finite and held-out loss <= {WITHIN}x the twin's",
                    "healthy": f"mean held-out loss over {args.healthy_seeds} seeds <= "
                               f"{HEALTHY_WITHIN}x unguarded's, 0 warnings"},
        "summary": s,
        "rescue": rescue, "healthy": healthy,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_num(res), indent=1) + "\n")
    print(table(rescue, healthy))
    print(f"\nrescue: {s['rescue_within_2x']}/{s['rescue_cases']} finite and within {WITHIN:g}x "
          f"of the twin (held-out; {s['rescue_within_2x_train']} on the training loss; "
          f"unguarded: {s['rescue_unguarded_within_2x']})")
    print(f"held out: {s['held_out_within_2x']}/{s['held_out_cases']} finite and within "
          f"{WITHIN:g}x (unguarded: {s['held_out_unguarded_within_2x']})")
    if args.rescue_seeds > 1:
        for key in ("rescue", "held_out"):
            (w, n), (uw, _) = s[f"{key}_seed_runs_within_2x"], s[f"{key}_unguarded_seed_runs_within_2x"]
            print(f"{key} over {args.rescue_seeds} seeds: {w}/{n} runs within {WITHIN:g}x "
                  f"(unguarded: {uw}/{n})")
    print(f"healthy: {s['healthy_ok']}/{s['healthy_cases']} within {HEALTHY_WITHIN - 1:.0%} "
          f"with 0 warnings ({s['healthy_warnings']} warnings in {s['healthy_steps']} steps)")
    print(f"wrote {out} in {res['seconds']} s")
    return res


if __name__ == "__main__":
    main()
