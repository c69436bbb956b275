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


def test_fused_optimizer_skip(tmp_path):
    cb = GradGuardCallback(every=50, run_dir=tmp_path / "rd", report=False)
    model = Tiny(fused=True)
    trainer(tmp_path, cb, logger=False, max_steps=6).fit(model, loader())
    steps = [r for r in read_jsonl(tmp_path / "rd" / "metrics.jsonl") if r["type"] == "step"]
    assert [r["step"] for r in steps if r["skipped"]] == [NAN_STEP]
    assert model.snap and model.after
    for k, v in model.snap.items():
        assert torch.equal(v, model.after[k]), k


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
