"""Executors carry out the plan: a skipped step is as if the batch had never been seen.

Each test compares a guarded run that meets a bad batch with an unguarded reference run
that never saw that batch: parameters and optimizer state must be bit-identical, and
finite. The first step of a fused optimizer is the case that broke before: fused SGD with
momentum allocates its momentum buffer uninitialised on its first step, so a device-side
skip there left garbage that turned the weights NaN one step later.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.executors import FreshState, Hook, optimizer_kind
from gradguard.integrations._hooked import hooked_guard
from helpers import batches, mlp

CUDA = torch.cuda.is_available()
OPTIMIZERS = {
    "sgd_momentum_fused": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, fused=True),
    "adam_fused": lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
    "adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    "adam_foreach": lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=True),
    "adam_capturable": pytest.param(
        lambda ps: torch.optim.Adam(ps, lr=1e-2, capturable=True),
        marks=pytest.mark.skipif(not CUDA, reason="capturable Adam runs on CUDA only"),
    ),
}
DEVICE = "cuda" if CUDA else "cpu"


def loss_of(model, batch, bad=False):
    x, y = (t.to(DEVICE) for t in batch)
    loss = nn.functional.mse_loss(model(x), y)
    return loss * math.nan if bad else loss


def assert_same(model_a, opt_a, model_b, opt_b):
    for (n, p), q in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.isfinite(p).all(), n
        assert torch.equal(p, q), n
    sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        for name, v in sa[k].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(sb[k][name])), (k, name)


def reference(factory, data, skip_index):
    model = mlp(seed=3).to(DEVICE)
    opt = factory(model.parameters())
    for i, batch in enumerate(data):
        if i == skip_index:
            continue  # never saw that batch
        loss_of(model, batch).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


@pytest.mark.parametrize("factory", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
@pytest.mark.parametrize("bad_index", [0, 3], ids=["first_step", "later_step"])
@pytest.mark.parametrize("driver", ["direct", "hook"])
def test_skip_equals_a_run_that_never_saw_the_batch(factory, bad_index, driver):
    data = batches(6, seed=4)
    model = mlp(seed=3).to(DEVICE)
    opt = factory(model.parameters())
    if driver == "direct":
        guard = gg.Guard(model, opt, every=4)
    else:
        guard = hooked_guard(model, opt, gg.GuardConfig(every=4))
    for i, batch in enumerate(data):
        loss = loss_of(model, batch, bad=i == bad_index)
        loss.backward()
        guard.step(loss)
        if driver == "hook":
            opt.step()  # the trainer's own step
        opt.zero_grad()
    guard.close()
    assert guard.skipped_steps == 1
    ref_model, ref_opt = reference(factory, data, bad_index)
    assert_same(model, opt, ref_model, ref_opt)


def gradscaler_loop(model, opt, data, bad_index, guard=None):
    """Lightning's 16-mixed order: backward, unscale_, the hook (the guard), scaler.step,
    update, zero_grad."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    if guard == "hook":
        guard = hooked_guard(model, opt, gg.GuardConfig(every=4), scaler=scaler)
    taken = []
    for i, batch in enumerate(data):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_of(model, batch, bad=i == bad_index).float()
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        if guard is not None:
            guard.step(loss)
        before = [p.detach().clone() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        taken.append(not all(torch.equal(a, b) for a, b in zip(before, model.parameters())))
        opt.zero_grad()
    if guard is not None:
        guard.close()
    return taken, guard


def test_gradscaler_through_the_hook_skips_the_nan_step_and_takes_the_next():
    data = batches(5, seed=2)
    model, ref_model = mlp(seed=1), mlp(seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.05, momentum=0.9)
    taken, guard = gradscaler_loop(model, opt, data, 2, guard="hook")
    ref_taken, _ = gradscaler_loop(ref_model, ref_opt, data, 2)
    assert taken == ref_taken == [True, True, False, True, True]  # the clean step after: taken
    assert_same(model, opt, ref_model, ref_opt)
    assert guard.skipped_steps == 1


def test_hook_discards_the_stash_of_a_step_that_never_ran():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = Hook(opt)
    guard = gg.Guard(model, opt, executor=hook, every=10)
    loss_of(model, batches(1)[0], bad=True).backward()
    guard.step()  # bad: the gradients are taken off for the step ...
    assert all(p.grad is None for p in model.parameters())
    # ... which never runs (a GradScaler skipped it); the trainer zeroes, a new backward
    loss_of(model, batches(1, seed=5)[0]).backward()
    fresh = [p.grad.clone() for p in model.parameters()]
    guard.step()
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), fresh))
    guard.close()


def test_optimizer_kind_and_fresh_state():
    w = nn.Parameter(torch.ones(2))
    assert optimizer_kind(torch.optim.Adam([w], fused=True)) == "fused"
    assert optimizer_kind(torch.optim.Adam([w], foreach=True)) == "foreach"
    assert optimizer_kind(torch.optim.Adam([w], foreach=False)) == "plain"
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9, fused=True)
    fresh = FreshState(opt)
    w.grad = torch.ones(2)
    assert fresh([w]) is True
    opt.step()
    assert fresh([w]) is False
    opt.state.clear()  # e.g. a reset
    assert fresh([w]) is True
