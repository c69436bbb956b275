"""How a run ended, judged on its loss (report/_outcome.py), config-aware remedies, and the
heatmap's colours anchored on the run's own range."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gradguard.report._data import RunData
from gradguard.report._outcome import judge
from gradguard.report._plots import heatmap_colors, heatmap_plot
from gradguard.report._summary import summary_sentence


def run(loss, *, events=(), skipped=(), grad=None, layers=None):
    n = len(loss)
    sk = np.zeros(n, dtype=bool)
    sk[list(skipped)] = True
    g = np.full(n, 1.0) if grad is None else np.asarray(grad, dtype=float)
    lm = np.zeros((0, 0)) if layers is None else layers
    names = [str(i) for i in range(lm.shape[1])]
    return RunData(Path("r"), np.arange(n), np.asarray(loss, dtype=float), g, np.ones(n), sk,
                   names, np.arange(lm.shape[0]) * 10 + 9, lm, lm, list(events))


def ev(kind, step, severity="warning", **data):
    return {"kind": kind, "step": step, "severity": severity, "message": "", "data": data}


DECAY = 2.6 + 2.0 * np.exp(-np.arange(100) / 15)  # a healthy loss: 4.6 -> ~2.6


def _nan_at(loss, step, tail=None):
    loss = np.array(loss, dtype=float)
    loss[step] = np.nan
    if tail is not None:
        loss[step + 1:] = tail
    return loss


@pytest.mark.parametrize("name, data, status, cause", [
    ("healthy", run(DECAY), "healthy", None),
    ("nan step, loss back below its level",
     run(_nan_at(DECAY, 60), events=[ev("nonfinite_grad", 60, "error")], skipped=[60]),
     "recovered", None),
    ("nan step, loss stalls at 3.3 (2.6 before)",
     run(_nan_at(DECAY, 60, tail=3.3), events=[ev("nonfinite_grad", 60, "error")], skipped=[60]),
     "not_recovered", None),
    ("loss explodes at step 1, gradients then vanish",
     run(np.r_[6.8, 1500.0, np.linspace(900, 103, 98)], events=[ev("vanishing_grad", 9)]),
     "diverged", "lr_too_high"),
    ("the last steps are still non-finite",
     run(_nan_at(DECAY, 90, tail=np.nan), grad=np.r_[np.ones(90), np.full(10, np.nan)],
         events=[ev("nonfinite_grad", 90, "error")], skipped=range(90, 100)),
     "diverged", None),
    ("loss climbing before the first NaN",
     run(np.r_[np.linspace(3, 9, 50), np.full(50, np.nan)], grad=np.r_[np.ones(50), np.full(50, np.nan)],
         events=[ev("nonfinite_grad", 50, "error")], skipped=range(50, 100)),
     "diverged", "lr_too_high"),
    ("recovery gave up", run(DECAY, events=[ev("nonfinite_grad", 40, "error"), ev("abort", 70, "error")]),
     "stopped", None),
    ("routine loss-scale overflow is no incident",
     run(DECAY, events=[ev("skip", 3, "info", reason="loss_scale_overflow")], skipped=[3]),
     "healthy", None),
    ("a rollback on a loss that rose, no gradient event: recovered, not healthy",
     run(np.r_[DECAY[:40], np.full(10, 4.6), DECAY[50:] - 0.1],
         events=[ev("rollback", 49, "error", reason="the loss rose", level_before=2.9)]),
     "recovered", None),
    ("a back-off on a rise, the loss still above the level before it: not recovered",
     run(np.r_[DECAY[:30], np.full(70, 3.5)],
         events=[ev("lr_backoff", 49, reason="rose", level_before=3.0)]),
     "not_recovered", None),
    ("layers that died, the loss flat at chance under its first level: not recovered",
     run(np.r_[3.2, 6.4, 17.7, np.full(97, 2.30)],
         events=[ev("disconnected_layer", 99, died=True, steps=82)]),
     "not_recovered", "dead_units"),
    ("layers that died, then a rollback that may have revived them: judged on the loss",
     run(DECAY, events=[ev("disconnected_layer", 59, died=True, steps=50),
                        ev("rollback", 69, "error", reason="died", level_before=3.0)]),
     "recovered", None),
    ("a layer that never had a gradient (info) is no death",
     run(DECAY, events=[ev("disconnected_layer", 49, "info", died=False)]),
     "healthy", None),
    ("no loss recorded: the gradients decide",
     run(np.full(100, np.nan), events=[ev("nonfinite_grad", 5, "error")], skipped=[5]),
     "recovered", None),
])
def test_outcome_is_judged_on_the_loss(name, data, status, cause):
    out = judge(data)
    assert (out.status, out.cause) == (status, cause), out
    assert out.ok == (status in ("healthy", "recovered"))


def test_stalled_run_says_where_the_loss_ended():
    data = run(_nan_at(DECAY, 60, tail=3.3), events=[ev("nonfinite_grad", 60, "error")],
               skipped=[60])
    assert summary_sentence(data).endswith(
        "gradguard skipped 1 step; training did not recover (the loss ended at 3.3, above the "
        "2.65 it had before step 60).")


def test_a_run_the_ladder_acted_on_says_what_it_saw_not_no_gradient_trouble():
    """A network that died: no NaN, no gradient spike, a rollback on the loss. Under
    ``gradguard run`` it was called HEALTHY, "No gradient trouble in 200 steps ... gradguard
    rolled back 2 times"."""
    why = ("the loss rose to 2.342, 1.4x its best (1.714), back at the fresh model's level "
           "(2.31), and `1`, `4` get no gradient at all: the network died")
    data = run(np.r_[DECAY[:40], np.full(10, 4.6), DECAY[50:] - 0.1],
               events=[ev("rollback", 49, "error", reason=why), ev("rollback", 149, "error",
                                                                   reason="the loss rose")])
    s = summary_sentence(data)
    assert s.startswith(f"At step 49, {why}.")
    assert s.endswith("gradguard rolled back 2 times; training recovered.")
    assert "No gradient trouble" not in s


def test_diverging_loss_leads_the_summary_not_vanishing():
    data = run(np.r_[6.8, 1500.0, np.linspace(900, 103, 98)], events=[ev("vanishing_grad", 9)])
    s = summary_sentence(data)
    assert s.startswith("The loss rose from 6.8 to 1") and "(`lr_too_high`)" in s
    assert "vanish" not in s


@pytest.mark.parametrize("config, says, never", [
    ({"zero_code": True, "clip": "ZClip(alpha=0.97, z_thresh=2.5)", "recovery": True},
     "Adaptive clipping is already on", "--clip zclip"),
    ({"zero_code": True, "clip": "none", "recovery": True}, "`--clip zclip`", "ZClip is"),
    ({"clip": "none", "recovery": True}, "gg.ZClip()", "--clip"),
])
def test_remedy_takes_the_active_configuration_into_account(config, says, never):
    data = run(_nan_at(DECAY, 60, tail=3.3), events=[ev("grad_spike", 58), ev("nonfinite_grad", 60, "error")],
               skipped=[60])
    remedy = judge(data, config).remedy
    assert says in remedy and never not in remedy


def test_lr_remedy_mentions_recovery_only_when_it_was_off():
    data = run(np.r_[6.8, 1500.0, np.linspace(900, 103, 98)])
    off = judge(data, {"zero_code": True, "recovery": False}).remedy
    on = judge(data, {"zero_code": True, "recovery": True}).remedy
    assert "--recovery" in off and "--recovery" not in on
    backed = run(np.r_[6.8, 1500.0, np.linspace(900, 103, 98)], events=[ev("lr_backoff", 5, factor=0.1)])
    assert "lower the base learning rate" in judge(backed, {"recovery": True}).remedy


# ---- heatmap colours ------------------------------------------------------------------------
def test_heatmap_colours_span_the_runs_own_range():
    rng = np.random.default_rng(0)
    a = 10 ** rng.uniform(0, 3, size=(6, 200))  # layers with norms of 1..1e3
    a[:, 17] = 1e12  # one exploding window
    rgba, norm, legend = heatmap_colors(a)
    assert norm.vmin < 1.1 and 900 < norm.vmax < 1e3 + 1  # the spike saturates, not the scale
    ordinary = np.delete(a, 17, axis=1)
    spread = norm(ordinary.max()) - norm(ordinary.min())
    assert spread > 0.95  # 1..1e3 uses the whole colour range (was: the top 25 %, dark)
    brightness = rgba[..., :3].mean(axis=-1)
    assert np.median(np.delete(brightness, 17, axis=1)) > 0.3 and legend == {}


def test_heatmap_marks_vanishing_zero_and_nonfinite_cells_apart():
    a = np.array([[1.0, 2.0, 3.0], [1e-10, 0.0, np.nan]])
    rgba, _, legend = heatmap_colors(a)
    assert len({tuple(rgba[1, j]) for j in range(3)}) == 3  # three different colours
    assert set(legend) == {"below 1e-08 (the vanishing floor)", "no gradient (0)", "non-finite"}
    data = run(np.linspace(2, 1, 30), layers=a.T)
    png, note = heatmap_plot(data)
    assert png.startswith("data:image/png;base64,") and "vanishing floor" in note


def test_the_lr_cut_is_shown_to_three_digits():
    data = run(DECAY, events=[ev("lr_backoff", 40, reason="rose", factor=0.00728207),
                              ev("lr_backoff", 60, reason="rose", factor=0.00728207)])
    assert "cut the LR to x0.00728 (2 back-offs)" in summary_sentence(data)


def test_the_summary_of_a_network_that_died_names_its_dead_layers():
    dead = [ev("disconnected_layer", 99, died=True, steps=82) | {"layer": n} for n in "024"]
    data = run(np.r_[3.2, 6.4, 17.7, np.full(97, 2.30)], events=dead)
    text = summary_sentence(data, {})
    assert text.startswith("From step 18, `0`, `2`, `4` got no gradient at all: the units that "
                           "feed them died. Training did not recover: the network died at step 18")
    assert "No gradient trouble" not in text


@pytest.mark.parametrize("n", [3, 4, 5])
def test_a_run_too_short_for_two_levels_is_not_called_flat(n):
    """Found as a stranger: a 3-step run whose loss went 10, 5, 2.5 was "The loss did not
    fall (5 at the start, 5 at the end) ... run gg.doctor": its start and end levels were
    the median of the same three steps. A run shorter than two level windows is judged on
    its incidents alone."""
    data = run(10.0 / 2.0 ** np.arange(n))
    out = judge(data)
    assert out.status == "healthy" and not out.flat and not out.rose
    assert "did not fall" not in summary_sentence(data)
    flat = run(np.full(12, 2.3))
    assert judge(flat).flat  # a run with two windows still is


def test_non_finite_norms_with_no_event_are_not_no_gradient_trouble():
    """Found as a stranger: a run with 47 non-finite steps whose events.jsonl was missing
    was "No gradient trouble in 60 steps: the gradient norm stayed between 91.7 and
    4.98e+18"."""
    grad = np.ones(60)
    grad[10:] = np.inf
    said = summary_sentence(run(np.full(60, 2.0), grad=grad))
    assert "No gradient trouble" not in said
    assert "50 steps had a non-finite gradient norm" in said


def test_skipped_steps_losses_are_not_the_runs_level():
    """Found as a stranger: a run stopped when every batch became x1e4 (all skipped, the
    weights those of step 39) was "the loss rose ... the learning rate is too high": the
    skipped batches' losses were judged as the run's level."""
    loss = np.concatenate([DECAY[:40], np.full(6, 1e8)])
    data = run(loss, skipped=range(40, 46), events=[ev("abort", 45, "error")])
    out = judge(data)
    assert out.status == "stopped" and not out.rose and out.cause != "lr_too_high"
    assert "learning rate is too high" not in summary_sentence(data)


def test_a_run_back_under_its_first_incident_that_relapsed_later_did_not_recover():
    """Found by a stranger: an LR retry blew a run up at step 382 of 400 (its loss 0.03 ->
    0.2-0.8), and the run was "training recovered", judged against its level before the
    wreck at step 4. It is judged against the level it had reached before the last
    incident."""
    rng = np.random.default_rng(0)
    loss = np.r_[np.full(4, 2.0), np.full(6, 5.0), np.geomspace(2.0, 0.03, 290),
                 np.full(82, 0.03), np.full(18, 0.5)] * np.exp(rng.normal(0, 0.05, 400))
    events = [ev("rollback", 4, "error"), ev("loss_spike", 382)]
    out = judge(run(loss, events=events))
    assert (out.status, out.incident_step) == ("not_recovered", 382)
    assert "did not recover from step 382" in out.clause and "above the 0.03" in out.clause
    assert out.final > 0.4 and "0.03" in out.evidence  # the level after it, the one before
    # a run that stays at the level it reached is recovered, its later skip notwithstanding
    loss[382:] = 0.03 * np.exp(rng.normal(0, 0.05, 18))
    assert judge(run(loss, events=events)).status == "recovered"
    # and an incident inside the first trouble, above its level, is the same trouble
    assert judge(run(np.r_[np.full(4, 2.0), np.full(6, 5.0), np.geomspace(4.0, 1.0, 390)],
                     events=[ev("rollback", 4, "error"), ev("rollback", 8, "error")])
                 ).status == "recovered"


def test_a_run_back_at_a_level_it_never_left_is_told_its_loss_did_not_fall():
    """Found by a stranger: a vanilla RNN at chance (1.39) through the whole run, its LR
    capped at step 20, was "training recovered. Stable at lr 0.00348: the edge of what
    trains"; back at its level, yes, but that level is where it started."""
    rng = np.random.default_rng(1)
    loss = 1.386 * np.exp(rng.normal(0, 0.01, 300))
    out = judge(run(loss, events=[ev("rollback", 20, "error")]))
    assert out.status == "recovered"
    assert "training recovered, but over the run the loss did not fall" in out.clause
    # found by a stranger: an encoder-decoder at Adam 30x sat at chance, "recovered", with
    # no remedy at all
    assert "does not learn" in out.remedy and "gg.doctor" in out.remedy
    assert "the loss did not fall" in summary_sentence(run(loss, events=[ev("rollback", 20, "error")]))
    # found by a stranger: BART on a task with a plateau, its LR x100 for three steps at
    # step 100, its attention collapsed for good at the plateau's level (110x its twin),
    # was told "the model does not learn": the jump is named
    jumped = judge(run(loss, events=[ev("lr_too_high", 100), ev("lr_backoff", 103)]))
    assert jumped.status == "recovered" and "jumped far above" in jumped.remedy
    assert "before step 100" in jumped.remedy and "does not learn" not in jumped.remedy
    fell = judge(run(np.geomspace(2.0, 0.5, 300), events=[ev("rollback", 20, "error")]))
    assert fell.clause == "training recovered" and fell.remedy is None
    # with the LR the rollback lowered, it is a stall (the LR left suspected)
    capped = ev("rollback", 20, "error") | {"data": {"factor": 0.0035, "ceiling": 0.0035}}
    out = judge(run(loss, events=[capped]))
    assert (out.status, out.cause) == ("stalled", "lr_lowered")
    assert "after gradguard lowered the LR at step 20" in out.clause


def test_one_bad_batch_skipped_at_the_last_step_is_no_divergence():
    """Found by a stranger: a healthy run whose last step was one x100 batch, skipped, was
    "diverged ... the last steps are still non-finite", every step finite, and
    ``--fail-on-divergence`` failed the job."""
    loss = DECAY.copy()
    loss[-1] = 50.0  # the bad batch's own loss, finite
    out = judge(run(loss, events=[ev("grad_spike", 99)], skipped=[99]))
    assert out.status == "recovered", out
    # nor is one NaN batch at the last step, skipped after a step taken finite (found by a
    # stranger: "diverged", --fail-on-divergence failed, the weights the clean run's)
    nan = _nan_at(DECAY, 99)
    events = [ev("nonfinite_grad", 99, "error")]
    grad = np.r_[np.ones(99), np.nan]
    assert judge(run(nan, grad=grad, events=events, skipped=[99])).status == "recovered"
    # a last step non-finite is still a divergence when its NaN went into the weights
    # (not skipped), or when the step before it was non-finite too
    assert judge(run(nan, grad=grad, events=events)).status == "diverged"
    two = _nan_at(_nan_at(DECAY, 98), 99)
    assert judge(run(two, grad=np.r_[np.ones(98), np.nan, np.nan], events=events,
                     skipped=[98, 99])).status == "diverged"


def test_a_loss_nan_from_the_first_step_is_not_told_to_lower_the_learning_rate(tmp_path):
    """Found by a stranger: a GNN whose mean aggregation divided by the degree of isolated
    nodes (0/0) was NaN on every step from the first; every step was skipped, three
    rollbacks went back to the weights it started from, and the run stopped, told "Lower
    the learning rate". No LR mends a loss that is NaN before any update."""
    import torch
    from torch import nn

    import gradguard as gg
    from gradguard.errors import TrainingDiverged
    from gradguard.report import load_run

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    degree = torch.ones(32, 1)
    degree[:3] = 0  # three isolated nodes: their mean over no neighbour is 0/0
    with pytest.raises(TrainingDiverged):
        with gg.Guard(model, opt, clip=gg.ZClip(), recovery=gg.Recovery(),
                      sinks=[gg.JsonlSink(tmp_path)]) as guard:
            for _ in range(60):
                h = model(x) * degree / degree
                loss = nn.functional.cross_entropy(h, y)
                opt.zero_grad()
                loss.backward()
                guard.step(loss)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    out = judge(load_run(tmp_path))
    assert out.status == "stopped", out
    assert "no learning rate mends" in (out.remedy or "") and "Lower" not in out.remedy, out



def test_an_incident_within_the_first_level_window_is_no_climb_of_the_loss():
    """Found by a stranger: a CTC loss falling fast from 10, Inf at step 7 (a target too
    long for its input), skipped and recovered, was cause `lr_too_high`, "the loss was
    already climbing when the incident came": its median over steps 0-6 was above the
    start level, the median of the first 30 steps, which had fallen since."""
    loss = 2.0 + 8.0 * np.exp(-np.arange(300) / 40.0)
    loss[7] = np.inf
    out = judge(run(loss, skipped=[7], events=[ev("nonfinite_grad", 7)]))
    assert out.status == "recovered" and out.cause != "lr_too_high", out
    # a climb measured after the start window is one
    late = np.concatenate([np.linspace(3.0, 2.0, 100), np.linspace(2.0, 4.0, 100),
                           np.linspace(2.5, 2.0, 100)])
    late[200] = np.inf
    out = judge(run(late, skipped=[200], events=[ev("nonfinite_grad", 200)]))
    assert out.cause == "lr_too_high", out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_noisy_loss_whose_first_batch_was_its_lowest_was_not_climbing(seed):
    """Found by a stranger: a heavy-tailed regression (batch losses 41,000-54,000 about a
    steady 47,000) whose first loss was its lowest met an x1e4 batch at step 100, was
    skipped and recovered, and its cause was `lr_too_high`: "climbing" from the 41,400 of
    its first batch to the 47,210 of its noise before the incident. A climb is read out of
    the noise of the window before it, from its step-to-step changes, so a steady climb
    of 1.5% a step through that window is still one."""
    rng = np.random.default_rng(seed)
    loss = 47_000 * np.exp(0.12 * rng.standard_normal(300))
    low = int(np.argmin(loss[:30]))
    loss[[0, low]] = loss[[low, 0]]  # the first batch, the lowest of the start window
    bad = [ev("grad_spike", 100), ev("skip", 100, "info")]
    out = judge(run(loss, skipped=[100], events=bad))
    assert out.status == "recovered" and out.cause != "lr_too_high", out
    climbing = loss.copy()
    climbing[60:100] = 47_000 * 1.015 ** np.arange(1, 41) * np.exp(
        0.01 * rng.standard_normal(40))
    out = judge(run(climbing, skipped=[100], events=bad))
    assert out.cause == "lr_too_high", out


def test_a_late_incident_is_judged_within_the_noise_of_the_level_before_it_too():
    """Found by a stranger: a regression whose loss divided by the target, 0 on a few
    samples, had an Inf loss on 10% of its batches, each skipped; the last 6 steps before
    the end, and the median of those 6 noisy steps, 1.67x the level before (within the
    noise of its 40-step window), made it "did not recover from step 393", at its twin's
    loss. A relapse is a level out of the noise of both windows."""
    rng = np.random.default_rng(0)
    loss = 0.05 * np.exp(-np.arange(400) / 60) + 0.0032 * np.exp(0.45 * rng.standard_normal(400))
    bad = [*range(20, 400, 10), 393]
    loss[bad] = np.inf
    loss[394:] = 0.0032 * np.array([1.2, 1.9, 1.6, 1.8, 1.5, 2.1])  # a short window, by chance
    events = [ev("nonfinite_grad", s, "error") for s in bad]
    out = judge(run(loss, skipped=bad, events=events))
    assert out.status == "recovered", out
    worse = loss.copy()
    worse[394:] = 0.0032 * 30  # a level out of any noise: a relapse
    assert judge(run(worse, skipped=bad, events=events)).status == "not_recovered"


def test_a_loss_that_rose_long_after_a_layer_went_silent_did_not_rise_for_it():
    """Found by a regression hunt: a mixture whose one expert was switched off at step 60
    (told gated, an info), its labels noisier from step 100, ended back at its start level
    as its twin with every expert did, and was "the network died at step 60". The layers'
    silence took back what the run learnt only when the loss rose as they went silent."""
    gated = [ev("disconnected_layer", 119, "info", gated=True, steps=60)]
    later = np.concatenate([np.linspace(3.9, 2.0, 60), np.full(40, 2.0),
                            np.linspace(2.0, 3.55, 200)])
    assert judge(run(later, events=gated)).status == "healthy"
    at_once = np.concatenate([np.linspace(3.9, 2.0, 60), np.full(240, 3.5)])
    out = judge(run(at_once, events=gated))
    assert (out.status, out.cause) == ("not_recovered", "dead_units"), out


def test_a_first_loss_of_exactly_zero_is_no_start_level():
    """Found by a regression hunt: a first batch whose every label was masked (a loss of
    exactly 0) made runs that learnt from 2.3 to 0.08 "stalled ... 0 at the start"."""
    loss = DECAY.copy()
    loss[0] = 0.0
    out = judge(run(loss))
    assert out.status == "healthy" and out.start is not None and out.start > 3.5, out


def test_a_loss_spike_under_the_loops_own_clip_says_nothing_of_the_learning_rate():
    """Found by a stranger: a GRU seq2seq that clipped at 1.0 itself before guard.step met
    30 corrupted batches at x1e3 their loss; the guard saw loss spikes and, their gradient
    spikes clipped away, no gradient spike, and the run's cause was `lr_too_high`. A loss
    spike with no gradient spike is read as the LR's only where the gradients were not
    capped before the guard measured them."""
    loss = DECAY.copy()
    loss[60:70] *= 1e3
    spikes = [ev("loss_spike", 60), ev("lr_backoff", 60)]
    assert judge(run(loss, events=spikes)).cause == "lr_too_high"
    capped = [ev("clip", 49, "info", cap=1.0, steps_at_cap=50, steps=50), *spikes]
    out = judge(run(loss, events=capped))
    assert out.status == "recovered" and out.cause is None, out


LONG = 2.6 + 2.0 * np.exp(-np.arange(300) / 45)  # a healthy loss over 300 steps


def test_the_summary_tells_a_rollback_the_next_step_undid_and_no_burst_end_as_a_cut():
    """Found by a stranger: a x100 loss storm over 20 steps, a back-off at 102, a rollback
    at 105 that the next step undid (the restored weights spiked on the batches too: the
    weights it replaced are back, the LR in full), was "cut the LR to x0.0118 and rolled
    back 1 time"; an LR x300 burst, its rollback's LR handed back to the schedule when the
    burst ended (an `lr_backoff` info), was "cut the LR to x1 (2 back-offs)"."""
    storm = [ev("grad_spike", 100), ev("lr_backoff", 102, factor=0.1),
             ev("rollback", 105, "error", factor=0.0118, snapshot_step=49),
             ev("grad_spike", 106, cause="bad_batches", factor=1.0, rollback_undone=True)]
    text = summary_sentence(run(LONG, events=storm, skipped=range(100, 120)))
    assert "undid the LR back-off and the rollback it took" in text, text
    assert "x0.0118" not in text and "rolled back 1 time" not in text
    # a NaN streak's: told as what the restored weights showed (found by a helper: "spiked")
    nan = [*storm[:3], ev("nonfinite_input", 106, "warning", cause="nonfinite_input",
                          factor=1.0, rollback_undone=True)]
    nans = [ev("nonfinite_grad", s, "error") for s in range(100, 108)]
    out = judge(run(LONG, events=[*nans, *nan], skipped=range(100, 108)))
    text = summary_sentence(run(LONG, events=[*nans, *nan], skipped=range(100, 108)))
    assert "the weights restored gave NaN/Inf on them too" in text, text
    assert out.remedy.startswith("Check the batches of the 8 non-finite step(s)"), out
    kept = [*storm[:3], ev("grad_spike", 106, cause="bad_batches", rollback_undone=False)]
    text = summary_sentence(run(LONG, events=kept, skipped=range(100, 120)))
    assert "cut the LR to x0.0118 and rolled back 1 time" in text, text
    # found by a regression hunt: the weights came back, the LR did not (no ladder state
    # from before the streak to put back): the cut stands, the rollback alone is undone
    cut = [*storm[:3], ev("grad_spike", 106, cause="bad_batches", factor=0.0118,
                          rollback_undone=True)]
    text = summary_sentence(run(LONG, events=cut, skipped=range(100, 120)))
    assert "cut the LR to x0.0118 and rolled back 1 time, 1 undone" in text, text
    # the shift test's undo puts the weights a rollback replaced back, the LR with them
    shifted = [ev("lr_backoff", 60, factor=0.1), ev("rollback", 90, "error", factor=1.0),
               ev("rollback", 175, "error", factor=0.1, snapshot_step=149),
               ev("data_shift", 185, factor=1.0, undone=True)]
    text = summary_sentence(run(LONG, events=shifted, skipped=range(60, 63)))
    assert "rolled back 2 times, 1 undone" in text, text
    assert "backed off the LR (the rollback after it restored it)" in text, text
    burst = [ev("grad_spike", 101), ev("lr_backoff", 103, factor=0.1),
             ev("rollback", 106, "error", factor=0.00538, snapshot_step=99),
             ev("lr_backoff", 120, "info", factor=1.0, reason="burst_ended")]
    text = summary_sentence(run(LONG, events=burst, skipped=range(101, 107)))
    assert "cut the LR to x0.00538 during the LR burst (x1 of the schedule once it ended) " \
           "and rolled back 1 time" in text, text
    assert "back-offs" not in text
    # a streak's two back-offs (at 3 and 6 skips) undone together at the next step: the LR
    # of before the streak is back in full, no cut
    streak = [ev("nonfinite_grad", 143, "error"), ev("lr_backoff", 145, factor=0.1),
              ev("lr_backoff", 148, factor=0.0118),
              ev("nonfinite_input", 149, cause="nonfinite_input", undone=True, factor=1.0)]
    text = summary_sentence(run(LONG, events=streak, skipped=range(143, 149)))
    assert "backed off the LR, and restored it at the next step" in text, text
    assert "x0.0118" not in text and "x0.1" not in text


def test_a_run_capped_by_the_growth_rule_that_ended_before_it_settled_is_told_the_cap():
    """Found by a stranger: a GPT-2 under the HF Trainer at 30x its LR was rolled back at
    step 60 by the growth of its first weights and trained at x0.056 for the last 90 of
    its 150 steps, 1.01x its healthy twin, "recovered" with no cause and no remedy: the
    run ended before the ladder called the LR settled. The cap is the LR it trained at."""
    grew = ev("rollback", 60, "error", factor=0.0559, ceiling=0.0559, snapshot_step=-1)
    grew["message"] = ("step 60: the weights grew 4.58x in the first 20 steps (the median "
                       "weight matrix's norm) ...: an LR far too high; rolled back")
    out = judge(run(DECAY, events=[grew]))
    assert (out.status, out.cause) == ("recovered", "lr_too_high"), out
    assert out.remedy.startswith("From step 60 it trained at x0.0559 of your LR"), out.remedy
    assert out.remedy in summary_sentence(run(DECAY, events=[grew]))
    # a rollback for another reason, or a cap a probe may have moved since: no such advice
    probed = [grew, ev("lr_probe", 80, "info")]
    assert judge(run(DECAY, events=probed)).remedy is None


def test_a_run_that_took_no_step_is_no_loss_that_rose_for_the_learning_rate():
    """Found by a stranger: a VAE on x255 pixels, its gradient Inf from step 0 (an exp of
    its log-variance overflows), every step skipped and the run stopped at step 20, was
    cause `lr_too_high`, "the loss rose from 1.99e+19 to 1.14e+20: the learning rate is
    too high": the batches' losses on the weights it started from. With no step taken the
    loss levels say nothing of the LR; the remedy names inputs off their scale."""
    rng = np.random.default_rng(0)
    loss = 2e19 * np.exp(np.linspace(0, 1.7, 21) + 0.2 * rng.standard_normal(21))
    events = [ev("nonfinite_grad", 0, "error"), ev("abort", 20, "error")]
    data = run(loss, grad=np.full(21, np.inf), skipped=range(21), events=events)
    out = judge(data)
    assert out.status == "stopped" and out.cause != "lr_too_high" and not out.rose, out
    assert "learning rate is too high" not in summary_sentence(data)
    assert "far off the scale" in out.remedy and "no learning rate mends" in out.remedy


def test_nan_batches_skipped_in_a_run_that_recovered_are_told_to_be_checked():
    """Found by a stranger: a Dataset that returned NaN for one sample in 500 put a NaN in
    18 of 282 batches; each was skipped and the run "recovered" with no cause and no
    remedy, though the events named the fix. The remedy counts them and names the first."""
    bad = [40, 77, 120]
    loss = LONG.copy()
    loss[bad] = np.nan
    events = [ev("nonfinite_grad", s, "error") for s in bad]
    out = judge(run(loss, events=events, skipped=bad))
    assert out.status == "recovered", out
    assert out.remedy == ("Check the batches of the 3 non-finite step(s) (the first at step "
                          "40) for NaN/Inf, and the loss for log(0) or x/0."), out.remedy


def test_a_retry_that_did_not_hold_is_told_not_try_a_few_times_higher():
    """Found by a stranger: an LSTM at Adam 30x was capped by the growth rule at x0.0571
    (lr 0.00514); the LR probe's retry at x0.239 failed mid-run, and the summary said "the
    cap the growth of the first weights set ... try a few times higher", which the guard
    had just tried. A retry that did not hold bounds the edge from above."""
    grew = ev("rollback", 60, "error", factor=0.0571, ceiling=0.0571, snapshot_step=-1)
    grew["message"] = "step 60: the weights grew 4.2x in the first 20 steps ...; rolled back"
    retry = ev("lr_settled", 270, "info", factor=0.0571, lr=[0.00514], retry=True,
               raised=False, tried=0.239, advise=[0.00257])
    text = summary_sentence(run(LONG, events=[grew, retry]))
    assert "Stable at lr 0.00514; a retry at 4.19x it, from the weights mid-run, did not " \
           "hold: the edge of what trains lies between; set half of it, 0.00257, in your " \
           "config." in text
    assert "a few times higher" not in text


def test_an_lr_the_growth_rule_capped_is_no_failed_edge_on_the_events_a_real_run_writes():
    """Found by a helper checking the docs: the sentence for an LR the growth rule capped
    ("an estimate, not an edge found failing") never came on a real run. The ladder records
    the LR before the rollback as failed (`failed_lr`), and the settled factor (the cap,
    x0.109) sits above the rollback's back-off (x0.1): runs at Adam 0.03, an LR their
    unguarded twins trained at, were told "it failed at lr 0.03 ... the edge of what trains
    lies between". These are the events such a run writes."""
    grew = ev("rollback", 49, "error", factor=0.1, ceiling=0.1085, snapshot_step=-1)
    grew["message"] = ("step 49: the weights grew 2.84x in the first 20 steps (the median "
                       "weight matrix's norm): an LR far too high; rolled back")
    settled = ev("lr_settled", 250, "info", factor=0.1085, lr=[0.00326], advise=[0.00326],
                 failed=1.0, failed_lr=[0.03])
    out = judge(run(LONG, events=[grew, settled]))
    assert (out.status, out.cause) == ("recovered", "lr_too_high"), out
    assert out.remedy == ("Stable at lr 0.00326: the cap the growth of the first weights set, "
                          "an estimate, not an edge found failing; set lr 0.00326 in your config, or "
                          "try a few times higher."), out.remedy
