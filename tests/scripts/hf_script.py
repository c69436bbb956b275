"""A Hugging Face Trainer script (nothing gradguard-specific in it): a small GPT-2 built
from a config (random init, nothing downloaded), trained on characters of Python's own
``json`` package source, with the Trainer's default ``max_grad_norm=1.0``.

    python tests/scripts/hf_script.py --steps 20
    gradguard run tests/scripts/hf_script.py --steps 20 --nan-at 8

``--nan-at STEP`` makes one step's loss NaN; ``--dump FILE`` writes the Trainer's own
log (``grad_norm`` is what ``clip_grad_norm_`` returned: the pre-clip norm) and a digest
of the final weights.
"""

import argparse
import hashlib
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments


class Chars(torch.utils.data.Dataset):
    def __init__(self, block: int) -> None:
        text = Path(json.__file__).with_name("decoder.py").read_text()
        self.vocab = sorted(set(text))
        self.ids = torch.tensor([self.vocab.index(c) for c in text])
        self.block = block

    def __len__(self) -> int:
        return (len(self.ids) - 1) // self.block

    def __getitem__(self, i: int) -> dict:
        x = self.ids[i * self.block:(i + 1) * self.block]
        return {"input_ids": x, "labels": x}


class NanTrainer(Trainer):
    """Makes one step's loss NaN (a corrupted batch)."""

    nan_at = -1

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        if self.state.global_step == self.nan_at:
            return (out[0] * float("nan"), out[1]) if return_outputs else out * float("nan")
        return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--nan-at", type=int, default=-1)
    ap.add_argument("--output-dir", default="hf_out")
    ap.add_argument("--dump", default=None)
    args = ap.parse_args()

    torch.manual_seed(0)
    data = Chars(block=32)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=32,
                                       vocab_size=len(data.vocab)))
    targs = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=8,
        learning_rate=args.lr, logging_steps=1, report_to=[], save_strategy="no",
        disable_tqdm=True, use_cpu=True, seed=0, dataloader_num_workers=0,
    )
    NanTrainer.nan_at = args.nan_at
    trainer = NanTrainer(model=model, args=targs, train_dataset=data)
    trainer.train()
    weights = b"".join(p.detach().numpy().tobytes() for p in model.parameters())
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    print(f"hf_script: {trainer.state.global_step} steps, weights finite: {finite}")
    if args.dump:
        logs = [h for h in trainer.state.log_history if "grad_norm" in h]
        Path(args.dump).write_text(json.dumps({
            "steps": [{"loss": h["loss"], "true_norm": h["grad_norm"]} for h in logs],
            "digest": hashlib.sha256(weights).hexdigest(), "finite": finite}))


if __name__ == "__main__":
    main()
