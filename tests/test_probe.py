"""The LR probe (gradguard.recovery.probe): a loss far above its best with no spike; train
the same weights at the LR in force and at half of it, and lower it for good only when half
the LR halved the loss."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.recovery.probe import CONFIRM, COOLDOWN, GAIN, MEASURE, RECUR, TRIAL, LrProbe
from gradguard.recovery.rise import LossRise
from gradguard.report._data import load_run
from gradguard.report._outcome import judge
from gradguard.report._summary import summary_sentence
from helpers import GruRecall, recall_data, recording_guard


def feed(probe: LrProbe, values: list[float], step: int) -> int:
    probe.update(values, [False] * len(values))
    return step + len(values)


@pytest.mark.parametrize(("control", "trial", "too_high"), [
    (0.8, 0.3, True),    # half the LR halved the loss of the same weights: the LR sets it
    (0.25, 0.3, False),  # the loss fell as much at the full LR: progress, not the LR
    (0.5, 0.3, False),   # fell from its level before, but x0.6 of the control (> GAIN)
    (1.2, 0.7, False),   # hardly fell at half the LR: no cause to lower it
])
def test_the_probe_lowers_only_when_half_the_lr_halves_the_loss_of_the_same_weights(
        control, trial, too_high):
    probe = LrProbe()
    step = feed(probe, [1.0] * MEASURE, 0)
    assert probe.start(step) and probe.phase == "control" and probe.factor == 1.0
    step = feed(probe, [control] * (TRIAL - 1), step)
    assert probe.advance(step) is None  # the control arm is not over
    step = feed(probe, [control], step)
    assert probe.advance(step) == "fork" and probe.phase == "trial" and probe.factor == 0.5
    step = feed(probe, [trial] * TRIAL, step)
    done = probe.advance(step)
    assert done is not None and done != "fork" and done.too_high is too_high
    assert (done.before, done.control, done.trial) == (1.0, control, trial)
    assert not probe.active and probe.factor == 1.0
    # a probe that found nothing waits COOLDOWN steps, then twice as long (not after one
    # whose loss fell by half at half the LR: the next excursion may complete its evidence)
    assert probe.next == (step + 1 if too_high else step + COOLDOWN)
    fell = trial <= GAIN
    assert probe.cooldown == (COOLDOWN if too_high or fell else 2 * COOLDOWN)
    assert probe.fell == ((step, 1.0, trial) if fell and not too_high else None)


def _single_sample_losses(level: float, n: int) -> list[float]:
    """``n`` losses whose median is ``level`` and whose logs spread evenly over four nats
    either side of it, as a loss on batches of one does (a squared error of one sample)."""
    return [level * math.exp(-2 + 4 * i / (n - 1)) for i in range(n)]


def test_arms_whose_medians_differ_by_half_within_their_noise_find_nothing():
    """Batches of one: each loss is one sample's, and two medians of 20 such losses from the
    same weights at the same LR differ by half and more by chance (found as a stranger: a
    regression MLP on SGD with batches of one had its LR halved at step 469, then rolled
    back twice and its loss tests turned off, 0.66 against 0.23 unguarded). The trial must
    stand ``NOISE_Z`` standard errors below the control as well."""
    probe = LrProbe()
    step = feed(probe, _single_sample_losses(1.0, MEASURE), 0)
    assert probe.start(step)
    pad = [1.0] * (TRIAL - MEASURE)  # each arm's level: the median of its last MEASURE
    step = feed(probe, pad + _single_sample_losses(1.0, MEASURE), step)
    assert probe.advance(step) == "fork"
    step = feed(probe, pad + _single_sample_losses(0.4, MEASURE), step)  # x0.4: noise
    done = probe.advance(step)
    assert done.trial <= GAIN * done.control and not done.too_high and not done.fell
    assert done.spread_control > 0.2 and done.spread_trial > 0.2
    # the same medians from losses that hardly stray: the LR is too high
    sure = done._replace(spread_before=0.02, spread_control=0.02, spread_trial=0.02)
    assert sure.too_high and sure.fell


def test_a_cue_confirmed_soon_after_a_probe_that_fell_says_the_lr_is_too_high():
    """A probe that fell (x0.3 at half the LR) and did not rise again (the excursion it
    started on decayed by itself) leaves evidence: the next confirmed cue within RECUR
    steps completes it, with no probe of its own; later than that, a probe is started."""
    for gap, what in ((RECUR, "recurred"), (RECUR + 10, "probe")):
        probe = LrProbe()
        step = feed(probe, [1.0] * MEASURE, 0)
        probe.start(step)
        step = feed(probe, [0.25] * TRIAL, step)
        assert probe.advance(step) == "fork"
        step = feed(probe, [0.3] * TRIAL, step)
        done = probe.advance(step)
        assert done is not None and done != "fork" and done.fell and not done.too_high
        feed(probe, [1.0] * MEASURE, step)  # the level for the next probe
        assert probe.cue(step + gap - 10, True) is None  # first sight
        assert probe.cue(step + gap, True) == what
        other = LrProbe()
        other.load_state_dict(probe.state_dict())
        assert other.fell == probe.fell


def test_a_probe_starts_when_its_cue_comes_back_not_on_one_excursion():
    """A floor the LR sets keeps coming back; a healthy run's loss may go above twice its
    best once (a BatchNorm MLP at SGD 0.3, lab T7's healthy twin, at step 149) and a probe
    there would cost it nothing but perturb a chaotic trajectory."""
    probe = LrProbe()
    feed(probe, [1.0] * MEASURE, 0)
    assert not probe.cue(149, True) and probe.watching and not probe.active
    assert not probe.cue(159, False) and probe.watching  # still watching for it
    assert not probe.cue(149 + CONFIRM + 10, True)  # too late: a new first sight
    assert probe.suspect == 149 + CONFIRM + 10
    assert probe.cue(149 + CONFIRM + 20, True) and probe.active
    assert probe.suspect is None


def test_a_probe_needs_a_level_to_compare_and_waits_out_its_cooldown():
    probe = LrProbe()
    step = feed(probe, [1.0] * (MEASURE - 1), 0)
    assert not probe.start(step)  # no MEASURE losses before it yet
    step = feed(probe, [1.0], step)
    probe.next = step + 5
    assert not probe.start(step)
    assert probe.start(step + 5)


def test_a_probe_interrupted_by_the_ladder_is_void_and_round_trips():
    probe = LrProbe()
    step = feed(probe, [1.0] * MEASURE, 0)
    probe.start(step)
    probe.fork = {"model": {}}
    step = feed(probe, [0.9] * TRIAL, step)
    assert probe.advance(step) == "fork"
    step = feed(probe, [0.3] * 10, step)
    other = LrProbe()
    other.load_state_dict(probe.state_dict())
    assert other.state_dict() == probe.state_dict() and other.factor == 0.5
    probe.cancel(step)
    assert not probe.active and probe.factor == 1.0 and probe.advance(step + 50) is None
    assert probe.fork is None


def test_a_control_arm_does_not_survive_a_resume():
    """The copy the trial would start from is not checkpointed: a probe resumed in its
    control arm is dropped (its cue brings it back)."""
    probe = LrProbe()
    step = feed(probe, [1.0] * MEASURE, 0)
    probe.start(step)
    feed(probe, [0.9] * 10, step)
    other = LrProbe()
    other.load_state_dict(probe.state_dict())
    assert not other.active and other.factor == 1.0 and other.probes == 1


def test_noisy_is_twice_the_best_having_given_back_some_progress():
    rise = LossRise()
    rise.update(list(range(40)), [2.0] * 3 + [0.2] * 37, [False] * 40)
    rise.update(list(range(40, 60)), [0.35] * 20, [False] * 20)
    assert rise.noisy() is None  # x1.75
    rise.update(list(range(60, 80)), [0.5] * 20, [False] * 20)
    assert rise.noisy() == (0.5, 2.5)
    near_zero = LossRise()  # x3 of a best near zero, 0.2% of what the run learnt: noise
    near_zero.update(list(range(40)), [2.0] * 3 + [0.001] * 37, [False] * 40)
    near_zero.update(list(range(40, 60)), [0.003] * 20, [False] * 20)
    assert near_zero.noisy() is None


def floor_run(floor, steps: int = 400, every: int = 50, seed: int = 0, run_dir=None,
              hooked: bool | str = False, trace: list | None = None, close: bool = True,
              **rec_kw):
    """A run whose loss learns from 5 towards a noisy ``floor(lr, age)`` set by the LR the
    last optimizer step used (the LR times the guard's factor; warmed up over 60 steps).
    The gradients are a real model's; the loss handed to the guard is the level, a function
    of the model's age (a buffer counting its updates, restored with its weights when the
    probe forks its trial from the weights its control started from) and of the LR.
    ``hooked``: the guard runs as in a trainer's pre-step hook, the loop steps the
    optimizer itself; ``"inside"``: as Lightning calls it, within the optimizer's step
    (from its closure, after the step's pre-hooks); ``trace`` gets the weights after each
    step."""
    torch.manual_seed(seed)
    model = nn.Linear(4, 1)
    model.register_buffer("age", torch.zeros((), dtype=torch.long))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 60))
    rec = gg.Recovery(**rec_kw)
    guard, used = recording_guard(model, opt, rec, every=every, run_dir=run_dir,
                                  hooked=bool(hooked))
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 4, generator=g)
        loss = nn.functional.mse_loss(model(x), x.sum(1, keepdim=True).sin())
        loss.backward()
        lr = used[-1] if used else 0.0
        age = int(model.age)
        level = 5.0 * math.exp(-age / 10) + floor(lr, age)
        told = loss.detach() * 0 + level * math.exp(0.1 * float(torch.randn((), generator=g)))
        if hooked == "inside":
            opt.step(lambda t=told: guard.step(t))  # pre-hooks, the guard, the update, post-hooks
        else:
            guard.step(told)
        if hooked is True:
            opt.step()  # the trainer's own step
        if trace is not None:
            trace.append(model.weight.detach().clone())
        model.age += 1
        sched.step()
        opt.zero_grad()
    if close:  # a trial under way at the close is discarded
        guard.close()
    return guard, rec, used


def test_a_loss_whose_floor_the_lr_sets_gets_the_lr_it_trains_at(tmp_path):
    """No NaN, no spike, no loss that gives back half its progress: at the full LR (0.5) the
    loss sits at 2.1, ten times its best; at half the LR at 0.6. The probe trains the same
    weights at both, sees the loss follow the LR, and the ladder keeps it halved and reports
    the LR it settled on."""
    guard, rec, used = floor_run(lambda lr, step: 0.1 + 8 * lr * lr)
    lowered = [e for e in guard.events if e.kind == "lr_backoff"]
    assert len(lowered) == 1 and lowered[0].severity == "warning" and lowered[0].data["probe"]
    ev = lowered[0]
    assert "from the same weights" in ev.message and "the LR is too high" in ev.message
    assert ev.data["cause"] == "lr_too_high" and ev.data["lr"] == [pytest.approx(0.25)]
    start = ev.step - 2 * TRIAL  # the probe's control ran at the full LR, its trial at half
    assert set(used[start + 1:start + 1 + TRIAL]) == {0.5}
    assert set(used[start + 1 + TRIAL:ev.step + 1]) == {0.25}
    assert set(used[ev.step + 1:]) == {0.25}
    assert rec.lr_factor == rec.lr_ceiling == 0.5
    settled = [e for e in guard.events if e.kind == "lr_settled"]
    assert settled and settled[0].data["lr"] == [pytest.approx(0.25)]
    assert not [e for e in guard.events if e.kind in ("skip", "rollback", "abort")]
    assert all(torch.isfinite(p).all() for p in guard.model.parameters())


def test_the_verdict_and_summary_of_a_run_whose_lr_was_lowered(tmp_path):
    """The report tells the story: the LR was too high, gradguard halved it, the run
    recovered, and the LR to set."""
    floor_run(lambda lr, step: 0.1 + 8 * lr * lr, run_dir=tmp_path)
    data = load_run(tmp_path)
    outcome = judge(data)
    assert (outcome.status, outcome.cause) == ("recovered", "lr_too_high")
    text = summary_sentence(data, {})
    assert "at half the LR" in text and "gradguard halved the LR; training recovered." in text
    assert text.endswith("Stable at lr 0.25: the edge of what trains; set half of it, 0.125, "
                         "in your config.")


def test_excursions_that_recur_at_the_full_lr_get_it_lowered():
    """At the full LR the loss is thrown up to 30x its best every 150 steps and decays by
    itself (an MLP on Adam at 100x does this, to 12x its best); at half the LR it is not.
    The probe started on the first excursion's peak sees the loss fall by half at half the
    LR, and keep falling when the LR comes back: no proof. The next excursion, 60 steps
    after that probe, completes it: the ladder halves the LR, and the excursions stop."""
    start: list[int] = []

    def floor(lr: float, step: int) -> float:
        if step >= 100 and (step - 100) % 150 == 0 and lr >= 0.5:
            start.append(step)
        return 0.1 + (3.0 * math.exp(-(step - start[-1]) / 30) if start else 0.0)

    guard, rec, used = floor_run(floor, steps=700)
    lowered = [e for e in guard.events if e.kind == "lr_backoff"]
    assert len(lowered) == 1 and lowered[0].data["probe"], [e.message for e in lowered]
    ev = lowered[0]
    assert "again" in ev.message and "at half the LR: the LR is too high" in ev.message
    assert rec._probe.probes == 1 and ev.step - rec.actions[0].step < RECUR
    assert start == [100, 250] and rec.lr_factor == rec.lr_ceiling == 0.5
    assert set(used[ev.step + 1:]) == {0.25}
    assert [e.kind for e in guard.events if e.kind == "lr_settled"] == ["lr_settled"]
    assert not [e for e in guard.events if e.kind in ("skip", "rollback", "abort")]


def test_a_loss_that_does_not_follow_the_lr_keeps_it():
    """The same run, but its floor does not depend on the LR (a noisy task: the loss
    doubles over its best now and then whatever the LR): the probe halves the LR, sees no
    gain, restores it and waits twice as long before the next."""
    guard, rec, used = floor_run(lambda lr, step: 0.1 + 0.5 * min(1.0, max(0, step - 60) / 60))
    # best 10-step median ~0.15 (end of learning), level 0.6: the probe's cue
    assert rec._probe.probes >= 1 and rec.lr_factor == 1.0 and rec.lr_ceiling == 1.0
    assert not [e for e in guard.events if e.kind in ("lr_backoff", "lr_settled", "rollback")]
    assert used.count(0.25) <= rec._probe.probes * TRIAL + 10  # only the trials ran at half


def test_a_probe_goes_on_from_the_arm_whose_loss_is_lower(monkeypatch):
    """When half the LR is worse (here the loss sits three times higher at half the LR), the
    run goes on at its LR from the control's weights: the trial's steps are the ones
    discarded. When it is better but not by half, from the trial's."""
    from gradguard.recovery import actions
    restored: list[int] = []
    restore = actions.restore

    def spy(guard, snap):  # type: ignore[no-untyped-def]
        restored.append(snap["step"])
        restore(guard, snap)

    monkeypatch.setattr(actions, "restore", spy)
    for mult, back in ((3.0, True), (0.7, False)):
        restored.clear()
        guard, rec, _ = floor_run(
            lambda lr, age, m=mult: 0.1 + 0.5 * min(1.0, max(0, age - 60) / 60) * (1 if lr >= 0.4 else m))
        assert rec._probe.probes >= 1 and rec.lr_factor == 1.0
        first = restored[0]  # the fork: the weights the probe started from
        assert len(restored) == rec._probe.probes * (2 if back else 1)
        if back:
            assert restored[:2] == [first, first + TRIAL]
        assert not [e for e in guard.events if e.kind in ("lr_backoff", "rollback", "skip")]
        # each probe says what it found and which arm's weights the run goes on from
        said = [e for e in guard.events if e.kind == "lr_probe"]
        assert len(said) == rec._probe.probes and {e.severity for e in said} == {"info"}
        kept = "control" if back else "trial"
        assert all(e.data["kept"] == kept and e.data["trial"] > 0.5 * e.data["control"]
                   for e in said)
        assert f"from the {'control' if back else 'half-LR'} arm's weights" in said[0].message
        assert said[0].data["next"] > said[0].step


def test_lr_probe_false_leaves_the_lr_alone():
    guard, rec, _ = floor_run(lambda lr, step: 0.1 + 8 * lr * lr, lr_probe=False)
    assert rec._probe.probes == 0 and rec.lr_factor == 1.0
    assert not [e for e in guard.events if e.kind == "lr_backoff"]
    with pytest.raises(TypeError, match="lr_probe"):
        gg.Recovery(lr_probe="yes")  # type: ignore[arg-type]


def test_a_probe_under_way_survives_a_resume():
    """A checkpoint taken during a probe's trial restores it: the LR in force is still half,
    the guard still flushes every ten steps, and the probe goes on where it was."""
    _, rec, used = floor_run(lambda lr, step: 0.1 + 8 * lr * lr, steps=150, close=False)
    assert rec._probe.phase == "trial" and rec.lr_factor == 0.5 and used[-1] == 0.25
    other = gg.Recovery()
    other.load_state_dict(rec.state_dict())
    assert other._probe.state_dict() == rec._probe.state_dict()
    assert other.lr_factor == 0.5 and other.flush_every(50) == 10


def test_a_probe_under_way_is_void_when_the_parameter_groups_change():
    """Its copy of the training state holds the old groups: it can no longer be restored
    (``add_param_group`` relayouts the guard and its recovery)."""
    guard, rec, _ = floor_run(lambda lr, step: 0.1 + 8 * lr * lr, steps=120)
    assert rec._probe.phase == "control" and rec._probe.fork is not None
    rec.relayout(guard)
    assert not rec._probe.active and rec._probe.fork is None and rec.lr_factor == 1.0


def test_a_probe_fork_in_a_trainers_hook_voids_the_update_that_follows(monkeypatch):
    """Driven from a trainer's pre-step hook, the guard flushes at the next step, after its
    backward: the weights the probe restores there (its fork, and the control's at the end
    when half the LR is worse) must not get that backward's gradients. The update is voided
    as after a rollback: the weights after that step are the restored ones."""
    from gradguard.recovery import actions
    trace: list[torch.Tensor] = []
    restored: list[tuple[int, torch.Tensor]] = []
    restore = actions.restore

    def spy(guard, snap):  # type: ignore[no-untyped-def]
        restored.append((len(trace), snap["model"]["weight"].clone()))
        restore(guard, snap)

    monkeypatch.setattr(actions, "restore", spy)
    guard, rec, _ = floor_run(
        lambda lr, age: 0.1 + 0.5 * min(1.0, max(0, age - 60) / 60) * (1 if lr >= 0.4 else 3.0),
        hooked=True, trace=trace)
    assert rec._probe.probes >= 1 and len(restored) == 2 * rec._probe.probes
    for step, weight in restored:
        assert torch.equal(trace[step], weight), step  # no update on the restored weights
    voided = [e.step for e in guard.events if e.kind == "skip" and e.data.get("reason") == "rolled_back"]
    assert voided == [step for step, _ in restored]


def test_the_lr_reported_is_the_schedules_times_the_factor_when_the_guard_runs_inside_the_step():
    """Lightning calls the guard from within the optimizer's step, after its pre-hooks
    scaled the LR by this step's factor: the LR the events name (and the user is told to
    set) is still the schedule's LR times the factor, not that product scaled again."""
    guard, rec, used = floor_run(lambda lr, step: 0.1 + 8 * lr * lr, hooked="inside")
    lowered = [e for e in guard.events if e.kind == "lr_backoff"]
    settled = [e for e in guard.events if e.kind == "lr_settled"]
    assert len(lowered) == 1 and lowered[0].data["lr"] == [pytest.approx(0.25)]
    assert "(lr 0.25)" in lowered[0].message
    assert settled and settled[0].data["lr"] == [pytest.approx(0.25)]
    assert rec.lr_factor == 0.5 and used[-1] == 0.25


def test_the_summary_of_a_hook_driven_run_does_not_count_the_probes_voided_update(tmp_path):
    """Under a trainer's hook the update after the fork is voided (the step is recorded as
    voided, with an info event); the story is still the probe's, not a skipped step: no
    count, sink or file calls it skipped."""
    guard, _, _ = floor_run(lambda lr, step: 0.1 + 8 * lr * lr, hooked=True, run_dir=tmp_path)
    voided = [e.step for e in guard.events if e.kind == "skip" and e.data.get("reason") == "rolled_back"]
    assert len(voided) == 1 and guard.skipped_steps == 0
    records = [r for r in gg.read_jsonl(tmp_path / "metrics.jsonl") if r.get("type") == "step"]
    assert [r["step"] for r in records if r.get("voided")] == voided
    assert not any(r["skipped"] for r in records)
    text = summary_sentence(load_run(tmp_path), {})
    assert "skipped" not in text and "gradguard halved the LR; training recovered." in text


def test_the_probes_copies_count_against_snapshot_memory():
    """``snapshot_memory`` bounds the host memory the recovery holds: the probe's two
    copies of the training state (at the fork) count with the snapshots. A budget they fit
    in runs the probe as an unbounded one does; one byte less and there is no probe, and a
    warning says so once."""
    free, rec_free, _ = floor_run(lambda lr, step: 0.1 + 8 * lr * lr)
    ring = rec_free.ring.store.nbytes()  # two snapshots, each the size of a probe copy
    assert ring > 0 and len(rec_free.ring.store) == 2
    lowered = [e.data.get("probe") for e in free.events if e.kind == "lr_backoff"]
    assert lowered == [True]

    guard, rec, _ = floor_run(lambda lr, step: 0.1 + 8 * lr * lr, snapshot_memory=2 * ring)
    assert [e.data.get("probe") for e in guard.events if e.kind == "lr_backoff"] == lowered
    assert rec._probe.probes == rec_free._probe.probes and not rec._probe.disabled

    with pytest.warns(gg.GradGuardWarning, match="LR probe is off") as caught:
        guard, rec, used = floor_run(lambda lr, step: 0.1 + 8 * lr * lr,
                                     snapshot_memory=2 * ring - 1)
    assert len([w for w in caught if "LR probe" in str(w.message)]) == 1
    assert rec._probe.disabled and rec._probe.probes == 0 and rec._probe.fork is None
    assert not [e for e in guard.events if e.kind == "lr_backoff"] and used[-1] == 0.5
    assert rec.snapshot_bytes <= 2 * ring - 1


def test_snapshot_bytes_counts_the_probes_copy_while_it_runs(monkeypatch):
    from gradguard.recovery import _flush

    seen: list[tuple[bool, int, int]] = []
    real = _flush.probe_lr

    def spy(rec, guard, step, *a, **k):  # type: ignore[no-untyped-def]
        out = real(rec, guard, step, *a, **k)
        seen.append((rec._probe.fork is not None, rec.snapshot_bytes, rec.ring.store.nbytes()))
        return out

    monkeypatch.setattr(_flush, "probe_lr", spy)
    floor_run(lambda lr, step: 0.1 + 8 * lr * lr)
    running = [(b, r) for forked, b, r in seen if forked]
    assert running and all(b > r for b, r in running)
    assert all(b == r for forked, b, r in seen if not forked)


def test_a_retry_runs_its_trial_at_the_ceiling_before_the_trouble_once_per_ceiling():
    """The retry (the ceiling a trouble lowered, tried again): its control arm at the
    factor in force, its trial at the ceiling before the trouble; never twice the same."""
    probe = LrProbe()
    step = feed(probe, [0.2] * MEASURE, 0)
    assert probe.start_retry(step, 0.0125, 1.0) and probe.phase == "control"
    assert probe.factor == 1.0 and not probe.retrying
    step = feed(probe, [0.2] * TRIAL, step)
    assert probe.advance(step) == "fork" and probe.trial_from == step + 1
    assert probe.retrying and probe.factor == pytest.approx(80.0)  # x1.0 over x0.0125
    step = feed(probe, [0.1] * TRIAL, step)
    done = probe.advance(step)
    assert done is not None and done != "fork" and (done.control, done.trial) == (0.2, 0.1)
    assert not probe.active and probe.factor == 1.0 and probe.retry_to is None
    step = feed(probe, [0.2] * MEASURE, step)
    assert not probe.may_retry(step, 1.0) and not probe.start_retry(step, 0.0125, 1.0)
    assert probe.may_retry(step, 0.5)
    assert probe.probes == 0  # a retry is no probe of half the LR: their pace is apart


def test_a_retry_that_fails_discards_its_steps_and_does_not_survive_a_resume():
    probe = LrProbe()
    step = feed(probe, [0.2] * MEASURE, 0)
    probe.start_retry(step, 0.25, 1.0)
    step = feed(probe, [0.2] * TRIAL, step)
    probe.advance(step)
    first = step + 1
    step = feed(probe, [0.3] * 5, step)
    other = LrProbe()
    other.load_state_dict(probe.state_dict())
    # the control's state it would go back to is not checkpointed: no trial after a resume
    assert not other.active and other.factor == 1.0 and other.retried == [1.0]
    probe.fail_retry(step)
    assert probe.discarded == (first, step) and not probe.active and probe.factor == 1.0
    again = LrProbe()
    again.load_state_dict(probe.state_dict())
    assert again.discarded == (first, step) and again.retried == [1.0]


def test_after_a_retry_of_the_ceiling_before_the_trouble_failed_the_next_tries_halfway():
    probe = LrProbe()
    assert probe.retry_target(0.09, 1.0) == 1.0  # the ceiling before the trouble first
    probe.retried.append(1.0)
    assert probe.retry_target(0.09, 1.0) == pytest.approx(0.3)  # then halfway (geometric)
    probe.retried.append(0.3)
    assert probe.retry_target(0.09, 1.0) == pytest.approx(math.sqrt(0.027))
    probe.retried.append(math.sqrt(0.027))
    assert probe.retry_target(0.09, 1.0) is None  # less than RETRY_STEP x the ceiling: done
    assert probe.retry_target(0.5, 1.0) is None  # x0.5 between a ceiling and one that failed


def test_a_script_that_ended_during_a_trial_arm_is_told_its_weights_are_the_trials():
    """``gradguard run`` closes the guard after the script ended, which saved the trial
    arm's weights: they are not swapped for the control's after it, and the event says
    whose they are (it said the control's, found by a stranger)."""
    from gradguard import _lifecycle

    full, _, _ = floor_run(lambda lr, step: 0.1 + 8 * lr * lr)
    [lowered] = [e for e in full.events if e.kind == "lr_backoff"]
    fork = lowered.step - TRIAL
    trace: list[torch.Tensor] = []
    guard, _, used = floor_run(lambda lr, step: 0.1 + 8 * lr * lr, steps=fork + 10,
                               trace=trace, close=False)
    assert set(used[fork + 1:]) == {0.25}
    _lifecycle.close(guard, after_script=True)
    [ended] = [e for e in guard.events if e.kind == "lr_probe"]
    assert "the script's last weights, and what it saved, are the trial arm's" in ended.message
    assert f"trained from step {fork + 1} at x0.5 the LR in force" in ended.message
    assert torch.equal(guard.model.weight.detach(), trace[-1])


def test_a_run_that_ends_during_a_trial_arm_ends_on_the_controls_weights(monkeypatch):
    """The run ends (``guard.close``) ten steps into the probe's trial arm: those weights
    come from ten steps at another LR, judged by nothing. Found with a retry under way at
    the end of a char LSTM's run (the trial at the LR the ladder had cut 100x). The
    control's state, trained at the LR in force and copied at the fork, is restored, and
    an info event says so."""
    from gradguard.recovery import _probing

    full, _, _ = floor_run(lambda lr, step: 0.1 + 8 * lr * lr)
    [lowered] = [e for e in full.events if e.kind == "lr_backoff"]
    fork = lowered.step - TRIAL  # the trial arm's first flush
    restored: list[torch.Tensor] = []
    real = _probing._restore

    def spy(rec, guard, snap):
        restored.append(snap["model"]["weight"].clone())
        real(rec, guard, snap)

    monkeypatch.setattr(_probing, "_restore", spy)
    trace: list[torch.Tensor] = []
    guard, rec, used = floor_run(lambda lr, step: 0.1 + 8 * lr * lr, steps=fork + 10,
                                 trace=trace)
    assert set(used[fork + 1:]) == {0.25}  # the run ended inside the trial at half the LR
    [ended] = [e for e in guard.events if e.kind == "lr_probe"]
    assert "ended during the trial arm" in ended.message and ended.severity == "info"
    assert len(restored) == 2  # the fork (the trial starts from the probe's start) and the end
    final = guard.model.weight.detach()
    assert torch.equal(final, restored[-1]) and not torch.equal(final, trace[-1])
    assert not torch.equal(restored[-1], restored[0])  # the control trained on from the start
    assert rec.lr_factor == 1.0


def test_a_retry_from_a_run_stuck_at_its_fresh_loss_passes_on_a_tie():
    """Found by a stranger: a GRU on Adam that learns to recall its first token at any LR
    from 0.01 to 0.2 unguarded had its LR cut to x0.017 at step 20 by the growth rule,
    and sat at chance (1.39) to the end: each retry of a higher LR was refused on "1.39
    against 1.381", two arms at chance told apart by noise. A control arm that has learnt
    nothing passes a trial no worse within 5%. (At 0.2 the growth rule now leaves it: its
    loss is at 0.02% of the fresh model's by step 60. At 0.03 it is still at chance there,
    rolled back, its LR capped at x0.185, and its retry at x0.431 passes at step 469 on
    1.392 against 1.387.)"""
    x, y = recall_data(7, 4000)
    held_x, held_y = recall_data(8, 500)
    torch.manual_seed(0)
    model = GruRecall()
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    gen = torch.Generator().manual_seed(1000)
    with gg.Guard(model, opt, clip=gg.ZClip(), recovery=gg.Recovery()) as guard:
        for _ in range(900):
            i = torch.randint(0, len(x), (64,), generator=gen)
            loss = nn.functional.cross_entropy(model(x[i]), y[i])
            loss.backward()
            guard.step(loss)
            opt.zero_grad()
    assert any(e.kind == "rollback" and e.step == 60 for e in guard.events)  # the growth rule
    assert any("the LR in force has learnt nothing" in e.message for e in guard.events)
    with torch.no_grad():
        assert nn.functional.cross_entropy(model(held_x), held_y).item() < 0.1  # was 1.39


def test_a_probe_whose_half_lr_arm_did_better_short_of_the_bar_says_so():
    """Found by a stranger: half the LR reached 0.30 against 0.55 at the LR in force, short
    of the x0.5 bar, and the event said "the LR is not what holds it up". It says the
    lower LR did better, short of the bar; a half-LR arm no better still gets the old words."""
    from gradguard.recovery.messages import probe_event
    from gradguard.recovery.probe import Probed

    short = probe_event(Probed(179, 1.2, 0.55, 0.30), False, 379).message
    assert "lower but short of the x0.5 a lower LR must reach to be taken: the LR stays" in short
    assert "not what holds it up" not in short
    worse = probe_event(Probed(239, 0.3, 0.1111, 0.1168), True, 439).message
    assert "the LR is not what holds it up, and stays. The run goes on from the control" in worse
