"""A training loop over plain tensors (no nn.Module, no nn.Parameter), with value clipping.

    python tests/scripts/plain_tensor.py --steps 30
    gradguard run tests/scripts/plain_tensor.py --steps 30 --nan-at 10

``--nan-at STEP`` puts a NaN in one batch; ``--dump FILE`` writes the true pre-clip
gradient norm of each step and a digest of the final weights.
"""

import argparse
import hashlib
import json
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--clip-value", type=float, default=0.05)
    ap.add_argument("--nan-at", type=int, default=-1)
    ap.add_argument("--dump", default=None)
    args = ap.parse_args()

    torch.manual_seed(0)
    w1 = (torch.randn(8, 16) * 0.3).requires_grad_()
    b1 = torch.zeros(16, requires_grad=True)
    w2 = (torch.randn(16, 1) * 0.3).requires_grad_()
    params = [w1, b1, w2]
    opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9)
    records = []
    for step in range(args.steps):
        x = torch.randn(32, 8)
        y = x.sum(dim=1, keepdim=True).sin()
        if step == args.nan_at:
            x[0, 0] = float("nan")
        loss = ((torch.tanh(x @ w1 + b1) @ w2 - y) ** 2).mean()
        loss.backward()
        true = torch.nn.utils.get_total_norm([p.grad for p in params]).item()
        torch.nn.utils.clip_grad_value_(params, args.clip_value)
        opt.step()
        opt.zero_grad()
        records.append({"loss": loss.item(), "true_norm": true})
    weights = b"".join(p.detach().numpy().tobytes() for p in params)
    finite = all(bool(torch.isfinite(p).all()) for p in params)
    print(f"plain_tensor: {args.steps} steps, weights finite: {finite}")
    if args.dump:
        Path(args.dump).write_text(json.dumps({
            "steps": records, "digest": hashlib.sha256(weights).hexdigest(), "finite": finite}))


if __name__ == "__main__":
    main()
