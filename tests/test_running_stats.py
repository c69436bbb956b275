"""A skipped step's forward already moved the batch norm running statistics: the guard puts
them back (gradguard/_running.py). Against a reference loop that never saw the bad batch."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradguard as gg


def bn_model(momentum=0.1):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16, momentum=momentum), nn.ReLU(),
                         nn.Linear(16, 3))


def batches(n=12):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g))
            for _ in range(n)]


def make_opt(model, kind):
    return torch.optim.Adam(model.parameters(), lr=1e-2, **({} if kind == "plain" else {kind: True}))


def run(kind, fault=None, at=6, guarded=True, momentum=0.1, **guard_kw):
    model = bn_model(momentum)
    opt = make_opt(model, kind)
    guard = gg.Guard(model, opt, clip=None, **guard_kw) if guarded else None
    for step, (x, y) in enumerate(batches()):
        if step == at and fault is not None:
            if fault == "drop":
                continue  # the reference: the bad batch never reached the model
            x = x.clone()
            if fault == "scale":  # the whole batch in other units
                x = 1e4 * x
            else:
                x[0, 0] = math.nan if fault == "nan" else 1e4 * x[0, 0]
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if guard is not None:
            guard.step(loss)
        else:
            opt.step()
        opt.zero_grad()
    if guard is not None:
        guard.close()
    return model


def same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("kind", ["plain", "foreach", "fused"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_a_skipped_nan_batch_leaves_the_running_statistics_as_if_never_seen(kind, momentum):
    guarded = run(kind, "nan", momentum=momentum)
    bn = guarded[1]
    assert torch.isfinite(bn.running_mean).all() and torch.isfinite(bn.running_var).all()
    assert same_state(guarded, run(kind, "drop", guarded=False, momentum=momentum))
    guarded.eval()
    assert torch.isfinite(guarded(torch.randn(4, 8))).all()  # eval() answers, not NaN


def test_without_the_guard_the_nan_batch_poisons_them_for_good():
    """What the fix is for: the reference loop with the NaN batch and a manual skip of the
    optimizer step (the usual ``if not torch.isfinite(loss): continue`` after backward)."""
    model = bn_model()
    opt = make_opt(model, "plain")
    for step, (x, y) in enumerate(batches()):
        if step == 6:
            x = x.clone()
            x[0, 0] = math.nan
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if torch.isfinite(loss):
            opt.step()
        opt.zero_grad()
    assert not torch.isfinite(model[1].running_mean).all()


class Skip(nn.Module):
    """A batch norm branch and a linear skip path: x1e4 inputs are normalised away in the
    branch (its running variance takes them in) and make the skip path's gradient spike."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.bn, self.head = nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 3)
        self.skip = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.lin(x)))) + self.skip(x)


def test_a_spike_skipped_at_its_step_puts_back_the_variance_it_inflated():
    """A x1e4 input batch, skipped as a gradient spike by the recovery's per-step verdict,
    would leave a running variance ~1e7 times too large."""
    model = Skip()
    opt = make_opt(model, "plain")
    guard = gg.Guard(model, opt, clip=None, recovery=gg.Recovery())
    for step, (x, y) in enumerate(batches(60)):
        if step == 50:
            x = x * 1e4
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if step == 50:
            inflated = model.bn.running_var.max().item()
        guard.step(loss)
        opt.zero_grad()
        if step == 49:
            before = model.bn.running_var.clone()
        if step == 50:
            after = model.bn.running_var.clone()
    guard.close()
    assert [e.step for e in guard.events if e.kind == "skip"] == [50]
    assert inflated > 1e5 and torch.equal(after, before)


@pytest.mark.parametrize("kind", ["plain", "fused"])
def test_an_offscale_batch_behind_batch_norm_is_skipped_as_if_never_seen(kind):
    """A x1e4 batch whose scale the batch norm layer divides out: its loss and gradients
    are a sound batch's, only the running variance takes the scale in (1e7 times too large
    for ``eval()``). The Recovery skips the step by the statistics alone (``OFFSCALE``):
    weights, optimizer and statistics end as in the loop that never saw the batch."""
    guard_kw = {"recovery": gg.Recovery()}
    guarded = run(kind, "scale", **guard_kw)
    assert same_state(guarded, run(kind, "drop", guarded=False))
    unguarded = run(kind, "scale", guarded=False)
    assert unguarded[1].running_var.max() > 1e5 > guarded[1].running_var.max() * 1e3

    model = bn_model()
    guard = gg.Guard(model, make_opt(model, kind), clip=None, **guard_kw)
    for step, (x, y) in enumerate(batches()):
        nn.functional.cross_entropy(model(1e4 * x if step == 6 else x), y).backward()
        guard.step()
        guard.optimizer.zero_grad()
    guard.close()
    [skip] = [e for e in guard.events if e.kind == "skip"]
    assert skip.step == 6 and skip.severity == "warning"
    assert skip.data["reason"] == "offscale_batch" and skip.data["cause"] == "unscaled_input"
    assert "another scale" in skip.message


def offscale_run(bad, steps=20, **recovery):
    model = bn_model()
    guard = gg.Guard(model, make_opt(model, "plain"), clip=None,
                     recovery=gg.Recovery(**recovery))
    for step, (x, y) in enumerate(batches(steps)):
        nn.functional.cross_entropy(model(1e4 * x if step in bad else x), y).backward()
        guard.step()
        guard.optimizer.zero_grad()
    guard.close()
    return model, guard


def test_three_offscale_batches_in_a_row_back_the_lr_off_until_the_next_step_proves_them():
    """For the ladder they are skips the weights cannot cause unseen, like non-finite ones:
    three in a row back the LR off, and the next step, clean on the same weights (a
    skipped step changes none), undoes it. Without the Recovery's per-step verdict
    (``skip_spikes=False``) nothing is skipped and the statistics take the scale in."""
    model, guard = offscale_run((10, 11, 12))
    [backoff] = [e for e in guard.events if e.kind == "lr_backoff"]
    [undone] = [e for e in guard.events if e.kind == "unscaled_input"]
    assert guard.skipped_steps == 3 and (backoff.step, undone.step) == (12, 13)
    assert "3 consecutive off-scale steps skipped" in backoff.message
    assert undone.data["undone"] and "3 off-scale step(s) before it is clean" in undone.message
    assert guard.recovery.lr_factor == 1.0 and model[1].running_var.max() < 10
    model, guard = offscale_run((10, 11, 12), skip_spikes=False)
    assert guard.skipped_steps == 0 and not [e for e in guard.events if e.kind == "lr_backoff"]
    assert model[1].running_var.max() > 1e5


def test_a_stretch_of_offscale_batches_is_the_batches_fault_after_one_rollback():
    """A shard on another scale (30 batches in a row, after the snapshot of step 49): a
    back-off, a rollback, and the first batch on the restored weights is off-scale too:
    the batches are at fault (``unscaled_input``), the rest is skipped with nothing else,
    and the statistics never take the scale in."""
    model, guard = offscale_run(range(60, 90), steps=110)
    kinds = [(e.kind, e.step) for e in guard.events
             if e.kind in ("lr_backoff", "rollback", "unscaled_input", "abort")]
    assert kinds == [("lr_backoff", 62), ("rollback", 65), ("unscaled_input", 66)]
    assert guard.skipped_steps == 30 and model[1].running_var.max() < 10
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_offscale_steps_on_weights_an_lr_too_high_wrecked_cap_the_lr_at_their_rollback():
    """timm's ResNet-18 (the zoo's copy, width 16) on 32-pixel digits at SGD 3.0: its first
    updates blow the activations up, so from step 5 every batch moves a batch norm
    layer's running variance by x3 and more, its loss only 2x. Three skips back the LR off;
    the step after, on the same weights, is off-scale too: not the batches, the weights.
    The rollback to the weights before the first step cut the LR there only for the steps
    of its restore, then restored the LR that wrecked them in full; it now caps the ceiling
    by the size of the first update from those weights, as for a wreck found by its loss."""
    from sklearn.datasets import load_digits
    from tests.zoo.real.nets import TimmResNet

    d = load_digits()
    x = torch.tensor(d.data[:512], dtype=torch.float32) / 16
    img = nn.functional.interpolate(((x - 0.3) / 0.4).view(-1, 1, 8, 8), size=32).repeat(1, 3, 1, 1)
    y = torch.tensor(d.target[:512])
    torch.manual_seed(0)
    model = TimmResNet(width=16)
    opt = torch.optim.SGD(model.parameters(), lr=3.0, momentum=0.9, weight_decay=5e-5)
    guard = gg.Guard(model, opt, clip=gg.ZClip(), recovery=gg.Recovery())
    gen = torch.Generator().manual_seed(100)
    for _ in range(12):
        idx = torch.randint(0, len(y), (32,), generator=gen)
        loss = nn.functional.cross_entropy(model(img[idx]), y[idx])
        loss.backward()
        guard.step(loss)
        opt.zero_grad()
    guard.close()
    skips = [e.step for e in guard.events if e.kind == "skip"]
    [backoff] = [e for e in guard.events if e.kind == "lr_backoff"]
    [rollback] = [e for e in guard.events if e.kind == "rollback"]
    assert skips[:6] == list(range(skips[0], skips[0] + 6)) and backoff.step == skips[2]
    assert "off-scale steps skipped" in rollback.message
    assert "the first update from the weights restored moved them by" in rollback.message
    assert rollback.data["ceiling"] < 0.1  # not 1.0, restored in full
    assert guard.recovery.lr_ceiling == rollback.data["ceiling"]
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("bs", [8, 64])
def test_healthy_batch_norm_runs_are_never_offscale(bs):
    """Unnormalised inputs (x255: the first batches move the running variance from its
    initial 1 by a factor of hundreds, before ``OFFSCALE_AFTER``), small batches, a CNN:
    no step is skipped in 300."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x_all = torch.tensor(digits.data, dtype=torch.float32).view(-1, 1, 8, 8) * 16
    y_all = torch.tensor(digits.target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Flatten(), nn.Linear(16 * 64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    guard = gg.Guard(model, opt, clip=gg.ZClip(), recovery=gg.Recovery())
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        i = torch.randint(0, len(x_all), (bs,), generator=g)
        loss = nn.functional.cross_entropy(model(x_all[i]), y_all[i])
        loss.backward()
        guard.step(loss)
        opt.zero_grad()
    guard.close()
    assert guard.skipped_steps == 0 and loss.item() < 1.0
    assert not [e for e in guard.events if e.severity != "info"]


def test_the_scale_test_weighs_a_layer_not_a_channel():
    """A channel whose variance was ~0 (its inputs dead) and comes back moves its own
    running variance by any factor, not its layer's; the whole layer x1e3 is off-scale.
    Before ``OFFSCALE_AFTER`` batches nothing is."""
    from gradguard._running import OFFSCALE_AFTER, RunningStats

    bn = nn.BatchNorm1d(16)
    stats = RunningStats(bn)
    assert not stats.offscale(torch.device("cpu"))  # a fresh layer: its initial variance
    with torch.no_grad():
        bn.num_batches_tracked.fill_(OFFSCALE_AFTER)
        bn.running_var[0] = 1e-9
        stats.refresh()
        bn.running_var[0] = 0.5
        assert not stats.offscale(torch.device("cpu"))
        bn.running_var.mul_(1e3)
        assert stats.offscale(torch.device("cpu"))
    assert RunningStats(nn.Linear(2, 2)).offscale(torch.device("cpu")) is None


@pytest.mark.parametrize("momentum, moved, off", [
    (0.1, 2.5, False), (0.1, 3.5, True),  # the default: x3 the running variance
    (0.997, 5.0, False), (0.997, 30.0, True),  # the last batch's: x21 (OFFSCALE_BATCH)
    (None, 3.5, True),  # a cumulative average: x3, however little a batch moves it now
])
def test_the_scale_test_allows_for_the_momentum(momentum, moved, off):
    """A layer whose momentum is near 1 keeps the last batch's statistics (transformers'
    MobileNetV2: 0.997), and small batches differ by x2.5 from one to the next: it takes
    a batch off-scale at the variance the default momentum's x3 stands for."""
    from gradguard._running import OFFSCALE_AFTER, RunningStats

    bn = nn.BatchNorm1d(16, momentum=momentum)
    stats = RunningStats(bn)
    with torch.no_grad():
        bn.num_batches_tracked.fill_(OFFSCALE_AFTER)
        stats.refresh()
        bn.running_var.mul_(moved)
    assert bool(stats.offscale(torch.device("cpu"))) is off


def test_a_step_taken_keeps_the_statistics_its_forward_wrote():
    guarded = run("plain")
    assert same_state(guarded, run("plain", guarded=False))


def test_a_model_without_norm_layers_and_a_lazy_one():
    model = nn.Sequential(nn.Linear(8, 3))
    guard = gg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), clip=None)
    assert guard._running.buffers == []
    lazy = nn.Sequential(nn.Linear(8, 16), nn.LazyBatchNorm1d(), nn.Linear(16, 3))
    lazy(torch.randn(4, 8))  # materialised by a dry run, as lazy modules require
    g2 = gg.Guard(lazy, torch.optim.SGD(lazy.parameters(), lr=0.1), clip=None)
    assert len(g2._running.buffers) == 3
    still = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16, track_running_stats=False))
    assert gg.Guard(still, torch.optim.SGD(still.parameters(), lr=0.1))._running.buffers == []


@pytest.mark.parametrize("kind", ["plain", "fused"])
def test_a_model_cast_after_the_guard_was_built_is_followed(kind):
    """``model.double()`` (or ``.to(device)``) after ``Guard(...)`` keeps the parameters
    but replaces the buffers: the statistics are collected anew, nothing mixes the old
    tensors with the new (on the fused path a ``torch.where`` across dtypes or devices
    would raise), and a NaN batch after that is still put back."""
    model = bn_model()
    opt = make_opt(model, kind)
    guard = gg.Guard(model, opt, clip=None)
    model.double()
    for step, (x, y) in enumerate(batches()):
        x = x.double()
        if step == 6:
            x[0, 0] = math.nan
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        guard.step(loss)
        opt.zero_grad()
    guard.close()
    bn = model[1]
    assert bn.running_mean.dtype == torch.float64 and guard._running.buffers[0] is bn.running_mean
    assert torch.isfinite(bn.running_mean).all() and torch.isfinite(bn.running_var).all()


def test_statistics_a_skipped_nan_forward_left_are_put_back(tmp_path):
    """Found by a stranger: a loop that skips a non-finite loss before backward (a common
    pattern) had its batch norm statistics NaN from that forward already; the guard never
    saw the step, the model gave NaN in eval() and the run read "healthy". A running
    variance that turned NaN/Inf since the last step skips the next step, and the
    statistics go back to those of the step before."""
    from gradguard.lab._data import minibatches, split_digits

    xtr, ytr, xte, yte = split_digits()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    guard = gg.Guard(model, opt, clip=gg.ZClip(), recovery=gg.Recovery(),
                     sinks=[gg.JsonlSink(tmp_path)])
    batch = minibatches(xtr, ytr, 64, 0)
    for step in range(120):
        x, y = batch(step)
        if step == 50:
            x = x.clone()
            x[0, 0] = math.nan
        loss = nn.functional.cross_entropy(model(x), y)
        if not torch.isfinite(loss):
            continue  # the loop's own skip: the forward has run
        opt.zero_grad()
        loss.backward()
        guard.step(loss)
    guard.close()
    assert all(torch.isfinite(b).all() for b in model.buffers())
    [skip] = [e for e in guard.events if e.kind == "skip"]
    assert skip.step == 50 and "NaN/Inf" in skip.message
    assert skip.data["cause"] == "nonfinite_input" and "unit" not in skip.remedy
    from gradguard.report import load_run
    from gradguard.report._summary import summary_sentence

    sentence = summary_sentence(load_run(tmp_path))
    assert "running statistics NaN/Inf" in sentence and "No gradient trouble" not in sentence
    model.eval()
    with torch.no_grad():
        assert float(nn.functional.cross_entropy(model(xte), yte)) < 1.0
