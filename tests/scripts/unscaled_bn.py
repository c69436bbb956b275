"""A user's script where some batches never got their /16 (the digits' pixels, 0-16, in
another unit than the rest: 0-1): a BatchNorm CNN on AdamW. Behind the batch norm layer
those batches train like any other (the layer divides the scale out), so the loss and
the gradients never show them; only the running variance takes them in, and the eval()
model answers garbage. Prints the held-out loss."""

import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=150)
ap.add_argument("--bad", type=float, default=0.05, help="share of batches left unscaled")
args = ap.parse_args()

d = load_digits()
X = torch.tensor(d.data, dtype=torch.float32).view(-1, 1, 8, 8)
Y = torch.tensor(d.target)
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                      nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, 10))
opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
g = torch.Generator().manual_seed(7)
for _step in range(args.steps):
    idx = torch.randint(0, 1400, (64,), generator=g)
    x = X[idx] if torch.rand((), generator=g).item() < args.bad else X[idx] / 16
    loss = F.cross_entropy(model(x), Y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
model.eval()
with torch.no_grad():
    held_out = F.cross_entropy(model(X[1400:] / 16), Y[1400:]).item()
print(f"held-out loss {held_out:.4f}")
