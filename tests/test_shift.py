"""Batches that change are no damage: the weights a rollback restored give the trouble's
loss, and the guard learns the new level instead of rolling back until it stops the run
(``gradguard.recovery.shift``)."""

from __future__ import annotations

import math

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

import gradguard as gg
from gradguard.executors import STALE
from gradguard.recovery import shift as shift_mod
from gradguard.recovery.shift import SHIFT_STEPS, Shift, ShiftTest
from gradguard.report import load_run
from gradguard.report._outcome import judge
from gradguard.report._summary import summary_sentence


# ---- the test itself -----------------------------------------------------------------
def test_restored_weights_at_their_saved_level_are_no_shift():
    t = ShiftTest()
    t.update(range(10), [1.0] * 10)
    t.arm(10, 5, 0.9)
    assert t.update(range(10, 10 + SHIFT_STEPS), [1.0, 1.1, 0.95]) is None
    assert t.armed is None  # judged once


def test_restored_weights_at_the_troubles_level_are_a_shift():
    t = ShiftTest()
    t.update(range(10), [0.01] * 5 + [5.0] * 5)
    t.arm(10, 3, 0.01)
    assert t.update([10, 11], [5.5, 6.0]) is None  # waits for SHIFT_STEPS losses
    found = t.update([12, 13, 14], [5.2, 4.0, 6.5])
    assert found == Shift(14, 3, 0.01, 5.5, 5.0) and t.found == found


def test_a_stretch_of_bad_batches_that_ended_after_the_rollback_is_no_shift():
    t = ShiftTest()
    t.update(range(10), [0.01] * 5 + [5.0] * 5)
    t.arm(10, 3, 0.01)
    # the stretch outlasted the restore by three steps, then the batches were sound again
    assert t.update(range(10, 20), [5.0] * 3 + [0.01] * 7) is None


def test_losses_before_the_restore_in_the_same_window_are_the_troubles_level():
    t = ShiftTest()
    t.update(range(10), [0.01] * 10)  # the flush before the trouble
    t.arm(15, 3, 0.01)  # a rollback at a step, before the next flush
    found = t.update(range(10, 20), [0.01, 5.0, 5.0, 5.0, 5.0, 4.0, 4.0, 4.0, 4.0, 4.0])
    assert found is not None and found.before == 5.0 and found.after == 4.0


def test_restored_weights_that_blow_up_again_are_no_shift():
    """An LR still too high at the backed-off factor wrecks the restored weights again
    within the window: their first losses were at the saved level."""
    t = ShiftTest()
    t.update(range(10), [9.0] * 10)
    t.arm(10, 3, 1.0)
    assert t.update(range(10, 20), [1.0, 1.0, 1.1] + [9.0] * 7) is None


def test_a_rollback_that_helped_is_no_shift():
    t = ShiftTest()
    t.update(range(10), [5.0] * 10)
    t.arm(10, 3, 0.1)
    # 5x the saved level, yet a tenth of the trouble's: the restored weights are better
    assert t.update(range(10, 13), [0.5] * 3) is None


def test_no_ratio_scale_for_losses_that_can_be_negative():
    t = ShiftTest()
    t.update(range(10), [-1.0] * 10)
    t.arm(10, 3, 0.5)
    assert t.update(range(10, 13), [-2.0] * 3) is None
    t.arm(20, 3, None)  # a snapshot of unknown level: no test
    assert t.armed is None


def test_a_voided_step_computed_its_loss_before_the_restore():
    t = ShiftTest()
    t.update(range(10), [5.0] * 10)
    t.arm(10, 3, 0.1)
    # step 10's update was voided (a trainer's hook restored after its backward): its
    # loss is the replaced weights'; the restored weights give 0.1
    assert t.update(range(10, 14), [5.0, 0.1, 0.1, 0.1], [STALE, 0, 0, 0]) is None


def test_state_round_trip_mid_test():
    t = ShiftTest()
    t.update(range(10), [0.01] * 5 + [5.0] * 5)
    t.arm(10, 3, 0.01)
    t.update([10], [5.5])
    u = ShiftTest()
    u.load_state_dict(t.state_dict())
    assert u.update([11, 12], [6.0, 5.2]) == Shift(12, 3, 0.01, 5.5, 5.0)


# ---- in a training loop ------------------------------------------------------------------
_X, _Y = load_digits(return_X_y=True)
_X = torch.tensor(_X, dtype=torch.float32) / 16
_Y = torch.tensor(_Y)
TRAIN, HELD = slice(0, 1400), slice(1400, None)


def _curriculum(guarded: bool, *, steps: int = 600, change: int = 250, seed: int = 0,
                corrupt: int | None = None, run_dir=None, width: int = 128, batch: int = 64):
    """A digits MLP on Adam: classes 0-4 until ``change``, all ten from there (a
    curriculum's next stage); ``corrupt``: instead of the change, the first layer's
    weights x50 at that step (damage, no change of data). Returns the held-out loss on
    all classes (None: stopped) and the guard."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                          nn.Linear(width, 10))
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    sinks = [gg.JsonlSink(run_dir)] if run_dir is not None else None
    guard = gg.Guard(model, opt, clip=gg.ZClip(), recovery=gg.Recovery(),
                     sinks=sinks) if guarded else None
    g = torch.Generator().manual_seed(seed)
    x_all, y_all = _X[TRAIN], _Y[TRAIN]
    first = (y_all < 5).nonzero().squeeze(1)
    every = torch.arange(len(y_all))
    try:
        for step in range(steps):
            pool = first if corrupt is None and step < change else every
            i = pool[torch.randint(len(pool), (batch,), generator=g)]
            if corrupt is not None and step == corrupt:
                with torch.no_grad():
                    model[0].weight.mul_(50)
            loss = nn.functional.cross_entropy(model(x_all[i]), y_all[i])
            loss.backward()
            guard.step(loss) if guard is not None else opt.step()
            opt.zero_grad()
    except gg.TrainingDiverged:
        return None, guard
    finally:
        if guard is not None:
            guard.close()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with torch.no_grad():
        return nn.functional.cross_entropy(model(_X[HELD]), _Y[HELD]).item(), guard


def test_a_curriculums_next_stage_is_learnt_not_rolled_back_until_the_run_stops(tmp_path):
    plain, _ = _curriculum(False)
    held, guard = _curriculum(True, run_dir=tmp_path)
    kinds = [e.kind for e in guard.events]
    shifted = [e for e in guard.events if e.kind == "data_shift"]
    assert held is not None and len(shifted) == 1, kinds
    e = shifted[0]
    assert e.step > 250 and e.data["snapshot_step"] < 250
    assert e.data["snapshot_level"] < 0.1 and e.data["level_after"] > 1.0
    assert "batches" in e.message and "changed" in e.message
    assert kinds.count("rollback") == 1 and "abort" not in kinds
    assert "loss_level_off" not in kinds  # the loss tests stay on for the rest of the run
    rec = guard.recovery
    assert rec.lr_ceiling == 1.0 and rec.lr_factor == 1.0  # the LR is the user's again
    assert not rec.state.level_off and rec.state.rollbacks == 0
    assert held <= 1.3 * plain, (held, plain)
    # the run's verdict: the levels before the change judge nothing after it
    data = load_run(tmp_path)
    out = judge(data)
    assert out.status == "unjudged" and out.ok and "batches changed" in out.clause
    # dated where the change came (its first warning), not where it was found
    assert "change at step 250," in (out.remedy or "") and e.step > 250
    assert "batches changed" in summary_sentence(data)


def test_without_the_test_the_change_is_found_in_the_batches_and_learnt(monkeypatch):
    """What the test changes, now that spikes on restored weights are the batches' fault:
    with it off, the first rollback's restored weights spike on the new batches too, the
    batches are found at fault (their loss spikes are theirs, not a trouble to roll back
    from again), the per-step statistics learn the new level within a few skipped steps,
    and the run learns the change at its own LR. Before that finding existed it cost three
    rollbacks and the run was stopped."""
    monkeypatch.setattr(shift_mod, "SHIFT_RATIO", math.inf)
    plain, _ = _curriculum(False)
    held, guard = _curriculum(True)
    kinds = [e.kind for e in guard.events]
    found = [e for e in guard.events if "the batches are at fault" in e.message]
    assert "data_shift" not in kinds and kinds.count("rollback") == 1 and len(found) == 1, kinds
    assert held is not None and "abort" not in kinds
    assert guard.recovery.lr_ceiling == 1.0 and guard.recovery.lr_factor == 1.0
    assert held <= 1.3 * plain, (held, plain)


def test_damaged_weights_are_rolled_back_not_taken_for_new_data():
    """Weights wrecked in place (x50 in the first layer) with the batches unchanged: the
    restored weights give their saved level, no shift, and the run is back at its
    level."""
    plain, _ = _curriculum(False, corrupt=None, change=0)
    held, guard = _curriculum(True, corrupt=250)
    kinds = [e.kind for e in guard.events]
    assert held is not None and "rollback" in kinds and "data_shift" not in kinds, kinds
    assert held <= 1.3 * plain, (held, plain)


@pytest.mark.parametrize("seed", [1, 2])
def test_other_seeds_learn_the_change_too(seed):
    plain, _ = _curriculum(False, seed=seed)
    held, guard = _curriculum(True, seed=seed)
    kinds = [e.kind for e in guard.events]
    assert held is not None and "data_shift" in kinds and "abort" not in kinds, kinds
    assert held <= 1.3 * plain, (held, plain)


@pytest.mark.parametrize("seed", [0, 1])
def test_a_change_learnt_before_the_rollback_is_kept_when_the_batches_prove_changed(seed):
    """A smaller net on smaller batches: the change's gradients are clipped, not skipped,
    the loss spike backs the LR off, and the weights learn the new classes for 50 steps
    (the loss from 5.8 to about 1) before the progress check, asking the loss back at the
    old stage's level, rolls back. The restored weights give the trouble's loss on the new
    batches, far above the weights before it: those are put back (found by a stranger:
    1.34-1.43x the unguarded held-out loss, 50 steps of the new classes thrown away)."""
    kw = dict(steps=800, change=300, seed=seed, width=64, batch=32)
    plain, _ = _curriculum(False, **kw)
    held, guard = _curriculum(True, **kw)
    kinds = [e.kind for e in guard.events]
    shifted = [e for e in guard.events if e.kind == "data_shift"]
    assert held is not None and len(shifted) == 1 and "rollback" in kinds, kinds
    e = shifted[0]
    assert e.data["undone"] is True and "the rollback is undone" in e.message
    assert e.data["level_before"] * 1.5 <= e.data["level_after"]
    assert guard.recovery._undo is None  # the copy is let go once judged
    assert held <= 1.1 * plain, (held, plain)


def _inputs_x50(seed: int, guarded: bool) -> tuple[float, gg.Guard | None]:
    """A regression MLP on Adam 1e-2 whose inputs are x50 for good from step 300 of 500
    (Adam learns them unguarded); the held-out MSE on the new inputs."""
    w = torch.randn(16, 1, generator=torch.Generator().manual_seed(7))

    def data(s: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, 16, generator=torch.Generator().manual_seed(1000 + s))
        return x, torch.sin(x @ w / 2) + 0.1 * (x[:, :2] ** 2).sum(1, keepdim=True)

    x_all, y_all = data(seed, 4096)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    guard = gg.Guard(model, opt, clip=gg.ZClip(), recovery=gg.Recovery()) if guarded else None
    mse = nn.functional.mse_loss
    for step in range(500):
        i = torch.randint(0, 4096, (64,), generator=torch.Generator().manual_seed(seed * 100003 + step))
        loss = mse(model(x_all[i] * (50 if step >= 300 else 1)), y_all[i])
        opt.zero_grad()
        loss.backward()
        guard.step(loss) if guard is not None else opt.step()
    if guard is not None:
        guard.close()
    xe, ye = data(9, 1024)
    with torch.no_grad():
        return float(mse(model(xe * 50), ye)), guard


def test_after_a_change_a_rollback_goes_back_to_the_weights_the_run_went_on_from():
    """Found by a stranger: inputs x50 for good. Once the change was found (the weights of
    step 249 gave 1767 on the new batches), three rollbacks in a row went back to the
    snapshots of steps 249 and 149, each spiking on the new batches, and the run was
    stopped (TrainingDiverged), 4150x its unguarded loss. The weights the run goes on from
    are kept as the newest snapshot at the change: a rollback goes back to them."""
    unguarded, _ = _inputs_x50(1, False)
    held, guard = _inputs_x50(1, True)
    assert guard is not None and guard.recovery is not None
    [shifted] = [a.step for a in guard.recovery.decisions if a.kind == "shifted"]
    after = [e for e in guard.events if e.kind == "rollback" and e.step > shifted]
    assert all(f"snapshot of step {shifted}" in e.message for e in after), [e.message for e in after]
    assert not any(e.kind == "abort" for e in guard.events)
    assert shifted in guard.recovery.ring.store.steps()
    assert held < 3 * unguarded, (held, unguarded)


def test_a_stretch_of_bad_batches_over_by_the_end_of_a_long_flush_is_no_change_of_data():
    """Found by a stranger: an HF Trainer run whose loss was x100 for steps 60-79 was rolled
    back at 65, the rollback undone; the storm's steps the rung clipped filled the test's
    first ten losses, and at the flush of step 113, the loss back at its level for 34
    steps, "the batches changed": unjudged, told to check its data pipeline. The latest
    losses of a window longer than that are judged too; a change that lasts is still one."""
    from gradguard.recovery.shift import AFTER, ShiftTest

    def judged(tail):
        test = ShiftTest()
        test.update(list(range(10)), [1.0] * 10)  # the level before the trouble
        test.update(list(range(10, 15)), [300.0] * 5)  # the trouble
        test.arm(15, 9, 1.0)  # a rollback to the snapshot of step 9, at 1.0
        losses = [300.0] * 12 + [tail] * 34
        return test.update(list(range(15, 15 + len(losses))), losses)

    assert judged(1.0) is None and 12 + 34 > AFTER
    assert judged(300.0) is not None
