"""gg.doctor: leaves its arguments untouched, rejects bad input clearly, reports in JSON."""

from __future__ import annotations

import json
import traceback

import pytest
import torch
from tests.zoo.broken import dead_bias_mlp, lr_sgd_mlp, rnn_tanh_vanish
from tests.zoo.healthy import bn_cnn
from torch import nn

import gradguard as gg
from gradguard.doctor import Diagnosis, Finding


def _snapshot(model, opt):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        [m.training for m in model.modules()],
        {k: {n: (t.clone() if isinstance(t, torch.Tensor) else t) for n, t in s.items()} for k, s in opt.state_dict()["state"].items()},
        [dict(g) for g in opt.state_dict()["param_groups"]],
        torch.get_rng_state().clone(),
    )


def _assert_same(a, b):
    sd_a, g_a, tr_a, st_a, pg_a, rng_a = a
    sd_b, g_b, tr_b, st_b, pg_b, rng_b = b
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k
    for x, y in zip(g_a, g_b):
        assert (x is None and y is None) or torch.equal(x, y)
    assert tr_a == tr_b
    assert st_a.keys() == st_b.keys()
    for k in st_a:
        for n in st_a[k]:
            x, y = st_a[k][n], st_b[k][n]
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
    assert pg_a == pg_b
    assert torch.equal(rng_a, rng_b)


@pytest.mark.parametrize("build", [bn_cnn, lr_sgd_mlp], ids=["batchnorm_momentum", "diverging_lr"])
def test_doctor_never_changes_its_arguments(build):
    model, batch, loss_fn, _ = build()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2 if build is bn_cnn else 10.0)
    # a non-empty optimizer state and existing .grad must survive too
    loss_fn(model(batch[0]), batch[1]).backward()
    opt.step()
    loss_fn(model(batch[0]), batch[1]).backward()
    model.train()
    model.eval() if build is lr_sgd_mlp else None
    before = _snapshot(model, opt)
    x_before = batch[0].clone()
    gg.doctor(model, batch, loss_fn, opt)
    _assert_same(before, _snapshot(model, opt))
    assert torch.equal(batch[0], x_before)


def test_findings_sorted_root_cause_first_and_healthy_flag():
    d = Diagnosis(
        [
            Finding("disconnected_layer", "warning", "a", {}, "r", 0.9),
            Finding("lr_too_high", "error", None, {}, "r", 0.9),
            Finding("dead_units", "info", "b", {}, "r", 0.3),
            Finding("init_too_large", "warning", "c", {}, "r", 0.8),
        ]
    )
    assert [f.cause for f in d.findings] == ["init_too_large", "lr_too_high", "disconnected_layer", "dead_units"]
    assert d.top is not None and d.top.cause == "init_too_large"
    assert not d.healthy
    assert Diagnosis([Finding("dead_units", "info", None, {}, "r", 0.2)]).healthy
    assert Diagnosis([]).top is None


def test_finding_rejects_unknown_cause_and_severity():
    with pytest.raises(ValueError, match="cause='exploding'"):
        Finding("exploding", "error", None)
    with pytest.raises(ValueError, match="severity='fatal'"):
        Finding("dead_units", "fatal", None)  # type: ignore[arg-type]


def test_diagnosis_json_roundtrip_and_atomic_save(tmp_path):
    diag = gg.doctor(*lr_sgd_mlp())
    assert diag.top is not None and diag.top.cause == "lr_too_high"
    d = diag.to_dict()
    text = json.dumps(d, allow_nan=False)  # strict JSON, no NaN literals
    assert json.loads(text)["findings"][0]["cause"] == "lr_too_high"
    path = diag.save(tmp_path / "run" / "diagnosis.json")
    assert [p.name for p in path.parent.iterdir()] == ["diagnosis.json"]  # no temp file left
    back = Diagnosis.load(path)
    assert [f.cause for f in back.findings] == [f.cause for f in diag.findings]
    assert back.findings[0].evidence["losses_at_lr"] == d["findings"][0]["evidence"]["losses_at_lr"]
    (tmp_path / "bad.json").write_text('{"type": "other"}')
    with pytest.raises(ValueError, match="not a gradguard diagnosis"):
        Diagnosis.load(tmp_path / "bad.json")


def test_nonfinite_evidence_is_written_as_strings():
    f = Finding("nonfinite_loss", "error", "loss_fn", {"loss": float("nan"), "x": [float("inf"), 1.0]}, "r")
    assert f.to_dict()["evidence"] == {"loss": "nan", "x": ["inf", 1.0]}


def test_str_reads_cause_where_evidence_remedy():
    text = str(gg.doctor(*dead_bias_mlp()))
    assert "dead_units" in text and "evidence:" in text and "remedy:" in text and "dead_fraction=1" in text


def test_recurrent_finding_measures_time_steps():
    diag = gg.doctor(*rnn_tanh_vanish())
    f = diag.top
    assert f is not None and f.cause == "recurrent_vanishing" and f.where == "rnn"
    assert f.evidence["steps"] == 60
    assert f.evidence["ratio_first_to_last"] < 1e-4
    assert 0 < f.evidence["spectral_radius"] < 1


def _mlp():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))


def test_batch_that_does_not_fit_names_the_batch():
    with pytest.raises(ValueError, match=r"doctor batch: inputs \(16, 7\) float32 do not fit"):
        gg.doctor(_mlp(), (torch.randn(16, 7), torch.randn(16, 1)), nn.MSELoss())
    with pytest.raises(ValueError, match="doctor batch: expected an \\(inputs, targets\\) pair"):
        gg.doctor(_mlp(), torch.randn(16, 4), nn.MSELoss())


def test_non_scalar_loss_is_rejected():
    with pytest.raises(ValueError, match=r"doctor loss_fn: returned a tensor of shape \(16, 1\)"):
        gg.doctor(_mlp(), (torch.randn(16, 4), torch.randn(16, 1)), nn.MSELoss(reduction="none"))


def test_model_without_parameters_is_rejected():
    with pytest.raises(ValueError, match="doctor model: ReLU has no parameters"):
        gg.doctor(nn.ReLU(), (torch.randn(4, 4), None), lambda out: out.sum())
    with pytest.raises(TypeError, match=r"doctor model: expected a torch\.nn\.Module"):
        gg.doctor(lambda x: x, (torch.randn(4, 4), None), lambda out: out.sum())  # type: ignore[arg-type]


class _Boom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        raise KeyError("user bug in forward")


def test_exception_in_user_forward_is_reraised_with_its_traceback():
    with pytest.raises(KeyError, match="user bug in forward") as info:
        gg.doctor(_Boom(), (torch.randn(2, 4), None), lambda out: out.sum())
    frames = [f.name for f in traceback.extract_tb(info.value.__traceback__)]
    assert frames[-1] == "forward"


def test_dict_and_tuple_inputs_and_no_targets():
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 1), nn.Linear(3, 1)

        def forward(self, x, z):
            return self.a(x) + self.b(z)

    m = Two()
    x, z = torch.randn(8, 4), torch.randn(8, 3)
    assert gg.doctor(m, ((x, z), None), lambda out: out.pow(2).mean()).healthy
    assert gg.doctor(m, ({"x": x, "z": z}, None), lambda out: out.pow(2).mean()).healthy


class _LogLayer(nn.Module):
    def forward(self, x):
        return torch.log(x)  # NaN for x < 0


def test_nonfinite_is_localised_to_the_module_where_it_first_appears():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), _LogLayer(), nn.Linear(16, 1))
    diag = gg.doctor(model, (torch.randn(32, 8), torch.randn(32, 1)), nn.MSELoss())
    assert diag.top is not None and diag.top.cause == "nonfinite_loss"
    assert diag.top.where == "3" and "`3`" in diag.top.remedy
    assert len(diag.findings) == 1  # no depth diagnosis on top of NaNs


def test_float16_overflow_names_the_layer_and_its_input_scale():
    from tests.zoo.broken import fp16_activations

    diag = gg.doctor(*fp16_activations())
    f = diag.top
    assert f is not None and f.cause == "half_precision_overflow" and f.severity == "error"
    assert f.where == "2"  # the second Linear overflows, fed by finite inputs
    assert f.evidence["largest_finite_input"] < 65504 < f.evidence["fp16_max"] + 1


def test_root_cause_outranks_the_lr_divergence_it_provokes():
    from tests.zoo.broken import unscaled_tabular

    diag = gg.doctor(*unscaled_tabular())
    causes = [f.cause for f in diag.findings]
    assert causes[0] == "unscaled_input" and "lr_too_high" in causes
    assert diag.top.evidence["max_feature_rms"] > 1000


def test_raw_scale_is_fine_when_the_model_normalises_it_first():
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))

        def forward(self, x):
            return self.net(x / 255.0)

    torch.manual_seed(0)
    x = torch.rand(32, 16) * 255.0
    y = torch.randn(32, 1)
    assert gg.doctor(Scaled(), (x, y), nn.MSELoss()).healthy
    raw = gg.doctor(Scaled().net, (x, y), nn.MSELoss())
    assert raw.top is not None and raw.top.cause == "unscaled_input" and raw.top.where == "inputs"


def test_a_curvature_within_its_limit_gives_no_lr_bound_above_the_lr_the_steps_found_too_high():
    """Found as a stranger: a digits MLP on SGD momentum at lr 3, whose loss blows up within
    the step probe's steps while its curvature at the start is 0.31x its limit: the
    ``lr_too_high`` error carried the curvature's ``recommended_lr`` 4.78 and
    ``max_stable_lr`` 9.56, above the LR it called too high. The curvature grows as SGD
    trains; its bounds at the start are no advice. The recommendation is the step
    probe's."""
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x[:256], dtype=torch.float32) / 16, torch.tensor(y[:256])
    net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                        nn.Linear(128, 10))
    opt = torch.optim.SGD(net.parameters(), lr=3.0, momentum=0.9)
    top = gg.doctor(net, (x, y), nn.CrossEntropyLoss(), opt).top
    assert top is not None and top.cause == "lr_too_high" and top.severity == "error"
    ev = top.evidence
    assert ev["over_limit"] < 1  # the curvature rule did not trip
    assert "max_stable_lr" not in ev
    assert ev["recommended_lr"] == ev["stable_lr"] < 3.0


def test_curvature_rule_catches_slow_divergence_the_step_probe_misses():
    from tests.zoo.broken import lr_slow_deep_mlp

    from gradguard.doctor.lr import SGD_MORE, SHARPNESS_MARGIN, _step_probe

    model, (x, y), loss_fn, opt = lr_slow_deep_mlp()
    found = _step_probe(model, opt, lambda m: loss_fn(m(x), y), 4)
    # the loss falls over the first 4 steps (which is all the step probe looked at before
    # SGD_MORE: the curvature rule alone found it, a warning); the steps SGD gets more see it
    # blow up once the curvature has grown
    losses = found[0].evidence["losses_at_lr"]
    assert losses[4] < losses[0] and 4 < len(losses) - 1 <= 4 + SGD_MORE
    before = _snapshot(model, opt)
    diag = gg.doctor(model, (x, y), loss_fn, opt)
    _assert_same(before, _snapshot(model, opt))
    top = diag.top
    assert top is not None and top.cause == "lr_too_high" and top.severity == "error"
    ev = top.evidence  # the curvature rule's evidence, merged into the step probe's finding
    assert ev["stability_limit"] == pytest.approx(2 * 1.9)  # heavy ball, β = 0.9
    assert ev["lr_times_sharpness"] > SHARPNESS_MARGIN * ev["stability_limit"]
    assert ev["recommended_lr"] < 0.3 and f"{ev['recommended_lr']:.3g}" in top.remedy


@pytest.mark.parametrize("lr, severity", [(0.05, None), (0.25, None), (0.5, "warning"),
                                          (1.0, "error")])
def test_sgd_nesterov_whose_loss_falls_first_then_blows_up_is_found(lr, severity):
    """Found as a stranger: a digits GELU MLP on SGD Nesterov (momentum 0.9; its right LR
    0.05). At 20x (1.0) and 10x (0.5) it diverges from scratch (held-out 15-23x its twin);
    at 5x it trains (0.62-1.03x). Its curvature at init is 0.3x the stable limit at 20x and
    grows as it trains; on one batch its loss falls for 6 steps and blows up at step 9: with
    4 probe steps the doctor called it healthy."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = torch.tensor(d.data[:64], dtype=torch.float32) / 16, torch.tensor(d.target[:64])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(),
                          nn.Linear(256, 10))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True)
    diag = gg.doctor(model, (x, y), nn.CrossEntropyLoss(), opt)
    found = [f for f in diag.findings if f.cause == "lr_too_high" and f.severity != "info"]
    assert [f.severity for f in found] == ([] if severity is None else [severity])
    if found:
        assert found[0].evidence["stable_lr"] is not None and found[0].evidence["stable_lr"] < lr


def test_under_a_warm_up_the_lr_probed_is_the_peak_the_schedule_plans():
    """Found as a stranger: the same MLP at 20x behind a 100-step LambdaLR warm-up, built
    before the doctor is called (as a training script does), was "healthy": the probes ran
    at the warm-up's first LR, 0.01. It fails at its peak of 1.0 with or without the
    warm-up; the probes now run there, and leave the LRs and the schedule as they were.
    With optimizer state (training under way) the LR the optimizer has is probed."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = torch.tensor(d.data[:64], dtype=torch.float32) / 16, torch.tensor(d.target[:64])

    def setup(peak, warm=100):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(),
                              nn.Linear(256, 10))
        opt = torch.optim.SGD(model.parameters(), lr=peak, momentum=0.9, nesterov=True)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
        return model, opt, sched

    model, opt, sched = setup(1.0)
    before = _snapshot(model, opt)
    diag = gg.doctor(model, (x, y), nn.CrossEntropyLoss(), opt)
    _assert_same(before, _snapshot(model, opt))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)
    top = diag.top
    assert top is not None and top.cause == "lr_too_high" and top.severity == "error"
    assert top.evidence["lr"] == 1.0 and top.evidence["lr_now"] == pytest.approx(0.01)
    assert top.evidence["at_schedule_peak"] and top.evidence["stable_lr"] < 1.0
    assert top.remedy.startswith("Measured at the peak your schedule plans (lr=1; its first "
                                 "steps run at 0.01)")
    assert "add warm-up" not in top.remedy
    sched.step()  # the schedule goes on from where it was
    assert opt.param_groups[0]["lr"] == pytest.approx(0.02)
    # a peak that trains is healthy behind its warm-up too
    model, opt, _ = setup(0.05)
    diag = gg.doctor(model, (x, y), nn.CrossEntropyLoss(), opt)
    assert not [f for f in diag.findings if f.cause == "lr_too_high" and f.severity != "info"]
    # under way: one step taken, the optimizer has state; its LR now is what is probed
    model, opt, sched = setup(1.0, warm=1000)
    nn.CrossEntropyLoss()(model(x), y).backward()
    opt.step()
    opt.zero_grad()
    sched.step()
    diag = gg.doctor(model, (x, y), nn.CrossEntropyLoss(), opt)
    assert not [f for f in diag.findings if f.cause == "lr_too_high" and f.severity != "info"]


def test_curvature_rule_is_for_sgd_only():
    from tests.zoo.broken import lr_slow_deep_mlp

    model, batch, loss_fn, _ = lr_slow_deep_mlp()
    diag = gg.doctor(model, batch, loss_fn, torch.optim.Adam(model.parameters(), lr=1e-3))
    assert not any("sharpness" in f.evidence for f in diag.findings)


class _OwnStepSize(torch.optim.Optimizer):
    """No numeric LR in its param groups (``lr=None``): it computes its own step size, as
    Adafactor does with ``relative_step=True``."""

    def __init__(self, params):
        super().__init__(params, {"lr": None})

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    p.sub_(0.01 * p.grad)


def test_an_optimizer_with_no_numeric_lr_skips_the_lr_probe_and_says_so():
    """The LR probe scales ``group["lr"]``: with lr=None it crashed (``float(None)``). Now
    the rest of the diagnosis runs, the probe is left out of ``probes`` and a warning
    names the param group and why."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    x = torch.randn(64, 8)
    with pytest.warns(RuntimeWarning, match=r"LR probe is not run: param group 0 .* lr=None"):
        diag = gg.doctor(model, (x, x[:, :1]), nn.functional.mse_loss,
                         optimizer=_OwnStepSize(model.parameters()))
    assert "lr" not in diag.probes and "numerics" in diag.probes
    plain = gg.doctor(model, (x, x[:, :1]), nn.functional.mse_loss,
                      optimizer=torch.optim.SGD(model.parameters(), lr=0.01))
    assert "lr" in plain.probes


def test_an_optimizer_over_another_models_parameters_is_refused_by_the_doctor():
    """Found by a stranger: at SGD lr=10 the doctor said ``lr_too_high`` with the model's own
    optimizer, and nothing at all (exit 0 from the CLI) with the same optimizer over an
    identical second model: its LR probe stepped the other model."""
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    other = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    x = torch.randn(64, 8)
    with pytest.raises(ValueError, match=r"doctor optimizer: it holds none of the model's "
                       "parameters"):
        gg.doctor(model, (x, x[:, :1]), nn.functional.mse_loss,
                  optimizer=torch.optim.SGD(other.parameters(), lr=10.0))


def _char_gpt2_after(lr: float, steps: int = 40):
    """A 2-layer GPT-2 (width 32, from its config) trained ``steps`` AdamW steps at ``lr`` on
    the characters of ``textwrap``'s source; the model, a batch, the loss and the optimizer."""
    transformers = pytest.importorskip("transformers")
    import inspect
    import textwrap

    text = inspect.getsource(textwrap)
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text])
    torch.manual_seed(0)
    transformers.logging.set_verbosity_error()

    class CharLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = transformers.GPT2LMHeadModel(transformers.GPT2Config(
                n_layer=2, n_embd=32, n_head=2, vocab_size=len(chars), n_positions=32,
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))

        def forward(self, x):
            return self.m(input_ids=x).logits

    def loss_fn(out, y):
        return nn.functional.cross_entropy(out[:, :-1].reshape(-1, out.size(-1)), y[:, 1:].reshape(-1))

    model = CharLM()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)

    def batch():
        starts = torch.randint(0, len(ids) - 33, (16,), generator=gen)
        return torch.stack([ids[i:i + 32] for i in starts])

    for _ in range(steps):
        x = batch()
        loss = loss_fn(model(x), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x = batch()
    return model, (x, x), loss_fn, opt


def test_weights_grown_in_training_are_not_blamed_on_the_init():
    """Found as a stranger (2026-12-03): a GPT-2 on AdamW at 100x its LR, doctored mid-run
    with its optimizer, has weights 14x the Xavier std; the doctor said ``init_too_large``
    and "re-init with Xavier", which throws the run away. The finding stays (the weights are
    too large for the depth), the remedy now blames the LR; the same model at the LR that
    trains is healthy, and with no optimizer state the advice is the init's as before."""
    model, batch, loss_fn, opt = _char_gpt2_after(0.3)
    diag = gg.doctor(model, batch, loss_fn, optimizer=opt)
    top = diag.top
    assert top.cause == "init_too_large" and top.evidence["factor"] > 5, str(diag)
    assert top.evidence["optimizer_steps"] == 40 and top.evidence["lr"] == pytest.approx(0.3)
    assert "gg.init.apply_" not in top.remedy and "Lower the learning rate" in top.remedy, top.remedy
    assert "after 40 steps of AdamW at lr 0.3" in top.remedy
    assert "attention" in top.remedy  # the evidence the depth finding carried is kept
    assert not any("gg.init.apply_" in f.remedy for f in diag.findings if f.cause == "init_too_large")
    # without the optimizer the doctor cannot tell: the init's advice, as before
    blind = gg.doctor(model, batch, loss_fn)
    assert blind.top.cause == "init_too_large" and "gg.init.apply_" in blind.top.remedy
    assert "optimizer_steps" not in blind.top.evidence

    healthy = _char_gpt2_after(3e-3)
    assert gg.doctor(healthy[0], healthy[1], healthy[2], optimizer=healthy[3]).healthy


# SGD at 1e-12: its gradients of 1e7 make a larger step's loss infinite
@pytest.mark.parametrize("make_opt", [torch.optim.Adam, lambda p: torch.optim.SGD(p, lr=1e-12, momentum=0.9)])
def test_weights_initialised_too_large_keep_the_inits_advice_after_a_step(make_opt):
    """The zoo's MLP initialised at std 0.5 (2.8x Xavier's), one optimizer step taken: one
    Adam step at 1e-3 cannot have moved a weight by more than about 1e-3, so the init is
    still to blame; SGD's step has no such bound, so the init's advice stands with the
    other reading added."""
    from tests.zoo.broken import init_large_mlp

    model, (x, y), loss_fn, _ = init_large_mlp()
    opt = make_opt(model.parameters())
    fresh = gg.doctor(model, (x, y), loss_fn, optimizer=opt)
    assert fresh.top.cause == "init_too_large" and "gg.init.apply_" in fresh.top.remedy
    assert "optimizer_steps" not in fresh.top.evidence
    loss_fn(model(x), y).backward()
    opt.step()
    opt.zero_grad()
    stepped = gg.doctor(model, (x, y), loss_fn, optimizer=opt)
    f = next(f for f in stepped.findings if f.cause == "init_too_large")
    assert "gg.init.apply_" in f.remedy and "as a learning rate too high does" not in f.remedy, f.remedy
    adam = isinstance(opt, torch.optim.Adam)
    assert f.evidence["optimizer_steps"] == (1 if adam else None)
    assert ("If training moved them (SGD has stepped these weights)" in f.remedy) is not adam


@pytest.mark.parametrize("name,cause,said", [
    ("hf_vit", "init_too_large", "has weights of std"),  # a patch projection 13x its scale
    ("hf_mistral", "init_too_large", "has collapsed to about one key per query"),
    ("torch_encoder_post_ln", "init_too_small", "has gains of rms"),  # LayerNorm gains at 0.64
])
def test_real_models_trained_at_100x_their_lr_are_told_to_lower_it_not_to_reinit(name, cause, said):
    """The real zoo's healthy models, 30 AdamW steps on their batch at 100x their LR, then
    doctored mid-run with that optimizer: the weights training moved off their scale
    (grown, an attention collapsed, LayerNorm gains shrunk) are the LR's doing, not the
    init's. At their own LR the same 30 steps leave them healthy."""
    pytest.importorskip("transformers")
    from tests.zoo.real.healthy import REAL_HEALTHY

    from gradguard._tensors import call_model

    case = next(c for c in REAL_HEALTHY if c.name == name)
    for mult in (1.0, 100.0):
        model, batch, loss_fn, opt = case.build()
        for g in opt.param_groups:
            g["lr"] *= mult
        for _ in range(30):
            loss = loss_fn(call_model(model, batch[0]), batch[1])
            opt.zero_grad()
            loss.backward()
            opt.step()
        diag = gg.doctor(model, batch, loss_fn, optimizer=opt)
        if mult == 1.0:
            assert diag.healthy, str(diag)
            continue
        f = next((f for f in diag.findings if f.cause == cause), None)
        assert f is not None, str(diag)
        assert said in f.remedy and "as a learning rate too high does" in f.remedy, f.remedy
        assert "gg.init" not in f.remedy and "nn.init.ones_" not in f.remedy, f.remedy
        assert f.evidence["optimizer_steps"] == 30


def test_constant_groups_at_a_norm_layer_mid_run_get_the_dead_channels_reading():
    """The zoo's MobileNetV3 trained 30 RMSprop steps on its batch at 100x its LR: BatchNorms deep
    in it get constant channels, an ``unscaled_input`` finding says "standardise the inputs"
    (they are standard); the optimizer has stepped the layers feeding them, so the remedy
    adds the reading of channels that died in training. Fresh, no such finding."""
    from tests.zoo.real.healthy import REAL_HEALTHY

    from gradguard._tensors import call_model

    case = next(c for c in REAL_HEALTHY if c.name == "mobilenet_v3_small")
    model, batch, loss_fn, opt = case.build()
    assert not any(f.cause == "unscaled_input" for f in gg.doctor(model, batch, loss_fn).findings)
    for g in opt.param_groups:
        g["lr"] *= 100
    for _ in range(30):
        loss = loss_fn(call_model(model, batch[0]), batch[1])
        opt.zero_grad()
        loss.backward()
        opt.step()
    norms = [f for f in gg.doctor(model, batch, loss_fn, optimizer=opt).findings
             if f.cause == "unscaled_input" and "fed_by" in f.evidence]
    assert norms, "no constant-group finding at a normalisation layer"
    assert all("channels whose units died" in f.remedy for f in norms), [f.remedy for f in norms]


def test_a_layer_whose_weights_are_nan_is_named_for_them_not_for_a_missing_clamp():
    """Mid-run, an update can leave NaN in the weights (the zoo's VGG-11 and ResNet at 100x
    their LR): the first layer then "turns finite inputs into NaN/Inf", and the doctor told
    the user to clamp its log/div/sqrt/exp, for a conv. Now it names the weights and the
    update; a layer that makes NaN of finite weights still gets the clamp advice."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    with torch.no_grad():
        model[2].weight[0, :3] = float("nan")
    diag = gg.doctor(model, (x, y), nn.MSELoss())
    assert diag.top.cause == "nonfinite_loss" and diag.top.where == "2"
    assert diag.top.evidence["weights_nonfinite"] == [3, 17]  # 16 weights and a bias
    assert "NaN/Inf weights (3 of 17 values)" in diag.top.remedy and "clamp" not in diag.top.remedy
    log = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), _LogLayer(), nn.Linear(16, 1))
    assert "clamp" in gg.doctor(log, (x, y), nn.MSELoss()).top.remedy


def test_lazy_layers_not_yet_run_are_refused_by_the_doctor_and_the_init_audit():
    """Found as a stranger: ``gg.doctor`` over a model of ``nn.LazyLinear`` layers before any
    forward failed with torch's "Attempted to use an uninitialized parameter", and
    ``gg.init.audit`` printed an empty table (``gg.init.apply_`` and ``gg.gradcheck`` raised
    torch's error too); all now name the parameters and say to run
    one forward first (the doctor never mutates its arguments, so it does not run that
    forward itself), and after that forward the model is diagnosed as any other."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.LazyLinear(64), nn.ReLU(), nn.LazyLinear(4))
    x = torch.randn(32, 16)
    y = (x[:, :4] > 0).long().argmax(1)
    for call in (lambda: gg.doctor(model, (x, y), nn.CrossEntropyLoss()),
                 lambda: gg.init.audit(model, (x, y)),
                 lambda: gg.init.apply_(model, "he"), lambda: gg.gradcheck(model, x)):
        with pytest.raises(ValueError, match=r"4 of its parameters are not initialized yet "
                                             r"\(`0.weight`, `0.bias`, `2.weight` \.\.\..*forward"):
            call()
    model(x)
    assert gg.doctor(model, (x, y), nn.CrossEntropyLoss()).healthy


def test_a_model_with_non_reentrant_activation_checkpointing_is_diagnosed():
    """Found as a stranger: ``checkpoint(..., use_reentrant=False)``, torch's recommended
    form and what transformers' ``gradient_checkpointing_enable()`` uses, made the doctor
    fail with "inputs ... do not fit" (exit 2 from the CLI): the checkpoint took the
    tensors the doctor's activation profile saved for the model's own, and its
    recomputation found other shapes."""
    from torch.utils.checkpoint import checkpoint

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
            self.head = nn.Linear(64, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(checkpoint(self.body, x, use_reentrant=False))

    torch.manual_seed(0)
    diag = gg.doctor(Net(), (torch.randn(128, 32), torch.randint(0, 4, (128,))),
                     nn.CrossEntropyLoss())
    assert diag.healthy


def test_the_lr_advised_after_a_blow_up_never_rose_on_the_way():
    """Found as a stranger: Adam at 1 blew a digits MLP up, and the advice was "the loss
    does not rise at lr=0.1" from a run at 0.1 that went 2.30, 9.19, 4.53, 3.54, 2.26 (its
    end alone was judged); trained at 0.1 the MLP reached 55% held-out accuracy, 75% at
    1e-3. The LR advised is one at which no step's loss rose above the start."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(4):
        layers += [nn.Linear(64, 64), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(64, 10))
    batch = (x[:256], torch.tensor(y[:256]))
    diag = gg.doctor(model, batch, nn.CrossEntropyLoss(), torch.optim.Adam(model.parameters(), 1.0))
    top = diag.top
    assert top.cause == "lr_too_high"
    assert max(top.evidence["losses_at_lr_div_10"]) > 1.05 * top.evidence["loss_start"]
    assert top.evidence["stable_lr"] == pytest.approx(0.01)
    assert "lr=0.01" in top.remedy


def test_tanh_saturated_by_weights_far_too_large_is_told_to_reinit_not_to_swap_to_relu():
    """Found as a stranger: an 8-layer tanh MLP at N(0, 1) weights (inputs to its tanh at
    rms 7.7) got only "use ReLU/GELU in hidden layers ... (and Xavier init)": with ReLU and
    the same weights it exploded (held-out 4e4), with Xavier it trained (0.35 against
    1.98). Inputs that far out of scale lead with the re-initialisation; a deep sigmoid
    stack at its default init keeps the advice to change the activation."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(8):
        lin = nn.Linear(64, 64)
        nn.init.normal_(lin.weight, 0.0, 1.0)
        layers += [lin, nn.Tanh()]
    big = nn.Sequential(*layers, nn.Linear(64, 10))
    batch = (torch.randn(256, 64), torch.randint(0, 10, (256,)))
    top = gg.doctor(big, batch, nn.CrossEntropyLoss()).top
    assert top.cause == "saturating_activation"
    assert "re-initialise the layers before them with Xavier" in top.remedy
    assert "use ReLU/GELU" not in top.remedy
    deep = nn.Sequential(*[m for _ in range(10) for m in (nn.Linear(32, 32), nn.Sigmoid())],
                         nn.Linear(32, 1))
    top = gg.doctor(deep, (torch.randn(64, 32), torch.randn(64, 1)), nn.MSELoss()).top
    assert top.cause == "saturating_activation" and "use ReLU/GELU" in top.remedy


def test_a_straight_through_estimator_is_no_error_but_said_to_be_one_by_design():
    """Found as a stranger: a binarised layer whose custom Function passes the gradient
    through unchanged (a straight-through estimator, as in quantisation-aware training) was
    an error ("fix STE.backward", CLI exit 1). A backward that hands the gradient back
    exactly as is, or negated (gradient reversal), is an info that names the design."""

    class STE(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return torch.sign(x)

        @staticmethod
        def backward(ctx, g):
            return g

    class Binarize(nn.Module):
        def forward(self, x):
            return STE.apply(x)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), Binarize(), nn.Linear(64, 4))
    diag = gg.doctor(model, (torch.randn(128, 32), torch.randint(0, 4, (128,))),
                     nn.CrossEntropyLoss())
    found = [f for f in diag.findings if f.cause == "wrong_gradient"]
    assert diag.healthy and [f.severity for f in found] == ["info"]
    assert found[0].evidence["passes_gradient"] == "unchanged"
    assert "straight-through estimator" in found[0].remedy


def test_recurrent_remedies_fit_the_cell_and_what_was_already_done():
    """Found as a stranger: a GRU was told to "init the forget-gate bias to 1" (a GRU has
    none, and gg.init.apply_ zeroes its biases), and a tanh RNN whose recurrent weights were
    already orthogonal, as advised, got the same advice again (2.9e-9 over 200 steps)."""

    class VRNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.RNN(1, 64, batch_first=True, nonlinearity="tanh")
            self.out = nn.Linear(64, 1)

        def forward(self, x):
            return self.out(self.rnn(x)[0][:, -1])

    class GRULM(nn.Module):
        def __init__(self):
            super().__init__()
            self.e, self.r, self.o = nn.Embedding(200, 64), nn.GRU(64, 128, batch_first=True), \
                nn.Linear(128, 200)

        def forward(self, x):
            return self.o(self.r(self.e(x))[0])

    torch.manual_seed(0)
    x = torch.randn(32, 200, 1)
    rnn = gg.init.apply_(VRNN(), "orthogonal")
    found = [f for f in gg.doctor(rnn, (x, x[:, :5, 0].sum(1, keepdim=True)),
                                  nn.MSELoss()).findings if f.cause == "recurrent_vanishing"]
    assert found and "already orthogonal" in found[0].remedy
    assert "init the recurrent weights orthogonal" not in found[0].remedy
    torch.manual_seed(0)
    ids = torch.randint(0, 200, (16, 64))

    def lm(out, y):
        return nn.functional.cross_entropy(out[:, :-1].reshape(-1, 200), y[:, 1:].reshape(-1))

    found = [f for f in gg.doctor(GRULM(), (ids, ids), lm).findings
             if f.cause == "recurrent_vanishing"]
    assert found and not found[0].remedy.split(": ")[-1].startswith("init the forget-gate")
    assert "an LSTM with its forget-gate bias" in found[0].remedy


def test_a_compiled_model_is_diagnosed_as_its_module_by_its_own_names():
    """Found by a stranger: ``gg.doctor(torch.compile(m), ...)`` named the layer of a wrong
    custom backward ``_orig_mod.1`` (the guard strips the prefix), and dynamo recompiled
    the doctor's hooks until its recompile limit, warning each time."""
    import warnings

    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(10) for m in (nn.Linear(32, 32), nn.Sigmoid())],
                          nn.Linear(32, 1))
    batch = (torch.randn(64, 32), torch.randn(64, 1))
    plain = gg.doctor(model, batch, nn.MSELoss())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = gg.doctor(torch.compile(model, backend="eager"), batch, nn.MSELoss())
    assert [(f.cause, f.where) for f in compiled.findings] == [
        (f.cause, f.where) for f in plain.findings]
    assert plain.findings and not any("_orig_mod" in str(f.where) for f in compiled.findings)
    assert not [w for w in caught if "recompile" in str(w.message)]


def test_an_lr_error_ranks_with_the_initialisation():
    """Found by a stranger: a 10-layer ReLU MLP at AdamW 0.1 (its loss 2.3 -> 142 in one
    step) led with an ``init_too_small`` warning, its ``lr_too_high`` error second; He init
    left the run at chance. An LR error ranks with ``init_too_small``: above a warning of
    it, below ``init_too_large`` (weights too large make any LR diverge: a regression hunt
    found a ReLU MLP with weights x5 told to lower its LR 100x); an LR warning keeps its
    place after the init's."""
    def top(*findings: tuple[str, str]) -> str:
        return Diagnosis([Finding(c, s, None, {}, "") for c, s in findings]).top.cause

    assert top(("init_too_small", "warning"), ("lr_too_high", "error")) == "lr_too_high"
    assert top(("dead_units", "warning"), ("lr_too_high", "error")) == "lr_too_high"
    assert top(("init_too_large", "error"), ("lr_too_high", "error")) == "init_too_large"
    assert top(("init_too_large", "warning"), ("lr_too_high", "error")) == "init_too_large"
    assert top(("init_too_small", "error"), ("lr_too_high", "error")) == "init_too_small"
    assert top(("init_too_small", "warning"), ("lr_too_high", "warning")) == "init_too_small"
    assert top(("unscaled_input", "warning"), ("lr_too_high", "error")) == "unscaled_input"


def test_a_backward_that_overflows_by_the_forwards_scale_is_told_so_not_a_singular_op():
    """Found by a stranger: a transformer without LayerNorm, its weights x10, a finite loss
    of 1.7e14 whose backward overflowed, was told "the derivative of sqrt/log/pow at 0 is
    infinite: add an eps" (it has none). A huge forward points at the init and the
    scale; a finite, ordinary loss whose backward breaks still points at a singular op."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 1))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3000.0)
    batch = (torch.randn(32, 16), torch.randn(32, 1))
    top = gg.doctor(model, batch, nn.MSELoss()).top
    assert top.cause == "nonfinite_loss" and "initialisation" in top.remedy
    assert "sqrt/log/pow" not in top.remedy

    class Root(nn.Module):  # sqrt at 0: a finite loss, an infinite derivative
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sqrt(self.lin(x) * 0.0)

    top = gg.doctor(Root(), (torch.randn(8, 4), torch.zeros(8, 1)), nn.MSELoss()).top
    assert top.cause == "nonfinite_loss" and "sqrt/log/pow" in top.remedy, top
