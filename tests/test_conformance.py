"""The conformance matrix: gradguard's promises in the loops people run (issue 13).

Axes (tests/conformance/setups.py): optimizers (SGD +-momentum/nesterov, Adam, AdamW
plain/foreach/fused, Adagrad, RMSprop, Adafactor, LBFGS) x schedulers (none, StepLR,
LambdaLR per step and per epoch, OneCycleLR, LinearLR warm-up, CosineAnnealingWarmRestarts,
ReduceLROnPlateau, HF linear with warm-up) x precision (fp32, fp64, bf16 parameters,
GradScaler) x layouts (one group, decay/no-decay groups, a group added later, frozen
layers, a tied head) in the plain loop; the Lightning and Hugging Face drivers are in
tests/test_conformance_frameworks.py. Every optimizer meets every scheduler; precision and
layout cycle through those pairs, so every row and every column is covered.

Each cell checks, against an unguarded reference run:
* a skip on the first and on a later step leaves parameters and optimizer state equal,
  bit for bit, to a run that never saw that batch;
* after a back-off the LR the optimizer actually uses is <= the schedule's LR x the
  back-off factor, and never above the schedule's LR afterwards;
* the named origin of a NaN born in the head is the head;
* no NaN reaches a parameter.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import gradguard as gg
from conformance.setups import (
    LATE_STEP,
    LAYOUTS,
    OPTIMIZERS,
    PRECISIONS,
    SCHEDULERS,
    Cell,
    Run,
    after_step,
    build,
    forward_loss,
    poison_grads,
    sample,
)
from helpers import assert_same_run

STEPS = 7
CELLS = sample()


def drive(run: Run, guard: gg.Guard | None, *, poison: int | None = None,
          never_seen: int | None = None, check_finite: bool = False) -> list[tuple[float, float]]:
    """Train STEPS steps. ``poison``: that step's gradients go NaN (guarded runs);
    ``never_seen``: that batch is left out entirely (the reference; the schedule and the
    loss scale still move as in the guarded run). Returns ``(schedule LR, LR used)`` of
    group 0 for every optimizer step the optimizer ran."""
    used: list[float] = []
    run.optimizer.register_step_pre_hook(
        lambda o, a, k: used.append(float(o.param_groups[0]["lr"])))
    pairs: list[tuple[float, float]] = []
    for step in range(STEPS):
        sched_lr = float(run.optimizer.param_groups[0]["lr"])
        n_used = len(used)
        if step == never_seen:
            if run.scaler is not None:  # the guarded run's overflow halved the scale
                run.scaler.scale(torch.ones(()))  # (initialises a scaler not used yet)
                run.scaler.update(run.scaler.get_scale() * run.scaler.get_backoff_factor())
        else:
            one_step(run, guard, step, bad=step == poison)
        pairs.extend((sched_lr, u) for u in used[n_used:])
        after_step(run, step)
        if check_finite:
            for n, p in run.model.named_parameters():
                assert torch.isfinite(p).all(), (step, n)
    return pairs


def one_step(run: Run, guard: gg.Guard | None, step: int, *, bad: bool) -> None:
    opt = run.optimizer
    if isinstance(opt, torch.optim.LBFGS):
        def closure():
            opt.zero_grad()
            loss = forward_loss(run, step)
            loss.backward()
            if bad:
                poison_grads(opt)
            return loss

        if guard is not None:
            guard.step(closure=closure)
        else:
            opt.step(closure)
        return
    loss = forward_loss(run, step)
    (loss if run.scaler is None else run.scaler.scale(loss)).backward()
    if bad:
        poison_grads(opt)
    if guard is not None:
        guard.step(loss, scaler=run.scaler)
    elif run.scaler is not None:
        run.scaler.step(opt)
    else:
        opt.step()
    if run.scaler is not None:
        run.scaler.update()
    run.model.zero_grad()  # also params no optimizer group holds yet ("added_later")


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        # torch warns about a scheduler stepped before the optimizer (a skipped first step)
        warnings.simplefilter("ignore", UserWarning)
        yield


def test_the_sample_covers_every_row_and_every_column():
    ran = [c for c in CELLS if c.applicable()]
    assert {c.optimizer for c in ran} == set(OPTIMIZERS)
    assert {c.scheduler for c in ran} == set(SCHEDULERS)
    assert {c.precision for c in ran} == set(PRECISIONS)
    assert {c.layout for c in ran} == set(LAYOUTS)
    assert {(c.optimizer, c.scheduler) for c in ran} == {(o, s) for o in OPTIMIZERS for s in SCHEDULERS}


def _params(cells):
    return [pytest.param(c, id=c.id) for c in cells]


@pytest.mark.parametrize("cell", _params(CELLS))
@pytest.mark.parametrize("bad_step", [0, 3], ids=["first_step", "later_step"])
def test_a_skip_equals_a_run_that_never_saw_the_batch(cell: Cell, bad_step: int):
    run = build(cell)
    guard = gg.Guard(run.model, run.optimizer, every=3)
    drive(run, guard, poison=bad_step, check_finite=True)
    guard.close()
    ref = build(cell)
    drive(ref, None, never_seen=bad_step)
    assert guard.skipped_steps == 1
    assert_same_run(run.model, run.optimizer, ref.model, ref.optimizer)
    if cell.precision != "scaler":  # under a scaler a NaN gradient is a loss-scale overflow
        origin = [e.layer for e in guard.events if e.kind == "nonfinite_grad"]
        # before its group is added the head is not the optimizer's: the norm is the last
        last = "norm" if cell.layout == "added_later" and bad_step < LATE_STEP else "head"
        assert origin == [last], (cell.id, origin)


@pytest.mark.parametrize("cell", _params(CELLS))
def test_the_lr_used_after_a_back_off_follows_the_schedule(cell: Cell):
    run = build(cell)
    rec = gg.Recovery(skip_patience=1, restore_steps=3)
    guard = gg.Guard(run.model, run.optimizer, recovery=rec, every=2)
    pairs = drive(run, guard, poison=2, check_finite=True)
    guard.close()
    backoffs = [e for e in guard.events if e.kind == "lr_backoff"]
    if cell.precision == "scaler":  # a routine overflow: the ladder does not act
        assert backoffs == []
        return
    assert [e.step for e in backoffs] == [2], cell.id
    # LBFGS evaluates its closure several times but steps (and uses the LR) once a step
    after = pairs[2:]
    for sched, used in after:
        assert used <= sched * (1 + 1e-6), (cell.id, sched, used)  # never above the schedule
    # backed off at once (host skip flag), or at the next flush (fused: flag on device)
    lowered = [i for i, (sched, used) in enumerate(after) if used < sched * (1 - 1e-6)]
    assert lowered and lowered[0] <= 2, (cell.id, after)
    sched, used = after[lowered[0]]
    assert used <= sched * 0.1 * (1 + 1e-6), (cell.id, sched, used)
