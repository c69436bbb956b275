"""The HTML incident report: content, downsampling, bad input, and a real headless browser."""

from __future__ import annotations

import base64
import io
import json
import math
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.helpers import batches, mlp
from torch import nn

import gradguard as gg
from gradguard.cli import main
from gradguard.events import Flush
from gradguard.report import ReportError, load_run
from gradguard.report._data import max_pool, minmax_downsample
from gradguard.report._outcome import judge
from gradguard.report._summary import summary_sentence

pytest.importorskip("matplotlib")

NAN_STEP = 17
SECTIONS = ("Summary", "Loss", "Gradient norm and clipping", "Per-layer gradient norms",
            "Gradient flow", "Events")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A real guarded run with a NaN gradient and a spike batch."""
    d = tmp_path_factory.mktemp("run")
    model = mlp(depth=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gg.Guard(model, opt, clip=gg.ZClip(warmup_steps=5), every=10,
                  sinks=[gg.JsonlSink(d)]) as guard:
        for step, (x, y) in enumerate(batches(60)):
            if step == 30:
                x = x * 1e3
            loss = (model(x) - y).pow(2).mean()
            loss.backward()
            if step == NAN_STEP:
                model[2].weight.grad[0, 0] = math.nan
            guard.step(loss)
            opt.zero_grad()
    return d


def _images(page: str) -> list[str]:
    return re.findall(r'<img [^>]*src="([^"]+)"', page)


def test_report_is_self_contained_with_every_section(run_dir, tmp_path):
    path = gg.report(run_dir, tmp_path / "r.html")
    page = path.read_text()
    for title in SECTIONS:
        assert f">{title}</h2>" in page
    imgs = _images(page)
    assert len(imgs) == 4
    for src in imgs:  # every plot is an embedded PNG that decodes
        assert src.startswith("data:image/png;base64,")
        from matplotlib.image import imread

        img = imread(io.BytesIO(base64.b64decode(src.split(",", 1)[1])), format="png")
        assert img.shape[0] > 100 and img.shape[1] > 500
        assert img[..., :3].std() > 0.05  # not a blank canvas
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing from the network
    assert "<script" not in page
    assert f"Gradients exploded at step {NAN_STEP}" in page
    assert "Diagnosis" not in page  # no diagnosis.json in this run


def test_report_default_path_is_in_the_run_dir(run_dir):
    assert gg.report(run_dir) == run_dir / "report.html"
    assert (run_dir / "report.html").stat().st_size > 10_000


def test_summary_sentence_of_a_real_run(run_dir):
    s = summary_sentence(load_run(run_dir))
    assert s.startswith(f"Gradients exploded at step {NAN_STEP} in `")
    assert "(NaN)" in s and "skipped 1 step" in s and "training recovered" in s
    # its targets are noise: back at its level, which is where it started, and said so
    assert re.search(r"but over the run the loss did not fall \([\d.]+ at the start, "
                     r"[\d.]+ at the end\)\.$", s)


def _data(events, n=100, nan_tail=False):
    d = load_run_like(n)
    d.events = events
    if nan_tail:
        d.grad_norm[-5:] = np.nan
    return d


def load_run_like(n: int):
    from gradguard.report._data import RunData

    return RunData(
        Path("x"), np.arange(n), np.linspace(1, 0.1, n), np.full(n, 2.0), np.ones(n),
        np.zeros(n, dtype=bool), [], np.zeros(0, dtype=np.int64), np.zeros((0, 0)),
        np.zeros((0, 0)), [],
    )


def _ev(kind, step, severity="warning", layer=None, message="", data=None):
    return {"kind": kind, "step": step, "severity": severity, "layer": layer,
            "message": message, "data": data or {}}


@pytest.mark.parametrize(
    "events, nan_tail, expected",
    [
        ([], False, "No gradient trouble in 100 steps: the gradient norm stayed between 2 and 2."),
        (
            [_ev("nonfinite_grad", 412, "error", "layers.7.mlp", "step 412: gradient norm is NaN"),
             _ev("lr_backoff", 413, data={"factor": 0.5})],
            False,
            "Gradients exploded at step 412 in `layers.7.mlp` (NaN). gradguard halved the LR; "
            "training recovered.",
        ),
        (
            [_ev("grad_spike", 40, layer="fc"), _ev("rollback", 41), _ev("rollback", 60),
             _ev("abort", 70, "error")],
            False,
            "The gradient norm spiked at step 40 in `fc`. gradguard rolled back 2 times; "
            "training was stopped at step 70.",
        ),
        (
            [_ev("nonfinite_grad", 5, "error", message="gradient norm is Inf"),
             _ev("loss_spike", 9)],
            True,
            "Gradients exploded at step 5 (Inf). Training did not recover (the last steps are "
            "still non-finite).",
        ),
        (
            [_ev("grad_spike", 10, layer="fc"), _ev("nonfinite_grad", 20, "error", "fc", "is NaN"),
             _ev("nonfinite_grad", 21, "error", "fc", "is NaN"),
             _ev("lr_backoff", 21, data={"factor": 0.1}), _ev("lr_backoff", 22, data={"factor": 0.01})],
            False,
            "The gradient norm spiked at step 10 in `fc`. Gradients became NaN at step 20 in `fc` "
            "(2 non-finite steps in all). gradguard cut the LR to x0.01 (2 back-offs); training "
            "recovered.",
        ),
        (  # the loss itself non-finite (a NaN batch): no explosion of the gradients
            [_ev("nonfinite_grad", 30, "error", "(loss)", "step 30: gradient norm is NaN"),
             _ev("nonfinite_grad", 31, "error", "(loss)", "step 31: gradient norm is NaN")],
            False,
            "The loss was NaN at step 30, and the gradients with it; 2 non-finite steps in "
            "all. Training recovered.",
        ),
        (
            [_ev("grad_spike", 10, layer="fc"),
             _ev("nonfinite_grad", 20, "error", "(input)", "step 20: gradient norm is Inf")],
            False,
            "The gradient norm spiked at step 10 in `fc`. The input batch of step 20 held Inf "
            "(1 non-finite step in all). Training recovered.",
        ),
        (  # the back-off undone at the next step (finite on the same weights)
            [_ev("nonfinite_grad", 30, "error", "(input)", "step 30: gradient norm is NaN"),
             _ev("lr_backoff", 32, data={"factor": 0.1}),
             _ev("nonfinite_input", 33, data={"factor": 1.0, "undone": True})],
            False,
            "The input batch of step 30 held NaN. gradguard backed off the LR, and restored it "
            "at the next step (sound on the same weights: the batches were at fault); "
            "training recovered.",
        ),
        (  # one of two undone
            [_ev("nonfinite_grad", 30, "error", "fc", "step 30: gradient norm is NaN"),
             _ev("lr_backoff", 32, data={"factor": 0.1}),
             _ev("nonfinite_input", 33, data={"factor": 1.0, "undone": True}),
             _ev("lr_backoff", 38, data={"factor": 0.1})],
            False,
            "Gradients exploded at step 30 in `fc` (NaN). gradguard cut the LR to x0.1 (2 "
            "back-offs, 1 undone); training recovered.",
        ),
        (  # a rollback after the back-off sets the LR in force (found by a stranger: "cut
            # the LR to x0.1" where the rollback past an LR burst kept x1, or set x0.0118)
            [_ev("grad_spike", 151, layer="fc", message="gradient norm spiked"),
             _ev("lr_backoff", 151, data={"factor": 0.1}),
             _ev("rollback", 199, data={"factor": 1.0})],
            False,
            "The gradient norm spiked at step 151 in `fc`. gradguard backed off the LR (the "
            "rollback after it restored it) and rolled back 1 time; training recovered.",
        ),
        (
            [_ev("grad_spike", 151, layer="fc", message="gradient norm spiked"),
             _ev("lr_backoff", 151, data={"factor": 0.1}),
             _ev("rollback", 199, data={"factor": 0.0118})],
            False,
            "The gradient norm spiked at step 151 in `fc`. gradguard cut the LR to x0.0118 and "
            "rolled back 1 time; training recovered.",
        ),
        ([_ev("vanishing_grad", 0, layer="0")], False,  # vanishing, but the loss fell
         "Gradients vanished in `0` from step 0. The loss still fell, from 0.9591 to 0.1409."),
        (
            [_ev("nonfinite_grad", 5, "error", message="gradient norm is NaN"),
             _ev("lr_backoff", 6, data={"factor": 0.1}),
             _ev("lr_settled", 80, "info", data={"factor": 0.37, "lr": [0.0370001, 0.0370001]})],
            False,
            "Gradients exploded at step 5 (NaN). gradguard cut the LR to x0.1; training "
            "recovered. Stable at lr 0.037; set it in your config.",
        ),
        (  # half of it is advised (recovery.tally); an event without advise, as above, is
            # one of an older gradguard
            [_ev("nonfinite_grad", 5, "error", message="gradient norm is NaN"),
             _ev("lr_backoff", 6, data={"factor": 0.1}),
             _ev("lr_settled", 80, "info", data={"factor": 0.37, "lr": [0.037],
                                                 "advise": [0.0185]})],
            False,
            "Gradients exploded at step 5 (NaN). gradguard cut the LR to x0.1; training "
            "recovered. Stable at lr 0.037: the edge of what trains; set half of it, 0.0185, in "
            "your config.",
        ),
        (  # a jump below the LR that failed (a run worse than fresh): no edge, itself advised
            [_ev("rollback", 49, "error", data={"factor": 0.1}),
             _ev("lr_settled", 150, "info", data={"factor": 0.1, "lr": [0.005], "advise": [0.005],
                                                  "failed": 1.0, "failed_lr": [0.05]})],
            False,
            "No gradient trouble in 100 steps: the gradient norm stayed between 2 and 2. "
            "gradguard rolled back 1 time; training recovered. Stable at lr 0.005; it failed at "
            "lr 0.05, 10x higher: set lr 0.005 in your config (the edge of what trains lies "
            "between).",
        ),
        (  # the same under a schedule that had moved the LR (a decay): the factor of the
            # schedule held, and the advice scales the config's LR, not the one at step 105
            [_ev("rollback", 4, "error", data={"factor": 0.0539}),
             _ev("lr_settled", 105, "info", data={
                 "factor": 0.0539, "lr": [0.00392], "advise": [0.00539], "failed": 1.0,
                 "failed_lr": [0.1], "scheduled": True})],
            False,
            "No gradient trouble in 100 steps: the gradient norm stayed between 2 and 2. "
            "gradguard rolled back 1 time; training recovered. Stable at x0.0539 of your "
            "schedule (lr 0.00392 at step 105); it failed at x1, 18.6x higher: set lr 0.00539 "
            "in your config (the edge of what trains lies between).",
        ),
        (  # half of it under a warm-up's schedule
            [_ev("nonfinite_grad", 5, "error", message="gradient norm is NaN"),
             _ev("lr_backoff", 6, data={"factor": 0.1}),
             _ev("lr_settled", 20, "info", data={"factor": 0.5, "lr": [0.25], "advise": [0.5],
                                                 "scheduled": True})],
            False,
            "Gradients exploded at step 5 (NaN). gradguard cut the LR to x0.1; training "
            "recovered. Stable at x0.5 of your schedule (lr 0.25 at step 20): the edge of what "
            "trains; set half of it, 0.5, in your config.",
        ),
        (  # the ladder acted first, on what no gradient event shows (weights that grew): its
            # reason starts the story, the later spike (a retry's trial) follows; it led alone
            [_ev("rollback", 20, "error", data={"factor": 0.01, "reason": "the weights grew "
                                                 "34.9x in the first 20 steps"}),
             _ev("grad_spike", 80, layer="5", message="spike")],
            False,
            "At step 20, the weights grew 34.9x in the first 20 steps. The gradient norm "
            "spiked at step 80 in `5`. gradguard rolled back 1 time; training recovered.",
        ),
        (  # at the same step as a layer whose gradients vanished, its consequence: the
            # ladder's reason leads (found by a stranger on a BERT at 30x its LR)
            [_ev("rollback", 60, "error", data={"factor": 0.01, "reason": "the weights grew "
                                                 "7.2x in the first 60 steps"}),
             _ev("vanishing_grad", 60, layer="emb", message="vanished")],
            False,
            "At step 60, the weights grew 7.2x in the first 60 steps. Gradients vanished in "
            "`emb` from step 60. gradguard rolled back 1 time; training recovered.",
        ),
        (  # settled 1e4x below the user's LR: no LR to set, a scale gone wrong (found by a
            # stranger: tabular features on a scale of 1e3 on SGD, told to set 2.6e-7)
            [_ev("rollback", 4, "error", data={"factor": 5e-5, "reason": "an LR far too high"}),
             _ev("lr_settled", 90, "info", data={"factor": 5e-5, "lr": [5e-7],
                                                 "advise": [2.5e-7]})],
            False,
            "At step 4, an LR far too high. gradguard rolled back 1 time; training recovered. "
            "Stable at lr 5e-07, 2e+04x below yours: no usual LR, but a sign that something "
            "scales the gradients up (inputs or targets not normalised, a loss summed where it "
            "is meant averaged, weights initialised too large); fix that (run gg.doctor on a "
            "batch) rather than set this LR.",
        ),
        (  # ... but an LR of 10 typed for Adam settles at an ordinary LR: that is advised
            # (a regression hunt found it told as a scale gone wrong)
            [_ev("rollback", 4, "error", data={"factor": 9.6e-4, "reason": "an LR far too high"}),
             _ev("lr_settled", 90, "info", data={"factor": 9.6e-4, "lr": [0.0096]})],
            False,
            "At step 4, an LR far too high. gradguard rolled back 1 time; training recovered. "
            "Stable at lr 0.0096; set it in your config.",
        ),
        (  # a retry lifted the LR part of the way back: that factor of the config's LR
            [_ev("rollback", 4, "error", data={"factor": 0.01, "reason": "an LR far too high"}),
             _ev("lr_settled", 90, "info", data={
                 "factor": 0.0316, "lr": [0.0119], "advise": [0.0474], "scheduled": True,
                 "retry": True, "raised": True})],
            False,
            "At step 4, an LR far too high. gradguard rolled back 1 time; training recovered. "
            "Stable at x0.0316 of your schedule (lr 0.0119 at step 90), where a retry of the LR "
            "the trouble lowered found it trains: set 0.0474 in your config.",
        ),
        (  # the clip acted often since the LR was lowered (recovery.tally)
            [_ev("nonfinite_grad", 5, "error", message="gradient norm is NaN"),
             _ev("lr_backoff", 6, data={"factor": 0.1}),
             _ev("lr_settled", 200, "info", data={"factor": 0.5, "lr": [0.5], "clipped": 15,
                                                  "steps": 215, "advise": [0.25]})],
            False,
            "Gradients exploded at step 5 (NaN). gradguard cut the LR to x0.1; training "
            "recovered. Stable at lr 0.5, with the gradients clipped on 15 of the 215 steps "
            "since the LR was lowered to it: the edge of what trains; set half of it, 0.25, in "
            "your config.",
        ),
    ],
)
def test_summary_sentence_table(events, nan_tail, expected):
    assert summary_sentence(_data(events, nan_tail=nan_tail)) == expected


def test_a_run_whose_loss_may_rise_is_not_judged_on_its_level():
    """``loss_rise=False`` (``--no-loss-rise``, the setting the docs give for a GAN's
    players): the run's loss is no level to judge. A healthy 2-D GAN at its balance point
    (the discriminator's loss from 1.18 to 1.31) was "DIVERGED ... the learning rate is too
    high", and ``--fail-on-divergence`` failed it."""
    d = _data([])
    d.loss = np.linspace(0.5, 1.5, d.n_steps)  # a loss that rose over the run
    assert judge(d).status == "diverged"
    # with no gradient trouble at all, the remedy names the option (found by a stranger:
    # healthy REINFORCE runs "diverged", told only to lower the LR)
    assert judge(d).remedy.endswith("pass gg.Recovery(loss_rise=False).")
    assert judge(d, {"zero_code": True}).remedy.endswith("rerun with `--no-loss-rise`.")
    assert judge(d, {"loss_rise": True}).status == "diverged"
    out = judge(d, {"recovery": True, "loss_rise": False})
    assert out.status == "healthy" and not out.rose and out.cause is None
    assert summary_sentence(d, {"loss_rise": False}).startswith("No gradient trouble")
    # without a recovery guard.json records loss_rise false too: that says nothing of the loss
    assert judge(d, {"recovery": False, "loss_rise": False}).status == "diverged"
    # nor is the level judged after an incident (found by a stranger: a WGAN-GP generator
    # whose loss went from -0.66 to 1.18 after a skip was "NOT RECOVERED")
    d = _data([_ev("skip", 40, "warning")])
    d.loss = np.linspace(-0.7, 1.2, d.n_steps)
    d.skipped[40] = True
    assert judge(d, {"recovery": True, "loss_rise": True}).status == "diverged"
    out = judge(d, {"recovery": True, "loss_rise": False})
    assert out.status == "recovered" and out.cause is None, out


def test_a_loop_of_ones_own_records_the_guards_options_for_the_report(tmp_path):
    """``gg.report`` of a run a ``JsonlSink`` wrote judged it as if ``loss_rise`` were on
    (only ``gradguard run`` wrote ``guard.json``): the sink writes it at its first flush."""
    import torch

    import gradguard as gg
    from gradguard.report._outcome import read_guard_config

    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, opt, recovery=gg.Recovery(loss_rise=False), every=5,
                     sinks=[gg.JsonlSink(tmp_path)])
    for _ in range(10):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        loss.backward()
        guard.step(loss)
        opt.zero_grad()
    guard.close()
    cfg = read_guard_config(tmp_path)
    assert cfg is not None and cfg["loss_rise"] is False and cfg["recovery"] is True
    assert cfg["zero_code"] is False and cfg["clip"] == "none"


def test_a_run_whose_every_step_overflowed_in_float16_is_told_so():
    """Every step a loss-scale overflow the GradScaler skipped (a scale too high for the whole
    run): no update was taken. It was "No gradient trouble in 30 steps: the gradient norm
    stayed between nan and nan", the skips "routine", the remedy to clip or lower the LR."""
    from gradguard.report._outcome import remedy

    d = _data([_ev("skip", i, "info", data={"reason": "loss_scale_overflow", "scale": 1e30})
               for i in range(30)], n=30)
    d.grad_norm[:] = np.nan
    d.skipped[:] = True
    text = summary_sentence(d, {"clip": "none"})
    assert text.startswith("Every one of the 30 steps overflowed in float16: the GradScaler "
                           "skipped them all, and no update was taken.")
    assert "nan and nan" not in text and "routine" not in text
    out = judge(d, {"clip": "none"})
    assert remedy(out.status, out.cause, {"clip": "none"}, d, None).startswith(
        "Every step overflowed in float16")


def _flat(events):
    """A run whose loss sat at 2.3 (chance on ten classes) from first step to last."""
    d = _data(events)
    d.loss = np.full(d.n_steps, 2.3) + 0.01 * np.sin(np.arange(d.n_steps))
    return d


def test_a_loss_fit_to_its_float_floor_is_judged_by_no_level_there():
    """Found by a stranger: blob classifiers whose cross-entropy fell from 1.4 to 1e-8 within
    ten steps (held-out 0 to 3e-6) were "diverged: the loss rose from 3.73e-09 to 1.75e-06
    (lr_too_high)", "did not recover (the loss ended at 5.77e-07, above the 0 it had before
    step 34)" and "stalled: the loss did not fall (0 at the start, 0 at the end)". A loss
    that ended at a millionth of its first or less is fit: no level at its floor says
    it rose, stalled or did not come back."""
    d = _data([])
    n = d.n_steps
    d.loss = np.concatenate([[1.4, 0.5, 0.01], np.full(n - 3, 3.7e-9)])
    d.loss[-10:] = 1.2e-6  # a rise at the floor
    out = judge(d)
    assert out.status == "healthy" and out.cause is None and not out.flat
    d.events = [_ev("grad_spike", 34, severity="warning")]
    d.loss[34:] = 5.77e-7
    d.loss[30:34] = 0.0
    out = judge(d)
    assert out.status == "recovered" and out.cause != "lr_too_high"
    # a loss that is not at its floor is still judged on its level
    d.loss[-10:] = 0.5
    assert judge(d).status != "recovered"
    # nor is a millionth of a huge first loss a floor (found by a regression hunt: targets
    # of 1e4, a fresh MSE of 1.4e9, a rise from 4 to 400 at the end was "recovered" at 112x
    # its twin's held-out loss)
    d = _data([])
    d.loss = np.concatenate([[1.4e9, 1e8, 1e6], np.full(n - 3, 4.0)])
    d.loss[-10:] = 400.0
    assert judge(d).status in ("diverged", "not_recovered")


def test_an_lr_the_growth_rule_capped_is_no_edge_of_what_trains():
    """Found by a stranger: a char LSTM on SGD at 30x, rolled back by the growth rule with
    its LR capped at x0.0106 (lr 0.318), was told "the edge of what trains; set half of it,
    0.159, in your config": every LR up to 13.7 trains, and 0.159 ends 27% worse than its
    twin. The cap is an estimate: the summary says so and advises the LR itself."""
    f = 0.010584795999478204
    grown = _ev("rollback", 20, severity="error", data={"factor": f, "ceiling": f},
                message="step 20: the weights grew 19.9x in the first 20 steps (the median "
                        "weight matrix's norm): an LR far too high")
    settled = _ev("lr_settled", 329, severity="info",
                  data={"factor": f, "lr": [0.3175], "raised": False, "advise": [0.1588]})
    text = summary_sentence(_data([grown, settled]))
    assert "Stable at lr 0.318: the cap the growth of the first weights set" in text
    assert "edge of what trains" not in text and "0.159" not in text
    # a back-off after it lowered it further: the tally's advice stands
    backoff = _ev("lr_backoff", 100, data={"factor": f / 2, "ceiling": f / 2})
    settled["data"] = {**settled["data"], "factor": f / 2, "lr": [0.159], "advise": [0.0794]}
    assert "the edge of what trains" in summary_sentence(_data([grown, backoff, settled]))


def test_layers_told_dead_in_a_network_whose_loss_kept_falling_are_no_network_that_died():
    """Found by a stranger: a healthy MoE LM whose unchosen experts (gated by 0, no graph
    order to tell them gated) got "died" warnings was "training did not recover: the network
    died at step 6", its loss falling from 3.4 to 2.3 all the while. A network that learns
    has not died; one whose loss sat still since is."""
    died = _ev("disconnected_layer", 60, layer="experts.2", data={"died": True, "steps": 50})
    d = _data([died])  # the loss falls from 1 to 0.1 over the run
    d.layers = ["embed", "experts.2", "head"]
    d.layer_step, d.layer_mean = np.array([49, 99]), np.array([[1.0, 1.0, 1.0], [1.0, 0.0, 1.0]])
    d.layer_max = d.layer_mean
    out = judge(d)
    assert out.status == "healthy" and out.cause is None
    d.loss[60:] = d.loss[60]  # flat from the step they were told dead
    out = judge(d)
    assert (out.status, out.cause) == ("not_recovered", "dead_units")
    # every layer but the last dead: only the head's bias learns, whatever the loss does
    # (found by a regression hunt: a ReLU MLP killed by an LR spike, its loss settling
    # after it, was "training recovered" at 13x its twin's held-out loss)
    d = _data([_ev("disconnected_layer", 60, layer=n, data={"died": True, "steps": 50})
               for n in ("0", "2")])
    d.layers = ["0", "2", "4"]
    d.layer_step, d.layer_mean = np.array([49, 99]), np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 1.0]])
    d.layer_max = d.layer_mean
    assert judge(d).status in ("not_recovered", "diverged")


def test_a_run_whose_gradients_vanished_and_whose_loss_never_fell_stalled():
    """Tried as a stranger (a 12-layer sigmoid MLP on the digits under `gradguard run`: 600
    steps at chance): it was "HEALTHY ... Training recovered"."""
    d = _flat([_ev("vanishing_grad", 49, layer="0")])
    out = judge(d)
    assert (out.status, out.cause, out.incident_step, out.flat, out.ok) == (
        "stalled", "vanishing_grad", 49, True, False)
    assert "He init" in out.remedy and "gg.doctor" in out.remedy
    assert summary_sentence(d) == ("Gradients vanished in `0` from step 49. Training stalled: "
                                   "the loss did not fall (2.3 at the start, 2.299 at the end).")


def test_a_flat_loss_without_vanishing_gradients_is_healthy_and_says_it_did_not_fall():
    """A fine-tune that starts at its best has a flat loss too: no stall without vanishing
    gradients, but the summary says the loss did not fall."""
    d = _flat([])
    assert (judge(d).status, judge(d).flat) == ("healthy", True)
    assert summary_sentence(d).endswith(
        "The loss did not fall (2.3 at the start, 2.299 at the end): nothing to recover from, "
        "but if the model started untrained it is not learning (run gg.doctor on a batch).")
    assert judge(_data([])).flat is False  # linspace(1, 0.1): it fell
    assert "did not fall" not in summary_sentence(_data([]))


def test_a_flat_loss_that_fell_within_its_first_noise_is_not_said_not_to_have_fallen():
    """Tried as a stranger (GPT-2 at 33x its LR in the HF Trainer under `gradguard run`):
    "The loss did not fall (3.274 at the start, 2.997 at the end)" read as a contradiction."""
    d = _data([])
    g = np.random.default_rng(0)
    d.loss = np.concatenate([3.3 * np.exp(0.3 * g.standard_normal(20)),
                             np.full(d.n_steps - 20, 3.0) + 0.01 * g.standard_normal(d.n_steps - 20)])
    out = judge(d)
    assert (out.status, out.flat) == ("healthy", True) and out.final < 0.95 * out.start
    text = summary_sentence(d)
    assert f"The loss fell only from {out.start:.4g} to {out.final:.4g}, within the noise of " \
           "its first steps: nothing to recover from" in text
    assert "did not fall" not in text


def test_a_loss_that_fell_fast_through_its_first_steps_did_fall():
    """Found as a stranger (a digits MLP in the Hugging Face Trainer at AdamW 0.03 under
    `gradguard run`): its loss falls from 2.3 to 0.1 through its first steps and to 0.002
    by the end, and the summary said it "fell only from 0.654 to 0.00185, within the noise
    of its first steps". The noise of the first steps is their step-to-step change, not
    their spread about a median that a fall runs through."""
    d = _data([], n=400)
    g = np.random.default_rng(0)
    d.loss = np.concatenate([np.geomspace(2.3, 0.1, 40), np.geomspace(0.1, 0.002, 360)]) \
        * np.exp(0.2 * g.standard_normal(400))
    out = judge(d)
    assert (out.status, out.flat) == ("healthy", False) and out.final < 0.01 * out.start
    assert "within the noise" not in summary_sentence(d)


def test_a_loss_whose_batches_differ_in_difficulty_and_that_fell_did_fall():
    """Found as a stranger (a trunk with four task heads under `gradguard run`, one task per
    batch, the tasks' losses 1-16x apart): its loss falls from 0.97 to 0.054, under every
    one of its first steps' losses, and the summary said it "fell only ... within the noise
    of its first steps": their step-to-step changes are the tasks', not noise. A mixture
    that does not fall is still flat."""
    d = _data([], n=300)
    g = np.random.default_rng(4)
    task = np.where(np.arange(300) % 7 == 0, 0, np.arange(300) % 4)
    scale = np.array([1.0, 4.0, 9.0, 16.0])[task]
    d.loss = scale * np.geomspace(1.0, 0.02, 300) * np.exp(0.3 * g.standard_normal(300))
    out = judge(d)
    assert (out.status, out.flat) == ("healthy", False)
    assert "within the noise" not in summary_sentence(d)
    d.loss = scale * np.exp(0.3 * g.standard_normal(300))  # the same mixture, not learning
    assert judge(d).flat is True


def test_summary_of_batches_on_another_scale_and_what_to_check():
    """Steps skipped by the batch norm statistics alone (gradguard._running.offscale):
    nothing spiked, so the summary tells what did, and the remedy what to look at."""
    off = {"reason": "offscale_batch", "cause": "unscaled_input"}
    d = _data([{**_ev("skip", 12, data=off), "threshold": 3.0}, _ev("skip", 40, data=off)])
    d.skipped[[12, 40]] = True
    assert summary_sentence(d) == (
        "2 batches from step 12 on were on another scale: each multiplied a batch norm "
        "layer's running variance by more than 3 while the loss and the gradients stayed as "
        "they were (inputs in other units?). gradguard skipped 2 steps; training recovered.")
    outcome = judge(d, None)
    assert (outcome.status, outcome.cause) == ("recovered", "unscaled_input")
    assert "unit error" in outcome.remedy


def test_batches_on_another_scale_after_the_loss_rose_are_told_as_the_lrs_doing():
    """Found by a stranger: a timm ResNet at AdamW 300x had its batch norm statistics
    thrown by the weights the LR wrecked; six steps were skipped as "on another scale", the
    ladder rolled back to the weights before the first step and cut the LR, and the summary
    asked whether the inputs were in other units. When the loss rose before the skips (the
    cause is the LR), the summary leads with what the ladder found."""
    off = {"reason": "offscale_batch", "cause": "unscaled_input"}
    d = _data([{**_ev("skip", 30, data=off), "threshold": 3.0}, _ev("skip", 31, data=off),
               _ev("rollback", 33, "error",
                   data={"reason": "the loss rose to 4.1, 2.1x its best (1.9)"})])
    d.loss = np.r_[np.linspace(2.0, 4.0, 34), np.geomspace(2.0, 0.5, 66)]
    d.skipped[[30, 31]] = True
    assert judge(d).cause == "lr_too_high"
    s = summary_sentence(d)
    assert s.startswith("At step 33, the loss rose to 4.1") and "other units" not in s


def test_summary_sentence_counts_skips_and_clips():
    d = _data([_ev("nonfinite_grad", 3, "error")])
    d.skipped[[3, 4, 5]] = True
    d.clip_coef[10:12] = 0.5
    assert summary_sentence(d).endswith(
        "gradguard skipped 3 steps and clipped 2 steps; training recovered."
    )


def test_summary_says_a_grad_scalers_skips_are_its_own_not_the_guards():
    """Under ``gradguard run`` a float16 script whose GradScaler skipped its first steps
    read "gradguard skipped 6 steps" on a healthy run: those skips were the scaler's."""
    scaler = {"reason": "loss_scale_overflow", "scale": 65536.0}
    d = _data([_ev("skip", i, "info", data=scaler) for i in (0, 1, 2)])
    d.skipped[[0, 1, 2]] = True
    text = summary_sentence(d)
    assert "gradguard skipped" not in text
    assert text.endswith("The GradScaler skipped 3 steps for loss-scale overflows (routine in "
                         "mixed precision).")
    d = _data([_ev("skip", 0, "info", data=scaler), _ev("nonfinite_grad", 3, "error")])
    d.skipped[[0, 3]] = True
    assert "gradguard skipped 1 step; training recovered. The GradScaler skipped 1 step " in (
        summary_sentence(d))


def test_diagnosis_is_rendered_when_present(run_dir, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(run_dir, d)
    diag = {
        "healthy": False,
        "findings": [
            {"cause": "init_too_large", "severity": "error", "where": "2",
             "evidence": {"growth_per_layer": 3.2, "layers": [0, 2]},
             "remedy": "Re-initialise with gg.init.apply_(model, 'he').", "confidence": 0.9},
            {"cause": "lr_too_high", "severity": "warning", "where": None,
             "evidence": {"loss_ratio": 7.5}, "remedy": "Lower the LR 10x.", "confidence": 0.6},
        ],
    }
    (d / "diagnosis.json").write_text(json.dumps(diag))
    page = gg.report(d).read_text()
    assert ">Diagnosis</h2>" in page
    diag_part = page.split(">Diagnosis</h2>", 1)[1]
    for text in ("init_too_large", "lr_too_high", "growth_per_layer = 3.2", "90%",
                 "gg.init.apply_(model, &#x27;he&#x27;)", "Lower the LR 10x."):
        assert text in diag_part
    assert diag_part.index("init_too_large") < diag_part.index("lr_too_high")


# ---- downsampling -----------------------------------------------------------------------
def test_minmax_downsample_keeps_a_one_step_spike():
    y = np.ones(100_000)
    y[54_321] = 1e6
    y[7] = -3.0
    x, yd = minmax_downsample(np.arange(100_000), y, max_points=1000)
    assert len(yd) <= 1000
    assert 1e6 in yd and -3.0 in yd and 54_321 in x


def test_max_pool_keeps_a_hot_column_and_nan_blocks():
    a = np.ones((500, 2000))
    a[:, 1234] = 1e5
    a[:, :20] = np.nan  # exactly the first block of columns
    b, kr, kc = max_pool(a, 100, 100)
    assert b.shape[0] <= 100 and b.shape[1] <= 100 and (kr, kc) == (5, 20)
    assert (b[:, 1234 // kc] == 1e5).all()
    assert np.isnan(b[:, 0]).all() and (b[:, 1] == 1.0).all()


def _synthetic_run(d: Path, steps: int, layers: int, every: int) -> None:
    """A run directory written through JsonlSink with ``layers`` layers."""
    sink = gg.JsonlSink(d, fsync=False)
    rng = np.random.default_rng(0)
    names = [f"blocks.{i}.mlp" for i in range(layers)]
    for start in range(0, steps, every):
        st = list(range(start, min(start + every, steps)))
        norms = np.exp(rng.normal(size=len(st)))
        recs = [{"step": s, "loss": 1.0 / (1 + s), "grad_norm": float(n), "clip_coef": 1.0,
                 "skipped": False, "finite": True} for s, n in zip(st, norms)]
        g = (np.exp(rng.normal(size=layers)) * np.linspace(1e-4, 1, layers)).tolist()
        sink.write(Flush(steps=recs, layers={"step": st[-1], "first_step": st[0], "layers": names,
                                             "grad_norm": g, "grad_norm_max": g}, events=[]))
    sink.close()


def test_many_layers_and_steps_are_downsampled(tmp_path):
    _synthetic_run(tmp_path, steps=5_500, layers=520, every=5)
    page = gg.report(tmp_path).read_text()
    assert len(page) < 3_000_000
    assert "then the max over blocks of 2 layers x 2 windows" in page
    assert "No gradient trouble in 5500 steps" in page


# ---- bad input --------------------------------------------------------------------------
def _cli(capsys, *args):
    rc = main(["report", *map(str, args)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_report_writes_and_prints_the_path(run_dir, tmp_path, capsys):
    rc, out, _ = _cli(capsys, run_dir, "-o", tmp_path / "x.html")
    assert rc == 0 and out.strip() == str(tmp_path / "x.html")
    assert (tmp_path / "x.html").exists()


def test_cli_report_missing_dir_exits_2(tmp_path, capsys):
    rc, _, err = _cli(capsys, tmp_path / "nope")
    assert rc == 2 and "does not exist" in err and "nope" in err


def test_cli_report_empty_dir_exits_2(tmp_path, capsys):
    rc, _, err = _cli(capsys, tmp_path)
    assert rc == 2 and "no gradguard files" in err


def test_cli_report_no_step_records_exits_2(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text("")
    rc, _, err = _cli(capsys, tmp_path)
    assert rc == 2 and "no step records" in err


def _copy(run_dir: Path, tmp: Path) -> Path:
    d = tmp / "run"
    shutil.copytree(run_dir, d)
    (d / "report.html").unlink(missing_ok=True)
    return d


def test_cli_report_corrupt_line_exits_2(run_dir, tmp_path, capsys):
    d = _copy(run_dir, tmp_path)
    lines = (d / "metrics.jsonl").read_text().splitlines()
    lines[5] = lines[5][:20]
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    rc, _, err = _cli(capsys, d)
    assert rc == 2 and "metrics.jsonl:6: corrupt JSON line" in err and "(column " in err
    assert not (d / "report.html").exists()


@pytest.mark.parametrize("bad, said", [
    ({"v": 1, "type": "event", "kind": "skip", "step": 3, "severity": "warning",
      "message": "", "data": [1, 2]}, "'data' must be an object"),
    ({"v": 1, "type": "step", "step": 3, "loss": "nan", "grad_norm": 1.0, "clip_coef": 1.0,
      "skipped": False, "finite": True}, "'loss' must be a number or null"),
    ({"v": 1, "type": "step", "step": 3, "loss": 1.0, "grad_norm": 1.0, "clip_coef": 1.0,
      "skipped": "no", "finite": True}, "'skipped' must be true or false"),
])
def test_cli_report_records_of_the_wrong_shape_exit_2(tmp_path, capsys, bad, said):
    """Found as a stranger: an event whose data was a list crashed the report with a
    traceback (exit 1), and "skipped": "no" counted as a skip."""
    d = tmp_path / "run"
    d.mkdir()
    good = {"v": 1, "type": "step", "step": 0, "loss": 1.0, "grad_norm": 1.0,
            "clip_coef": 1.0, "skipped": False, "finite": True}
    name = "events.jsonl" if bad["type"] == "event" else "metrics.jsonl"
    (d / "metrics.jsonl").write_text(json.dumps(good) + "\n")
    with open(d / name, "a") as fh:
        fh.write(json.dumps(bad) + "\n")
    rc, _, err = _cli(capsys, d)
    assert rc == 2 and said in err, err


def test_cli_report_newer_schema_exits_2(run_dir, tmp_path, capsys):
    d = _copy(run_dir, tmp_path)
    with open(d / "events.jsonl", "a") as fh:
        fh.write(json.dumps({"v": 2, "type": "event", "kind": "future", "step": 99}) + "\n")
    rc, _, err = _cli(capsys, d)
    assert rc == 2 and "schema version 2 is newer" in err


def test_cli_report_corrupt_diagnosis_exits_2(run_dir, tmp_path, capsys):
    d = _copy(run_dir, tmp_path)
    (d / "diagnosis.json").write_text('{"findings": [')
    rc, _, err = _cli(capsys, d)
    assert rc == 2 and "diagnosis.json: corrupt JSON" in err


def test_cli_report_truncated_last_line_warns_and_renders(run_dir, tmp_path, capsys):
    d = _copy(run_dir, tmp_path)
    text = (d / "metrics.jsonl").read_text()
    (d / "metrics.jsonl").write_text(text + '{"v": 1, "type": "step", "step": 60, "lo')
    rc, out, err = _cli(capsys, d)
    assert rc == 0 and "warning" in err and "truncated last line" in err
    page = (d / "report.html").read_text()
    assert "truncated last line" in page and ">Summary</h2>" in page
    assert out.strip() == str(d / "report.html")


def test_report_api_raises_report_error(tmp_path):
    with pytest.raises(ReportError, match="does not exist"):
        gg.report(tmp_path / "missing")
    assert issubclass(ReportError, ValueError)


# ---- a real browser ---------------------------------------------------------------------
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--hide-scrollbars", "--enable-logging=stderr", "--v=0"]


def _chromium(page: Path, *flags: str) -> subprocess.CompletedProcess:
    assert CHROMIUM is not None
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [CHROMIUM, *CHROME_FLAGS, f"--user-data-dir={profile}", *flags, page.as_uri()],
            capture_output=True, text=True, timeout=120,
        )


def _console_messages(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ":CONSOLE" in ln]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_console_capture_sees_a_console_error(tmp_path):
    """The check below would catch a broken page: a console.error is seen."""
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>console.error('boom-from-page')</script></body></html>")
    r = _chromium(bad, "--dump-dom")
    assert any("boom-from-page" in m for m in _console_messages(r.stderr))


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    from matplotlib.image import imread

    page = gg.report(run_dir, tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    r = _chromium(page, "--dump-dom", f"--screenshot={shot}", "--window-size=1280,3000")
    assert r.returncode == 0 and shot.exists(), r.stderr[-2000:]
    for title in SECTIONS:
        assert f">{title}</h2>" in r.stdout
    assert r.stdout.count("<img") == 4
    assert f"Gradients exploded at step {NAN_STEP}" in r.stdout
    assert _console_messages(r.stderr) == []

    img = imread(shot)
    assert img.shape[:2] == (3000, 1280)
    rgb = img[..., :3]
    non_white = (rgb < 0.95).any(axis=-1).mean()
    assert 0.05 < non_white < 0.9  # text and plots drawn, not a blank or error page
    assert len(np.unique((rgb * 255).astype(np.uint8).reshape(-1, 3), axis=0)) > 200


def test_a_gradient_out_of_scale_at_init_is_said_and_a_converging_run_is_not():
    """Found as a stranger: a transformers ConvNeXt on zero-background digits (a LayerNorm
    over blank patches: gradguard.doctor.norms) started at a gradient norm of 1.8e4 and was
    under 10 from step 2; the run sat at chance and the report said "No gradient trouble ...
    between 0.108 and 1.77e+04" and no more."""
    d = _flat([])
    d.grad_norm = np.concatenate([[1.1e4, 1.77e4, 8.6], np.full(d.n_steps - 3, 1.0)])
    text = summary_sentence(d)
    assert ("It started at 1.77e+04, 1.77e+04x its level ten steps later: a gradient out of "
            "scale at init, before any update could cause it (run gg.doctor on a batch).") in text
    assert text.count("gg.doctor") == 1  # said once, not again after the flat loss
    # a run whose loss goes to ~0 lowers its norm 1000x over the run, not in ten steps
    d = _data([])
    d.grad_norm = np.geomspace(2.0, 2e-3, d.n_steps)
    assert "out of scale" not in summary_sentence(d)

    # found by a stranger: an MLP on separable blobs fit in ten steps (loss 9.4 to 1e-3,
    # its norm with it) was told "a gradient out of scale at init"
    d = _data([])
    d.grad_norm = np.concatenate([[9.35, 6.0, 2.0], np.full(d.n_steps - 3, 1e-3)])
    d.loss = np.concatenate([[4.7, 2.0, 0.5], np.full(d.n_steps - 3, 1e-5)])
    assert "out of scale" not in summary_sentence(d)


def test_an_lr_jump_is_an_incident_the_run_is_judged_from_not_healthy():
    """Found by a stranger: a script that raised its LR 30x mid-run got gradguard's own
    ``lr_too_high`` warning, then the verdict "HEALTHY: No gradient trouble in 300 steps"
    (held-out 2.7x its twin's). The jump is an incident: the run is judged from the level
    before it, and the summary names it."""
    import numpy as np

    from gradguard.report._data import RunData
    from gradguard.report._outcome import judge
    from gradguard.report._summary import summary_sentence

    n = 60
    loss = np.linspace(2.0, 0.5, n)
    loss[30:] = 1.5  # up after the jump, and it stays there
    jump = {"kind": "lr_too_high", "step": 30, "severity": "warning", "value": 30.0,
            "message": "step 30: learning rate of param group 0 jumped 30x"}
    d = RunData(Path("r"), np.arange(n), loss, np.ones(n), np.ones(n), np.zeros(n, bool), [],
                np.zeros(0, int), np.zeros((0, 0)), np.zeros((0, 0)), [jump])
    out = judge(d)
    assert (out.status, out.incident_step) == ("not_recovered", 30)
    text = summary_sentence(d, {})
    assert text.startswith("The learning rate jumped 30x at step 30, above any the run had")
    assert "did not recover" in text and "No gradient trouble" not in text


def test_a_loop_without_backward_is_told_nothing_trained_not_no_gradient_trouble(tmp_path):
    """Found by a stranger: the README's loop with ``loss.backward()`` forgotten was "No
    gradient trouble in 200 steps: the gradient norm stayed between 0 and 0", a healthy
    run, with the one event saying otherwise in the table below."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    guard = gg.Guard(model, opt, clip=gg.ZClip(), recovery=gg.Recovery(), every=50,
                     sinks=[gg.JsonlSink(tmp_path)])
    for _ in range(200):
        x = torch.randn(32, 16)
        guard.step((model(x) - x.sum(1, keepdim=True)).pow(2).mean())  # no backward
        opt.zero_grad()
    guard.close()
    data = load_run(tmp_path)
    out = judge(data)
    assert (out.status, out.cause, out.incident_step, out.ok) == ("stalled", "no_gradient", 0, False)
    assert "loss.backward() before guard.step()" in out.remedy
    text = summary_sentence(data)
    assert text.startswith("Training stalled: from step 0 no gradient reached the optimizer")
    assert "No gradient trouble" not in text


def test_a_run_whose_gradients_came_back_is_not_said_to_have_had_none():
    """A stretch without gradients that ended (a warm-up with everything frozen) is no
    stall: only a silence that lasts to the end of the run is."""
    ev = [_ev("disconnected_layer", 49)]
    d = _data(ev)
    d.grad_norm[:50] = 0.0
    assert judge(d).cause != "no_gradient"
    d.grad_norm[:] = 0.0
    assert (judge(d).status, judge(d).cause) == ("stalled", "no_gradient")


@pytest.mark.parametrize("exc", [RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"),
                                 KeyboardInterrupt(), SystemExit(0), StopIteration(),
                                 GeneratorExit()])
def test_a_loop_that_raises_out_of_its_guard_block_is_told_stopped(tmp_path, exc):
    """Found by a stranger: a run that died of an out-of-memory error inside ``with
    gg.Guard(...)`` was "No gradient trouble in 38 steps", no word of the crash."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(type(exc)):
        with gg.Guard(model, opt, every=10, sinks=[gg.JsonlSink(tmp_path)]) as guard:
            for i, (x, y) in enumerate(batches(60)):
                if i == 38:
                    raise exc
                loss = torch.nn.functional.mse_loss(model(x), y)
                loss.backward()
                guard.step(loss)
                opt.zero_grad()
    data = load_run(tmp_path)
    out = judge(data)
    # an exit with code 0 is an end, and so are an iterator run out and a generator's close
    # (found by a stranger: a loop written as a generator, closed by its caller, was
    # "stopped at step 30 by GeneratorExit")
    if isinstance(exc, (SystemExit, StopIteration, GeneratorExit)):
        assert out.status == "healthy" and not any(e["kind"] == "abort" for e in data.events)
        return
    name = type(exc).__name__
    assert out.status == "stopped" and f"training was stopped at step 37 by {name}" in out.clause
    assert f"by {name}" in summary_sentence(data)
    # no gradient advice for a run stopped from outside (found by a stranger: a SIGTERM
    # preemption was told to clip its gradients or lower its LR)
    assert out.remedy.startswith("Nothing in the gradients or the loss stopped it: see what "
                                 f"the loop raised ({name}"), out.remedy
    # the guard cannot tell whether the loop had finished (post-training code that raised)
    assert "if training had not finished, resume" in out.remedy
    if isinstance(exc, RuntimeError):
        assert "CUDA out of memory" in out.clause


def test_an_inf_loss_is_told_inf(tmp_path):
    """Found by a stranger: a loss of +Inf was summarised as "The loss was NaN" (the kind
    of its gradients' norm, which an Inf loss makes NaN as often as Inf)."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gg.Guard(model, opt, every=10, sinks=[gg.JsonlSink(tmp_path)]) as guard:
        for i, (x, y) in enumerate(batches(20)):
            loss = torch.nn.functional.mse_loss(model(x), y)
            if i == 7:
                loss = loss * math.inf  # +Inf, and its gradients Inf or NaN
            loss.backward()
            guard.step(loss)
            opt.zero_grad()
    data = load_run(tmp_path)
    [ev] = [e for e in data.events if e["kind"] == "nonfinite_grad"]
    assert ev["layer"] == "(loss)" and ev["data"]["loss"] == "Inf"
    assert "The loss was Inf at step 7" in summary_sentence(data)


def _silent_run(tmp_path, *, hinge: bool, given: bool = True):
    """A classifier whose gradients are all exactly zero: a hinge loss that fits separable
    data (a loss of 0 from some step on), or ReLUs dead from the start under a head
    without a bias."""
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = (x[:, 0] > 0).long()
    x[:, 0] += torch.where(x[:, 0] > 0, 1.0, -1.0)  # a margin: separable
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 2, bias=hinge))
    if not hinge:
        with torch.no_grad():
            model[0].bias.fill_(-1e3)  # every ReLU off for good
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gg.Guard(model, opt, every=20, sinks=[gg.JsonlSink(tmp_path)]) as guard:
        for step in range(300):
            i = torch.randint(0, 256, (32,), generator=torch.Generator().manual_seed(step))
            out = model(x[i] * (10.0 if hinge else 1.0))
            loss = (torch.nn.functional.multi_margin_loss(out, y[i]) if hinge else
                    torch.nn.functional.cross_entropy(out, y[i]))
            loss.backward()
            guard.step(loss) if given else guard.step()
            opt.zero_grad()
    return load_run(tmp_path)


def test_a_loss_fit_to_zero_whose_gradients_are_zero_is_no_stall(tmp_path):
    """Found by a regression hunt: a hinge loss on separable data reaches exactly 0, and its
    gradients with it; the run was "stalled ... call loss.backward()". And a batch that
    breaks the margin after a stretch of zeros is no gradient spike, nor a window of zero
    gradients at a loss of 0 dead units (warnings the hunt found on a healthy SVM)."""
    data = _silent_run(tmp_path, hinge=True)
    assert data.loss[-50:].max() == 0.0
    out = judge(data)
    assert out.status == "healthy" and out.cause is None
    assert not [e for e in data.events if e["severity"] != "info"], data.events


@pytest.mark.parametrize("hinge", [True, False])
def test_zero_gradients_of_a_run_stepped_without_its_loss_are_not_judged(tmp_path, hinge):
    """Found by a regression hunt: a linear SVM stepped without its loss (``guard.step()``),
    its hinge loss fit to 0, was "stalled ... the units that feed the layers died". Without
    the loss a fit and dead units look alike (every gradient exactly zero): the run is
    unjudged, the clause names both, and the remedy asks for the loss."""
    data = _silent_run(tmp_path, hinge=hinge, given=False)
    out = judge(data)
    assert (out.status, out.cause) == ("unjudged", None)
    assert "a loss fit exactly" in out.clause and "units that died" in out.clause
    assert "guard.step(loss)" in out.remedy


def test_a_loss_of_zero_from_the_first_step_is_no_fit(tmp_path):
    """Found by a regression hunt: a preprocessing bug that masks every label gives a loss
    of exactly 0 and gradients of exactly 0 from the first step; the exemption of a fit
    loss made it "healthy, the gradient norm between 0 and 0". A fresh model is never at
    a loss of 0: only a loss that was above 0 can have been fit."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(100, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 100))
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    with gg.Guard(model, opt, every=20, sinks=[gg.JsonlSink(tmp_path)]) as guard:
        for _ in range(100):
            tok = torch.randint(0, 100, (8, 16))
            mask = torch.zeros(8 * 16)  # every label ignored
            ce = torch.nn.functional.cross_entropy(model(tok).view(-1, 100), tok.view(-1),
                                                   reduction="none")
            loss = (ce * mask).sum() / mask.sum().clamp(min=1)
            loss.backward()
            guard.step(loss)
            opt.zero_grad()
    data = load_run(tmp_path)
    assert any(e["kind"] == "disconnected_layer" and e["severity"] == "warning"
               for e in data.events), data.events
    assert judge(data).status == "stalled"


def test_every_gradient_exactly_zero_behind_dead_units_is_no_missing_backward(tmp_path):
    """Found by a regression hunt: ReLUs killed under a head without a bias leave every
    gradient exactly zero; the run was told to call loss.backward(), which it did."""
    data = _silent_run(tmp_path, hinge=False)
    out = judge(data)
    assert (out.status, out.cause) == ("stalled", "dead_units")
    assert "backward" not in out.remedy and "LeakyReLU" in out.remedy
    text = summary_sentence(data)
    assert "every gradient was exactly zero" in text and "No gradient trouble" not in text


def test_a_loss_that_never_fell_after_the_ladder_lowered_the_lr_is_a_stall():
    """Found by strangers: a GRU on Adam that learns its task at any LR from 0.01 to 0.2
    unguarded, its LR capped at step 20 by the growth rule, sat at chance to the end and was
    "training recovered ... Stable at lr 0.00365: set half of it, 0.00182, in your config",
    an LR that never trains. A loss that did not fall over the run after the ladder lowered
    the LR is a stall, the LR left suspected; a flat run the ladder left at its LR (a NaN
    batch skipped in a fine-tune that starts at its best) is still recovered."""
    growth = ("step 20: the weights grew 4.29x in the first 20 steps (the median weight "
              "matrix's norm): an LR far too high")
    ev = [_ev("rollback", 20, message=growth, data={"factor": 0.0365, "ceiling": 0.0365,
                                                      "reason": growth}),
          _ev("lr_settled", 300, "info", data={"factor": 0.0608, "lr": [0.00365],
                                              "advise": [0.00182]})]
    d = _data(ev, n=400)
    d.loss[:] = 1.386 + 0.003 * np.sin(np.arange(400))  # at chance throughout
    out = judge(d)
    assert (out.status, out.cause) == ("stalled", "lr_lowered"), out
    assert "after gradguard lowered the LR at step 20" in out.clause
    assert "gg.Recovery(early_growth=False)" in out.remedy and not out.ok
    text = summary_sentence(d)
    assert "training recovered" not in text and "Stable at" not in text, text
    skipped = [_ev("nonfinite_grad", 30, "error", "(input)", "gradient norm is NaN"),
               _ev("skip", 30)]
    d = _data(skipped, n=400)
    d.loss[:] = 0.2 + 0.001 * np.sin(np.arange(400))
    assert judge(d).status == "recovered"
    # nor a back-off, restored over its restore_steps or undone at the next step: the
    # ceiling stayed 1 (found by a regression hunt: a converged fine-tune that met three NaN
    # batches was "stalled ... after gradguard lowered the LR")
    backed = [*skipped, _ev("lr_backoff", 31, data={"factor": 0.1, "ceiling": 1.0}),
              _ev("nonfinite_input", 32, data={"factor": 1.0, "ceiling": 1.0, "undone": True})]
    d = _data(backed, n=400)
    d.loss[:] = 0.2 + 0.001 * np.sin(np.arange(400))
    assert judge(d).status == "recovered"


def test_an_lr_found_stable_that_failed_again_is_not_advised():
    """Found by a stranger: a sum-reduced loss on SGD settled at lr 0.00399 at step 105,
    spiked again at step 163 at that LR and was cut to x0.00133, and the summary still
    ended "set lr 0.00399 in your config", an LR that diverges from scratch."""
    ev = [_ev("grad_spike", 4, layer="fc"),
          _ev("rollback", 4, data={"factor": 0.0133}),
          _ev("lr_settled", 105, "info", data={"factor": 0.0133, "lr": [0.00399],
                                               "advise": [0.002]}),
          _ev("lr_backoff", 163, data={"factor": 0.00133})]
    text = summary_sentence(_data(ev, n=300))
    assert "set half of it" not in text and "in your config" not in text, text
    assert ("The LR it had found stable, lr 0.00399 at step 105, failed again at step 163: "
            "no stable LR was found") in text


def test_a_run_whose_schedule_took_its_lr_away_is_told_so(tmp_path):
    """Found by a stranger: a StepLR meant per epoch, stepped every batch, took the LR to
    1e-23 of its start and the run never learnt; the summary said "nothing to recover
    from ... run gg.doctor on a batch", which cannot see a schedule."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.8)
    with gg.Guard(model, opt, every=20, sinks=[gg.JsonlSink(tmp_path)]) as guard:
        for x, y in batches(200):
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            guard.step(loss)
            opt.zero_grad()
            sched.step()
    data = load_run(tmp_path)
    [ev] = [e for e in data.events if e["kind"] == "lr_decayed"]
    assert ev["step"] == 42  # 0.8**42 < 1e-4
    text = summary_sentence(data)
    assert "the learning rate fell to 8.5e-05 of its peak by step 42: the schedule decays " \
           "it too fast" in text, text
    # a schedule that gets there in its last steps (a cosine to 0, a OneCycle) is as meant
    # (found by a regression hunt: a fine-tune that starts at its best was told otherwise)
    d = _data([_ev("lr_decayed", 199, "info") | {"value": 0.0}], n=200)
    d.loss[:] = 0.2 + 0.001 * np.sin(np.arange(200))
    assert "decays it too fast" not in summary_sentence(d)


def test_trouble_right_after_an_lr_jump_is_told_after_the_jump():
    """Found by a stranger: after a LambdaLR x100 at step 150 the summary began "The
    gradient norm spiked at step 151", the reported jump left unsaid."""
    ev = [_ev("lr_too_high", 50, data={"group": 0}) | {"value": 100.0},
          _ev("grad_spike", 51, layer="4")]
    text = summary_sentence(_data(ev))
    assert text.startswith("The learning rate jumped 100x at step 50, above any the run had "
                           "or planned. The gradient norm spiked at step 51 in `4`."), text
    late = [_ev("lr_too_high", 10) | {"value": 100.0}, _ev("grad_spike", 51, layer="4")]
    assert summary_sentence(_data(late)).startswith("The gradient norm spiked at step 51")


def test_a_change_of_data_is_dated_where_its_trouble_began_not_where_it_was_found():
    """Found by a stranger: inputs x8+2 from step 200, a spike there, a rollback to the
    snapshot of step 49, the change found at step 259: told "if the data was meant to
    change at step 259". The change is dated by the first warning after the snapshot its
    rollback restored."""
    events = [_ev("nonfinite_grad", 20, "error"),  # an earlier, unrelated incident
              _ev("grad_spike", 60), _ev("rollback", 64, "error", data={"snapshot_step": 49}),
              _ev("data_shift", 79, data={"snapshot_step": 49})]
    out = judge(_data(events))
    assert out.status == "unjudged"
    assert out.remedy.startswith("If the data was meant to change at step 60, nothing to do")
    events[-1]["data"] = {}  # an older record: the step it was found at
    assert "change at step 79" in judge(_data(events)).remedy


def test_a_run_the_ladder_settled_at_a_lower_lr_has_that_lr_as_its_remedy():
    """Found by a stranger: SGD at 3.0 rolled back and settled at 0.03; the summary said
    "Stable at lr 0.03 ... set it in your config", and ``run.json``'s outcome had no cause
    and no remedy. The settled LR, as the summary says it, is the remedy, the LR the cause."""
    events = [_ev("grad_spike", 40), _ev("rollback", 41, "error", data={"factor": 0.1}),
              _ev("lr_settled", 60, "info", data={"factor": 0.1, "lr": [0.3], "advise": [0.15],
                                                 "clipped": 3, "steps": 20})]
    out = judge(_data(events))
    assert (out.status, out.cause) == ("recovered", "lr_too_high")
    assert out.remedy == ("Stable at lr 0.3, with the gradients clipped on 3 of the 20 steps "
                          "since the LR was lowered to it: the edge of what trains; set half "
                          "of it, 0.15, in your config.")
    events[-1]["data"]["factor"] = 1.0  # back at the LR set: no LR remedy
    assert judge(_data(events)).remedy is None


@pytest.mark.parametrize("lr", [1e-6, 1e-3])
def test_a_flat_run_whose_updates_barely_move_the_weights_is_told_its_lr_is_too_low(tmp_path, lr):
    """Found by a stranger: Adam at 1e-6, its loss flat at chance for 400 steps, was
    "No gradient trouble ... run gg.doctor on a batch", and the doctor found nothing (no
    probe of it sees an LR too low). Its updates moved the weights by 7e-6 of their norm
    per step: the summary says the LR is likely far too low. At 1e-3 the loss falls."""
    import torch
    from torch import nn

    from gradguard.lab._common import minibatches, split_digits

    x_train, y_train, _, _ = split_digits()
    batch = minibatches(x_train, y_train, 32, seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    with gg.Guard(model, opt, clip=gg.ZClip(), recovery=gg.Recovery(),
                  sinks=[gg.JsonlSink(tmp_path)]) as guard:
        for step in range(200):
            x, y = batch(step)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            guard.step(loss.detach())
    text = summary_sentence(load_run(tmp_path))
    assert ("its learning rate is likely far too low" in text) == (lr == 1e-6), text


def test_batches_of_padding_only_are_told_in_the_summary(tmp_path):
    """Found by a stranger: a masked LM whose every 7th batch was padding only had a NaN
    loss there (a mean over no targets) and zero gradients; the ``nonfinite_loss``
    warnings named the fix, yet the summary said "No gradient trouble" and left it out."""
    import torch
    from torch import nn

    from gradguard.lab._common import minibatches, split_digits

    x_train, y_train, _, _ = split_digits()
    batch = minibatches(x_train, y_train, 32, seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with gg.Guard(model, opt, clip=gg.ZClip(), recovery=gg.Recovery(),
                  sinks=[gg.JsonlSink(tmp_path)]) as guard:
        for step in range(140):
            x, y = batch(step)
            if step % 7 == 3:
                y = torch.full_like(y, -100)  # padding only
            loss = nn.functional.cross_entropy(model(x), y, ignore_index=-100)
            opt.zero_grad()
            loss.backward()
            guard.step(loss.detach())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    text = summary_sentence(load_run(tmp_path))
    assert "No gradient trouble" not in text, text
    assert "non-finite at 20 steps from step 3" in text and "max(count, 1)" in text, text


def test_sparse_embedding_updates_are_no_lr_far_too_low(tmp_path):
    """Found by a regression hunt: two 20,000-row embedding tables and a linear head on SGD
    at 0.1 (a loss that does not fall): each step updates the rows of its batch's tokens
    alone, the tables are the median layer at 1.1e-6 of their norm per step, and the run
    was told its LR was likely far too low (10x did worse). The head moved 10-100x that:
    an LR far too low leaves every layer still."""
    import torch
    from torch import nn

    class Tables(nn.Module):
        def __init__(self):
            super().__init__()
            self.e, self.e2 = nn.Embedding(20000, 64), nn.Embedding(20000, 64)
            self.h = nn.Linear(64, 2)

        def forward(self, x):
            return self.h(self.e(x).mean(1) + self.e2(x).mean(1))

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model = Tables()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gg.Guard(model, opt, clip=gg.ZClip(), recovery=gg.Recovery(),
                  sinks=[gg.JsonlSink(tmp_path)]) as guard:
        for _ in range(200):
            x = torch.randint(0, 20000, (32, 10), generator=gen)
            loss = nn.functional.cross_entropy(model(x), x[:, 0] % 2)
            opt.zero_grad()
            loss.backward()
            guard.step(loss.detach())
    run = load_run(tmp_path)
    assert np.nanmedian(run.update_ratio[len(run.update_ratio) // 2:]) < 1e-5  # the tables
    text = summary_sentence(run)
    assert "did not fall" in text and "far too low" not in text, text


def test_a_loss_on_two_levels_is_judged_by_its_lower_batches_too():
    """Found by a stranger: a 99:1 classifier under label smoothing has half its batches
    without a minority sample, their loss at the smoothing's floor (0.208), the others at
    0.23-0.3: the median of a short window flips between the two by chance, and a run an
    LR burst left unharmed was "not recovered: the loss ended at 0.23, above the 0.208 it
    had before step 100". Its lower quartile, back at the floor, tells it recovered; a run
    the trouble damaged has its lower batches raised too (a regression hunt: the
    interquartile range taken as the noise passed a loss 5-22x its level)."""
    rng = np.random.default_rng(0)
    n = 160
    events = [_ev("lr_too_high", 100), _ev("lr_backoff", 100, data={"factor": 0.1})]
    d = _data(events, n=n)
    floor = rng.random(n) < 0.55
    d.loss = np.where(floor, 0.208, 0.23 + 0.07 * rng.random(n))
    d.loss[92:100] = 0.208  # the window before the burst: at the floor by chance
    d.loss[-16:] = np.where(np.arange(16) % 2 == 0, 0.24, 0.208)
    d.loss[-16:][:3] = 0.25  # ... and the end just above it
    out = judge(d)
    assert out.status == "recovered", out
    d.loss[-16:] = np.where(np.arange(16) % 2 == 0, 0.9, 0.6)  # both levels raised
    assert judge(d).status in ("not_recovered", "diverged")


@pytest.mark.parametrize("norm", [False, True])
def test_the_vanishing_remedy_of_a_run_knows_the_models_norms(tmp_path, norm):
    """The run's remedy for vanishing gradients is its detector's, which knows the model:
    ten sigmoid layers on SGD stall with their early gradients vanishing; with a LayerNorm
    before the head the model is not told to add one (found by a stranger: a post-LN
    transformer, with a LayerNorm and a residual in every block, was), and still hears of
    the activations."""
    torch.manual_seed(0)
    mods = [m for _ in range(10) for m in (nn.Linear(16, 16), nn.Sigmoid())]
    model = nn.Sequential(*mods, *([nn.LayerNorm(16)] if norm else []), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gg.Guard(model, opt, every=25, sinks=[gg.JsonlSink(tmp_path)]) as guard:
        for _ in range(100):
            x = torch.randn(32, 16)
            loss = nn.functional.mse_loss(model(x), x[:, :1])
            loss.backward()
            guard.step(loss)
            opt.zero_grad()
    assert [e.kind for e in guard.events if e.severity == "warning"] == ["vanishing_grad"] * 4
    out = judge(load_run(tmp_path))
    assert (out.status, out.cause) == ("stalled", "vanishing_grad"), out
    assert "ReLU-family" in out.remedy and "gg.doctor" in out.remedy
    assert ("add normalisation (LayerNorm" in out.remedy) != norm
    assert ("post-LN" in out.remedy and "`20`" in out.remedy) == norm
