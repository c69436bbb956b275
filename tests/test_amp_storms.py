"""Mixed precision and bad batches: a step skipped for the guard's own reasons (a spike)
does not back the GradScaler's loss scale off, in the plain loop and through a trainer's
hook; an overflow whose loss is far off is no routine one (gradguard/executors/_amp.py,
gradguard/recovery/verdict.py OVERFLOW_LOSS_RATIO)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.integrations._hooked import hooked_guard
from helpers import batches, mlp


def spiking_loop(how, *, spikes=range(40, 46), nan_at=None, steps=60):
    """fp32 gradients under a GradScaler (overflow only from an injected inf), x1e3
    gradients on ``spikes``: the guard skips them as spikes, none overflows."""
    model = mlp(seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=10_000)
    rec = gg.Recovery()
    if how == "hook":
        guard = hooked_guard(model, opt, gg.GuardConfig(recovery=rec), scaler=scaler)
    else:
        guard = gg.Guard(model, opt, clip=gg.ZClip(), recovery=rec)
    scales = []
    for i, (x, y) in enumerate(batches(steps, seed=3)):
        loss = nn.functional.mse_loss(model(x), y)
        scaler.scale(loss).backward()
        if i in spikes:
            for p in model.parameters():
                p.grad.mul_(1e3)
        if i == nan_at:
            model[0].weight.grad[0, 0] = float("inf")
        if how == "hook":  # a trainer's order: unscale_, its hook, scaler.step, update
            scaler.unscale_(opt)
            guard.step(loss)
            scaler.step(opt)
        else:
            guard.step(loss, scaler=scaler)
        scaler.update()
        scales.append(scaler.get_scale())
        opt.zero_grad()
    guard.close()
    skips = [e.step for e in guard.events if e.kind == "skip"]
    return scales, skips, guard


@pytest.mark.parametrize("how", ["plain", "hook"])
def test_steps_skipped_for_a_spike_leave_the_loss_scale_alone(how):
    scales, skips, guard = spiking_loop(how)
    assert set(range(40, 46)) <= set(skips)  # the guard skipped every spiking step
    # before: each halved the scale (2**10 -> 2**4); a spike is no overflow
    assert scales[-1] == 2.0**10 and set(scales) == {2.0**10}
    assert all(torch.isfinite(p).all() for p in guard.model.parameters())


@pytest.mark.parametrize("how", ["plain", "hook"])
def test_an_overflow_still_halves_the_scale(how):
    scales, skips, _ = spiking_loop(how, spikes=(), nan_at=30)
    assert 30 in skips and scales[29] == 2.0**10 and scales[30] == 2.0**9 == scales[-1]


def test_two_hooked_guards_on_one_scaler_both_give_back_and_detach_in_any_order():
    model = mlp(seed=0)
    opts = [torch.optim.SGD(model[0].parameters(), lr=0.1), torch.optim.SGD(model[2].parameters(), lr=0.1)]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=10_000)
    guards = [hooked_guard(model, o, gg.GuardConfig(recovery=gg.Recovery()), scaler=scaler)
              for o in opts]
    for i, (x, y) in enumerate(batches(50, seed=3)):
        loss = nn.functional.mse_loss(model(x), y)
        scaler.scale(loss).backward()
        if i >= 40:  # both optimizers' gradients spike: each guard skips its own step
            for p in model.parameters():
                p.grad.mul_(1e3)
        for g, o in zip(guards, opts):
            scaler.unscale_(o)
            g.step(loss)
            scaler.step(o)
        scaler.update()
        for o in opts:
            o.zero_grad()
    assert scaler.get_scale() == 2.0**10  # neither guard's skips backed it off
    guards[0].close()  # the first to attach goes first: the wrapper stays for the second
    assert "update" in scaler.__dict__
    guards[1].close()
    assert "update" not in scaler.__dict__ and not any("gradguard" in k for k in scaler.__dict__)


def test_the_hook_gives_the_scalers_update_back_at_detach():
    model, opt = mlp(seed=0), None
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    guard = hooked_guard(model, opt, gg.GuardConfig(), scaler=scaler)
    assert "update" in scaler.__dict__
    guard.close()
    assert "update" not in scaler.__dict__ and scaler.update.__func__ is torch.amp.GradScaler.update


def digits_fp16(factor, seed=0, guarded=True, steps=400, nan_every=None, fused=False):
    """A digits MLP on Adam under fp16 autocast and a GradScaler; batches 100-119
    x``factor``; every ``nan_every``-th batch with a NaN pixel. Returns the held-out loss
    and the guard (and, with ``nan_every``, the final loss scale)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = torch.tensor(d.data, dtype=torch.float32) / 16, torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1400], perm[1400:]
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                          nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused)
    scaler = torch.amp.GradScaler("cpu")
    guard = gg.Guard(model, opt, clip=gg.ZClip(), recovery=gg.Recovery()) if guarded else None
    gen = torch.Generator().manual_seed(seed + 100)
    for step in range(steps):
        idx = train[torch.randint(0, len(train), (64,), generator=gen)]
        xb = x[idx] * (factor if 100 <= step < 120 else 1.0)
        if nan_every and step % nan_every == nan_every - 1:
            xb = xb.clone()
            xb[0, 5] = float("nan")
        with torch.autocast("cpu", dtype=torch.float16):
            loss = nn.functional.cross_entropy(model(xb).float(), y[idx])
        scaler.scale(loss).backward()
        if guard is not None:
            guard.step(loss, scaler=scaler)
        else:
            scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    if guard is not None:
        guard.close()
    with torch.no_grad():
        held_out = nn.functional.cross_entropy(model(x[test]), y[test]).item()
    return (held_out, guard) if nan_every is None else (held_out, guard, scaler.get_scale())


def test_a_stretch_of_x1e4_batches_in_fp16_is_skipped_not_learnt_as_new_data():
    """Found as a stranger: the x1e4 batches overflow fp16 (their loss ~800); classed as
    routine overflows, they went unseen by the ladder, which took them for a change of data
    and trained on them (4.96x the clean run's held-out loss, unguarded 1.93x)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clean, _ = digits_fp16(1.0, guarded=False)
        unguarded, _ = digits_fp16(1e4, guarded=False)
        held_out, guard = digits_fp16(1e4)
    kinds = [e.kind for e in guard.events]
    assert "data_shift" not in kinds
    skipped = {e.step for e in guard.events if e.kind == "skip"}
    assert set(range(100, 120)) <= skipped  # every bad batch skipped, by the scaler or the guard
    routine = [e.step for e in guard.events if e.kind == "skip" and e.severity == "info"
               and 100 <= e.step < 120]
    assert routine == []  # none of them called a routine overflow: their loss was far off
    assert held_out < min(unguarded, 1.3 * clean)


def test_nan_batches_do_not_wear_the_loss_scale_down():
    """A NaN in the data makes the loss NaN: no loss scale causes or cures it, yet each such
    batch halved the scale (torch's own GradScaler does); one batch in 20 for 400 steps took
    2**16 down to 0.06, where fp16 gradients underflow."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, _, bare_scale = digits_fp16(1.0, guarded=False, nan_every=20)
        _, guard, scale = digits_fp16(1.0, nan_every=20)
    assert bare_scale < 0.1
    assert scale >= 2.0**14
    assert sum(e.kind == "skip" and e.severity == "warning" for e in guard.events) == 20
    assert all(torch.isfinite(p).all() for p in guard.model.parameters())


@pytest.mark.parametrize("fused", [False, True])
def test_a_stretch_of_x100_batches_in_fp16_ends_near_the_clean_run(fused):
    """With a fused Adam (the skip flags heard one step late) a routine overflow right after
    the rollback was heard as the restored weights' clean first step, so the x100 batch
    after it was taken for new trouble on them: a second rollback, to before step 0, at
    x0.004 of the LR, and the run ended at chance (18x the clean run's held-out loss)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clean, _ = digits_fp16(1.0, guarded=False, fused=fused)
        unguarded, _ = digits_fp16(100.0, guarded=False, fused=fused)
        held_out, guard = digits_fp16(100.0, fused=fused)
    assert sum(e.kind == "rollback" for e in guard.events) == 1
    assert held_out < min(unguarded, 1.3 * clean)
