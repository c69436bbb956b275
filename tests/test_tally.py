"""The settled LR is advised honestly: half of it (the edge of what trains), with how often
the clip acted since it was set when it did often (gradguard.recovery.tally)."""

import math

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.recovery.tally import AT_LEAST, SHARE, ClipTally


def test_the_tally_counts_taken_steps_and_their_clips_and_starts_over_at_a_new_ceiling():
    t = ClipTally()
    t.update(1.0, [1.0, 0.5, math.nan, 0.9], [False, False, False, True])
    assert (t.ceiling, t.steps, t.clipped) == (1.0, 3, 1)  # the skipped step is no step
    t.update(0.5, [0.2, 0.3], [False, False])
    assert (t.ceiling, t.steps, t.clipped) == (0.5, 2, 2)
    t.update(0.5, [1.0] * 8, [False] * 8)
    assert (t.steps, t.clipped) == (10, 2)
    t2 = ClipTally()
    t2.load_state_dict(t.state_dict())
    assert t2 == t


@pytest.mark.parametrize("steps, clipped, edge", [
    (100, AT_LEAST - 1, False),  # too few clips to say anything
    (40, AT_LEAST, True),
    (1000, int(SHARE * 1000) - 1, False),  # a healthy run's ZClip clips ~1% or fewer
    (1000, int(SHARE * 1000), True),
])
def test_the_edge_needs_a_share_and_a_count_of_clipped_steps(steps, clipped, edge):
    assert ClipTally(0.5, steps, clipped).edge() is edge


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x, y, perm[:1400], perm[1400:]


def _sgd_run(lr, steps, clip=None, recovery=None, seed=2, cosine=False):
    """The digits GELU MLP on SGD Nesterov (its right LR: 0.05): the guard (or None) and
    the held-out loss."""
    x, y, tr, te = _digits()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(),
                          nn.Linear(256, 10))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if cosine else None
    guard = gg.Guard(model, opt, clip=clip, recovery=recovery) if recovery else None
    gen = torch.Generator().manual_seed(seed + 100)
    for _ in range(steps):
        idx = tr[torch.randint(0, len(tr), (64,), generator=gen)]
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        guard.step(loss) if guard else opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()
    if guard is not None:
        guard.close()
    with torch.no_grad():
        return guard, nn.functional.cross_entropy(model(x[te]), y[te]).item()


def _settled_events(guard):
    settled = [e for e in guard.events if e.kind == "lr_settled"]
    assert settled, [e.message for e in guard.events]
    for e in settled:
        assert e.data["advise"] == [pytest.approx(lr / 2) for lr in e.data["lr"]]
        assert e.remedy.startswith(f"Set the learning rate to {e.value / 2:.3g} ")
    return settled


def test_an_lr_that_held_with_the_clip_is_advised_at_half_and_half_trains():
    # 20x the right LR: a rollback to the fresh weights at step 12-17 caps the LR at 0.5 or
    # 0.25 (the update that wrecked them; the trajectory at 20x differs by CPU and thread
    # count), ZClip clips some steps of the restore; the ladder settles at 0.5 or 0.25
    guard, _ = _sgd_run(1.0, 500, clip=gg.ZClip(), recovery=gg.Recovery())
    for e in _settled_events(guard):
        assert e.value <= 0.5
        if "clipped" in e.data:  # said only when the clip acted often enough to hold it
            assert e.data["clipped"] >= max(AT_LEAST, SHARE * e.data["steps"])
            assert f"with its gradients clipped on {e.data['clipped']} of the" in e.message
        else:
            assert "clipped" not in e.message
    # the advice is true: from scratch, bare, it trains, where 0.5 (the highest LR the
    # ladder can settle at) fails
    _, advised = _sgd_run(e.data["advise"][0], 400)
    _, at_half_of_one = _sgd_run(0.5, 400)
    _, right = _sgd_run(0.05, 400)
    assert advised < 1.5 * right
    assert not at_half_of_one < 1.5 * right  # NaN, or far above


def test_the_settled_event_says_how_often_the_clip_acted_where_it_held_the_lr():
    """The digits GELU MLP on SGD at 20x, seed 2, on the machine of :mod:`.tally`'s
    figures: ZClip clipped 15 of the 100 steps of the restore up to the ceiling of 0.5."""
    import dataclasses

    from gradguard.recovery import Action, messages

    model = nn.Linear(4, 2)
    guard = gg.Guard(model, torch.optim.SGD(model.parameters(), lr=1.0), recovery=gg.Recovery())
    rec = guard.recovery
    rec.state = dataclasses.replace(rec.state, factor=0.5, ceiling=0.5, failed=1.0)
    said = []
    for clipped in (15, 4):  # 15% of the steps since the ceiling was set, then 4%
        rec._clips = ClipTally(ceiling=0.5, steps=100, clipped=clipped)
        e = messages.settled_event(guard, Action("settled", 218, factor=0.5, ceiling=0.5))
        assert e.data["advise"] == [pytest.approx(0.25)]
        said.append((e.data.get("clipped"), e.data.get("steps"), e.message.endswith(
            f"with its gradients clipped on {clipped} of the 100 steps since it was set")))
    assert said == [(15, 100, True), (None, None, False)]
    guard.close()


def test_an_lr_that_held_without_clipping_is_advised_at_half_with_no_clip_count():
    # no clip: nothing was clipped; the settled LR is still the edge of what trains
    guard, _ = _sgd_run(1.0, 500, recovery=gg.Recovery())
    for e in _settled_events(guard):
        assert "clipped" not in e.data and "clipped" not in e.message


def test_an_lr_set_by_a_jump_below_the_one_that_failed_is_advised_itself():
    """A run worse than fresh has its ceiling set at the back-off factor, 10x under the one
    that failed (:mod:`gradguard.recovery.rise`): no halving found the edge, which lies
    between; the LR that held is what to set, and the event names the one that failed.
    A ceiling within a halving of the failed factor is the edge: half of it, as before."""
    import dataclasses

    from gradguard.recovery import Action, messages

    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = gg.Guard(model, opt, recovery=gg.Recovery())
    rec = guard.recovery
    rec.state = dataclasses.replace(rec.state, factor=0.1, ceiling=0.1, failed=1.0)
    e = messages.settled_event(guard, Action("settled", 150, factor=0.1, ceiling=0.1))
    assert e.data["advise"] == e.data["lr"] == [pytest.approx(0.005)]
    assert e.data["failed_lr"] == [pytest.approx(0.05)]
    assert e.message.endswith("it failed at lr 0.05, 10x higher")
    assert e.remedy.startswith("Set the learning rate to 0.005 (x0.1) in your config: it held")
    rec.state = dataclasses.replace(rec.state, factor=0.05, ceiling=0.05, failed=0.1)
    e = messages.settled_event(guard, Action("settled", 250, factor=0.05, ceiling=0.05))
    assert e.data["advise"] == [pytest.approx(0.00125)] and "failed_lr" not in e.data
    guard.close()


def test_under_a_schedule_the_advice_scales_the_lr_of_the_config_not_the_lr_now():
    """A schedule that moved the LR (a decay, a warm-up): the LR at the step the ladder
    settled is no value to write in a config (advised at 0.00392 for an AdamW whose cosine
    schedule had decayed 0.1 to 0.0727 by step 105, where 0.00539 was what held). The
    factor of the schedule held: the advice is that factor of the LR the scheduler scales
    (``initial_lr``; a one-cycle schedule's ``max_lr``)."""
    import dataclasses

    from gradguard.recovery import Action, messages

    def settled(make_sched, factor, failed):
        model = nn.Linear(4, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sched = make_sched(opt)
        for _ in range(3):
            opt.step()
            sched.step()
        guard = gg.Guard(model, opt, recovery=gg.Recovery())
        guard.recovery.state = dataclasses.replace(guard.recovery.state, factor=factor,
                                                   ceiling=factor, failed=failed)
        e = messages.settled_event(guard, Action("settled", 150, factor=factor, ceiling=factor))
        guard.close()
        return e, opt.param_groups[0]["lr"]

    decay = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.3 ** s)  # noqa: E731
    e, now = settled(decay, 0.2, 0.4)  # at the edge: half of it
    assert now == pytest.approx(0.1 * 0.3 ** 3)
    assert e.data["lr"] == [pytest.approx(now * 0.2)]  # what runs now
    assert e.data["advise"] == [pytest.approx(0.1 * 0.2 / 2)] and e.data["scheduled"]
    assert e.remedy.startswith("Set the learning rate to 0.01 (x0.1 of the 0.1 it has, which "
                               "your schedule scales) in your config: half the highest that "
                               "held (x0.2)")
    e, _ = settled(decay, 0.1, 1.0)  # a jump below the factor that failed: itself
    assert e.data["advise"] == [pytest.approx(0.01)] and e.data["failed_lr"] == [pytest.approx(0.1)]
    assert e.message.endswith("it failed at x1 of it, 10x higher")
    assert e.remedy.startswith("Set the learning rate to 0.01 (x0.1 of the 0.1 it has")
    cycle = lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.4, total_steps=100)  # noqa: E731
    e, now = settled(cycle, 0.2, 0.4)  # a one-cycle's config value is its peak
    assert now < 0.4 / 5 and e.data["advise"] == [pytest.approx(0.4 * 0.2 / 2)]
    const = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)  # noqa: E731
    e, _ = settled(const, 0.2, 0.4)  # a schedule at its base: the text as without one
    assert e.data["advise"] == [pytest.approx(0.01)] and "scheduled" not in e.data
    assert e.remedy.startswith("Set the learning rate to 0.01 (x0.1) in your config: half the "
                               "highest that held (0.02)")


def test_under_reduce_lr_on_plateau_the_advice_scales_the_highest_lr_the_run_had():
    """``ReduceLROnPlateau`` records no planned LR (no ``initial_lr``): the advice scaled
    the LR the plateau had already halved ("failed at lr 0.015", "set 0.0016" for a config
    of 0.03; found by a helper in a Lightning run). The highest LR the run had stands for
    the config's, as for an LR a script sets by hand each step."""
    import dataclasses

    from gradguard.recovery import Action, messages

    model = nn.Linear(4, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
    guard = gg.Guard(model, opt, recovery=gg.Recovery())
    for _ in range(3):
        loss = model(torch.randn(8, 4)).square().mean()
        loss.backward()
        guard.step(loss.detach())
        opt.zero_grad()
        sched.step(1.0)  # no improvement: halved after the first
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0075)
    guard.recovery.state = dataclasses.replace(guard.recovery.state, factor=0.2, ceiling=0.2,
                                               failed=0.4)
    e = messages.settled_event(guard, Action("settled", 150, factor=0.2, ceiling=0.2))
    guard.close()
    assert e.data["advise"] == [pytest.approx(0.03 * 0.2 / 2)] and e.data["scheduled"]
    assert e.remedy.startswith("Set the learning rate to 0.003 (x0.1 of the 0.03 it has")


def test_under_a_cyclic_schedule_the_advice_scales_the_cycle_peak_not_its_floor():
    """``CyclicLR`` records its ``base_lr`` (the cycle's floor) as ``initial_lr`` and keeps
    ``max_lr`` to itself: the advice scaled the floor ("set 0.001 of the 0.01 it has" for a
    cycle to 0.1 that failed at its peak), an LR 10x under what the factor held. The
    highest LR the run had, the cycle's peak, is what the schedule scales."""
    import dataclasses

    from gradguard.recovery import Action, messages

    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sched = torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.01, max_lr=0.1, step_size_up=5)
    guard = gg.Guard(model, opt, recovery=gg.Recovery())
    for _ in range(8):  # past the cycle's peak at step 5
        loss = model(torch.randn(8, 4)).square().mean()
        loss.backward()
        guard.step(loss.detach())
        opt.zero_grad()
        sched.step()
    assert opt.param_groups[0]["lr"] < 0.1 and opt.param_groups[0]["initial_lr"] == 0.01
    guard.recovery.state = dataclasses.replace(guard.recovery.state, factor=0.2, ceiling=0.2,
                                               failed=0.4)
    e = messages.settled_event(guard, Action("settled", 150, factor=0.2, ceiling=0.2))
    guard.close()
    assert e.data["advise"] == [pytest.approx(0.1 * 0.2 / 2)] and e.data["scheduled"]
    assert e.remedy.startswith("Set the learning rate to 0.01 (x0.1 of the 0.1 it has")


def test_under_a_lambda_over_one_the_advice_scales_the_config_lr_not_the_peak():
    """Found by a regression hunt: a ``LambdaLR`` whose factor rises to 10 (a linear-scaling
    warm-up) took the highest LR the run had (0.1) for the config's, and the advice under
    a factor of 0.1 was "set 0.01", the config's own value, which the x10 makes the LR
    that failed. The schedule scales the config's 0.01: the advice is 0.001."""
    from gradguard.recovery.lrs import config_lrs

    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 10 * min(1.0, (s + 1) / 5))
    guard = gg.Guard(model, opt)
    for _ in range(20):
        loss = model(torch.randn(8, 4)).square().mean()
        loss.backward()
        guard.step(loss.detach())
        opt.zero_grad()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    advise, text, base = config_lrs(guard, 0.1)
    guard.close()
    assert advise == [pytest.approx(0.001)] and (text, base) == ("0.001", "0.01")


def test_a_retry_part_of_the_way_back_advises_that_factor_of_the_config_lr(tmp_path):
    """A retry lifted the LR part of the way back (x0.0316): under a schedule that decayed
    the LR, "Keep this learning rate (0.00333)" named the decayed LR now, 8x below what
    trains from scratch (a StepLR run found by a helper). The advice is that factor of the
    LR the schedule scales, and the run summary says so; back at x1, keep your LR."""
    import dataclasses

    from gradguard.recovery import Action, messages
    from gradguard.report._data import load_run
    from gradguard.report._summary import summary_sentence

    def raised(factor, tmp):
        model = nn.Linear(4, 2)
        opt = torch.optim.SGD(model.parameters(), lr=1.5)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        for _ in range(3):
            opt.step()
            sched.step()
        guard = gg.Guard(model, opt, recovery=gg.Recovery(), sinks=[gg.JsonlSink(tmp)])
        guard.recovery.state = dataclasses.replace(guard.recovery.state, factor=factor,
                                                   ceiling=factor)
        loss = model(torch.randn(8, 4)).square().mean()
        loss.backward()
        guard.step(loss.detach())
        e = messages.raised_event(guard, Action("raised", 500, "it trains", factor, factor))
        guard.add_event(e)
        guard.close()
        return e, summary_sentence(load_run(tmp))

    e, text = raised(0.0316, tmp_path / "part")
    assert e.data["advise"] == [pytest.approx(1.5 * 0.0316)] and e.data["scheduled"]
    assert e.remedy.startswith("Set the learning rate to 0.0474 (x0.0316 of the 1.5 it has, "
                               "which your schedule scales) in your config")
    assert "a retry of the LR the trouble lowered found it trains: set 0.0474 in your " \
           "config." in text
    e, text = raised(1.0, tmp_path / "full")
    assert "advise" not in e.data and e.remedy.startswith("Keep your learning rate")
    assert "Back at your lr" in text


def test_a_run_rescued_under_a_cosine_schedule_is_advised_the_config_lr_that_trains():
    """The digits GELU MLP on SGD Nesterov at 20x its LR under a cosine decay: the ladder
    settles while the schedule has decayed; the advice is the settled factor of the config's
    LR, and from scratch with the same schedule it trains."""
    guard, _ = _sgd_run(1.0, 330, clip=gg.ZClip(), recovery=gg.Recovery(), cosine=True)
    settled = [e for e in guard.events if e.kind == "lr_settled"]
    assert settled, [e.message for e in guard.events]
    e = settled[-1]
    assert e.data["scheduled"] and e.data["lr"][0] < e.data["factor"] * 0.99  # decayed
    assert e.data["advise"] == [pytest.approx(e.data["factor"] * 0.5)]  # x the config's 1.0
    _, advised = _sgd_run(e.data["advise"][0], 330, cosine=True)
    _, right = _sgd_run(0.05, 330, cosine=True)
    assert advised < 1.5 * right
