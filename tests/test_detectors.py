"""Detectors: pure functions over a window -> events (table-driven), and the Guard's hooks."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.detectors import (
    DetectorConfig,
    DetectorState,
    ForwardOrigin,
    LrTracker,
    detect,
    detect_activations,
    detect_nonfinite,
    detect_spikes,
    detect_update_ratio,
    detect_vanishing,
    nonfinite_origin,
)
from gradguard.detectors.spikes import confirm_length
from gradguard.telemetry import Window
from helpers import batches, mlp

LAYERS = ["a", "b", "c", "d", "e", "f"]


def window(layer_norms, losses=None, start=0, skipped=None, weight=None, update=None) -> Window:
    """A window with one parameter per layer (layer norm == parameter norm)."""
    ln = torch.as_tensor(layer_norms, dtype=torch.float32)
    n, n_layers = ln.shape
    total = ln.pow(2).sum(dim=1).sqrt()
    loss = torch.ones(n) if losses is None else torch.as_tensor(losses, dtype=torch.float32)
    return Window(
        steps=list(range(start, start + n)),
        loss=loss,
        total_norm=total,
        clip_coef=torch.ones(n),
        skipped=torch.zeros(n, dtype=torch.bool) if skipped is None else torch.as_tensor(skipped),
        param_norms=ln,
        names=[f"{x}.weight" for x in LAYERS[:n_layers]],
        layers=LAYERS[:n_layers],
        layer_index=list(range(n_layers)),
        weight_norms=None if weight is None else torch.as_tensor(weight, dtype=torch.float32),
        update_norms=None if update is None else torch.as_tensor(update, dtype=torch.float32),
    )


def noisy(n, sigma=0.1, seed=0, level=1.0):
    g = torch.Generator().manual_seed(seed)
    return (level * torch.exp(sigma * torch.randn(n, generator=g))).tolist()


def assert_complete(ev: gg.Event) -> None:
    """Every event carries step, value, severity, a message and a one-sentence remedy."""
    assert isinstance(ev.step, int)
    assert ev.value is not None and ev.severity in ("info", "warning", "error")
    assert ev.message and ev.remedy and ev.remedy.endswith(".")


# ---- non-finite localisation -----------------------------------------------------------
NAN, INF = math.nan, math.inf


@pytest.mark.parametrize(
    ("row", "bad", "origin"),
    [
        ([1.0, 2.0, 3.0], [], None),
        ([NAN, NAN, 3.0], ["a", "b"], "b"),  # b is nearest the loss with c finite
        ([1.0, INF, 3.0], ["b"], "b"),
        ([NAN, NAN, NAN], ["a", "b", "c"], "c"),  # from the loss / forward: the last layer
    ],
)
def test_nonfinite_origin_is_the_bad_layer_nearest_the_loss(row, bad, origin):
    assert nonfinite_origin(torch.tensor(row), LAYERS) == (bad, origin)


@pytest.mark.parametrize(
    ("row", "bad", "origin"),
    [
        ([NAN, NAN, 3.0], ["a", "b"], "a"),  # b feeds a: a is nearer the loss
        ([NAN, 2.0, NAN], ["a", "c"], "c"),  # two branches gone bad: the last registered
        ([NAN, NAN, NAN], ["a", "b", "c"], "c"),
        ([1.0, NAN, 3.0], ["b"], "b"),
    ],
)
def test_nonfinite_origin_follows_the_graph_order_when_given(row, bad, origin):
    """``after``: b feeds a and c; a and c are side by side (a pre-norm "b" registered
    after the projection "a" it feeds, beside a second branch "c")."""
    after = [[], [0, 2], []]
    assert nonfinite_origin(torch.tensor(row), LAYERS, after) == (bad, origin)


@pytest.mark.parametrize(
    ("loss", "fwd", "watched", "layer", "cause"),
    [
        (1.0, None, False, "b", None),
        (NAN, None, True, "(loss)", "nonfinite_loss"),  # watched: activations were finite
        (NAN, None, False, "(loss)", None),  # unwatched: input or loss, cannot tell
        (NAN, ForwardOrigin("(input)", "torch.float32"), True, "(input)", "nonfinite_input"),
        (NAN, ForwardOrigin("a", "torch.float16"), True, "a", "half_precision_overflow"),
        (NAN, ForwardOrigin("a", "torch.float32"), True, "a", None),
    ],
)
def test_nonfinite_event_names_origin_and_cause(loss, fwd, watched, layer, cause):
    rows = [[1.0, 1.0, 1.0], [1.0, NAN, 1.0] if fwd is None and loss == 1.0 else [NAN] * 3]
    w = window(rows, losses=[1.0, loss], skipped=[False, True])
    events = detect_nonfinite(w, ({1: fwd} if fwd else {}) if watched else None)
    nf = [e for e in events if e.kind == "nonfinite_grad"]
    assert [(e.step, e.layer) for e in nf] == [(1, layer)]
    assert nf[0].data.get("cause") == cause
    assert nf[0].severity == "error"
    assert [e.kind for e in events] == ["nonfinite_grad", "skip"]
    assert nf[0].remedy


def test_a_total_norm_that_overflowed_over_finite_layers_names_the_largest():
    """Found by a stranger: every layer's norm finite (3e38 each), their total Inf, was told
    "origin `None` (0 of 2 layers non-finite)"."""
    rows = [[1.0, 1.0, 1.0], [1.0, 3e38, 3e38]]
    w = window(rows, skipped=[False, True])
    assert math.isinf(w.total_norm[1])
    [ev] = [e for e in detect_nonfinite(w) if e.kind == "nonfinite_grad"]
    assert ev.layer == "b" and ev.data["layers"] == []
    assert "the layers' norms are finite, their total overflowed (the largest in `b`)" in ev.message


# ---- spikes -------------------------------------------------------------------------------
def test_confirmed_loss_spike_fires_at_its_first_step():
    losses = noisy(60)
    losses[50] *= 5.0
    losses[51] *= 4.0
    state = DetectorState()
    events = detect_spikes(window([[1.0, 1.0, 1.0]] * 60, losses), state)
    assert [(e.kind, e.step) for e in events] == [("loss_spike", 50)]
    ev = events[0]
    assert_complete(ev)
    assert ev.data["run"] == 2 and ev.value == pytest.approx(losses[50])
    assert ev.threshold == pytest.approx(2.0 * ev.data["median"])


def test_a_single_batch_loss_outlier_is_not_reported():
    losses = noisy(60)
    losses[50] *= 30.0  # heavy-tailed healthy losses have these
    assert detect_spikes(window([[1.0, 1.0, 1.0]] * 60, losses), DetectorState()) == []


def test_loss_spike_confirmed_across_windows_keeps_its_first_step():
    state = DetectorState()
    losses = noisy(40)
    losses[-1] = 10.0
    assert detect_spikes(window([[1.0] * 3] * 40, losses), state) == []  # not confirmed yet
    second = detect_spikes(window([[1.0] * 3] * 3, [10.0, 11.0, 1.0], start=40), state)
    assert [(e.step, e.data["run"], e.data["since"]) for e in second] == [(39, 3, 39)]
    assert state.loss_run == 0
    # a confirmed run still going on in the next window is reported again, as continued
    # (three spiking losses in the last 45 make a run of 2 or 3 chance: 4 confirm now)
    assert [e.step for e in detect_spikes(window([[1.0] * 3] * 6, [10.0] * 6, start=43),
                                          state)] == [43]
    third = detect_spikes(window([[1.0] * 3] * 2, [200.0, 1.0], start=49), state)
    assert [(e.step, e.data["continued"]) for e in third] == [(49, True)]
    # it quotes the loss now, beside where the run began (it quoted the first spike's
    # figures alone while the loss went on up: found by a stranger)
    said = third[0].message
    assert said.startswith("step 49: loss still spiking since step 43 (10 at step 43): 200 is ")
    assert third[0].value == 200.0


def heavy_tailed(n: int, every: int = 7, seed: int = 0) -> list[float]:
    """A healthy loss whose batches spike on their own one step in ``every`` (gross
    outliers in the targets), at 20-60x the rest."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, v in enumerate(noisy(n)):
        out.append(v * (20 + 40 * torch.rand(1, generator=g).item()) if i % every == 0 else v)
    return out


def test_a_heavy_tailed_loss_needs_a_longer_run_to_confirm_a_spike():
    """Where single batches spike on 1 step in 7, two or three in a row are chance (once in
    50 and 350 steps); a run of as many as chance gives once in 10,000 steps is needed."""
    losses = heavy_tailed(200)
    for i in (100, 101, 130, 131, 132, 160, 161, 162, 163):  # runs of 2, 3 and 4 (+1)
        losses[i] = 40.0
    state = DetectorState()
    assert [e for e in detect_spikes(window([[1.0] * 3] * 200, losses), state)
            if e.kind == "loss_spike"] == []
    need, share = confirm_length(state.loss)
    assert 0.1 < share < 0.25 and need == math.ceil(math.log(1e-4) / math.log(share)) >= 5
    # wrecked weights keep spiking: confirmed, at the run's first step
    more = [40.0] * 10 + [1.0] * 5
    events = detect_spikes(window([[1.0] * 3] * 15, more, start=200), state)
    assert [(e.kind, e.step) for e in events] == [("loss_spike", 200)]
    need, share = events[0].data["confirm"], events[0].data["share"]
    assert need >= 5 and need == math.ceil(math.log(1e-4) / math.log(share))
    assert f"{need} steps in a row" in events[0].message


def test_a_calm_loss_confirms_a_spike_at_two_steps():
    losses = noisy(100)
    assert confirm_length(losses) == (2, 0.0)
    assert confirm_length(losses[:10]) == (2, 0.0)  # too few to tell: the configured length
    spiky = [50.0 if i % 3 == 0 else v for i, v in enumerate(losses)]
    assert confirm_length(spiky)[0] == 8  # at most MAX_CONFIRM
    assert confirm_length(losses[:30] + [50.0] * 70, run=70) == (2, 0.0)  # the run left out


def test_no_spike_before_warmup():
    losses = [1.0] * 10 + [100.0]
    cfg = DetectorConfig(spike_warmup=20)
    assert detect_spikes(window([[1.0] * 3] * 11, losses), DetectorState(), cfg) == []


def test_grad_spike_names_the_layer_that_jumped():
    rows = [[1.0, 2.0, 3.0]] * 40
    rows[30] = [1.0, 5000.0, 3.0]
    events = detect_spikes(window(rows), DetectorState())
    assert [(e.kind, e.step, e.layer) for e in events] == [("grad_spike", 30, "b")]
    assert_complete(events[0])


@pytest.mark.parametrize("jump, clipped, length, severity", [
    (14.0, True, 1, "info"),  # a healthy heavy-tailed outlier the clip policy handled
    (14.0, False, 1, "warning"),  # nothing clipped it
    (60.0, True, 1, "warning"),  # past the per-step verdict's x50: no outlier
    (14.0, True, 2, "warning"),  # it lasted
])
def test_a_one_step_clipped_gradient_spike_is_info_and_any_other_a_warning(
        jump, clipped, length, severity):
    rows = [[1.0, 1.0, 1.0]] * 40
    for i in range(length):
        rows[30 + i] = [1.0, jump * math.sqrt(3.0), 1.0]  # total norm ~jump x the median
    w = window(rows)
    if clipped:
        w.clip_coef[30:30 + length] = 0.1
    events = detect_spikes(w, DetectorState())
    assert [(e.kind, e.step, e.severity) for e in events] == [("grad_spike", 30, severity)]
    assert events[0].data["run"] == length
    assert ("clipped" in events[0].message) == (clipped and jump < 50)


@pytest.mark.parametrize("length", [1, 3])
def test_a_gradient_spike_while_the_loss_falls_is_info(length):
    """Found by a stranger: a healthy digits CNN on SGD with Nesterov leaves its early
    plateau at steps 66-75, its norm 13-19x the plateau's median as its loss falls from 1.5
    to 0.6: warning-level spikes on a healthy run. A norm that jumps while the loss is
    below its recent median is info; the same jump with the loss above it is a warning."""
    rows = [[1.0, 1.0, 1.0]] * 40
    for i in range(length):
        rows[30 + i] = [1.0, 14.0 * math.sqrt(3.0), 1.0]
    falling = [2.0] * 30 + [1.5 - 0.05 * i for i in range(10)]
    events = detect_spikes(window(rows, falling), DetectorState())
    assert [(e.kind, e.step, e.severity) for e in events] == [("grad_spike", 30, "info")]
    assert "the loss fell at it" in events[0].message and "clipped" not in events[0].message
    rising = [2.0] * 30 + [2.5] * 10
    events = detect_spikes(window(rows, rising), DetectorState())
    assert [(e.kind, e.severity) for e in events if e.kind == "grad_spike"] == [
        ("grad_spike", "warning")]


def test_a_spike_over_a_median_below_zero_is_told_as_a_difference_and_none_over_zero():
    """A model that converged exactly has a gradient norm of exactly zero; the first
    non-zero one after it was a ZeroDivisionError in the message (it crashed the flush),
    and then a warning at each batch that broke a fit hinge loss's margin: over a median
    of exactly 0 there is no scale to spike above. A loss that can be negative had its
    ratio told as a negative multiple."""
    rows = [[0.0] * 3] * 40
    rows[30] = [0.5] * 3
    losses = [-2.0] * 40
    losses[30:33] = [40.0] * 3
    events = detect_spikes(window(rows, losses), DetectorState())
    assert [e.kind for e in events] == ["loss_spike"]
    assert "40 is 42 above the recent median -2 " in events[0].message


def test_spike_detectors_ignore_nonfinite_values():
    state = DetectorState()
    rows = [[1.0] * 3] * 30
    rows[5] = [NAN] * 3
    losses = [1.0] * 30
    losses[6] = INF
    detect_spikes(window(rows, losses), state)
    assert len(state.grad) == 29 and len(state.loss) == 29
    assert all(math.isfinite(x) for x in [*state.grad, *state.loss])


def test_no_false_spikes_on_heavy_tailed_noise():
    state = DetectorState()
    losses = noisy(3000, sigma=0.3, seed=3)
    g = noisy(3000, sigma=0.3, seed=4)
    rows = [[x, x, x] for x in g]
    events = []
    for k in range(0, 3000, 50):  # flushed in windows of 50, like the guard
        events += detect_spikes(window(rows[k : k + 50], losses[k : k + 50], start=k), state)
    assert events == []


def test_a_slowly_falling_loss_is_not_a_spike():
    losses = [2.0 * 0.99**i for i in range(300)]
    assert detect_spikes(window([[1.0] * 3] * 300, losses), DetectorState()) == []


# ---- vanishing ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ([1e-7, 1e-2, 1.0], ["a"]),  # 1e-5 of the later layers
        ([1e-5, 1e-6, 1.0], ["a", "b"]),
        ([0.1, 0.5, 1.0], []),  # healthy: within 10x
        ([0.0, 0.5, 1.0], []),  # exactly zero: disconnected, not vanishing
        ([1e-9, 1e-9, 1e-9], ["a", "b"]),  # below the absolute floor
    ],
)
def test_vanishing_grad_table(row, expected):
    events = detect_vanishing(window([row] * 10))
    assert (events[0].data["layers"] if events else []) == expected
    if events:
        assert events[0].kind == "vanishing_grad" and events[0].layer == expected[0]
        assert_complete(events[0])


def test_vanishing_in_a_network_with_norms_is_not_told_to_add_them():
    """Found by a stranger: a post-LN transformer on Adam 1e-2 without warm-up, stalled at
    its unigram loss with vanishing gradients, was told to add normalisation or residual
    connections; it had LayerNorm and a residual in every block. A model with norm layers
    is told warm-up, a lower LR and pre-LN, naming its norms; one without, the usual."""
    import dataclasses

    from gradguard.naming import norm_layers

    w = window([[1e-7, 1e-2, 1.0]] * 10)
    [plain] = detect_vanishing(w)
    assert "add normalisation" in plain.remedy and "warm-up" not in plain.remedy
    w = dataclasses.replace(w, norm_layers=["blocks.0.ln1", "blocks.0.ln2", "blocks.1.ln1"])
    [normed] = detect_vanishing(w)
    assert "add normalisation" not in normed.remedy
    assert "warm-up" in normed.remedy and "pre-LN" in normed.remedy
    assert "`blocks.0.ln1`, `blocks.0.ln2`, ..." in normed.remedy
    # what the telemetry hands the window: the model's norms, affine or not, by class
    class RMSNorm(torch.nn.Module):  # a model's own, as transformers' LlamaRMSNorm
        pass
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4, elementwise_affine=False),
                              torch.nn.BatchNorm1d(4), RMSNorm(), torch.nn.ReLU())
    assert norm_layers(net) == ["1", "2", "3"]
    assert norm_layers(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh())) == []


@pytest.mark.parametrize(("matrix", "expected"), [
    ([True, False, True], ["a"]),  # `b` only a norm scale: small by its size, not vanishing
    ([True, True, True], ["a", "b"]),
    (None, ["a", "b"]),  # unknown (a hand-built window): every layer is judged
    ([False, False, False], ["a", "b"]),  # none has a matrix (flattened shards): all judged
])
def test_vanishing_compares_only_layers_with_a_weight_matrix(matrix, expected):
    w = window([[1e-5, 1e-4, 1.0]] * 10)
    w.matrix_layers = matrix
    events = detect_vanishing(w)
    assert (events[0].data["layers"] if events else []) == expected


def test_telemetry_marks_the_layers_with_a_weight_matrix():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 1, bias=False))
    tel = gg.Telemetry(list(model.named_parameters()), every=2)
    model(torch.ones(2, 3)).sum().backward()
    tel.record(tel.measure(), loss=1.0, clip_coef=None, skipped=False)
    w = tel.flush()
    assert w is not None and w.layers == ["0", "1", "2"]
    assert w.matrix_layers == [True, False, True]


@pytest.mark.parametrize(("row", "expected"), [
    ([0.5, 1e-4, 1e-4, 1.0], []),  # the first layer got its gradient: b, c are small on their own
    ([1e-5, 1e-4, 1e-4, 1.0], ["a", "b", "c"]),  # from the input on: a vanished signal
    ([1e-5, 0.5, 1e-4, 1.0], ["a"]),  # the chain ends at the first layer it reached
])
def test_only_a_chain_from_the_input_vanishes(row, expected):
    """A signal that vanished on its way back leaves every layer before the first it failed
    to reach small too. timm's ``regnetx_002`` on 32-pixel digits (SGD 0.01): its last
    stage's residual branches, behind BatchNorm gains initialised to 0 that grow slowly
    there, had gradients 5e-4 of the head's at step 49 while the stem's were in full; they
    were "vanishing in 13 early layers"."""
    events = detect_vanishing(window([row] * 10))
    assert (events[0].data["layers"] if events else []) == expected


@pytest.mark.parametrize(("zeros", "expected"), [
    (10, []),  # every step's loss is 0.0: the batch is fitted, nothing to pass back
    (6, []),  # four steps left: too few to call it sustained (``vanish_min_steps``)
    (0, ["a", "b"]),  # the same norms with a loss to learn from: under the floor
])
def test_steps_whose_loss_is_exactly_zero_are_not_vanishing(zeros, expected):
    """A MobileNetV3-small (torchvision's design) on RMSprop with its batch memorised: the
    cross-entropy rounds to 0.0, and what is left of the gradients (8e-13 at an SE block)
    sat under the absolute floor: "gradients vanish" at step 99 of a run with nothing
    left to learn."""
    losses = [0.0] * zeros + [0.5] * (10 - zeros)
    events = detect_vanishing(window([[8e-13, 6e-11, 1e-10]] * 10, losses=losses))
    assert (events[0].data["layers"] if events else []) == expected


def test_vanishing_must_be_sustained():
    rows = [[1e-7, 1e-2, 1.0]] * 3 + [[0.5, 0.5, 1.0]] * 7
    assert detect_vanishing(window(rows)) == []


@pytest.mark.parametrize(("update", "expected"), [
    ([1e-3, 1e-3, 1e-3], []),  # Adam: the small gradient still moves `a` like the rest
    ([2e-4, 1e-3, 1e-3], []),  # a fifth of the later layers' pace: learning
    ([2e-5, 1e-3, 1e-3], []),  # 0.02 of the largest after it (a large kernel under Adam)
    ([5e-6, 1e-3, 1e-3], ["a"]),  # 0.005 of their pace: not learning
    ([1e-7, 1e-3, 1e-3], ["a"]),  # SGD: the update is as small as the gradient
    ([0.0, 1e-3, 1e-3], ["a"]),  # a skipped step says nothing: judged on the gradients
    (None, ["a"]),  # updates not sampled
])
def test_a_small_gradient_whose_layer_still_learns_is_not_vanishing(update, expected):
    """The query/key projections of BERT at its init under AdamW: gradients 1e-4 of the
    layers after them, updates at their pace."""
    w = window([[1e-6, 1e-2, 1.0]] * 10, weight=None if update is None else [1.0] * 3,
               update=update)
    events = detect_vanishing(w)
    assert (events[0].data["layers"] if events else []) == expected


def test_a_layer_learns_only_at_the_pace_of_the_fastest_after_it():
    """A gradient that fades over a deep SGD net (lab T1's 30-layer Xavier net): the first
    layer moves 1/10 of the typical layer after it but 1e-4 of the fastest, and vanishes."""
    rates = [1e-4] + [1e-3] * 4 + [1.0]
    w = window([rates] * 10, weight=[1.0] * 6, update=rates)
    events = detect_vanishing(w)
    assert events and events[0].data["layers"][0] == "a"


# ---- update ratio, activations, LR jumps -----------------------------------------------------
def test_update_ratio_far_above_and_far_below():
    w = window([[1.0] * 3] * 5, start=95, weight=[1.0, 1.0, 1.0], update=[1e-3, 0.5, 1e-9])
    events = detect_update_ratio(w)
    assert [(e.layer, e.severity) for e in events] == [("b", "warning"), ("c", "info")]
    for e in events:
        assert_complete(e)


def test_an_update_ratio_that_weight_decay_alone_makes_names_weight_decay(tmp_path):
    """Found by a stranger: SGD at 0.1 with momentum 0.9 and weight_decay=0.1 shrank a
    digits MLP's weights to 0 at chance; its update_ratio warnings said "Lower the learning
    rate" (at 0.01 it still shrinks to chance) and its summary "run gg.doctor". Weight
    decay alone moved the weights by lr x wd / (1 - momentum) = 0.1 of their norm a step:
    the remedy and the summary name it; a decay a tenth of the ratio leaves the LR's."""
    from gradguard.precursors import decay_per_step
    from gradguard.report import load_run
    from gradguard.report._data import RunData
    from gradguard.report._outcome import judge
    from gradguard.report._summary import summary_sentence

    params = list(nn.Linear(2, 2).parameters())
    assert decay_per_step(torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.1)) \
        == pytest.approx(0.1)
    assert decay_per_step(torch.optim.AdamW(params, lr=1e-3, weight_decay=0.5)) == \
        pytest.approx(5e-4)
    # a decay in its usual range is never the one named: at an LR 100x too high, 5e-4 on
    # SGD moves the weights as far (found by a regression hunt), and the LR is at fault
    assert decay_per_step(torch.optim.SGD(params, lr=10.0, momentum=0.9, weight_decay=5e-4)) \
        is None
    assert decay_per_step(torch.optim.AdamW(params, lr=1.0, weight_decay=0.1)) is None
    assert decay_per_step(torch.optim.Adam(params, lr=1e-3, weight_decay=0.1)) is None
    assert decay_per_step(torch.optim.SGD(params, lr=0.1)) is None
    w = window([[1.0] * 3] * 5, start=95, weight=[1.0, 1.0, 1.0], update=[1e-3, 0.25, 1e-3])
    [high] = detect_update_ratio(w, decay=0.1)
    assert high.remedy.startswith("Lower weight_decay") and high.data["decay"] == 0.1
    [high] = detect_update_ratio(w, decay=0.01)
    assert high.remedy.startswith("Lower the learning rate") and "decay" not in high.data

    x, y = torch.randn(1400, 64, generator=torch.Generator().manual_seed(0)), None
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                          nn.Linear(128, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    gen = torch.Generator().manual_seed(1)
    with gg.Guard(model, opt, clip=gg.ZClip(), recovery=gg.Recovery(),
                  sinks=[gg.JsonlSink(tmp_path)]) as guard:
        for _ in range(200):
            i = torch.randint(0, 1400, (64,), generator=gen)
            loss = nn.functional.cross_entropy(model(x[i]), y[i])
            opt.zero_grad()
            loss.backward()
            guard.step(loss.detach())
    assert all(float(m.weight.norm()) < 0.1 for m in model if isinstance(m, nn.Linear))
    warned = [e for e in guard.events if e.kind == "update_ratio" and e.severity == "warning"]
    assert warned and warned[0].remedy.startswith("Lower weight_decay"), warned
    text = summary_sentence(load_run(tmp_path))
    assert "its weight decay alone shrinks the weights by 0.1" in text, text
    run = load_run(tmp_path)  # stalled (its gradients vanished as well): weight decay is why
    run = RunData(run.run_dir, run.step, run.loss, run.grad_norm, run.clip_coef, run.skipped,
                  run.layers, run.layer_step, run.layer_mean, run.layer_max,
                  [*run.events, {"kind": "vanishing_grad", "step": 99, "severity": "warning",
                                 "message": "", "data": {}}])
    out = judge(run)
    assert (out.status, out.cause) == ("stalled", "weight_decay"), out
    assert out.remedy is not None and out.remedy.startswith("Lower weight_decay")


def test_many_layers_out_of_range_at_one_flush_are_one_event():
    """Found by a stranger: a ResNet whose LR ramped up got 29 ``update_ratio`` warnings at
    one step, one per layer; more than three are one event naming the worst layer."""
    n = min(8, len(LAYERS))
    up = [0.2 + 0.1 * i for i in range(n)]
    w = window([[1.0] * n] * 5, start=95, weight=[1.0] * n, update=up)
    [ev] = detect_update_ratio(w)
    assert (ev.severity, ev.layer) == ("warning", w.layers[-1])
    assert ev.value == pytest.approx(up[-1])
    assert ev.data["layers"] == list(w.layers) and ev.data["ratios"] == pytest.approx(up)
    assert ev.message.startswith(f"step 99: {n} layers' update/weight ratio 0.2 to {up[-1]:.2g}")
    assert_complete(ev)
    [low] = detect_update_ratio(window([[1.0] * n] * 5, start=95, weight=[1.0] * n,
                                       update=[1e-9 * (i + 1) for i in range(n)]))
    assert low.layer == w.layers[0] and f"{n} layers barely change" in low.message
    three = detect_update_ratio(window([[1.0] * 3] * 5, start=95, weight=[1.0] * 3,
                                       update=[0.5] * 3))
    assert len(three) == 3 and all(e.data == {} for e in three)  # up to three: one each


def test_a_layer_barely_changing_at_the_tail_of_an_annealed_schedule_is_not_reported():
    """Found as a stranger: at the last flush of a GPT-2 run under the HF Trainer's cosine
    schedule (the LR near zero) every LayerNorm was reported as barely changing, with
    "raise the learning rate" as the remedy. Below 5% of the run's highest LR it is the
    schedule, not the layer; a ratio far above is still reported."""
    from gradguard.detectors import LrTracker

    w = window([[1.0] * 3] * 5, start=95, weight=[1.0, 1.0, 1.0], update=[1e-3, 0.5, 1e-9])
    assert [e.layer for e in detect_update_ratio(w, annealed=True)] == ["b"]
    tr = LrTracker()
    for step, lr in enumerate([1e-3, 5e-4, 6e-5, 4e-5]):
        tr.observe(step, [{"lr": lr, "initial_lr": 1e-3}])
        assert tr.annealed() == (lr < 5e-5)
    assert not LrTracker().annealed()  # no LR seen: nothing to say


def test_high_update_ratio_while_the_loss_falls_is_info():
    """Large steps that train (a clipped tanh RNN at SGD lr 3) are no fault; the same
    ratio on a loss that does not fall is."""
    falling = window([[1.0] * 3] * 8, losses=[4, 3.8, 3.5, 3.4, 3.0, 2.9, 2.7, 2.6],
                     weight=[1.0] * 3, update=[1e-3, 0.5, 1e-3])
    flat = window([[1.0] * 3] * 8, losses=[3, 3.1, 2.9, 3, 3.2, 3, 3.1, 3.3], start=92,
                  weight=[1.0] * 3, update=[1e-3, 0.5, 1e-3])
    assert [(e.layer, e.severity) for e in detect_update_ratio(falling)] == [("b", "info")]
    assert "still falling" in detect_update_ratio(falling)[0].message
    assert [(e.layer, e.severity) for e in detect_update_ratio(flat)] == [("b", "warning")]


def test_a_high_update_ratio_is_not_judged_before_step_49():
    """A guard flushing every ten steps judges at step 19, on 20 losses: too early to say
    the loss is not falling (a healthy clipped tanh RNN warned there on four of five
    seeds); at ``every=50`` the first judgement is at step 49. Before it the high ratio is
    ``info``; from it on, the same window is a ``warning``."""
    flat = [3, 3.1, 2.9, 3, 3.2, 3, 3.1, 3.3, 3.0, 3.2]
    early = window([[1.0] * 3] * 10, losses=flat, start=10, weight=[1.0] * 3,
                   update=[1e-3, 0.5, 1e-3])
    late = window([[1.0] * 3] * 10, losses=flat, start=40, weight=[1.0] * 3,
                  update=[1e-3, 0.5, 1e-3])
    assert [e.severity for e in detect_update_ratio(early)] == ["info"]
    assert "too early" in detect_update_ratio(early)[0].message
    assert [e.severity for e in detect_update_ratio(late)] == ["warning"]


def test_the_loss_trend_behind_a_high_update_ratio_is_read_over_the_history():
    """Ten steps of a noisy loss rise half the time: a window whose second half is a little
    higher, in a run whose loss fell over the last 100 steps, is still a loss that falls;
    a run whose loss rose over them is not."""
    noisy_tail = [2.3, 2.1, 2.4, 2.2, 2.0, 2.4, 2.3, 2.5, 2.2, 2.4]  # rises within the window
    w = window([[1.0] * 3] * 10, losses=noisy_tail, start=90, weight=[1.0] * 3,
               update=[1e-3, 0.5, 1e-3])
    assert [e.severity for e in detect_update_ratio(w)] == ["warning"]  # the window alone
    fell = [3.0 - 0.01 * i for i in range(90)] + noisy_tail
    assert [e.severity for e in detect_update_ratio(w, history=fell)] == ["info"]
    rose = [1.5 + 0.01 * i for i in range(90)] + noisy_tail
    assert [e.severity for e in detect_update_ratio(w, history=rose)] == ["warning"]


@pytest.mark.parametrize(
    ("sample", "kinds"),
    [
        ({"r": {"dead": 0.9}}, ["dead_units"]),
        ({"r": {"dead": 0.1}}, []),
        ({"s": {"saturated": 0.8}}, ["saturating_activation"]),
        ({"s": {"saturated": 0.2}}, []),
    ],
)
def test_activation_detectors_table(sample, kinds):
    events = detect_activations(7, sample)
    assert [e.kind for e in events] == kinds
    for e in events:
        assert e.step == 7 and e.layer in sample
        assert_complete(e)


def test_lr_tracker_reports_jumps_not_warmup():
    tr = LrTracker()
    for step in range(100):  # linear warm-up: never 10x from one step to the next
        tr.observe(step, [{"lr": 1e-3 * (step + 1) / 100}])
    assert tr.pop_events() == []
    tr.observe(100, [{"lr": 0.5}])
    events = tr.pop_events()
    assert [(e.kind, e.step) for e in events] == [("lr_too_high", 100)]
    assert_complete(events[0])


def test_one_schedule_that_jumps_three_param_groups_is_one_warning():
    """Found by a stranger: Adam with three param groups (3e-4, 1e-3, 3e-3), their LRs x100
    for a burst, got three `lr_too_high` warnings at the same step. One warning names the
    groups; a single group's jump reads as before."""
    tr = LrTracker()
    base = [3e-4, 1e-3, 3e-3]
    for step in range(20):
        tr.observe(step, [{"lr": lr} for lr in base])
    tr.observe(20, [{"lr": lr * 100} for lr in base])
    [event] = tr.pop_events()
    assert (event.kind, event.step, event.data["groups"]) == ("lr_too_high", 20, [0, 1, 2])
    assert "param groups 0, 1, 2 jumped up to 100x" in event.message, event.message
    assert_complete(event)
    tr.observe(21, [{"lr": lr} for lr in base])
    tr.observe(22, [{"lr": base[0]}, {"lr": base[1] * 100}, {"lr": base[2]}])
    [event] = tr.pop_events()
    assert event.data["group"] == 1 and "groups" not in event.data
    assert "param group 1 jumped 100x" in event.message


def test_lr_tracker_reports_an_lr_decayed_away_once_not_a_warmup_from_zero():
    """Found by a stranger: a StepLR meant per epoch, stepped per batch (gamma 0.9), took
    the LR to 1e-23 of its start; the run never learnt and its report said nothing of the
    LR. The tracker says when every group's LR fell under 1e-4 of its peak, once; a warm-up
    from LR 0 (under it from the start) is no decay."""
    tr = LrTracker()
    for step in range(20):  # a warm-up from 0
        tr.observe(step, [{"lr": 0.05 * step / 20, "initial_lr": 0.05}])
    for step in range(20, 300):
        tr.observe(step, [{"lr": 0.05 * 0.9 ** (step - 20), "initial_lr": 0.05}])
    events = tr.pop_events()
    assert [(e.kind, e.step, e.severity) for e in events] == [("lr_decayed", 108, "info")]
    assert events[0].value < 1e-4 and "scheduler stepped every batch" in events[0].remedy
    assert_complete(events[0])
    sd = tr.state_dict()
    again = LrTracker()
    again.load_state_dict(sd)
    again.observe(300, [{"lr": 1e-12, "initial_lr": 0.05}])
    assert again.pop_events() == []  # said once


def test_lr_tracker_keeps_a_slip_of_the_lr_out_of_the_schedules_peak():
    """An LR x100 for three steps (a burst) is no peak of the schedule: an update after it
    was weighed as 1/100 of one at the peak, and a rollback then capped the LR at 1% for
    the rest of the run. A jump that stays is the run's LR from then on (fraction 1)."""
    tr = LrTracker()
    lrs = [0.05 * (1 - s / 300) for s in range(140)]
    for s in range(130, 133):
        lrs[s] *= 100
    for step, lr in enumerate(lrs):
        tr.observe(step, [{"lr": lr}])
        if step == 131:
            assert tr.fraction() == 1.0 and tr.peaks(1) == [0.05]
    assert [e.step for e in tr.pop_events()] == [130]
    assert tr.peaks(1) == [0.05] and tr.fraction() == pytest.approx(lrs[-1] / 0.05)
    again = LrTracker()
    again.load_state_dict(tr.state_dict())
    assert again.peaks(1) == [0.05]
    for step in range(140, 150):  # a jump that stays
        again.observe(step, [{"lr": 3.0}])
    assert again.fraction() == 1.0 and again.peaks(1) == [0.05]
    again.observe(150, [{"lr": 0.01}])  # back under the peak it slipped from
    again.observe(151, [{"lr": 0.06}])
    assert again.peaks(1) == [0.06]
    kept = LrTracker()  # a constant warm-up, then the LR it trains at: that is a peak
    for step in range(400):
        kept.observe(step, [{"lr": 0.01 if step < 100 else 0.1}])
    assert [e.step for e in kept.pop_events()] == [100] and kept.peaks(1) == [0.1]
    kept.observe(400, [{"lr": 0.01}])
    assert kept.fraction() == pytest.approx(0.1)


def test_detect_runs_everything_in_step_order():
    rows = [[1.0, 1.0, 1.0]] * 30
    rows[25] = [NAN] * 3
    losses = noisy(30)
    losses[22] = losses[23] = 50.0
    events = detect(window(rows, losses, skipped=[i == 25 for i in range(30)]))
    assert [(e.kind, e.step) for e in events] == [
        ("loss_spike", 22), ("nonfinite_grad", 25), ("skip", 25)]


def test_detector_config_validates():
    with pytest.raises(ValueError, match="spike_z"):
        DetectorConfig(spike_z=-1.0)
    with pytest.raises(ValueError, match="spike_warmup"):
        DetectorConfig(spike_warmup=0)


# ---- guard integration ---------------------------------------------------------------------
class Log(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x)


def log_net() -> nn.Sequential:
    torch.manual_seed(0)
    # layer 3 takes the log of a ReLU output: log(0) = -inf when a unit is off
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), Log(), nn.Linear(8, 1))


@pytest.mark.parametrize("fused", [False, True])
def test_watch_activations_names_the_first_module_whose_output_broke(fused):
    model = log_net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused)
    with torch.no_grad():
        model[2].weight.mul_(0.01)
        model[2].bias.fill_(1.0)  # pre-log values near 1: healthy
    guard = gg.Guard(model, opt, every=5, watch_activations=True)
    for step in range(8):
        with torch.no_grad():
            model[2].bias.fill_(-100.0 if step == 6 else 1.0)  # step 6: log of negatives
        loss = model(torch.rand(4, 4)).mean()
        loss.backward()
        guard.step(loss)
        opt.zero_grad()
    guard.close()
    nf = [e for e in guard.events if e.kind == "nonfinite_grad"]
    assert [(e.step, e.layer, e.data["forward_origin"]) for e in nf] == [(6, "3", "3")]
    assert "3" in nf[0].message


def test_watch_activations_names_a_nan_input():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = gg.Guard(model, opt, every=4, watch_activations=True)
    for step, (x, y) in enumerate(batches(4)):
        if step == 2:
            x = x.clone()
            x[0, 0] = math.nan
        nn.functional.mse_loss(model(x), y).backward()
        guard.step()
        opt.zero_grad()
    guard.close()
    nf = [e for e in guard.events if e.kind == "nonfinite_grad"]
    assert [(e.step, e.layer, e.data["cause"]) for e in nf] == [(2, "(input)", "nonfinite_input")]


@pytest.mark.parametrize(("opt_name", "extra"), [("adam_fused", 0), ("adam", 1)])
def test_watch_activations_adds_no_host_sync_per_step(sync_counter, opt_name, extra):
    fused = opt_name == "adam_fused"
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused)
    bare = 0
    for x, y in batches(3):  # what the optimizer itself syncs
        nn.functional.mse_loss(model(x), y).backward()
        with sync_counter as c:
            opt.step()
        opt.zero_grad()
        bare = max(bare, len(c.calls))
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused)
    guard = gg.Guard(model, opt, every=5, watch_activations=True, sample_activations=True,
                     recovery=gg.Recovery())
    for i, (x, y) in enumerate(batches(14)):
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        fresh = fused and not opt.state  # a step that creates fused state: on the host
        with sync_counter as c:
            guard.step(loss)
        opt.zero_grad()
        # step 0 also keeps the initial snapshot (Recovery): a one-off host read, like a flush
        if (i + 1) % 5 != 0 and i > 0:
            assert len(c.calls) <= bare + extra + fresh, (i, c.calls)


def test_sample_activations_reports_dead_relus_and_saturated_sigmoids():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.Sigmoid(),
                          nn.Linear(16, 1))
    with torch.no_grad():
        model[0].bias.fill_(-100.0)  # every ReLU unit is off
        model[2].weight.mul_(100.0)
        model[2].bias.fill_(50.0)  # sigmoid pinned at 1
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    guard = gg.Guard(model, opt, every=4, sample_activations=True)
    for _ in range(8):
        model(torch.randn(32, 4)).pow(2).mean().backward()
        guard.step()
        opt.zero_grad()
    guard.close()
    got = {(e.kind, e.layer, e.step) for e in guard.events if e.kind in
           ("dead_units", "saturating_activation")}
    assert got == {("dead_units", "1", 3), ("saturating_activation", "3", 3),
                   ("dead_units", "1", 7), ("saturating_activation", "3", 7)}
    dead = next(e for e in guard.events if e.kind == "dead_units")
    assert dead.value == pytest.approx(1.0)


def test_default_guard_gives_no_warnings_on_a_healthy_run():
    model = mlp(width=32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        guard = gg.Guard(model, opt, clip=gg.ZClip(), recovery=gg.Recovery(), every=25,
                         watch_activations=True, sample_activations=True)
        for x, y in batches(300, seed=5):
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            guard.step(loss)
            opt.zero_grad()
        guard.close()
    assert [e for e in guard.events if e.severity != "info"] == []


def test_steps_whose_graph_did_not_reach_a_layer_neither_silence_nor_revive_it():
    """``disconnected_layer`` counts a layer's silent steps among the steps whose graph
    reached it (``Window.grad_absent``): a task head used on one step in four is not
    silent on the other three; one whose own steps give it zeros is."""
    from gradguard.detectors import detect_no_gradient
    from gradguard.detectors.config import DIED_STEPS

    def turns(rows, start, zero):  # `a` used on one step in four, zero there if `zero`
        w = window([[0.0 if zero or k % 4 else 1.0, 0.5] for k in range(rows)], start=start)
        w.grad_absent = [None if k % 4 == 0 else frozenset({0}) for k in range(rows)]
        return w

    state = DetectorState()
    assert detect_no_gradient(turns(60, 0, zero=False), state) == []
    for start in range(60, 60 + 8 * DIED_STEPS, 60):
        assert detect_no_gradient(turns(60, start, zero=False), state) == []
    died: list = []
    start = 60 + 8 * DIED_STEPS
    while not died and start < 60 + 16 * DIED_STEPS:
        died = detect_no_gradient(turns(60, start, zero=True), state)
        start += 60
    assert [(e.layer, e.severity) for e in died] == [("a", "warning")]
    assert died[0].data["steps"] >= DIED_STEPS  # its own steps only, not every fourth's
    assert start - (60 + 8 * DIED_STEPS) >= 4 * DIED_STEPS - 60


def test_guard_state_dict_carries_detector_history():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = gg.Guard(model, opt, every=5)
    for x, y in batches(10):
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        guard.step(loss)
        opt.zero_grad()
    sd = guard.state_dict()
    other = gg.Guard(model, opt, every=5)
    other.load_state_dict(sd)
    assert list(other.detector_state.loss) == list(guard.detector_state.loss)
    assert len(other.detector_state.loss) == 10


def test_a_layer_dies_after_fifty_silent_steps_across_windows_and_a_resume():
    """A layer that had a gradient and then none: reported once it has had none for
    ``DIED_STEPS`` taken steps in a row, counted across flush windows and across a
    checkpoint of the detector state; a layer that never had one is the usual info."""
    from gradguard.detectors import detect_no_gradient
    from gradguard.detectors.config import DIED_STEPS

    state = DetectorState()
    alive = [[1.0, 0.5, 0.0]] * 5 + [[0.0, 0.5, 0.0]] * 25  # `a` dies at step 5
    first = detect_no_gradient(window(alive), state)
    assert [(e.layer, e.severity) for e in first] == [("c", "info")]  # never had one
    resumed = DetectorState()
    resumed.load_state_dict(state.state_dict())
    assert resumed.silent_run == {"a": 25, "b": 0}
    assert detect_no_gradient(window([[0.0, 0.5, 0.0]] * 20, start=30), resumed) == []
    got = detect_no_gradient(window([[0.0, 0.5, 0.0]] * 10, start=50), resumed)
    assert [(e.layer, e.severity, e.data["steps"]) for e in got] == [("a", "warning", DIED_STEPS + 5)]
    assert detect_no_gradient(window([[0.0, 0.5, 0.0]] * 30, start=60), resumed) == []  # once
    # a gradient that only ever underflowed (1e-20 of the largest) had nothing to lose
    state = DetectorState()
    first = detect_no_gradient(window([[1e-20, 0.5, 0.0]] * 5 + [[0.0, 0.5, 0.0]] * 25), state)
    assert [(e.layer, e.severity) for e in first] == [("c", "info")]
    assert "a" not in state.grad_layers
    later = detect_no_gradient(window([[0.0, 0.5, 0.0]] * 30, start=30), state)
    assert [(e.layer, e.severity) for e in later] == [("a", "info")]  # none on any step: so
    assert detect_no_gradient(window([[0.0, 0.5, 0.0]] * 30, start=60), state) == []
