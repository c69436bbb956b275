"""The LR probe (recovery/probe.py): a stalled quiet run tries half its LR and keeps it only
when the loss falls by a fifth. Unit tests of the rule, then guarded runs of a linear
regression whose LR is too high (the probe keeps) and one whose loss floor is the data's
noise (the probe returns to the full LR), each against the same run unguarded."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

import gradguard as gg
from gradguard.recovery.probe import KEEP_GAIN, SETTLE, SPAN, STALL_GAIN, LrProbe


def feed(probe: LrProbe, start: int, values: list[float]) -> int:
    steps = list(range(start, start + len(values)))
    probe.update(steps, values, [False] * len(values))
    return steps[-1]


def test_a_stall_is_due_and_a_falling_loss_is_not():
    falling = LrProbe()
    last = feed(falling, 0, [2.0] * SPAN + [2.0 * (1 - STALL_GAIN) - 0.01] * SPAN)
    assert not falling.due(last, quiet=True)
    stalled = LrProbe()
    last = feed(stalled, 0, [2.0] * SPAN + [2.0 * (1 - STALL_GAIN) + 0.01] * SPAN)
    assert stalled.due(last, quiet=True)
    assert not stalled.due(last, quiet=False)  # the ladder is busy
    assert not LrProbe().due(last, quiet=True)  # no history


def test_verdict_keeps_only_a_fall_of_keep_gain_and_ignores_the_settling_steps():
    for during, kept in ((1 - KEEP_GAIN) - 0.01, True), ((1 - KEEP_GAIN) + 0.01, False):
        probe = LrProbe()
        last = feed(probe, 0, [1.0] * (2 * SPAN))
        probe.start(last)
        # the first SETTLE steps at the new LR are worse: they do not count
        last = feed(probe, last + 1, [5.0] * SETTLE + [during] * (SPAN - SETTLE))
        assert probe.verdict(last) == (kept, 1.0, pytest.approx(during))
        assert probe.started is None


def test_no_verdict_before_span_steps():
    probe = LrProbe()
    last = feed(probe, 0, [1.0] * (2 * SPAN))
    probe.start(last)
    assert probe.verdict(feed(probe, last + 1, [0.1] * (SPAN - 1))) is None
    assert probe.started == last


def test_a_probe_that_did_not_pay_waits_twice_as_long_each_time():
    probe, step = LrProbe(), -1
    step = feed(probe, 0, [1.0] * (2 * SPAN))
    waits = []
    for _ in range(3):
        assert probe.due(step, quiet=True)
        probe.start(step)
        step = feed(probe, step + 1, [1.0] * SPAN)
        assert probe.verdict(step) == (False, 1.0, 1.0)
        waits.append(probe.not_before - step)
        step = feed(probe, step + 1, [1.0] * (probe.not_before - step))
    assert waits == [SPAN, 2 * SPAN, 4 * SPAN]


def test_a_probe_that_paid_lets_the_next_follow_a_new_stall():
    probe = LrProbe()
    step = feed(probe, 0, [1.0] * (2 * SPAN))
    probe.start(step)
    step = feed(probe, step + 1, [0.5] * SPAN)
    assert probe.verdict(step)[0]
    assert not probe.due(step, quiet=True)  # the SPAN before was 1.0: not a stall from here
    step = feed(probe, step + 1, [0.5] * SPAN)
    assert probe.due(step, quiet=True)


def test_cancel_ends_a_probe_and_holds_the_next_back():
    probe = LrProbe()
    step = feed(probe, 0, [1.0] * (2 * SPAN))
    probe.start(step)
    probe.cancel(step + 5)
    assert probe.started is None and probe.verdict(step + SPAN) is None
    assert probe.not_before == step + 5 + 2 * SPAN


def test_a_loss_that_is_not_positive_switches_the_probe_off():
    probe = LrProbe()
    step = feed(probe, 0, [1.0] * SPAN + [-0.5] + [1.0] * SPAN)
    assert probe.off and not probe.due(step, quiet=True)


def test_state_dict_round_trip():
    probe = LrProbe()
    step = feed(probe, 0, [1.0] * (2 * SPAN))
    probe.start(step)
    copy = LrProbe()
    copy.load_state_dict(probe.state_dict())
    assert copy.state_dict() == probe.state_dict()
    step = feed(copy, step + 1, [0.5] * SPAN)
    assert copy.verdict(step)[0]


# ---- guarded runs -------------------------------------------------------------------------
def regression(lr: float, noise: float, *, guard: bool, probe: bool = True, steps: int = 400,
               seed: int = 0, schedule=None) -> tuple[float, gg.Guard | None, torch.nn.Module]:
    """Minibatch SGD on a linear regression; returns the mean loss of the last 50 steps."""
    gen = torch.Generator().manual_seed(seed)
    w_star = torch.randn(20, 1, generator=gen)
    torch.manual_seed(seed)
    model = torch.nn.Linear(20, 1)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    sched = schedule(opt) if schedule is not None else None
    g = (gg.Guard(model, opt, clip=gg.ZClip(), recovery=gg.Recovery(lr_probe=probe))
         if guard else None)
    losses = []
    for _ in range(steps):
        x = torch.randn(8, 20, generator=gen)
        y = x @ w_star + noise * torch.randn(8, 1, generator=gen)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        if g is not None:
            g.step(loss)
        else:
            opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    if g is not None:
        g.close()
    return statistics.mean(losses[-50:]), g, model


def probe_events(guard: gg.Guard) -> list[gg.Event]:
    return [e for e in guard.events if e.kind == "lr_probe"]


def test_an_lr_too_high_that_trains_noisily_is_lowered_by_a_probe():
    unguarded, _, _ = regression(0.25, 0.1, guard=False)
    guarded, guard, model = regression(0.25, 0.1, guard=True)
    events = probe_events(guard)
    kept = [e for e in events if e.data["phase"] == "probe_end" and e.data["kept"]]
    assert kept, [e.message for e in events]
    assert kept[0].data["factor"] == 0.5 and "too high" in kept[0].message
    assert kept[0].remedy and "0.125" in kept[0].remedy
    assert guard.recovery.lr_ceiling <= 0.5
    assert guarded < 0.5 * unguarded  # the run it would have had at a lower LR
    assert all(e.severity == "info" for e in events)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # the probe is what lowered it: without it the guard (ZClip, the ladder) leaves the LR
    without, guard_off, _ = regression(0.25, 0.1, guard=True, probe=False)
    assert not probe_events(guard_off) and guard_off.recovery.lr_ceiling == 1.0
    assert guarded < 0.5 * without


def test_a_loss_floor_set_by_the_data_returns_to_the_full_lr():
    unguarded, _, _ = regression(0.01, 1.0, guard=False)
    guarded, guard, _ = regression(0.01, 1.0, guard=True)
    events = probe_events(guard)
    ends = [e for e in events if e.data["phase"] == "probe_end"]
    assert ends and not any(e.data["kept"] for e in ends)  # asked, and no better
    assert guard.recovery.lr_ceiling == 1.0
    assert guard.recovery.lr_factor == 1.0  # back at the full LR after the last probe
    assert not [e for e in guard.events if e.severity != "info"]
    assert guarded == pytest.approx(unguarded, rel=0.05)
    assert math.isfinite(guarded)


def test_no_probe_while_the_schedule_moves_the_lr():
    """A decaying LR lowers the loss by itself: a probe then would credit itself for it."""
    cosine = lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, 400)  # noqa: E731
    _, guard, _ = regression(0.25, 0.1, guard=True, schedule=cosine)
    assert not probe_events(guard)
    assert guard.recovery.lr_ceiling == 1.0


def test_a_schedule_step_during_a_probe_ends_it_without_a_verdict():
    # constant for 270 steps: a probe starts at the stall (step 249), StepLR moves at 270
    steplr = lambda opt: torch.optim.lr_scheduler.StepLR(opt, 270, 0.9)  # noqa: E731
    _, guard, _ = regression(0.25, 0.1, guard=True, schedule=steplr, steps=330)
    events = probe_events(guard)
    assert [e.data["phase"] for e in events][:2] == ["probe", "probe_end"]
    start, end = events[0], events[1]
    assert start.step < 270 < end.step
    assert not end.data["kept"] and "schedule changed the LR" in end.message
    assert guard.recovery.lr_ceiling == 1.0
