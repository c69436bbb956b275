"""A Lightning training script (nothing gradguard-specific in it), with the trainer's own
``gradient_clip_val``.

    python tests/scripts/lightning_script.py --steps 30
    gradguard run tests/scripts/lightning_script.py --steps 30 --nan-at 10

``--nan-at STEP`` puts a NaN in one batch; ``--dump FILE`` writes the true pre-clip
gradient norm of each step (measured in the module's ``on_before_optimizer_step``, which
Lightning calls before it clips) and a digest of the final weights.
"""

import argparse
import hashlib
import json
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn


class Regressor(pl.LightningModule):
    def __init__(self, lr: float, nan_at: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
        self.lr, self.nan_at = lr, nan_at
        self.records: list[dict] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.global_step == self.nan_at:
            x = x.clone()
            x[0, 0] = float("nan")
        loss = nn.functional.mse_loss(self.net(x), y)
        self.records.append({"loss": loss.item()})
        return loss

    def on_before_optimizer_step(self, optimizer):
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        self.records[-1]["true_norm"] = torch.nn.utils.get_total_norm(grads).item()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--clip", type=float, default=0.5, help="Trainer(gradient_clip_val=...)")
    ap.add_argument("--nan-at", type=int, default=-1)
    ap.add_argument("--dump", default=None)
    ap.add_argument("--root", default="lightning_logs")
    ap.add_argument("--own-callback", action="store_true", help="add gradguard's callback by hand")
    args = ap.parse_args()

    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = (x.sum(dim=1, keepdim=True) * 3).sin() * 5
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    model = Regressor(args.lr, args.nan_at)
    callbacks = []
    if args.own_callback:
        from gradguard.integrations.lightning import GradGuardCallback

        callbacks.append(GradGuardCallback(every=5, report=False))
    trainer = pl.Trainer(max_steps=args.steps, gradient_clip_val=args.clip or None, callbacks=callbacks,
                         accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=args.root)
    trainer.fit(model, data)
    weights = b"".join(p.detach().numpy().tobytes() for p in model.parameters())
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    print(f"lightning_script: {trainer.global_step} steps, weights finite: {finite}")
    if args.dump:
        Path(args.dump).write_text(json.dumps({
            "steps": model.records, "digest": hashlib.sha256(weights).hexdigest(),
            "finite": finite}))


if __name__ == "__main__":
    main()
