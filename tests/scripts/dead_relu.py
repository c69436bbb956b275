"""A user's script whose ReLUs die: the digits at 100x their scale (no normalisation), a
ReLU MLP on SGD momentum. The first updates are too large, every layer but the head stops
getting a gradient within ~70 steps, and the loss sits at chance (2.30), under its first
loss (huge inputs make the fresh model worse than chance). No NaN, no spike."""

import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=300)
ap.add_argument("--scale", type=float, default=100.0)
args = ap.parse_args()

d = load_digits()
X = torch.tensor(d.data, dtype=torch.float32) * args.scale / 16.0
Y = torch.tensor(d.target)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                      nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
g = torch.Generator().manual_seed(0)
for _step in range(args.steps):
    idx = torch.randint(0, len(X), (32,), generator=g)
    loss = F.cross_entropy(model(X[idx]), Y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
print(f"final loss {loss.item():.3f}")
