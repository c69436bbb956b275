"""Dying units (:mod:`gradguard.units`): the share of a layer's units that stopped getting
any gradient, measured on the device every ``SAMPLE`` steps, and the rollback it triggers
when half of a layer's units died within a hundred steps (an LR too high for the ReLUs,
with no NaN, spike or rise of the loss to tell)."""

from __future__ import annotations

import math

import pytest
import torch
from benchmarks import rescue as R
from benchmarks import rescue_cases as rc
from torch import nn

import gradguard as gg
from gradguard.units import DYING, MIN_UNITS, RECENT, SILENT, UnitWatch, watched


def _watch(width: int = 32) -> tuple[nn.Linear, UnitWatch]:
    layer = nn.Linear(4, width)
    params = list(layer.parameters())
    return layer, UnitWatch(params, watched(layer, params), torch.device("cpu"))


def _sample(layer: nn.Linear, watch: UnitWatch, dead: int | slice | None = None,
            grad: float = 1.0) -> float:
    """One sample with the rows ``dead`` zero; returns the share."""
    layer.weight.grad = torch.full_like(layer.weight, grad)
    if dead is not None:
        layer.weight.grad[dead if isinstance(dead, slice) else slice(0, dead)] = 0.0
    share, at = watch.sample().tolist()
    assert int(at) == 0
    return share


def test_the_watched_weights_are_linear_and_convolution_outputs_wide_enough():
    model = nn.ModuleDict({
        "emb": nn.Embedding(100, 32), "fc": nn.Linear(32, 64), "small": nn.Linear(64, MIN_UNITS - 1),
        "conv": nn.Conv2d(3, 16, 3), "up": nn.ConvTranspose2d(16, 32, 3), "norm": nn.LayerNorm(64),
    })
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    assert [names[i] for i in watched(model, params)] == ["fc.weight", "conv.weight"]


def test_a_unit_is_dead_after_SILENT_silent_samples_having_had_a_gradient():
    layer, watch = _watch()
    assert _sample(layer, watch) == 0.0
    shares = [_sample(layer, watch, dead=8) for _ in range(SILENT + 1)]
    assert shares == [0.0] * (SILENT - 1) + [0.25, 0.25]
    assert _sample(layer, watch) == 0.0  # a gradient again: alive


def test_a_unit_that_came_back_from_a_silence_needs_twice_as_long_next_time():
    """On batches of one a unit firing on a fifth of the inputs is silent on three samples
    half the time (up to 45% of a healthy digits MLP's layer on Adam); one that came back
    from ``s`` silent samples is dead after ``2 s + 1``."""
    layer, watch = _watch()
    _sample(layer, watch)
    assert [_sample(layer, watch, dead=16) for _ in range(SILENT)][-1] == 0.5
    assert _sample(layer, watch) == 0.0  # back: it was sparse, not dead
    shares = [_sample(layer, watch, dead=16) for _ in range(2 * SILENT + 1)]
    assert shares == [0.0] * (2 * SILENT) + [0.5]


def test_a_vanishing_gradient_is_no_dead_unit():
    """A row of 1e-30s (a deep network's vanishing gradient: its squares underflow float32)
    is a gradient; only an exact zero is silence."""
    layer, watch = _watch()
    _sample(layer, watch, grad=1e-30)
    assert [_sample(layer, watch, dead=8, grad=1e-30) for _ in range(SILENT)][-1] == 0.25


def test_units_dead_from_the_start_are_not_this_runs():
    layer, watch = _watch()
    shares = [_sample(layer, watch, dead=16) for _ in range(SILENT + 2)]
    assert shares == [0.0] * (SILENT + 2)


def test_a_sample_without_any_gradient_for_a_weight_tells_nothing():
    layer, watch = _watch()
    _sample(layer, watch)
    for _ in range(SILENT + 2):
        layer.weight.grad = None
        assert watch.sample().tolist()[0] == 0.0
        _sample(layer, watch, grad=0.0)  # every row zero: no gradient reached it at all
    assert _sample(layer, watch, dead=4) == 0.0  # the silent count starts here


def test_non_finite_rows_are_no_dead_units():
    layer, watch = _watch()
    _sample(layer, watch)
    for _ in range(SILENT + 1):
        assert _sample(layer, watch, dead=8, grad=math.nan) == 0.0


def test_a_non_finite_row_beside_finite_ones_is_no_silence():
    layer, watch = _watch()
    _sample(layer, watch)
    for _ in range(SILENT + 1):
        layer.weight.grad = torch.ones_like(layer.weight)
        layer.weight.grad[:8] = math.nan  # a step skipped for its NaN rows
        assert watch.sample().tolist()[0] == 0.0
    assert int(watch.silent.max()) == 0


def test_units_that_died_more_than_RECENT_samples_ago_drop_out():
    layer, watch = _watch()
    _sample(layer, watch)
    shares = [_sample(layer, watch, dead=16) for _ in range(RECENT + 2)]
    assert shares[SILENT - 1:RECENT] == [0.5] * (RECENT - SILENT + 1)
    assert shares[RECENT:] == [0.0, 0.0]


def test_a_slow_attrition_never_looks_like_dying():
    """A run that loses units a few at a time (a long run's ReLUs, a sparse autoencoder's
    latents): 2 of 64 every ten samples, 90% of them dead in the end, never half of them
    within ``RECENT`` samples."""
    layer, watch = _watch(64)
    _sample(layer, watch)
    shares = [_sample(layer, watch, dead=2 * (i // 10)) for i in range(300)]
    assert max(shares) < DYING / 2 and 2 * (299 // 10) / 64 > 0.9


def test_reset_and_state_dict():
    layer, watch = _watch()
    _sample(layer, watch)
    for _ in range(SILENT):
        _sample(layer, watch, dead=8)
    sd = watch.state_dict()
    other = _watch()[1]
    other.load_state_dict(sd)
    assert torch.equal(other.silent, watch.silent) and torch.equal(other.alive, watch.alive)
    wider = _watch(48)[1]
    wider.load_state_dict(sd)  # saved for other weights: counted afresh
    assert not wider.alive.any()
    watch.reset()
    assert _sample(layer, watch, dead=8) == 0.0


def test_the_guard_samples_every_SAMPLE_steps_into_its_window():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = gg.Guard(model, opt, every=25)
    for _ in range(25):
        loss = model(torch.randn(16, 8)).pow(2).mean()
        loss.backward()
        guard.step(loss)
        opt.zero_grad()
    window = guard.last_window
    sampled = [s for s, x in zip(window.steps, window.dying.tolist()) if not math.isnan(x)]
    assert sampled == [0, 10, 20]
    assert window.units_dying() == (0.0, "0.weight")


def test_a_restore_drops_the_windows_samples_of_the_weights_it_replaced():
    """Found by a stranger: OneCycle at 30x its LR, a spike at step 100 killed 61% of the
    first layer's units, a rollback at 102 (a streak of skips, between flushes) restored
    step 49's weights, and the flush at 109 read step 100's sample of the replaced weights:
    a second rollback, to the fresh weights with the LR cut x0.1 more, ended 22x its
    healthy twin (0.073 now, as the twin). A restore counts the units afresh and leaves
    the window no sample from before it."""
    from gradguard.recovery.actions import restore, snapshot_state

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = gg.Guard(model, opt, every=40)
    snap = None
    for step in range(40):
        loss = model(torch.randn(16, 8)).pow(2).mean()
        loss.backward()
        if step == 5:
            snap = snapshot_state(guard, step)
        if step == 22:
            restore(guard, snap)
            assert not guard.telemetry.units.alive.any()  # counted afresh
        guard.step(loss)
        opt.zero_grad()
    window = guard.last_window
    sampled = [s for s, x in zip(window.steps, window.dying.tolist()) if not math.isnan(x)]
    assert sampled == [30]  # steps 0, 10 and 20 were sampled on the weights replaced


def test_units_that_died_in_weights_an_undone_rollback_put_back_are_still_dying():
    """Found by a regression hunt: an LR x30 burst (steps 100-114, SGD) killed 85% of a
    digits MLP's first layer; a storm of x100 inputs at 120-127 made a rollback at 125
    that the next step undid (the batches at fault), putting those weights back, and the
    unit watch, counting afresh at each restore, never told their units dead: 2.1-4.0x the
    twin. The weights put back keep the counts they had; the dying-units rollback comes."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16
    y = torch.tensor(d.target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                          nn.Linear(128, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    guard = gg.Guard(model, opt, clip=gg.ZClip(), recovery=gg.Recovery())
    g = torch.Generator().manual_seed(1000)
    for step in range(200):
        i = torch.randint(0, 1400, (64,), generator=g)
        xb = x[i] * (100 if 120 <= step < 128 else 1)
        opt.param_groups[0]["lr"] = 0.05 * (30 if 100 <= step < 115 else 1)
        loss = nn.functional.cross_entropy(model(xb), y[i])
        opt.zero_grad()
        loss.backward()
        guard.step(loss)
    acts = [(a.kind, a.step) for a in guard.recovery.decisions]
    undone = next(s for k, s in acts if k == "data")  # the storm's rollback undone
    assert any(k == "rollback" and s > undone for k, s in acts), acts  # for the dead units
    with torch.no_grad():
        dead = ((model[0](x) > 0).sum(0) == 0).float().mean().item()
    assert dead < 0.25, dead  # 85% without that rollback


def _regression(recipe: rc.Recipe, seed: int = 0, guarded: bool = True) -> R.Outcome:
    return R.train(rc.REGRESSION_MLP, recipe, 300, guarded=guarded, seed=seed)


@pytest.fixture
def no_growth(monkeypatch):
    """The early-growth rule off (:mod:`gradguard.recovery.growth`): these runs' weights
    grow past 2x by step 20, and it rolls them back before any unit dies."""
    monkeypatch.setitem(R.RECOVERY_OPTIONS, "early_growth", False)


def test_a_regression_mlp_whose_relus_die_at_sgd_10x_is_rolled_back_and_trains(no_growth):
    """benchmarks/rescue.py's ``held_out_regression_sgd_lr10``: SGD with momentum at 10x the
    LR that trains kills 80% of the second layer's units by step 10 and all of them by 70;
    the loss goes on falling (no NaN, no spike, no rise to act on: the guard without the
    unit watch left it alone, 10.7x its twin). Half of them dead: rolled back to the
    weights before the first step, at a lower LR."""
    fast = rc.Recipe(torch.optim.SGD, 0.3, {"momentum": 0.9})
    twin = _regression(rc.Recipe(torch.optim.SGD, 0.03, {"momentum": 0.9}), guarded=False)
    bare = _regression(fast, guarded=False)
    out = _regression(fast)
    assert bare.eval_loss > 5 * twin.eval_loss
    died = [e for e in out.events if e.kind == "rollback" and "died" in e.message]
    assert died and died[0].step < 60 and "before the first step" in died[0].message
    assert "`2`" in died[0].message  # the layer whose units died
    assert out.params_finite and out.eval_loss < 2 * twin.eval_loss
    assert out.lr_ceiling < 1.0


@pytest.mark.parametrize("recipe", [
    rc.Recipe(torch.optim.AdamW, 1e-2),  # its twin: 17% of a layer's units die, in no hurry
    rc.Recipe(torch.optim.SGD, 0.03, {"momentum": 0.9}),
], ids=["adamw", "sgd"])
def test_a_healthy_relu_mlp_losing_a_few_units_is_left_alone(recipe):
    out = _regression(recipe)
    assert not out.decisions and not any(e.severity != "info" for e in out.events)
    bare = _regression(recipe, guarded=False)
    assert out.eval_loss == pytest.approx(bare.eval_loss, rel=0.02)


def test_a_cnn_whose_channels_die_on_fused_adam_at_10x_is_rolled_back(no_growth):
    """The fused path (skip flags on the device): the digits CNN on fused Adam at 10x loses
    75% of a convolution's channels by step 10 and trained on to 2.6x its twin (seed 1)
    under the guard without the unit watch."""
    fast = rc.Recipe(torch.optim.Adam, 0.03, {"fused": True})
    twin = R.train(rc.DIGITS_CNN, rc.Recipe(torch.optim.Adam, 3e-3, {"fused": True}), 300,
                   guarded=False, seed=1)
    out = R.train(rc.DIGITS_CNN, fast, 300, guarded=True, seed=1)
    died = [e for e in out.events if e.kind == "rollback" and "died" in e.message]
    assert died and died[0].step < 60
    assert out.params_finite and out.eval_loss < 2 * twin.eval_loss


def test_dying_units_in_a_lightning_trainer_roll_back_the_same_way(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from gradguard.events import read_jsonl
    from gradguard.integrations.lightning import GradGuardCallback

    class Regression(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = rc.REGRESSION_MLP.model()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.3, momentum=0.9)

    xs, ys = zip(*(rc.regression_batches(0)(s) for s in range(120)))
    data = torch.utils.data.TensorDataset(torch.cat(xs), torch.cat(ys))
    loader = torch.utils.data.DataLoader(data, batch_size=64)
    cb = GradGuardCallback(run_dir=tmp_path / "run", report=False,
                           recovery=gg.Recovery(early_growth=False))  # see no_growth
    trainer = pl.Trainer(max_steps=120, callbacks=[cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, accelerator="cpu")
    trainer.fit(Regression(), loader)
    rolled = [e for e in read_jsonl(tmp_path / "run" / "events.jsonl") if e["kind"] == "rollback"]
    assert rolled and "died" in rolled[0]["message"] and rolled[0]["step"] < 60
    assert "before the first step" in rolled[0]["message"]


def test_units_that_die_as_the_network_learns_changed_batches_are_the_changes_doing():
    """``benchmarks/curriculum.py``: every label shifted by 3 at step 300 (SGD); the guard
    finds the batches changed at step 359 (a rollback's weights give the new loss), and 62%
    of the first layer's units die as the network learns the new task. Found when the unit
    watch was new: it rolled back at step 409 to the weights from before the change (no
    snapshot since), whose loss on the new batches spiked, two more rollbacks, an abort
    (held-out 12.0 against 0.42 unguarded). Deaths so soon after a change, or with nothing
    since it to go back to, are the change's doing: no rollback."""
    from benchmarks import curriculum

    out = curriculum.run("permute", "sgd", 0, 900, guarded=True)
    assert out["stopped"] is None
    assert out["rungs"] == [["lr_backoff", 300], ["rollback", 349], ["data_shift", 359]]
    bare = curriculum.run("permute", "sgd", 0, 900, guarded=False)
    assert out["held_out"] < 1.1 * bare["held_out"]
