"""GradGuardCallback with a real lightning Trainer on CPU."""

from __future__ import annotations

import csv
import math

import pytest
import torch

import gradguard as gg
from gradguard.events import read_jsonl

pl = pytest.importorskip("lightning.pytorch")
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

from gradguard.integrations._hooked import check_version  # noqa: E402
from gradguard.integrations.lightning import GradGuardCallback  # noqa: E402

NAN_STEP = 3


class Tiny(pl.LightningModule):
    def __init__(self, nan_step: int = NAN_STEP, fused: bool = False) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        self.nan_step = nan_step
        self.fused = fused
        self.snap: dict[str, torch.Tensor] = {}

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.global_step == self.nan_step:
            x = x.clone()
            x[0, 0] = math.nan  # a corrupted batch
            self.snap = {k: v.detach().clone() for k, v in self.state_dict().items()}
        if self.global_step == self.nan_step + 1:
            self.after = {k: v.detach().clone() for k, v in self.state_dict().items()}
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, fused=self.fused)


def loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    ds = torch.utils.data.TensorDataset(x, x.sum(dim=1, keepdim=True))
    return torch.utils.data.DataLoader(ds, batch_size=8)


def trainer(tmp_path, cb, **kw):
    opts = dict(
        max_steps=8,
        callbacks=[cb],
        logger=CSVLogger(tmp_path / "logs"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        log_every_n_steps=1,
        accelerator="cpu",
    )
    opts.update(kw)
    return pl.Trainer(**opts)


def test_nan_step_skipped_run_dir_logs_and_report(tmp_path):
    cb = GradGuardCallback(clip=gg.ZClip(), every=4)
    model = Tiny()
    t = trainer(tmp_path, cb)
    t.fit(model, loader())
    run_dir = tmp_path / "gradguard"
    steps = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["type"] == "step"]
    assert [r["step"] for r in steps] == list(range(8))
    assert [r["step"] for r in steps if r["skipped"]] == [NAN_STEP]
    assert all(r["loss"] is not None for r in steps if not r["skipped"])
    events = read_jsonl(run_dir / "events.jsonl")
    assert ("skip", NAN_STEP) in {(e["kind"], e["step"]) for e in events}
    # the skipped update changed nothing, and no NaN reached a parameter
    assert model.snap and model.after
    for k, v in model.snap.items():
        assert torch.equal(v, model.after[k]), k
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # the trainer's logger got the series at the right steps; self.log the totals
    with open(tmp_path / "logs" / "lightning_logs" / "version_0" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    skipped = {int(r["step"]) for r in rows if r.get("gradguard/skipped") == "1.0"}
    assert skipped == {NAN_STEP}
    assert any(r.get("gradguard/layer_grad_norm/net.0") for r in rows)
    assert float(t.callback_metrics["gradguard/skipped_steps"]) == 1.0
    if hasattr(gg, "report"):
        assert (run_dir / "report.html").stat().st_size > 0
        assert cb.reports == [str(run_dir / "report.html")]


def test_a_second_fit_with_the_same_callback_is_a_run_of_its_own(tmp_path):
    """The same callback in a second ``fit`` from step 0 (a second stage, a cell run again):
    its guard writes to ``gradguard/fit1``. It wrote the same steps again into the first
    fit's files, which the readers then took for a resume and showed the second run only."""
    cb = GradGuardCallback(clip=gg.ZClip(), every=4, report=False)
    model = Tiny(nan_step=-1)
    trainer(tmp_path, cb).fit(model, loader())
    model.nan_step = NAN_STEP  # the second fit meets a bad batch at its step NAN_STEP
    trainer(tmp_path, cb).fit(model, loader())
    base = tmp_path / "gradguard"
    assert cb.run_dirs == [base, base / "fit1"]
    for d, skipped in ((base, []), (base / "fit1", [NAN_STEP])):
        steps = [r for r in read_jsonl(d / "metrics.jsonl") if r["type"] == "step"]
        assert [r["step"] for r in steps] == list(range(8))
        assert [r["step"] for r in steps if r["skipped"]] == skipped
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_fit_that_raises_is_told_stopped(tmp_path):
    """Found by a stranger: a fit that died of an out-of-memory error at step 5 was "No
    gradient trouble": the callback now writes the ``abort`` event a ``with`` block does."""
    from gradguard.report import load_run
    from gradguard.report._outcome import judge

    class Oom(Tiny):
        def training_step(self, batch, batch_idx):
            if self.global_step == 5:
                raise RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")
            return super().training_step(batch, batch_idx)

    cb = GradGuardCallback(every=4, report=False)
    with pytest.raises(RuntimeError, match="out of memory"):
        trainer(tmp_path, cb).fit(Oom(nan_step=-1), loader())
    out = judge(load_run(tmp_path / "gradguard"))
    assert out.status == "stopped"
    assert "stopped at step 4 by RuntimeError (CUDA out of memory" in out.clause


def test_a_fit_continued_on_the_same_trainer_goes_on_with_its_guard(tmp_path):
    """Found by a stranger: the notebook pattern, ``trainer.fit`` to 8 steps, then
    ``max_steps`` raised and ``fit`` again on the same Trainer, built a fresh guard at step
    0 in the same directory: a NaN batch at global step 11 was "NaN at step 3", steps 0-7
    were recorded twice and the report took the run for a resume from a checkpoint. The
    guard now goes on from the state it ended the first fit with."""
    cb = GradGuardCallback(clip=gg.ZClip(), every=4, report=False)
    model = Tiny(nan_step=11)
    t = trainer(tmp_path, cb, logger=False)
    t.fit(model, loader())
    t.fit_loop.epoch_loop.max_steps = 16
    t.fit(model, loader())
    base = tmp_path / "gradguard"
    assert cb.run_dirs == [base, base]
    steps = [r for r in read_jsonl(base / "metrics.jsonl") if r["type"] == "step"]
    assert [r["step"] for r in steps] == list(range(16))
    assert [r["step"] for r in steps if r["skipped"]] == [11]
    skips = [e for e in read_jsonl(base / "events.jsonl") if e["kind"] == "skip"]
    assert [e["step"] for e in skips] == [11]
    assert cb._final is not None and cb._final[0]["step_count"] == 16
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_an_optimizer_whose_step_needs_a_closure_is_left_unguarded_with_a_warning(tmp_path):
    """Found by a stranger: a healthy LightningModule on ``torch.optim.LBFGS`` stopped at
    its first step with "LBFGS.step needs a closure: call guard.step(closure=closure)",
    an API the user never called (and under ``gradguard run``). LBFGS evaluates its
    closure several times per step, each a backward Lightning hooks: it is left unguarded,
    said once, and trains as without the callback."""
    class Lbfgs(Tiny):
        def configure_optimizers(self):
            return torch.optim.LBFGS(self.parameters(), lr=0.1, max_iter=3)

    weights = []
    for cbs in ([], [GradGuardCallback(clip=gg.ZClip(), every=4, report=False)]):
        torch.manual_seed(0)
        model = Lbfgs(nan_step=-1)
        t = trainer(tmp_path, None, logger=False, callbacks=cbs)
        if cbs:
            with pytest.warns(gg.GradGuardWarning, match="LBFGS .* is not guarded") as said:
                t.fit(model, loader())
            assert sum("is not guarded" in str(w.message) for w in said) == 1
        else:
            t.fit(model, loader())
        weights.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*weights):
        assert torch.equal(a, b)
    assert not (tmp_path / "gradguard").exists()


class RingGAN(pl.LightningModule):
    """A 2-D GAN (8 Gaussians on a ring of radius 2) optimised by hand: two players."""

    def __init__(self) -> None:
        super().__init__()
        self.G = torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
                                     torch.nn.ReLU(), torch.nn.Linear(64, 2))
        self.D = torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.LeakyReLU(0.2),
                                     torch.nn.Linear(64, 64), torch.nn.LeakyReLU(0.2),
                                     torch.nn.Linear(64, 1))
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        bce = torch.nn.functional.binary_cross_entropy_with_logits
        (real,) = batch
        opt_d, opt_g = self.optimizers()
        z = torch.randn(len(real), 4)
        ones, zeros = torch.ones(len(real), 1), torch.zeros(len(real), 1)
        loss_d = bce(self.D(real), ones) + bce(self.D(self.G(z).detach()), zeros)
        opt_d.zero_grad()
        self.manual_backward(loss_d)
        opt_d.step()
        loss_g = bce(self.D(self.G(z)), ones)
        opt_g.zero_grad()
        self.manual_backward(loss_g)
        opt_g.step()

    def configure_optimizers(self):
        return [torch.optim.Adam(self.D.parameters(), lr=1e-3, betas=(0.5, 0.999)),
                torch.optim.Adam(self.G.parameters(), lr=1e-3, betas=(0.5, 0.999))]


def test_a_gans_players_are_not_judged_on_their_loss_level_and_each_has_a_ladder(tmp_path):
    """Found by a stranger: a healthy 2-D GAN under the callback's default recovery had its
    discriminator rolled back three times on a GAN's normal movement (the loss-rise test),
    and the generator's samples ended off the ring (0 of 8 modes against 8 unguarded); the
    generator, the second optimizer, had no ladder at all. Manual optimisation of several
    optimizers now gets ``Recovery(loss_rise=False)`` by default, said once, one ladder per
    optimizer; the run is bit for bit the unguarded one."""
    weights = []
    for guarded in (False, True):
        pl.seed_everything(1, verbose=False)
        g = torch.Generator().manual_seed(1)
        k = torch.randint(0, 8, (600 * 64,), generator=g).float() * (2 * math.pi / 8)
        data = 2 * torch.stack([torch.cos(k), torch.sin(k)], 1)
        data = data + 0.05 * torch.randn(data.shape, generator=g)
        dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=64)
        model = RingGAN()

        class Spy(GradGuardCallback):
            def on_train_end(self, trainer, pl_module):
                self.seen = list(self.guards.values())
                super().on_train_end(trainer, pl_module)

        cb = Spy(report=False)
        t = trainer(tmp_path, None, logger=False, max_steps=-1, max_epochs=1,
                    callbacks=[cb] if guarded else [])
        if guarded:
            with pytest.warns(gg.GradGuardWarning, match="optimizers by hand .* does not act on "
                                                         "the loss level"):
                t.fit(model, dl)
            recs = [g.recovery for g in cb.seen]
            assert len(recs) == 2 and all(r is not None and not r.loss_rise for r in recs)
            assert recs[0] is not recs[1]
        else:
            t.fit(model, dl)
        weights.append([p.detach().clone() for p in model.G.parameters()])
    for a, b in zip(*weights):
        assert torch.equal(a, b)


def test_a_batch_the_module_skips_by_returning_none_is_no_guard_step(tmp_path):
    """Found by a stranger: Lightning's own way to skip a batch (``training_step`` returns
    None) still calls the optimizer hook with every gradient None; the callback recorded
    it as a step with a gradient norm of 0 and the step before's loss, and after 60 such
    steps the report found a "gradient spike" (z=4.9e13) when the batches were good again.
    Such a step is no guard step, as under ``gradguard run``."""
    class Skipping(Tiny):
        def training_step(self, batch, batch_idx):
            if 2 <= self.global_step <= 4 and not hasattr(self, "skipped"):
                self.skipped = True
                return None  # a bad batch, skipped the Lightning way
            self.__dict__.pop("skipped", None)
            return super().training_step(batch, batch_idx)

    cb = GradGuardCallback(clip=gg.ZClip(), every=4, report=False)
    model = Skipping(nan_step=-1)
    trainer(tmp_path, cb, logger=False, max_steps=6).fit(model, loader())
    steps = [r for r in read_jsonl(tmp_path / "gradguard" / "metrics.jsonl") if r["type"] == "step"]
    assert steps and all(r["grad_norm"] > 0 for r in steps), steps
    assert len(steps) == len({r["step"] for r in steps})


def test_a_module_of_lazy_layers_is_guarded_from_its_first_step(tmp_path):
    """Found as a stranger: a LightningModule built of ``nn.LazyLinear`` layers (their
    shapes come from the first forward, which Lightning runs after ``on_train_start``)
    stopped the fit with torch's "Attempted to use an uninitialized parameter" from the
    guard's construction; the same module trains unguarded. Its guard is now built at
    its optimizer's first step, and the NaN batch is skipped as for any module."""
    class Lazy(Tiny):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.LazyLinear(8), torch.nn.ReLU(),
                                           torch.nn.LazyLinear(1))

    cb = GradGuardCallback(clip=gg.ZClip(), every=4, report=False)
    model = Lazy()
    trainer(tmp_path, cb, logger=False).fit(model, loader())
    steps = [r for r in read_jsonl(tmp_path / "gradguard" / "metrics.jsonl") if r["type"] == "step"]
    assert [r["step"] for r in steps] == list(range(8))
    assert [r["step"] for r in steps if r["skipped"]] == [NAN_STEP]
    for k, v in model.snap.items():
        assert torch.equal(v, model.after[k]), k
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_fused_optimizer_skip(tmp_path):
    cb = GradGuardCallback(every=50, run_dir=tmp_path / "rd", report=False)
    model = Tiny(fused=True)
    trainer(tmp_path, cb, logger=False, max_steps=6).fit(model, loader())
    steps = [r for r in read_jsonl(tmp_path / "rd" / "metrics.jsonl") if r["type"] == "step"]
    assert [r["step"] for r in steps if r["skipped"]] == [NAN_STEP]
    assert model.snap and model.after
    for k, v in model.snap.items():
        assert torch.equal(v, model.after[k]), k


class Burst(Tiny):
    """NaN batches at steps 2-4; records the ladder's LR factor each step, before it runs."""

    def __init__(self, rec: gg.Recovery, bad: tuple[int, ...] = (2, 3, 4)) -> None:
        super().__init__(nan_step=-1, fused=True)
        self.rec, self.factors, self.bad, self.weights = rec, [], bad, []

    def training_step(self, batch, batch_idx):
        self.factors.append(self.rec.lr_factor)
        self.weights.append([p.detach().clone() for p in self.parameters()])
        x, y = batch
        if self.global_step in self.bad:
            x = x * math.nan
        return torch.nn.functional.mse_loss(self.net(x), y)


def test_fused_skips_are_heard_before_the_flush(tmp_path):
    """The trainer steps a fused optimizer after the guard's hook: the skip flags stay on
    the device, and the ladder hears them at the next hook (the update done), not at the
    flush 50 steps later: the third skip backs the LR off from the update of step 5 on."""
    rec = gg.Recovery()
    cb = GradGuardCallback(every=50, recovery=rec, run_dir=tmp_path / "rd", report=False)
    model = Burst(rec)
    trainer(tmp_path, cb, logger=False, max_steps=8).fit(model, loader())
    events = read_jsonl(tmp_path / "rd" / "events.jsonl")
    assert [e["step"] for e in events if e["kind"] == "lr_backoff"] == [4]
    assert model.factors[:6] == [1.0] * 6  # step 5's update is the first backed off ...
    assert model.factors[6] < 0.2  # ... seen by the forward of step 6
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_rollback_heard_in_the_hook_leaves_the_restored_weights_untouched(tmp_path):
    """Six NaN steps (2-7): the sixth skip, heard in the hook of step 8 after its backward,
    rolls back to the weights before the first step. Lightning then steps the optimizer
    with step 8's gradients, computed on the weights the rollback replaced: the guard
    takes them off, so step 9 starts from the restored weights exactly. The optimizer
    keeps the LR the module set (the rollback ran inside its step, its LR scaled by the
    ladder for that step)."""
    rec = gg.Recovery()
    cb = GradGuardCallback(every=50, recovery=rec, run_dir=tmp_path / "rd", report=False)
    model = Burst(rec, bad=tuple(range(2, 8)))
    t = trainer(tmp_path, cb, logger=False, max_steps=11)
    t.fit(model, loader())
    assert t.optimizers[0].param_groups[0]["lr"] == 1e-2 and rec.lr_factor < 1.0
    events = read_jsonl(tmp_path / "rd" / "events.jsonl")
    assert [(e["step"], e["value"]) for e in events if e["kind"] == "rollback"] == [(7, -1.0)]
    assert all(torch.equal(a, b) for a, b in zip(model.weights[9], model.weights[0]))
    assert not all(torch.equal(a, b) for a, b in zip(model.weights[10], model.weights[0]))
    voided = [e["step"] for e in events if e["kind"] == "skip" and e["severity"] == "info"]
    assert voided == [8]
    assert all(torch.isfinite(p).all() for p in model.parameters())


class Averaged(pl.LightningModule):
    """NaN batches at steps 2-7 (rolled back at 7 to the weights before the first step),
    and each step's EMA weights (Lightning's ``EMAWeightAveraging``) recorded before it."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(4, 1)
        self.weights: list[torch.Tensor] = []
        self.averages: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        [ema] = [c for c in self.trainer.callbacks if isinstance(c, pl.callbacks.WeightAveraging)]
        self.weights.append(self.net.weight.detach().clone())
        self.averages.append(ema._average_model.module.net.weight.detach().clone())
        x, y = batch
        if 2 <= self.global_step <= 7:
            x = x * math.nan
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def test_a_weight_averaging_callback_is_rolled_back_with_the_weights(tmp_path):
    """Found as a stranger: Lightning's ``EMAWeightAveraging`` averages every update into
    a copy of the module and writes that average into the module when training ends, so
    the updates a rollback undid came back in the final weights. The callback hands the
    average to the ladder (``Recovery.also_restore``): the rollback at step 7 to the
    weights before the first step restores the average of then: a copy of them.
    Without it the average of step 8 was half the weights of steps 0-1."""
    cb = GradGuardCallback(every=50, run_dir=tmp_path / "rd", report=False)
    model = Averaged()
    ema = pl.callbacks.EMAWeightAveraging(decay=0.5)
    trainer(tmp_path, cb, logger=False, max_steps=11, callbacks=[cb, ema]).fit(model, loader())
    events = read_jsonl(tmp_path / "rd" / "events.jsonl")
    assert [(e["step"], e["value"]) for e in events if e["kind"] == "rollback"] == [(7, -1.0)]
    assert not torch.equal(model.averages[7], model.weights[0])  # steps 0-1 are in it
    assert torch.equal(model.weights[8], model.weights[0])
    assert torch.equal(model.averages[8], model.weights[0])


def test_the_callback_recovers_by_default(tmp_path):
    """Without ``recovery=`` (and without a ``config``) the callback guards with a
    ``gg.Recovery()`` ladder, as ``gradguard run`` does: six NaN steps in a row back the LR
    off, then roll back. ``recovery=None`` turns it off: the same run only skips."""
    runs = {}
    for name, kw in (("default", {}), ("off", {"recovery": None})):
        cb = GradGuardCallback(run_dir=tmp_path / name, report=False, **kw)
        assert (cb.recovery is None) == (name == "off")
        model = Burst(gg.Recovery(), bad=tuple(range(2, 8)))
        trainer(tmp_path, cb, logger=False, max_steps=11).fit(model, loader())
        runs[name] = [(e["kind"], e["step"]) for e in read_jsonl(tmp_path / name / "events.jsonl")
                      if e["kind"] in ("lr_backoff", "rollback")]
    assert runs == {"default": [("lr_backoff", 4), ("rollback", 7)], "off": []}
    two = GradGuardCallback(), GradGuardCallback()
    assert two[0].recovery is not two[1].recovery  # one ladder per callback
    assert GradGuardCallback(config=gg.GuardConfig()).recovery is None  # a config is as given


def test_conflicting_clip_settings_refused(tmp_path):
    cb = GradGuardCallback(clip=gg.NormClip(1.0))
    t = trainer(tmp_path, cb, logger=False, gradient_clip_val=0.5)
    with pytest.raises(ValueError, match="gradient_clip_val"):
        t.fit(Tiny(), loader())


def test_trainer_clip_alone_is_fine_and_measured_first(tmp_path):
    cb = GradGuardCallback(clip=None, run_dir=tmp_path / "rd", report=False)
    model = Tiny(nan_step=-1)
    trainer(tmp_path, cb, logger=False, gradient_clip_val=1e-3, max_steps=3).fit(model, loader())
    steps = [r for r in read_jsonl(tmp_path / "rd" / "metrics.jsonl") if r["type"] == "step"]
    # gradguard's hook runs before Lightning clips: it sees the unclipped norm
    assert len(steps) == 3
    assert all(r["grad_norm"] > 1e-3 for r in steps)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"on_nonfinite": "ignore"}, "on_nonfinite"), ({"every": 0}, "every"), ({"clip": 1.0}, "clip")],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        GradGuardCallback(**kwargs)


def test_unsupported_version_message():
    with pytest.raises(ImportError, match=r"lightning >=2.1,<3; found 1.9.5"):
        check_version("lightning", "1.9.5", "2.1", "3")
    with pytest.raises(ImportError, match=r"found 3.0.0"):
        check_version("lightning", "3.0.0", "2.1", "3")
    check_version("lightning", pl.__version__, "2.1", "3")


# ---- checkpoints: the guard's state is saved and restored by Lightning ------------------
class Plain(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=5e-2)


def small_loader():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 4, generator=g)
    ds = torch.utils.data.TensorDataset(x, 3.0 * x.sum(dim=1, keepdim=True))
    return torch.utils.data.DataLoader(ds, batch_size=8)  # 4 steps per epoch


def fit_with_checkpoints(root, clip, max_steps, ckpt_path=None):
    from lightning.pytorch.callbacks import ModelCheckpoint

    cb = GradGuardCallback(clip=clip, every=3, run_dir=root / "gg", report=False)
    ckpt = ModelCheckpoint(dirpath=root / ("ckpt2" if ckpt_path else "ckpt"),
                           every_n_train_steps=4, save_top_k=-1)
    model = Plain()
    t = trainer(root, cb, logger=False, max_steps=max_steps, callbacks=[cb, ckpt],
                enable_checkpointing=True)
    t.fit(model, small_loader(), ckpt_path=ckpt_path)
    return cb, model


def assert_same(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape, path
        assert torch.allclose(a, b, rtol=0, atol=0, equal_nan=True), path  # bit-identical
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


@pytest.mark.parametrize("make_clip", [lambda: gg.ZClip(warmup_steps=2), lambda: gg.AutoClip(percentile=50)])
def test_resume_from_checkpoint_continues_the_guard_state(tmp_path, make_clip):
    full_cb, full_model = fit_with_checkpoints(tmp_path / "full", make_clip(), max_steps=8)
    first_cb, _ = fit_with_checkpoints(tmp_path / "split", make_clip(), max_steps=4)
    ckpt = tmp_path / "split" / "ckpt" / "epoch=0-step=4.ckpt"
    saved = torch.load(ckpt, weights_only=False)["callbacks"]["GradGuardCallback"]
    assert saved["guards"][0]["step_count"] == 4
    assert_same(saved["guards"][0]["clip"], first_cb.clip.state_dict(), "checkpointed clip")
    resumed_cb, resumed_model = fit_with_checkpoints(tmp_path / "split", make_clip(), 8, ckpt)
    # the resumed guard went on from the checkpoint: same clip statistics, counters,
    # detector state as the uninterrupted run, and bit-identical parameters
    assert_same(resumed_cb.clip.state_dict(), full_cb.clip.state_dict(), "clip")
    assert_same(resumed_cb._final, full_cb._final, "guard")
    assert resumed_cb._final[0]["step_count"] == 8
    for (name, a), b in zip(full_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(AssertionError):  # the statistics had moved: a lost state would show
        assert_same(saved["guards"][0]["clip"], make_clip().state_dict())
    # the run directory got every step once, across both processes
    steps = [r["step"] for r in read_jsonl(tmp_path / "split" / "gg" / "metrics.jsonl")
             if r["type"] == "step"]
    assert steps == list(range(8))


# ---- DDP: a NaN on one rank only is skipped on every rank, no hang, no drift ------------
DDP_SCRIPT = r'''
import json, math, os, sys
import torch
import lightning.pytorch as pl
import gradguard as gg
from gradguard.integrations.lightning import GradGuardCallback

torch.set_num_threads(1)
NAN_STEP, out = int(sys.argv[1]), sys.argv[2]
RAISE = len(sys.argv) > 3  # rank 1 raises at NAN_STEP instead


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        self.changed = {}

    def training_step(self, batch, batch_idx):
        x, y = batch
        if RAISE and self.global_rank == 1 and self.global_step == NAN_STEP:
            raise RuntimeError("boom on rank 1")
        if self.global_rank == 1 and self.global_step == NAN_STEP:
            x = x.clone()
            x[0, 0] = math.nan  # a corrupted batch on rank 1 only
        return torch.nn.functional.mse_loss(self.net(x), y)

    def on_train_batch_start(self, batch, batch_idx):
        self.before = [p.detach().clone() for p in self.parameters()]

    def on_train_batch_end(self, outputs, batch, batch_idx):
        moved = any(not torch.equal(a, p) for a, p in zip(self.before, self.parameters()))
        self.changed[self.global_step - 1] = moved

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


class Probe(pl.Callback):
    def on_train_start(self, trainer, pl_module):
        self.guard = next(iter(guard_cb.guards.values()))


x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)
guard_cb, probe = GradGuardCallback(clip=gg.ZClip(warmup_steps=2), every=3, run_dir=os.path.join(out, "gg")), Probe()
model = Tiny()
trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=8, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=out, callbacks=[guard_cb, probe])
trainer.fit(model, data)
r = trainer.global_rank
torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, os.path.join(out, f"rank{r}.pt"))
g = probe.guard
with open(os.path.join(out, f"rank{r}.json"), "w") as fh:
    json.dump({"world": trainer.world_size, "step_count": g.step_count, "skipped": g.skipped_steps,
               "changed": model.changed, "clip": {k: v.tolist() for k, v in g.clip.state_dict()["state"].items()},
               "events": [[e.kind, e.step, e.data.get("ranks")] for e in g.events]}, fh)
'''


def _ddp_run(tmp_path, *args: str, script_text: str = DDP_SCRIPT,
             prefix: tuple[str, ...] = (), again: bool = True) -> tuple[int, str]:
    """Run DDP_SCRIPT on two ranks (Lightning's launcher starts rank 1); a hang fails; run
    once more when a rank aborted in gloo's teardown (``dist_launch.GLOO_TEARDOWN``)."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    script = tmp_path / "ddp_train.py"
    script.write_text(script_text)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
               GLOO_SOCKET_IFNAME="lo", PYTHONWARNINGS="ignore")
    for k in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK"):
        env.pop(k, None)  # Lightning's launcher starts rank 1 itself
    proc = subprocess.Popen(
        [sys.executable, *(a.format(port=port) for a in prefix), str(script), str(NAN_STEP),
         str(tmp_path), *args], cwd=tmp_path,
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # both ranks: a hang fails the test
        output, _ = proc.communicate()
        pytest.fail(f"DDP run hung (killed after 120 s):\n{output[-3000:]}")
    from dist_launch import GLOO_TEARDOWN, empty_dir

    if again and proc.returncode != 0 and GLOO_TEARDOWN in output and "raise" not in args:
        empty_dir(tmp_path)  # the first run's files (append-only records would hold both)
        return _ddp_run(tmp_path, *args, script_text=script_text, prefix=prefix, again=False)
    return proc.returncode, output


def test_ddp_a_rank_that_raises_fails_the_job_rather_than_hanging_it(tmp_path):
    """Found by a stranger: rank 1 raising in its training_step hung the job: the
    callback's on_exception closed its guard with a collective flush, while rank 0 waited
    in the backward's all-reduce. It closes without one now, as the HF callback does."""
    code, output = _ddp_run(tmp_path, "raise")
    assert code != 0 and "boom on rank 1" in output, output[-3000:]


def test_gradguard_run_leaves_a_script_lightning_launches_ranks_of_unguarded_with_a_warning(
        tmp_path):
    """Found by a stranger: ``gradguard run`` on a ``strategy="ddp", devices=2`` script
    started with plain python hung at step 0: Lightning starts rank 1 as a new ``python``
    process, unguarded, and rank 0's guard waited in a collective rank 1 never entered."""
    script = DDP_SCRIPT.replace("callbacks=[guard_cb, probe]", "callbacks=[]").split(
        "r = trainer.global_rank")[0]
    code, output = _ddp_run(tmp_path, script_text=script,
                            prefix=("-m", "gradguard", "run", "--no-report", "--out",
                                    str(tmp_path / "runs")))
    assert code == 0, output[-3000:]
    assert "Lightning starts its other ranks as new `python` processes" in output
    assert "torchrun --nproc-per-node N -m gradguard run" in output


def test_torchrun_gradguard_run_guards_every_rank_of_a_lightning_ddp_script(tmp_path):
    """Found by a regression hunt: the check above left a Lightning DDP script unguarded
    under ``torchrun -m gradguard run`` too, as the warning advised, where torchrun
    creates the ranks and every one is guarded."""
    script = DDP_SCRIPT.replace("callbacks=[guard_cb, probe]", "callbacks=[]").split(
        "r = trainer.global_rank")[0]
    code, output = _ddp_run(tmp_path, script_text=script, prefix=(
        "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
        "--master-port", "{port}", "-m", "gradguard", "run", "--no-report", "--out",
        str(tmp_path / "runs")))
    assert code == 0, output[-3000:]
    assert "Lightning starts its other ranks" not in output
    steps = [r for r in read_jsonl(next((tmp_path / "runs").glob("*/metrics.jsonl")))
             if r["type"] == "step"]
    assert len(steps) == 8 and [r["step"] for r in steps if r["skipped"]] == [NAN_STEP]


def test_ddp_two_ranks_nan_on_one_rank_is_skipped_everywhere(tmp_path):
    import json

    code, output = _ddp_run(tmp_path)
    assert code == 0, output[-3000:]
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in res] == [2, 2]
    for r in res:
        # the same step was skipped on both ranks (parameters did not move), no other
        assert r["step_count"] == 8 and r["skipped"] == 1
        assert [int(s) for s, moved in r["changed"].items() if not moved] == [NAN_STEP]
        assert ["skip", NAN_STEP, [1]] in r["events"]  # named: it came from rank 1
    assert res[0]["clip"] == res[1]["clip"]  # same clip statistics on both ranks
    p0, p1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for k in p0:
        assert torch.isfinite(p0[k]).all(), k
        assert torch.equal(p0[k], p1[k]), k  # no rank drifted
    steps = [r for r in read_jsonl(tmp_path / "gg" / "metrics.jsonl") if r["type"] == "step"]
    assert [r["step"] for r in steps if r["skipped"]] == [NAN_STEP]
    assert not (tmp_path / "gg" / "rank1").exists()


class WithNorm(pl.LightningModule):
    """A batch norm model whose batch at ``nan_step`` holds a NaN, in a real Trainer: the
    Trainer steps the optimizer, the guard hears the step in its hook."""

    def __init__(self, nan_step: int, fused: bool, scale: float | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8),
                                       torch.nn.ReLU(), torch.nn.Linear(8, 1))
        self.nan_step, self.fused, self.scale = nan_step, fused, scale

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.global_step == self.nan_step:
            x = x.clone()
            if self.scale is None:
                x[0, 0] = math.nan
            else:  # a batch in other units: the batch norm layer divides the scale out
                x = x * self.scale
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, fused=self.fused)


@pytest.mark.parametrize("fused", [False, True])
def test_a_skipped_nan_batch_leaves_the_batch_norm_statistics_finite_in_a_trainer(
        tmp_path, fused):
    """gradguard/_running.py through the trainer's hook: the NaN batch's forward wrote NaN
    into the running statistics before the hook skipped its step; they are put back, as if
    that batch had never been seen (the same Trainer run on the other batches only)."""
    model = WithNorm(nan_step=NAN_STEP, fused=fused)
    trainer(tmp_path / "g", GradGuardCallback(clip=None, every=4)).fit(model, loader())
    bn = model.net[1]
    assert torch.isfinite(bn.running_mean).all() and torch.isfinite(bn.running_var).all()
    ref = WithNorm(nan_step=-1, fused=fused)
    batches = [b for i, b in enumerate(loader()) if i != NAN_STEP]
    trainer(tmp_path / "r", GradGuardCallback(clip=None, every=4), max_steps=7).fit(
        ref, torch.utils.data.DataLoader(batches, batch_size=None))
    assert torch.equal(bn.running_mean, ref.net[1].running_mean)
    assert torch.equal(bn.running_var, ref.net[1].running_var)
    model.eval()
    assert torch.isfinite(model.net(torch.randn(3, 4))).all()  # eval() answers, not NaN


@pytest.mark.parametrize("fused", [False, True])
def test_a_batch_on_another_scale_is_skipped_in_a_trainer_as_if_never_seen(tmp_path, fused):
    """The off-scale test (gradguard/_running.py, ``RunningStats.offscale``) through the
    trainer's hook: a x1e4 batch whose loss and gradients the batch norm layer keeps
    normal is skipped by the statistics alone and put back: model and statistics end as
    in the same Trainer run on the other batches only."""
    step = 6  # past the batches the test waits for (OFFSCALE_AFTER)
    model = WithNorm(nan_step=step, fused=fused, scale=1e4)
    trainer(tmp_path / "g", GradGuardCallback(clip=None, every=4)).fit(model, loader())
    ref = WithNorm(nan_step=-1, fused=fused)
    batches = [b for i, b in enumerate(loader()) if i != step]
    trainer(tmp_path / "r", GradGuardCallback(clip=None, every=4), max_steps=7).fit(
        ref, torch.utils.data.DataLoader(batches, batch_size=None))
    assert model.net[1].running_var.max() < 10
    for a, b in zip(model.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)
    skips = [e for e in read_jsonl(tmp_path / "g" / "gradguard" / "events.jsonl")
             if e.get("kind") == "skip"]
    assert [(e["step"], e["data"]["reason"]) for e in skips] == [(step, "offscale_batch")]


def test_a_fresh_fit_into_a_root_dir_with_an_earlier_runs_records_writes_its_own(tmp_path):
    """Found by a stranger (under the Hugging Face Trainer, the same here): a script run
    twice into the same directory, first with a NaN batch, then healthy, had the second
    run's records appended to the first's and its verdict taken from the first's NaN. A
    fresh fit (no checkpoint) into a directory that holds records writes its own."""
    first = GradGuardCallback(report=False)
    trainer(tmp_path, first).fit(Tiny(), loader())
    second = GradGuardCallback(report=False)
    with pytest.warns(gg.GradGuardWarning, match="holds the records of an earlier run"):
        trainer(tmp_path, second).fit(Tiny(nan_step=-1), loader())
    [own] = second.run_dirs
    assert own.parent == tmp_path / "gradguard"
    for d, skipped in ((tmp_path / "gradguard", [NAN_STEP]), (own, [])):
        steps = [r for r in read_jsonl(d / "metrics.jsonl") if r["type"] == "step"]
        assert [r["step"] for r in steps] == list(range(8))
        assert [r["step"] for r in steps if r["skipped"]] == skipped
