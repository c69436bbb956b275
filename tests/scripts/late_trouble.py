"""A digits MLP on Adam whose LR the script raises 30x at --jump-at (a user's mistake late in
a run); it saves its weights when its loop ends, and again at interpreter exit (an atexit
handler, after gradguard run has closed its guards)."""

import argparse
import atexit
import os

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

p = argparse.ArgumentParser()
p.add_argument("--seed", type=int, default=1)
p.add_argument("--steps", type=int, default=300)
p.add_argument("--jump-at", type=int, default=250)
p.add_argument("--out", required=True)
args = p.parse_args()
torch.manual_seed(args.seed)
X, y = load_digits(return_X_y=True)
X, y = torch.tensor(X, dtype=torch.float32) / 16.0, torch.tensor(y)
model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(),
                      nn.Linear(256, 10))
os.makedirs(args.out, exist_ok=True)
atexit.register(lambda: torch.save(model.state_dict(), os.path.join(args.out, "atexit.pt")))
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
gen = torch.Generator().manual_seed(args.seed)
for step in range(args.steps):
    if step == args.jump_at:
        for group in opt.param_groups:
            group["lr"] *= 30
    idx = torch.randint(0, 1400, (32,), generator=gen)
    F.cross_entropy(model(X[idx]), y[idx]).backward()
    opt.step()
    opt.zero_grad()
torch.save(model.state_dict(), os.path.join(args.out, "final.pt"))
