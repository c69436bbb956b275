"""The per-step spike verdict and the loss-rise test of the recovery ladder."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.recovery.dead import DeadLayers
from gradguard.recovery.ladder import LadderState
from gradguard.recovery.rise import FRESH_SIGMAS, NOISE_UNITS, SEVERE, LossRise
from gradguard.recovery.snapshots import copy_state
from gradguard.recovery.verdict import GRAD_SPIKE, LOSS_SPIKE, STEP_GRAD_RATIO, SpikeVerdict
from helpers import recording_guard


def codes(v: SpikeVerdict, norms, losses=None):
    losses = losses or [None] * len(norms)
    return [int(v(torch.tensor(float(g)), loss)) for g, loss in zip(norms, losses)]


def heavy_tailed(n: int, seed: int = 0) -> list[float]:
    """Late-training losses: mostly tiny, now and then a batch x10-x40 the median."""
    g = torch.Generator().manual_seed(seed)
    base = (0.002 * torch.exp(0.3 * torch.randn(n, generator=g))).tolist()
    return [x * (30.0 if i % 37 == 5 else 1.0) for i, x in enumerate(base)]


def test_a_gradient_norm_far_above_its_history_is_a_spike_a_heavy_tail_is_not():
    v = SpikeVerdict(warmup=5)
    g = torch.Generator().manual_seed(0)
    norms = (torch.exp(0.2 * torch.randn(40, generator=g))).tolist()
    assert codes(v, norms) == [0] * 40
    assert codes(v, [0.4 * STEP_GRAD_RATIO]) == [0]  # x20: clipped by the policy, not skipped
    assert codes(v, [2 * STEP_GRAD_RATIO]) == [GRAD_SPIKE]


def test_a_loss_alone_is_no_reason_to_skip_after_the_warm_up():
    v = SpikeVerdict(warmup=5)
    losses = heavy_tailed(200)
    got = codes(v, [1.0] * 200, losses)
    assert got == [0] * 200
    assert max(losses) / sorted(losses)[100] > 10  # the tail was there to be judged


def test_an_early_loss_explosion_is_a_spike_at_its_step():
    v = SpikeVerdict(warmup=20)
    got = codes(v, [1.0, 1.0, 1.1], [4.0, 4.1, 4e7])  # a first update that wrecks the weights
    assert got == [0, 0, LOSS_SPIKE]


def test_a_loss_that_was_at_or_below_zero_is_judged_no_more():
    """Found by a stranger: a WGAN-GP generator's loss (-D(G(z))) at -0.7, then crossing
    zero (0.05, 0.5, 0.7, 0.9): its first positive values were the loss's whole history,
    "x10 the median twice in a row" flagged three steps, and the ladder rolled the weights
    back to the fresh ones ("the update before them wrecked the weights"), even under
    ``Recovery(loss_rise=False)``. A loss at or below zero has no ratio scale: once one is
    seen, the loss is never judged at its step again; a positive loss still is."""
    losses = [-0.7] * 30 + [0.05, 0.5, 0.7, 0.9, 1.2, 4e7]
    assert codes(SpikeVerdict(warmup=20), [1.0] * len(losses), losses) == [0] * len(losses)
    positive = codes(SpikeVerdict(warmup=20), [1.0] * 6, [0.05, 0.6, 0.7, 0.9, 1.2, 4e7])
    assert positive[-1] == LOSS_SPIKE and positive[2] == LOSS_SPIKE  # x10 twice in a row


def test_a_healthy_run_whose_loss_crosses_zero_is_no_trouble_to_the_ladder():
    """The stranger's repro: gradients of a healthy MSE run, a loss read -0.7 for 50 steps
    then rising through zero; guarded with ``Recovery(loss_rise=False)`` (the documented
    setting for such losses) it trains as unguarded, nothing skipped, no rung."""
    weights = []
    for guarded in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        guard = gg.Guard(model, opt, recovery=gg.Recovery(loss_rise=False)) if guarded else None
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(8, 1, generator=gen)
        for s in range(120):
            x = torch.randn(64, 8, generator=gen)
            mse = (model(x) - x @ w).pow(2).mean()
            level = -0.7 if s < 50 else (0.05 if s == 50 else 0.25 + 0.25 * (s - 50) ** 0.5)
            (mse - mse.detach() + level).backward()
            guard.step(mse - mse.detach() + level) if guard is not None else opt.step()
            opt.zero_grad()
        if guard is not None:
            guard.close()
            assert guard.skipped_steps == 0 and not guard.recovery.decisions
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1])


def test_non_finite_values_never_enter_the_history():
    v = SpikeVerdict(warmup=3)
    codes(v, [1.0, math.nan, math.inf, 1.0, 1.1, 0.9])
    assert v.count is not None and v.count.tolist()[0] == 4


# ---- the loss-rise test ------------------------------------------------------------------


def feed(rise: LossRise, start: int, losses: list[float]) -> None:
    rise.update(list(range(start, start + len(losses))), losses, [False] * len(losses))


def test_a_loss_that_climbs_from_the_start_has_risen():
    rise = LossRise()
    feed(rise, 0, [4.0 * 1.1**i for i in range(50)])  # x117 over 50 steps, never a spike
    got = rise.risen(1.5)
    assert got is not None and got[1] > 10


def test_a_network_that_learns_then_dies_back_to_chance_has_risen():
    rise = LossRise()
    feed(rise, 0, [2.3] * 3 + [1.3] * 27 + [2.3] * 20)
    assert rise.risen(1.5) is not None


def test_a_loss_back_at_the_fresh_models_level_has_returned():
    """A float64 CNN on fused AdamW with a warm-up to an LR too high: it reaches 1.7 nats,
    its ReLUs die, it sits at chance (2.33) for good: 1.37x its best, under the 1.5x band,
    yet everything it learnt is lost. A CNN on AdamW at 100x whose first update blows the
    loss up to 225 and whose ReLUs are dead from step 20 never learnt anything: it is back
    at (not above) its start, and the 225 is not the fresh model's level. A run that
    learnt and stays 5% under its start has not returned (alone, the rule says nothing of
    health: it counts with dead layers only)."""
    rise = LossRise()
    feed(rise, 0, [2.31] * 3 + [1.71] * 27 + [2.34] * 20)
    assert rise.risen(1.5) is None
    got = rise.returned()
    assert got is not None and got.ratio == pytest.approx(2.34 / 1.71)
    rise = LossRise()
    feed(rise, 0, [2.31, 225.1, 18.9] + [2.25] * 27 + [2.30] * 20)
    assert rise.initial == 18.9 and rise.fresh == 2.31
    got = rise.returned()
    assert got is not None and got.level == 2.30
    rise = LossRise()
    feed(rise, 0, [2.31] * 3 + [1.71] * 27 + [2.19] * 20)  # 0.948x where it started
    assert rise.returned() is None
    other = LossRise()
    other.load_state_dict(rise.state_dict())
    assert other.fresh == 2.31


def test_a_layer_is_dead_when_it_gets_no_gradient_on_most_steps_having_had_one():
    dead = DeadLayers()
    grads = [[1.0, 0.0, 0.5]] * 5 + [[0.0, 0.0, 0.4]] * 9
    assert dead.update(["conv", "frozen", "head"], grads, [False] * 14) == []  # 9 in a row
    # a skipped step (its gradient never applied) and a NaN row neither count nor revive
    assert dead.update(["conv", "frozen", "head"], [[3.0, 0.0, 1.0], [math.nan] * 3],
                       [True, False]) == []
    assert dead.update(["conv", "frozen", "head"], [[0.0, 0.0, 0.3]], [False]) == ["conv"]  # 10
    other = DeadLayers()
    other.load_state_dict(dead.state_dict())
    assert other.update(["conv", "frozen", "head"], [[0.0, 0.0, 0.3]], [False]) == ["conv"]
    # a batch now and then that still wakes a unit: 16 of the last 20 steps without any
    other = DeadLayers()
    rows = [[1.0, 0.2]] * 5 + ([[0.0, 0.2]] * 4 + [[0.3, 0.2]]) * 3
    assert other.update(["conv", "head"], rows, [False] * len(rows)) == []  # 12 of 15
    assert other.update(["conv", "head"], rows[5:10], [False] * 5) == ["conv"]
    # a head that takes turns with two others (two steps in three without a gradient)
    other = DeadLayers()
    rows = [[1.0, 0.2]] * 5 + ([[0.0, 0.2]] * 2 + [[0.3, 0.2]]) * 10
    assert other.update(["head_b", "trunk"], rows, [False] * len(rows)) == []
    assert other.update(["head_b", "trunk"], [[1e-30, 0.2]] * 20, [False] * 20) == []
    # a checkpoint of the older format: a count of zero steps in a row
    other = DeadLayers()
    other.load_state_dict({"alive": ["conv"], "zero": {"conv": 14}})
    assert other.update(["conv"], [[0.0]], [False]) == ["conv"]


def test_a_step_whose_graph_did_not_reach_a_layer_says_nothing_of_it():
    """A task head (an expert, an adapter) that a batch did not use has no gradient tensor
    at all that step, where dead units leave a gradient of zeros: such steps neither count
    as zero nor make it alive. Without them a head that takes turns with three others is
    zero on 15 of 20 steps: "dead" (a four-task model was rolled back three times and
    raised TrainingDiverged)."""
    layers = ["head_b", "trunk"]
    rows = [[0.3, 0.2]] + ([[0.0, 0.2]] * 3 + [[0.3, 0.2]]) * 10
    away = [frozenset()] + ([frozenset({0})] * 3 + [frozenset()]) * 10
    assert DeadLayers().update(layers, rows, [False] * len(rows)) == ["head_b"]  # unknown
    assert DeadLayers().update(layers, rows, [False] * len(rows), away) == []
    # on the steps that use it, its gradient is zero: that is a dead head
    dead = DeadLayers()
    rows = [[0.3, 0.2]] * 4 + [[0.0, 0.2]] * 36
    away = [frozenset()] * 4 + ([frozenset({0})] * 3 + [frozenset()]) * 9
    assert dead.update(layers, rows, [False] * len(rows), away) == []  # 9 zeros of its own
    assert dead.update(layers, [[0.0, 0.2]] * 4, [False] * 4,
                       [frozenset({0})] * 3 + [frozenset()]) == ["head_b"]  # 10 in a row
    # a layer never reached is never alive
    never = DeadLayers()
    assert never.update(layers, [[0.0, 0.2]] * 20, [False] * 20, [frozenset({0})] * 20) == []
    assert never.alive == {"trunk"}


def test_dead_layers_are_the_first_ones_dead_units_leave_no_gradient_before_them():
    """Dead units pass no gradient back: the layers before them (module order) have none
    either. Heads that take turns on a trunk that trains are zero on three steps in four
    where the step's graph cannot be read (DDP, ``set_to_none=False``): after a live trunk,
    they are not dead; a dead trunk is, with the head after it that still learns."""
    layers = ["trunk", "head_a", "head_b"]
    rows = [[0.5, 0.2, 0.2]] * 5 + [[0.5, 0.2, 0.0], [0.5, 0.0, 0.0], [0.5, 0.0, 0.0]] * 7
    assert DeadLayers().update(layers, rows, [False] * len(rows)) == []
    rows = [[0.5, 0.2, 0.2]] * 5 + [[0.0, 0.2, 0.0]] * 20
    assert DeadLayers().update(layers, rows, [False] * len(rows)) == ["trunk"]
    # a layer that never had a gradient (frozen) does not break the run of dead ones
    rows = [[0.0, 0.5, 0.2, 0.2]] * 5 + [[0.0, 0.0, 0.0, 0.2]] * 20
    got = DeadLayers().update(["frozen", "conv1", "conv2", "head"], rows, [False] * 25)
    assert got == ["conv1", "conv2"]


def test_dead_layers_with_a_loss_that_does_not_fall_are_a_network_that_stalled():
    """``DeadLayers.stalled``: the level when layers were first found dead is the mark; 50
    steps later a loss that has not fallen by 5% of it says the network died; one that fell
    is still learning; the mark goes when no layer is dead, and survives a checkpoint."""
    from gradguard.recovery.dead import STALL_FALL, STALL_STEPS

    layers = ["conv", "fc", "head"]
    dead = DeadLayers()
    dead.alive = set(layers)
    both = ["conv", "fc"]  # every layer but the last: the features are constant
    assert not dead.stalled(49, None, both, layers) and dead.since is None
    assert not dead.stalled(49, 2.30, both, layers) and dead.since == (49, 2.30)
    assert not dead.stalled(49 + STALL_STEPS - 1, 2.31, both, layers)  # too soon
    assert dead.stalled(49 + STALL_STEPS, 2.30 * (1 - STALL_FALL) + 1e-6, both, layers)
    # fell by 5%: learning
    assert not dead.stalled(49 + STALL_STEPS, 2.30 * (1 - STALL_FALL), both, layers)
    # a layer after the dead ones that still has a gradient: a path around them may learn
    assert not dead.stalled(99, 2.30, ["conv"], layers)
    again = DeadLayers()
    again.load_state_dict(dead.state_dict())
    assert again.since == (49, 2.30) and again.stalled(99, 2.29, both, layers)
    old = dead.state_dict()
    del old["since"]  # a checkpoint from before the mark
    again.load_state_dict(old)
    assert again.since is None
    rows = [[0.5, 0.2]] * 20  # every layer has a gradient: none dead, the mark goes
    assert dead.update(["conv", "head"], rows, [False] * 20) == [] and dead.since is None


def test_a_layer_whose_gradient_only_ever_underflowed_is_not_dead():
    """A signal that vanished on its way to a layer (1e-19 of the largest layer's gradient
    in the last block of a ``transformers`` EfficientNet that never learns) is exactly zero
    at times: that layer never had a gradient to lose. One at 1e-3 of it did."""
    rows = [[1e-20, 1e-3, 0.2]] * 5 + [[0.0, 0.0, 0.2]] * 15
    dead = DeadLayers()
    assert dead.update(["vanished", "alive", "head"], rows, [False] * 20) == ["alive"]
    assert dead.alive == {"alive", "head"}


def test_a_network_that_never_learnt_and_whose_signal_vanished_is_not_rolled_back_as_dead():
    """A classifier on random labels (its loss stays at the fresh model's level) with a side
    path whose gradient is 1e-16 on one step in five and exactly zero on the others: the
    loss back at the fresh level with a layer "that had a gradient and has none" read as a
    network that died, rolled back to the weights before the first step three times and
    raised ``TrainingDiverged`` (the EfficientNet above, at step 159)."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10))
            self.side = nn.Linear(16, 10)
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            gate = 1e-15 if self.calls % 5 == 0 else 0.0
            return self.body(x) + gate * self.side(x)

    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = gg.Guard(model, opt, clip=gg.ZClip(), recovery=gg.Recovery())
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        x, y = torch.randn(32, 16, generator=g), torch.randint(0, 10, (32,), generator=g)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        guard.step(loss)
        opt.zero_grad()
    guard.close()
    kinds = [(e.kind, e.severity) for e in guard.events]
    assert ("rollback", "error") not in kinds and ("abort", "error") not in kinds
    assert ("disconnected_layer", "warning") not in kinds
    assert guard.recovery.lr_ceiling == 1.0


def test_a_severe_rise_that_came_down_before_the_flush_has_risen():
    """A warm-up peak kills a CNN's ReLUs between two flushes: the loss climbs from its
    best 0.3 to 2.0 for 20 steps (6.7x, giving back 85% of what the run had learnt), and
    is back at 0.9 when the flush comes. The units it killed are still dead."""
    rise = LossRise()
    feed(rise, 0, [2.3] * 3 + [0.3] * 47)
    feed(rise, 50, [0.3] * 10 + [2.0] * 20 + [0.9] * 20)
    assert rise.latest == 0.9  # 3x the best, yet not half the progress given back now
    got = rise.risen(1.5)
    assert got is not None and got.level == 2.0 and got.ratio == pytest.approx(2.0 / 0.3)
    rise.reset()
    assert rise.risen(1.5) is None


def test_a_severe_rise_the_loss_came_back_from_by_the_flush_is_no_rise():
    """Found by a stranger: 20 steps of 30% wrong labels in a digits MLP's batches put the
    loss at 4.2x its best; at the flush it was back at its best (0.384 against 0.367), yet
    the peak rolled the run back 100 steps and halved its LR for good (1.6x its twin)."""
    rise = LossRise()
    feed(rise, 0, [2.3] * 3 + [0.475] * 147)
    feed(rise, 150, [0.475] * 50)
    feed(rise, 200, [1.54] * 20 + [0.384] * 30)
    assert rise.peak is not None and rise.peak.ratio >= SEVERE
    assert rise.risen(1.5) is None and rise.risen(1.5, strict=True) is None


def test_a_moderate_rise_that_came_down_is_no_rise():
    """The same shape at 1.8x the best (under ``SEVERE``), giving back more than half the
    progress: judged at the flush only, where the loss is back near its best."""
    rise = LossRise()
    feed(rise, 0, [2.3] * 3 + [1.0] * 47)
    feed(rise, 50, [1.0] * 10 + [1.8] * 20 + [1.05] * 20)
    assert rise.peak is not None and rise.peak.ratio < SEVERE
    assert rise.risen(1.5) is None


def test_noise_and_a_short_bump_are_no_rise():
    rise = LossRise()
    g = torch.Generator().manual_seed(1)
    curve = [2.3 * math.exp(-i / 60) + 0.05 for i in range(300)]
    noisy = [c * math.exp(0.4 * float(torch.randn((), generator=g))) for c in curve]
    noisy[200:210] = [x * 3 for x in noisy[200:210]]  # one bad stretch of ten steps
    for start in range(0, 300, 50):
        feed(rise, start, noisy[start:start + 50])
        assert rise.risen(1.5) is None, start


def test_a_flat_noisy_loss_is_no_rise_over_its_luckiest_first_batch():
    """A healthy run that learns little (benchmarks/quality.py's transformer, seed 3): its
    first three batch losses 0.27, 0.19, 0.44, then a noisy level near 0.29. The fresh
    model's level is their median, not the luckiest batch (0.29 is 1.56x 0.19: with the
    lowest of the three, every such run had "risen", having learnt nothing to give back)."""
    rise = LossRise()
    g = torch.Generator().manual_seed(3)
    flat = [0.29 * math.exp(0.15 * float(torch.randn((), generator=g))) for _ in range(197)]
    losses = [0.274, 0.187, 0.438, *flat]
    for start in range(0, 200, 25):
        feed(rise, start, losses[start:start + 25])
        assert rise.risen(1.5) is None, start
    assert rise.initial == 0.274
    feed(rise, 200, [0.6] * 20)  # a real rise from that level still counts
    assert rise.risen(1.5) is not None


def test_once_the_lr_is_known_too_high_a_rise_that_keeps_the_progress_still_counts():
    """A run settled just under the edge of stability: from 2.3 to a best of 0.15, then a
    noisy stretch at 0.4 (2.7x its best, yet far from giving back half of what it learnt)."""
    rise = LossRise()
    feed(rise, 0, [2.3] * 3 + [0.15] * 27 + [0.4] * 20)
    assert rise.risen(1.5) is None  # a healthy run's noise could look like this
    level, ratio = rise.risen(1.5, strict=True)  # after a relapse it is the LR again
    assert level == 0.4 and ratio == pytest.approx(0.4 / 0.15)
    feed(rise, 50, [0.2] * 20)  # back within 1.5x its best: no rise either way
    assert rise.risen(1.5, strict=True) is None


def test_even_on_probation_a_loss_near_zero_that_doubles_is_noise():
    """Late in a run, 2.3 nats below the fresh model: a ten-step level of 0.04 against a
    best of 0.015 is 2.7x it, yet gives back 1% of what the run learnt (STRICT_LOST: 3%);
    one of 0.2 gives back 8% and counts. The fresh level is the lowest first loss: a first
    update that blew the loss up to 250 is no level learnt from."""
    rise = LossRise()
    feed(rise, 0, [2.3, 250.0, 240.0] + [0.015] * 27 + [0.04] * 20)
    assert rise.fresh == 2.3
    assert rise.risen(1.5, strict=True) is None
    feed(rise, 50, [0.2] * 20)
    level, ratio = rise.risen(1.5, strict=True)
    assert level == 0.2 and ratio == pytest.approx(0.2 / 0.015)
    assert rise.risen(1.5) is None  # under the usual test: far from half the progress


def test_losses_below_zero_switch_the_test_off():
    rise = LossRise()
    feed(rise, 0, [1.0] * 20 + [-0.5] + [5.0] * 29)
    assert rise.off and rise.risen(1.5) is None


def test_a_loss_of_exactly_zero_is_a_level_not_a_reason_to_switch_off():
    """A classifier that fits a batch perfectly has a float32 loss of exactly 0: before,
    that switched the loss-level tests off for good, and every confirmed loss spike after
    it, however small, was acted on (a converged digits MLP was rolled back three times and
    stopped as diverged at a loss of 0.014, its fresh model's 757)."""
    rise = LossRise()
    feed(rise, 0, [2.3] * 3 + [1e-4] * 17 + [0.0] + [1e-4] * 29)
    assert not rise.off and rise.best == pytest.approx(1e-4)
    assert not rise.gives_back(2e-3)  # x20 the best, 0.08% of what the run learnt
    assert rise.gives_back(0.2)  # 8.7% of it
    feed(rise, 50, [0.0] * 50)  # a best of exactly 0: the ratio tests wait, the share works
    assert rise.best == 0.0 and rise.risen(1.5) is None
    assert not rise.gives_back(0.05) and rise.gives_back(0.1)


def test_a_loss_spike_gives_back_while_nothing_is_known_of_the_run():
    assert LossRise().gives_back(1e-9)  # no level yet
    resumed = LossRise()  # a resume: no fresh level to measure what was learnt from
    feed(resumed, 1000, [0.5] * 20)
    assert resumed.gives_back(0.51)
    negative = LossRise()
    feed(negative, 0, [1.0] * 20 + [-0.5] + [1.0] * 29)
    assert negative.off and negative.gives_back(1.01)


def test_skipped_steps_and_non_finite_losses_are_left_out_and_state_round_trips():
    rise = LossRise()
    rise.update(list(range(30)), [1.0] * 20 + [math.nan] + [50.0] * 9,
                [False] * 20 + [False] + [True] * 9)
    assert rise.risen(1.5) is None  # the x50 losses were of skipped steps
    other = LossRise()
    other.load_state_dict(rise.state_dict())
    assert other.state_dict() == rise.state_dict()


# ---- in a guarded run ----------------------------------------------------------------------


def test_a_bad_batch_is_skipped_at_its_step_and_leaves_the_weights_bit_identical():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    guard = gg.Guard(model, opt, clip=gg.ZClip(), recovery=gg.Recovery(), every=10)
    g = torch.Generator().manual_seed(1)
    bad = 60
    for step in range(80):
        x = torch.randn(16, 8, generator=g)
        if step == bad:
            x = x * 1e4  # a unit error in one batch
        loss = nn.functional.mse_loss(model(x), x.sum(dim=1, keepdim=True).sin())
        loss.backward()
        if step == bad:
            before = [p.detach().clone() for p in model.parameters()]
            state = {k: v.clone() for k, v in opt.state[next(model.parameters())].items()}
        guard.step(loss)
        if step == bad:
            assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
            after = opt.state[next(model.parameters())]
            assert all(torch.equal(state[k], after[k]) for k in state)
        opt.zero_grad()
    guard.close()
    skips = [e for e in guard.events if e.kind == "skip"]
    assert [e.step for e in skips] == [bad] and "spiked" in skips[0].message
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("seed", [0, 1])
def test_an_lr_far_too_high_is_backed_off_when_the_loss_climbs(seed):
    """A schedule gone wrong: the LR x150 at step 60; the gradient spikes are skipped, the
    LR backed off, and the run ends finite."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                          nn.Linear(64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    rec = gg.Recovery()
    guard = gg.Guard(model, opt, clip=gg.ZClip(), recovery=rec, every=25)
    g = torch.Generator().manual_seed(seed)
    for step in range(200):
        x = torch.randn(32, 8, generator=g)
        for grp in opt.param_groups:
            grp["lr"] = 0.02 if step < 60 else 3.0  # a schedule gone wrong at step 60
        loss = nn.functional.mse_loss(model(x), x[:, :1])
        loss.backward()
        guard.step(loss)
        opt.zero_grad()
    guard.close()
    backoffs = [e for e in guard.events if e.kind in ("lr_backoff", "rollback")]
    assert backoffs and backoffs[0].step >= 60
    assert rec.lr_ceiling < 1.0 or rec.lr_factor < 1.0
    assert all(torch.isfinite(p).all() for p in model.parameters())


def climbing_run(cap: float = math.inf, slow: int = 0, scale: float = 1.0, batch: int = 16,
                 **recovery: object) -> gg.Guard:
    """A linear model learning x -> ``scale`` * x[0] on batches of ``batch``; from step 40 a drift with no gradient
    is added to the loss it reports, growing 8% a step up to ``cap``. For the first ``slow``
    steps the LR is 1/50 of its value (the model has learnt nothing by the first snapshot)."""
    torch.manual_seed(0)
    lr = 0.05
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    guard = gg.Guard(model, opt, recovery=gg.Recovery(**recovery), every=20)
    g = torch.Generator().manual_seed(0)
    for step in range(100):
        opt.param_groups[0]["lr"] = lr / 50 if step < slow else lr
        x = torch.randn(batch, 4, generator=g)
        loss = nn.functional.mse_loss(model(x), scale * x[:, :1])
        loss.backward()
        drift = 0.0 if step < 40 else min(cap, 0.5 * (1.08 ** (step - 40) - 1))
        guard.step(loss.detach() + drift)
        opt.zero_grad()
    guard.close()
    return guard


def test_loss_rise_false_leaves_a_rising_loss_alone():
    """For objectives that may rise in a healthy run (a GAN's generator)."""
    guard = climbing_run(loss_rise=False)
    assert not [e for e in guard.events if e.kind in ("lr_backoff", "rollback")]
    with pytest.raises(TypeError, match="loss_rise"):
        gg.Recovery(loss_rise="yes")  # type: ignore[arg-type]


def test_a_loss_that_climbs_without_a_spike_backs_the_lr_off_at_the_flush():
    """From step 40 the loss grows 8% a step to +0.6, never a spike (the added drift has
    no gradient): the loss-rise test backs off at a flush, naming the rise. The first
    judgement (step 59) finds the loss already climbing, so the only snapshot is of the
    weights before the first step (a loss of 0.93): the weights now, at 0.6, hold clear
    progress over them and are kept."""
    guard = climbing_run(cap=0.6, batch=256)
    assert not [e for e in guard.events if e.kind in ("skip", "rollback")]
    assert [a for a in guard.recovery.actions if a.kind == "snapshot"] == []
    backoff = next(e for e in guard.events if e.kind == "lr_backoff")
    # at the flush of step 79, or 69 when an LR probe (started at step 59 on a loss twice its
    # best) flushes every ten steps
    assert "the loss rose" in backoff.message and backoff.step in (59, 69, 79)
    assert backoff.data["reason"].startswith("the loss rose")


def test_a_rise_above_the_level_of_the_last_snapshot_rolls_back_at_once():
    """The same climb without a cap, judged (and snapshot) at every flush: at the flush that
    sees it (step 79, or 69 when an LR probe flushes every ten steps) the loss is 1-2.8, over
    1.5x the level the snapshot of step 39 was taken at (0.0015). A back-off would keep
    weights worse than the snapshot's: the ladder rolls back at once, lowering the LR
    ceiling, with no back-off first. At step 59 the loss was already up 200x its best, not
    yet by half of what the run learnt (no rise yet), but no healthy state either: no
    snapshot was taken of it."""
    guard = climbing_run(snapshot_every=20)
    rec = guard.recovery
    assert rec is not None
    acted = [e for e in guard.events if e.kind in ("lr_backoff", "rollback")]
    assert [a.step for a in rec.actions if a.kind == "snapshot" and a.step < acted[0].step] == [
        19, 39]
    assert acted and acted[0].kind == "rollback" and acted[0].step in (59, 69, 79)
    assert acted[0].data["snapshot_step"] == 39
    assert "the last snapshot was taken at a loss of" in acted[0].message
    assert rec.decisions[0].kind == "rollback" and rec.decisions[0].ceiling == 0.5


@pytest.mark.parametrize("settled", [False, True], ids=["on_probation", "settled"])
def test_after_a_relapse_a_noisy_loss_well_above_its_best_halves_the_ceiling_again(settled):
    """LR far too high: the run is backed off and rolled back, the ceiling lowered; at the
    lowered ceiling its loss still climbs to 2x its best (no spike, no NaN, never near the
    fresh model's loss): the strict rise test lowers the ceiling once more. Once the lowered
    LR was reported settled, the usual test applies (a loss near zero late in a run doubles
    from noise alone) and the same rise is left alone."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    rec = gg.Recovery()
    guard = gg.Guard(model, opt, recovery=rec, every=10)
    # the state after a relapse whose trigger came 150 steps before this stretch of the run
    rec.state = LadderState(factor=0.25, ceiling=0.25, backoff_level=0.25, last_trigger=-150,
                            settled=0.25 if settled else None)
    g = torch.Generator().manual_seed(0)
    for step in range(120):
        x = torch.randn(16, 4, generator=g)
        loss = nn.functional.mse_loss(model(x), x[:, :1])
        loss.backward()
        # no gradient: a level only, noisy, climbing from 0.15 to 0.4 over steps 50-80
        level = 2.3 if step < 10 else 0.15 * (0.4 / 0.15) ** min(1.0, max(0, step - 50) / 30)
        noise = math.exp(0.2 * float(torch.randn((), generator=g)))
        guard.step(loss.detach() * 0 + level * noise)
        opt.zero_grad()
    guard.close()
    if settled:
        assert not [e for e in guard.events if e.kind in ("lr_backoff", "rollback")]
        assert rec.lr_ceiling == 0.25
        return
    # one rung (a back-off; a rollback since a snapshot is taken while the loss keeps
    # falling well below the newest one's level: the weights at 0.15 are there to go to)
    rungs = [e for e in guard.events if e.kind in ("lr_backoff", "rollback")]
    assert len(rungs) == 1 and rungs[0].step >= 60 and "the loss rose" in rungs[0].message
    assert rungs[0].kind == "lr_backoff" or rungs[0].data["snapshot_step"] >= 10
    assert not [e for e in guard.events if e.kind == "skip"]
    assert rec.lr_ceiling == pytest.approx(0.125)  # halved: the factor in force had failed


def test_a_rung_the_loss_level_decided_says_how_to_turn_the_loss_tests_off():
    """A loss that rises whatever the weights do (here a drift with no gradient; a GAN's
    players, RL returns) is what the loss-level tests cannot tell from trouble: the
    rollback they decide names ``Recovery(loss_rise=False)`` (benchmarks/gan.py: the default
    recovery aborts a healthy GAN, and trains it with the option)."""
    guard = climbing_run()
    rung = next(e for e in guard.events if e.kind == "rollback")
    assert "the loss rose" in rung.message and "loss_rise=False" in rung.remedy


def test_a_spike_or_a_nan_does_not_name_the_loss_tests():
    """Only the rungs the loss level decided (a rise, a loss that did not come back) carry
    ``by_level``, and only those name the option; a skipped NaN/spike, a confirmed loss spike
    with a gradient spike and a network that died (``by_level=False`` from the flush) do
    not (a loss spike alone is the loss level's: below)."""
    from gradguard.recovery.ladder import LadderConfig, LadderState, Trigger, transition
    from gradguard.recovery.messages import _moving_objective
    cfg = LadderConfig(skip_patience=1)
    for trig, by_level in ((Trigger("skip", 9, "non-finite"), False),
                           (Trigger("spike", 9, "confirmed loss spike (step 9)"), False),
                           (Trigger("spike", 9, "the loss is back at the fresh model's level, "
                                    "the network died"), False),
                           (Trigger("spike", 9, "the loss rose to 3, 2x its best", by_level=True), True)):
        _, (action,) = transition(cfg, LadderState(), trig)
        assert action.by_level is by_level, trig
        assert ("loss_rise=False" in _moving_objective(action)) is by_level
    st, _ = transition(cfg, LadderState(), Trigger("spike", 9, "the loss rose", 1.0, by_level=True))
    _, (check,) = transition(cfg, st, Trigger("progress", 60, value=5.0))  # did not come back
    assert check.kind == "rollback" and check.by_level
    assert _moving_objective(check).endswith("loss_rise=False).")


def drifting_run(steps: int, nan_at: tuple[int, ...] = (), run_dir=None, hooked: bool = False,
                 every: int = 20, **recovery: object):
    """A linear model learning x -> x[0]; from step 40 the loss it reports carries a drift
    no weight can undo (0.02 a step: a GAN's generator against a sharper discriminator),
    and the steps of ``nan_at`` have NaN gradients. ``hooked``: the guard runs in the
    optimizer's pre-step hook, as ``gradguard run`` drives it."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rec = gg.Recovery(**recovery)
    guard, used = recording_guard(model, opt, rec, every=every, run_dir=run_dir, hooked=hooked)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        x = torch.randn(16, 4, generator=g)
        loss = nn.functional.mse_loss(model(x), x[:, :1])
        (loss * (math.nan if step in nan_at else 1.0)).backward()
        told = loss.detach() + 0.02 * max(0, step - 40)
        if hooked:
            guard.step(told)  # what the hook reads: the loss, then the trainer's own step
            opt.step()
        else:
            guard.step(told)
        opt.zero_grad()
    guard.close()
    return guard, rec, model, used


def test_a_loss_no_restored_weights_bring_back_turns_the_loss_tests_off_not_the_run():
    """A loss that rises whatever the weights (benchmarks/gan.py: a GAN's generator) used to
    end in TrainingDiverged after max_rollbacks rollbacks the loss level decided. Weights
    restored at a fraction of the LR keep close to the loss they were saved at if the loss
    answers them; this one never comes back: the first losses on the restored weights are
    the trouble's (``data_shift``), and again at the next rollback: the loss moves by
    itself. The ladder turns its loss-level tests off, says so, lifts the ceilings their
    rungs lowered, and the run goes on at its LR. A NaN later is still skipped. (Before the
    shift test: three rollbacks, ``max_rollbacks``, then the same.)"""
    guard, rec, model, used = drifting_run(600, nan_at=(500,))
    kinds = [e.kind for e in guard.events]
    assert "abort" not in kinds and kinds.count("loss_level_off") == 1
    off = next(e for e in guard.events if e.kind == "loss_level_off")
    rollbacks = [e for e in guard.events if e.kind == "rollback" and e.step < off.step]
    shifts = [e for e in guard.events if e.kind == "data_shift"]
    # the second rollback goes to the weights the run went on from at the first change
    # (the snapshots from before it are dropped): the loss far above their level there
    # is a second change, or two rollbacks the level decided within ``relapse_window``
    # of the first are a drift too slow for the shift test; either turns the tests off
    assert len(rollbacks) == 2 and shifts and shifts[0].step < rollbacks[-1].step
    assert "changed again" in off.message or "changed by themselves" in off.message
    assert off.severity == "warning" and "does not answer the weights" in off.message
    assert "loss_rise=False" in off.remedy and off.data["ceiling"] == 1.0
    assert not [e for e in guard.events if e.kind in ("rollback", "lr_backoff")
                and e.step > off.step]  # the level decides nothing any more
    assert rec.state.level_off and rec.lr_ceiling == 1.0
    assert used[-1] == pytest.approx(0.05)  # restored to the full LR
    assert [e.step for e in guard.events if e.kind == "skip" and e.step > off.step] == [500]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_loss_tests_off_survive_a_checkpoint():
    _, rec, _, _ = drifting_run(350)
    assert rec.state.level_off
    fresh = gg.Recovery()
    fresh.load_state_dict(rec.state_dict())
    assert fresh.state.level_off


def test_a_run_whose_loss_does_not_answer_the_weights_is_not_judged_on_it(tmp_path):
    """The report's verdict is a loss level too: after ``loss_level_off`` it does not call
    the run diverged with ``lr_too_high`` (what a rising loss otherwise says), nor stops a
    ``gradguard run --fail-on-divergence`` for it; it says why and what to judge it on."""
    from gradguard.report._data import load_run
    from gradguard.report._outcome import judge
    from gradguard.report._summary import summary_sentence

    drifting_run(400, run_dir=tmp_path)
    data = load_run(tmp_path)
    out = judge(data, {})
    assert (out.status, out.cause, out.ok, out.rose) == ("unjudged", None, True, False)
    assert "did not answer the weights" in out.clause and "loss_rise=False" in out.remedy
    text = summary_sentence(data, {})
    assert "lr_too_high" not in text and "rolled back 2 times" in text
    assert "the run is not judged on it" in text


def test_restored_weights_are_judged_against_the_norms_they_had(monkeypatch):
    """Found running ``gradguard run`` on a script whose loss drifts: the model had fitted
    its linear target (gradient norm ~1e-4) when a rollback restored the fresh model (norm
    ~1), and the per-step spike verdict, whose statistics were the fitted model's, skipped
    the fresh model's steps as spikes (norm 1.7, 3.0, 1.2: x1e4 its median) and the three
    skips rolled back once more. A snapshot now carries the verdict's statistics with the
    weights (as it carries the clip policy's), and a rollback restores them. (The shift
    test is off here: it ends this run's episode before the fresh model comes back.)"""
    from gradguard.recovery import shift

    monkeypatch.setattr(shift, "SHIFT_RATIO", math.inf)
    guard, *_ = drifting_run(300, hooked=True, every=50)
    back = [e for e in guard.events if e.kind == "rollback"]
    assert any(e.data["snapshot_step"] == -1 for e in back)  # the fresh model came back
    assert not [e for e in guard.events if e.kind == "skip" and e.severity == "warning"]
    assert all("spiking" not in e.message for e in back)


def test_a_step_voided_by_a_restore_in_its_hook_teaches_the_statistics_nothing():
    """Under a trainer's hook (``gradguard run``, Lightning, the HF callback) the flush runs
    at the start of the next step's hook, after its backward: when it restores weights, that
    step's gradients are the replaced weights' and its update is voided. They used to feed
    the statistics just restored with the weights: a fitted model's norm (1e-4) became the
    first value of the fresh model's spike history, and every fresh step after it (norm ~1,
    x1e4) was skipped as a spike until the run stopped (TrainingDiverged, "101 steps in a
    row spiking"). The voided step leaves the clip policy's and the verdict's statistics as
    the restore left them."""
    from gradguard.integrations._hooked import hooked_guard
    from gradguard.recovery import actions

    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rec = gg.Recovery()
    guard = hooked_guard(model, opt, gg.GuardConfig(every=10, recovery=rec, clip=gg.ZClip()))
    real = rec.on_flush
    restored: dict[str, object] = {}

    def on_flush(guard_, window, *a, **k):  # type: ignore[no-untyped-def]
        real(guard_, window, *a, **k)
        if window.steps[-1] == 99:  # the fitted model goes back to its fresh weights
            snap = rec.ring.load(len(rec.store) - 1)
            assert snap is not None and snap["step"] == -1
            actions.restore(guard, snap)
            rec.restores += 1
            restored.update(verdict=copy_state(rec._verdict.state_dict()),
                            clip=copy_state(guard.clip.state_dict()))

    rec.on_flush = on_flush  # type: ignore[method-assign]
    g = torch.Generator().manual_seed(0)
    for step in range(130):
        x = torch.randn(16, 4, generator=g)
        loss = nn.functional.mse_loss(model(x), x[:, :1])
        loss.backward()
        guard.step(loss.detach())  # what the hook reads: the loss, then the trainer's step
        opt.step()
        opt.zero_grad()
        if step == 100:  # the voided step is over: the statistics are the restored ones
            now = rec._verdict.state_dict()
            assert torch.equal(now["count"], restored["verdict"]["count"])  # type: ignore[index]
            assert torch.equal(now["count"], torch.zeros(2, dtype=torch.long))
            was, clip = restored["clip"]["state"], guard.clip.state_dict()["state"]  # type: ignore[index]
            assert (clip is None) == (was is None)
            assert was is None or all(torch.equal(v, was[k]) for k, v in clip.items())
    guard.close()
    voided = [e for e in guard.events if e.kind == "skip" and e.step == 100]
    assert voided and voided[0].severity == "info"
    assert not [e for e in guard.events if e.kind == "skip" and e.severity != "info"]
    assert not [e for e in guard.events if e.kind in ("rollback", "lr_backoff", "abort")]


def test_a_snapshot_restores_the_spike_verdicts_statistics():
    from gradguard.recovery import actions

    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rec = gg.Recovery()
    guard = gg.Guard(model, opt, recovery=rec, every=10)
    g = torch.Generator().manual_seed(0)

    def train(n: int, scale: float) -> None:
        for _ in range(n):
            x = torch.randn(16, 4, generator=g)
            (scale * nn.functional.mse_loss(model(x), x[:, :1])).backward()
            guard.step()
            opt.zero_grad()

    train(30, 1.0)
    snap = copy_state(actions.snapshot_state(guard, 29))
    ring, count = rec._verdict.ring.clone(), rec._verdict.count.clone()
    train(30, 30.0)  # the norms the verdict sees now are 30x larger
    assert not torch.allclose(rec._verdict.ring, ring, equal_nan=True)
    actions.restore(guard, snap)
    torch.testing.assert_close(rec._verdict.ring, ring, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(rec._verdict.count, count)
    guard.close()


def test_an_early_loss_ten_times_the_first_twice_in_a_row_is_a_spike_at_its_step():
    """A GELU MLP on Adam at 100x: the first updates lift the loss from 2.3 to 20-50 and it
    falls back within ten steps, the weights wrecked for good (no LR trains them back down
    to the twin's loss). In the warm-up, x10 the first values two steps in a row is a spike
    (every step on wrecked weights is high); once is not (two tasks taking turns, their
    losses 10-100x apart), nor is x5 (a healthy first update moves the loss by far less)."""
    v = SpikeVerdict(warmup=20)
    got = codes(v, [1.0] * 6, [2.29, 4.65, 52.05, 33.99, 31.95, 30.0])
    assert got == [0, 0, 0, LOSS_SPIKE, LOSS_SPIKE, LOSS_SPIKE]
    v = SpikeVerdict(warmup=20)
    assert codes(v, [1.0] * 8, [0.1, 2.3] * 4) == [0] * 8  # two tasks taking turns
    v = SpikeVerdict(warmup=20)
    assert codes(v, [1.0] * 40, [0.1, 2.3] * 20) == [0] * 40  # each joins the history
    assert v.count is not None and v.count.tolist()[1] == 40
    v = SpikeVerdict(warmup=20)
    assert codes(v, [1.0] * 3, [2.3, 2.2, 11.0]) == [0, 0, 0]
    v = SpikeVerdict(warmup=20)
    assert codes(v, [1.0] * 3, [2.3, 2.2, 400.0]) == [0, 0, LOSS_SPIKE]  # x100: at once


def _blocks(seed: int, n: int, level: float = 4e-4) -> list[float]:
    """A converged classifier's loss: a noisy level, heavy-tailed, going nowhere."""
    g = torch.Generator().manual_seed(seed)
    base = (level * torch.exp(0.35 * torch.randn(n, generator=g))).tolist()
    return [x * (20.0 if i % 29 == 3 else 1.0) for i, x in enumerate(base)]


def test_a_run_that_starts_at_its_best_has_no_progress_to_give_back():
    """A fine-tuned model starts at its best: its noisy level (ten-step medians 1.5-2.5x
    apart) is no rise, however long it runs, for it learnt nothing whose share a rise
    could give back. A rise that stands out of that noise (x10) still counts. (The LR
    probe's cue, :meth:`LossRise.noisy`, may see it: an experiment, no rung.)"""
    for seed in range(5):
        rise, risen = LossRise(), []
        for start in range(0, 2000, 10):
            feed(rise, start, _blocks(seed * 1000 + start, 10))
            risen.append(rise.risen(1.5))
        assert risen == [None] * len(risen), (seed, [r for r in risen if r])
        assert rise.noise() is not None and rise.noise() > 0.05
        feed(rise, 2000, [10 * x for x in _blocks(seed, 20)])
        got = rise.risen(1.5)
        assert got is not None and got.ratio > 5


#: A ``transformers`` MobileNetV2 on digits, SGD momentum at 0.05 (the paper's LR; 0.005
#: trains): its first 50 batch losses. It learns nothing: from step 5 the loss is 2-6x the
#: fresh model's, and NaN at step 178.
MOBILENET_LR10 = [
    2.686, 2.675, 2.808, 3.685, 3.743, 2.557, 5.248, 4.298, 4.585, 5.642, 6.485, 6.276, 6.388,
    5.786, 3.903, 12.9, 5.327, 12.8, 8.574, 8.128, 8.457, 7.886, 14.622, 8.369, 3.7, 5.041,
    12.283, 7.733, 6.098, 8.21, 14.425, 3.744, 6.596, 10.078, 7.432, 2.824, 8.931, 4.852,
    18.122, 13.859, 3.462, 13.936, 14.834, 5.026, 8.126, 15.67, 12.423, 11.292, 2.524, 6.792]


def test_a_run_that_learnt_nothing_and_stands_well_above_its_fresh_level_has_risen():
    """Its rise over its best (the fresh level itself) is within the noise a run that
    learnt nothing must stand out of, yet it is 3 standard errors above the fresh model's
    level: risen, and worse than fresh (a rollback's ceiling is the back-off factor)."""
    rise = LossRise()
    feed(rise, 0, MOBILENET_LR10)
    noise = rise.noise()
    assert noise is not None and rise.best == rise.initial == pytest.approx(2.686)
    assert math.log(rise.latest / rise.best) < NOISE_UNITS * noise  # the noise test alone: no
    got = rise.risen(1.5)
    assert got is not None and got.ratio == pytest.approx(3.05, abs=0.01)
    assert rise.worse_than_fresh()
    assert math.log(rise.latest / rise.initial) > FRESH_SIGMAS * noise * math.sqrt(1 + 10 / 3)
    # a converged model fine-tuned: never risen, never worse than fresh
    for seed in range(5):
        quiet = LossRise()
        for start in range(0, 1000, 10):
            feed(quiet, start, _blocks(seed * 1000 + start, 10))
            assert not quiet.worse_than_fresh()
    # one that learnt first is judged by what it gave back, not against its fresh level
    learnt = LossRise()
    feed(learnt, 0, [2.3, 2.3, 2.3] + [0.2] * 37)
    feed(learnt, 40, [2.0] * 20)
    assert learnt.risen(1.5) is not None and not learnt.worse_than_fresh()


#: The same MobileNetV2 at the same LR reached through a 30-step linear warm-up
#: (``LambdaLR``): its first 50 batch losses. The warm-up lets it dip a little below the
#: fresh model's level (ten-step medians to 2.51 against 2.91), within the loss's noise,
#: before the LR nears 0.05 and the loss climbs to 3-5x.
MOBILENET_WARMUP = [
    2.686, 2.962, 2.907, 2.871, 2.926, 2.493, 2.684, 3.007, 2.431, 2.44, 2.53, 4.045, 1.95,
    2.457, 3.632, 4.176, 2.994, 3.332, 2.342, 3.949, 3.26, 2.59, 3.862, 9.444, 2.901, 7.137,
    3.102, 7.919, 4.448, 3.251, 5.438, 14.141, 8.973, 12.678, 10.839, 6.564, 6.152, 4.663,
    11.821, 11.63, 11.167, 8.213, 14.756, 8.463, 8.597, 12.395, 10.037, 9.519, 4.488, 4.525]


def test_a_run_whose_dip_below_its_fresh_level_was_noise_is_still_worse_than_fresh():
    """Its best is below the fresh level, but by less than the noise a run must learn to
    have learnt anything: what decides is that it learnt nothing, not that its best equals
    the fresh level to the last digit (with ``best >= initial`` its rollback halved the LR
    twice and ended 2.9x its twin; the back-off factor trains it: 1.8x)."""
    rise = LossRise()
    feed(rise, 0, MOBILENET_WARMUP)
    noise = rise.noise()
    assert noise is not None and rise.initial == pytest.approx(2.907)
    assert rise.best is not None and rise.best < rise.initial  # it dipped ...
    assert math.log(rise.first_block / rise.best) < NOISE_UNITS * noise  # ... within its noise
    assert rise.risen(1.5) is not None
    assert rise.worse_than_fresh()
    # the dip is what it learnt when it stands out of the noise: then judged by what it gave back
    learnt = LossRise()
    feed(learnt, 0, MOBILENET_WARMUP[:10] + [x / 20 for x in MOBILENET_WARMUP[10:20]])
    feed(learnt, 20, MOBILENET_WARMUP[20:])
    assert learnt.risen(1.5) is not None and not learnt.worse_than_fresh()


def test_the_loss_noise_and_first_level_survive_a_checkpoint():
    rise = LossRise()
    feed(rise, 0, _blocks(0, 95))
    again = LossRise()
    again.load_state_dict(rise.state_dict())
    assert again.first_block == rise.first_block is not None
    assert again.noise() == rise.noise() is not None
    feed(rise, 95, _blocks(1, 25))
    feed(again, 95, _blocks(1, 25))
    assert again.noise() == rise.noise() and len(again._sigmas) == 12
    older = LossRise()  # a checkpoint from before the noise was kept: the old test
    older.load_state_dict({k: v for k, v in rise.state_dict().items()
                           if k not in ("sigmas", "block", "first_block")})
    assert older.noise() is None and older.first_block is None


def _burst_run(grad_too: bool, **recovery: object):
    """A linear regression on SGD whose loss is x10 on steps 100-105 and 200-205: in what it
    reports alone (``grad_too`` False: an RL value loss as the returns of a better policy
    grow, a GAN player's), or in its inputs, gradients and all."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = gg.Guard(model, opt, recovery=gg.Recovery(**recovery), every=20)
    g = torch.Generator().manual_seed(0)
    for step in range(300):
        x = torch.randn(16, 4, generator=g)
        k = 10.0 if 100 <= step < 106 or 200 <= step < 206 else 1.0
        x = x * k if grad_too else x
        loss = nn.functional.mse_loss(model(x), x[:, :1] + 0.3 * torch.randn(16, 1, generator=g))
        loss.backward()
        guard.step(loss.detach() * (1.0 if grad_too else k))
        opt.zero_grad()
    guard.close()
    return guard


def test_a_loss_spike_its_gradients_do_not_share_is_the_loss_levels_to_decide():
    """A confirmed loss spike whose window has no gradient spike is judged on the loss alone:
    its rung carries ``by_level`` (its remedy names ``Recovery(loss_rise=False)``; at
    ``max_rollbacks`` it turns the loss tests off rather than raise ``TrainingDiverged``),
    and with the loss level no evidence (``loss_rise=False``, ``loss_level_off``) it is not
    acted on. Found as a stranger: PPO on CartPole at Adam 1e-2 (unguarded: a return of
    200), its value loss growing with the returns, was rolled back three times on the loss
    level, then stopped as diverged on a loss spike of 2.7x (now: ``loss_level_off``, 198.9);
    with ``loss_rise=False`` the same spike still backed the LR off. A spike with its
    gradients is acted on either way."""
    rungs = {}
    for grad_too in (False, True):
        for rise in (True, False):
            guard = _burst_run(grad_too, loss_rise=rise)
            acted = [e for e in guard.events if e.kind in ("lr_backoff", "rollback")]
            assert any(e.kind == "loss_spike" and e.step == 101 for e in guard.events)
            rungs[grad_too, rise] = acted
    alone = rungs[False, True]
    assert alone and alone[0].step == 101 and "loss_rise=False" in alone[0].remedy
    assert rungs[False, False] == []
    for rise in (True, False):
        with_grads = rungs[True, rise]
        assert with_grads and with_grads[0].step in (101, 103)
        assert not any("loss_rise=False" in (e.remedy or "") for e in with_grads)


def test_a_loss_level_rung_at_max_rollbacks_turns_the_loss_tests_off_not_the_run():
    from gradguard.recovery.ladder import LadderConfig, LadderState, Trigger, transition

    cfg = LadderConfig()
    st = LadderState(rollbacks=cfg.max_rollbacks, last_trigger=190, factor=0.01, ceiling=0.05)
    spike = "confirmed loss spike (step 196: loss spiking since step 196)"
    _, (off,) = transition(cfg, st, Trigger("spike", 196, spike, 1.0, confirmed=True, by_level=True))
    _, (abort,) = transition(cfg, st, Trigger("spike", 196, spike, 1.0, confirmed=True))
    assert (off.kind, abort.kind) == ("level_off", "abort")


def test_a_restore_heard_from_a_fused_skip_flag_in_a_hook_teaches_the_clip_policy_nothing(
        monkeypatch):
    """Under a trainer's hook a fused optimizer's skip flags are heard at the next step's
    hook, after its backward and after the clip policy saw that step. The digits CNN on
    fused AdamW at 100x: its first update wrecks it, the steps after are skipped for their
    loss, and the rollback comes on hearing their flags. The step whose hook heard them is
    voided (its gradients are the wrecked weights'), and the rollback restores the clip
    policy's statistics after the policy saw it: its state after that step is the one the
    rollback restored (the verdict, judged after the hearing, is spared as stale)."""
    from benchmarks import rescue_cases as rc

    from gradguard.integrations._hooked import hooked_guard
    from gradguard.recovery import actions

    torch.manual_seed(2)
    model = rc.digits_cnn()
    opt = torch.optim.AdamW(model.parameters(), lr=0.3, fused=True)
    guard = hooked_guard(model, opt, gg.GuardConfig(recovery=gg.Recovery(), clip=gg.ZClip()))
    real, restored = actions.rollback, []

    def rollback(guard_, *a, **k):  # type: ignore[no-untyped-def]
        out = real(guard_, *a, **k)
        restored.append((guard_.step_count, copy_state(guard_.clip.state_dict())))
        return out

    monkeypatch.setattr(actions, "rollback", rollback)
    batch = rc.digits_batches(2)
    for step in range(12):
        x, y = batch(step)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        guard.step(loss.detach())  # the hook; the trainer's fused step follows
        opt.step()
        opt.zero_grad()
        if restored and restored[-1][0] == step:  # this step's hook rolled back
            was, now = restored[-1][1]["state"], guard.clip.state_dict()["state"]
            assert all(torch.equal(v, was[k]) for k, v in now.items())
    guard.close()
    assert restored  # the wreck was rolled back through the hook
