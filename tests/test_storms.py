"""A stretch of bad batches (inputs x100 for 5 to 50 steps in a row: a corrupt shard, a
unit error upstream) is skipped whole, and the LR is not lowered for it (docs/recovery.md,
"A stretch of bad batches").

Found as a stranger: a digits MLP on Adam 1e-3 whose batches 100-119 were x100 ended at
2.1x-2.7x the held-out loss of the same run without them (1.2x-1.5x unguarded): three
skips backed the LR off, the grace after that back-off clipped ten of the bad batches
into the weights at the lowered LR, and the rollback that followed lowered the ceiling
for good. A stretch of 50 stopped the run (``TrainingDiverged``)."""

from __future__ import annotations

import torch
from benchmarks import rescue_cases as rc
from sklearn.datasets import load_digits
from torch import nn

import gradguard as gg

_X, _Y = load_digits(return_X_y=True)
X, Y = torch.tensor(_X / 16.0, dtype=torch.float32), torch.tensor(_Y)


def _run(start: int, length: int, *, guarded: bool, steps: int = 400, scale: float = 100.0,
         loss_scale: float = 1.0, sink: gg.JsonlSink | None = None):
    """The digits MLP (64-128-128-10) on Adam 1e-3, batches of 32 from the first 1,400
    digits, with batches ``start`` to ``start + length - 1`` x ``scale`` (their loss x
    ``loss_scale``): (the guard or None, the loss on the other 397)."""
    torch.manual_seed(0)
    model = rc.mlp(64, 10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    guard = gg.Guard(model, opt, clip=gg.ZClip(), recovery=gg.Recovery(),
                     sinks=[sink] if sink is not None else None) if guarded else None
    g = torch.Generator().manual_seed(0)
    norms.clear()
    for step in range(steps):
        i = torch.randint(0, 1400, (32,), generator=g)
        x, y = X[i], Y[i]
        if start <= step < start + length:
            x = x * scale
        loss = nn.functional.cross_entropy(model(x), y)
        if start <= step < start + length:
            loss = loss * loss_scale
        opt.zero_grad()
        loss.backward()
        if guard is not None:
            norms[step] = float(guard.step(loss))
        else:
            opt.step()
    if guard is not None:
        guard.close()
        assert all(torch.isfinite(p).all() for p in model.parameters())
    with torch.no_grad():
        return guard, nn.functional.cross_entropy(model(X[1400:]), Y[1400:]).item()


#: The guarded run's gradient norm per step (the last ``_run``'s).
norms: dict[int, float] = {}


def _skipped(guard) -> set[int]:
    return {e.step for e in guard.events if e.kind == "skip"}


def test_a_stretch_of_bad_batches_is_skipped_whole_and_the_lr_is_not_lowered_for_good():
    _, clean = _run(0, 0, guarded=False)
    _, unguarded = _run(100, 20, guarded=False)
    guard, held = _run(100, 20, guarded=True)
    # every bad batch with a gradient is skipped (one x100 batch that the weights the undone
    # rollback put back classify with certainty gives exactly zero: nothing to skip)
    assert {s for s in range(100, 120) if norms[s] != 0.0} <= _skipped(guard)
    assert sum(norms[s] == 0.0 for s in range(100, 120)) <= 1
    found = [e for e in guard.events if "the batches are at fault" in e.message]
    # once, or again after that zero-gradient step ended the first streak
    assert 1 <= len(found) <= 2 and {e.kind for e in found} == {"grad_spike"}
    assert found[0].data["cause"] == "unscaled_input" and "far off their scale" in found[0].message
    assert guard.recovery.lr_ceiling == 1.0 and guard.recovery.lr_factor == 1.0
    assert not [e for e in guard.events if e.kind == "lr_settled"]
    assert held < unguarded and held < 1.3 * clean, (held, unguarded, clean)


def test_a_short_stretch_is_found_at_the_first_clean_step_and_its_back_off_undone():
    guard, held = _run(100, 5, guarded=True)
    _, clean = _run(0, 0, guarded=False)
    assert set(range(100, 105)) <= _skipped(guard)
    kinds = [(a.kind, a.step) for a in guard.recovery.decisions if a.kind != "snapshot"]
    assert kinds == [("backoff", 102), ("sound", 105)], kinds
    sound = next(e for e in guard.events if e.data.get("undone"))
    assert sound.kind == "grad_spike" and "5 spiking step(s)" in sound.message
    assert held < 1.05 * clean, (held, clean)


def test_a_long_stretch_does_not_stop_the_run():
    """50 bad batches in a row (it was stopped at step 296 before)."""
    _, clean = _run(0, 0, guarded=False)
    guard, held = _run(250, 50, guarded=True)
    assert not [e for e in guard.events if e.kind == "abort"]
    assert guard.recovery.lr_ceiling == 1.0
    assert held < 1.3 * clean, (held, clean)


def test_a_shard_whose_loss_is_scaled_is_no_change_of_the_batches(tmp_path):
    """20 batches whose loss is x1000 (a bad shard, a loss scaled up: helper 2 of the
    eleventh session). The first six were skipped, a rollback came, and the next spiking
    step on the restored weights undid it (the batches at fault); the shift test the
    rollback had armed was never disarmed, judged the losses of the weights put back, and
    said "the batches changed" at step 172, long after the shard: the statistics reset and
    the run `unjudged`, "check the data pipeline there". No rollback stands after the undo:
    nothing is left to test."""
    from gradguard.report import load_run
    from gradguard.report._outcome import judge

    _, clean = _run(0, 0, guarded=False)
    guard, held = _run(120, 20, guarded=True, scale=1.0, loss_scale=1000.0,
                       sink=gg.JsonlSink(tmp_path))
    assert set(range(120, 140)) <= _skipped(guard)
    assert [e for e in guard.events if e.data.get("rollback_undone")], guard.events
    assert not [e for e in guard.events if e.kind == "data_shift"], [
        e.message for e in guard.events if e.kind == "data_shift"]
    assert judge(load_run(tmp_path)).status == "recovered"
    assert held < 1.1 * clean, (held, clean)


def test_a_change_of_the_targets_units_that_lasts_is_found_after_the_undone_rollback():
    """Found by a regression hunt: a regression MLP on Adam whose targets are in new units
    (x1000) from step 150 on, for good. Its spike streak rolled back and the next step undid
    the rollback (the batches at fault); with the shift test dropped at the undo (the fix
    for a shard of bad batches, above) nothing found the change, a progress check at step
    249 rolled back a second time, to step 49, and the test MSE ended 22-30x the unguarded
    run's. The shift test judges the steps taken after the undo: the change is found."""
    torch.manual_seed(0)
    w = torch.randn(16, 1)

    def data(n: int, new: bool) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, 16)
        y = torch.tanh(x @ w / 4) * 3 + 0.1 * torch.randn(n, 1)
        return x, y * 1000.0 if new else y

    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 1))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    with gg.Guard(model, opt, clip=gg.ZClip(), recovery=gg.Recovery()) as guard:
        for step in range(300):
            x, y = data(32, step >= 150)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            guard.step(loss)
            opt.zero_grad()
    assert [e for e in guard.events if e.data.get("rollback_undone")], guard.events
    shifts = [e.step for e in guard.events if e.kind == "data_shift"]
    assert shifts and shifts[0] < 220, shifts
    assert len([e for e in guard.events if e.kind == "rollback"]) == 1
