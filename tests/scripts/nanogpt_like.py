"""A nanoGPT-shaped training script (nothing gradguard-specific in it), tiny enough for CPU.

Like karpathy/nanoGPT's ``train.py``: a GPT with tied embeddings, AdamW with decay /
no-decay parameter groups, a cosine LR schedule with warm-up set by hand each iteration,
gradient accumulation, autocast, its own ``GradScaler`` and ``grad_clip``
(``scaler.unscale_`` then ``clip_grad_norm_``), data from a character-level corpus (the
source of Python's own ``json`` package, so nothing is downloaded).

    python tests/scripts/nanogpt_like.py --iters 40
    gradguard run tests/scripts/nanogpt_like.py --iters 40 --nan-at 20

Test hooks: ``--nan-at IT`` makes one micro-batch loss NaN; ``--dump FILE`` writes, per
iteration, the true pre-clip gradient norm (``get_total_norm`` right before the script's
clip) and the loss, and a digest of the final weights.
"""

import argparse
import hashlib
import json
import math
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = nn.MultiheadAttention(n_embd, n_head, batch_first=True)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, block: int, n_layer: int, n_head: int, n_embd: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, n_embd)
        self.wpe = nn.Embedding(block, n_embd)
        self.h = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying, as GPT-2
        for m in self.modules():  # GPT-2's init
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = idx.shape[1]
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
        x = self.wte(idx) + self.wpe(torch.arange(t))
        for block in self.h:
            x = block(x, mask)
        logits = self.lm_head(self.ln_f(x))
        return logits, F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))

    def configure_optimizers(self, weight_decay: float, lr: float, betas: tuple[float, float],
                             fused: bool) -> torch.optim.AdamW:
        params = {n: p for n, p in self.named_parameters() if p.requires_grad}
        decay = [p for p in params.values() if p.dim() >= 2]
        nodecay = [p for p in params.values() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": nodecay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--no-scaler", action="store_true", help="GradScaler(enabled=False), as with bf16")
    ap.add_argument("--fused", action="store_true")
    ap.add_argument("--nan-at", type=int, default=-1)
    ap.add_argument("--spike-at", type=int, default=-1, help="one micro-batch loss x 1e4")
    ap.add_argument("--skip-above", type=float, default=None,
                    help="skip the step itself when the clip's norm is non-finite or above this")
    ap.add_argument("--dump", default=None)
    args = ap.parse_args()

    torch.manual_seed(1337)
    text = Path(json.__file__).with_name("decoder.py").read_text()
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text], dtype=torch.long)

    def get_batch() -> tuple[torch.Tensor, torch.Tensor]:
        ix = torch.randint(len(data) - args.block - 1, (args.batch,))
        x = torch.stack([data[i:i + args.block] for i in ix])
        return x, torch.stack([data[i + 1:i + 1 + args.block] for i in ix])

    model = GPT(len(chars), args.block, n_layer=2, n_head=2, n_embd=32)
    optimizer = model.configure_optimizers(0.1, args.lr, (0.9, 0.95), args.fused)
    scaler = torch.amp.GradScaler("cpu", enabled=not args.no_scaler)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16)
    warmup = max(1, args.iters // 10)

    def get_lr(it: int) -> float:
        if it < warmup:
            return args.lr * (it + 1) / warmup
        ratio = (it - warmup) / max(1, args.iters - warmup)
        return args.lr * 0.1 + 0.5 * (1 + math.cos(math.pi * ratio)) * args.lr * 0.9

    records = []
    X, Y = get_batch()
    for it in range(args.iters):
        for group in optimizer.param_groups:
            group["lr"] = get_lr(it)
        total = 0.0
        for _ in range(args.accum):
            with ctx:
                _, loss = model(X, Y)
                loss = loss / args.accum
            if it == args.nan_at:
                loss = loss * float("nan")  # a corrupted batch
            if it == args.spike_at:
                loss = loss * 1e4
            X, Y = get_batch()
            total += loss.item()
            scaler.scale(loss).backward()
        rec = {"loss": total}
        if args.grad_clip != 0.0:
            scaler.unscale_(optimizer)
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            rec["true_norm"] = torch.nn.utils.get_total_norm(grads).item()
            rec["returned_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip).item()
            if args.skip_above is not None and not rec["returned_norm"] <= args.skip_above:
                optimizer.zero_grad(set_to_none=True)  # the script's own skip
                scaler.update()
                records.append(rec)
                continue
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        records.append(rec)
    model.eval()
    with torch.no_grad():
        _, val = model(*get_batch())
    weights = b"".join(p.detach().numpy().tobytes() for p in model.parameters())
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    print(f"nanogpt_like: {args.iters} iters, final eval loss {val.item():.4f}, weights finite: {finite}")
    if args.dump:
        Path(args.dump).write_text(json.dumps({
            "steps": records, "digest": hashlib.sha256(weights).hexdigest(), "finite": finite,
            "scale": scaler.get_scale() if scaler.is_enabled() else None,
        }))


if __name__ == "__main__":
    main()
