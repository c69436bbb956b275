"""A user's script whose batches change mid-run: a digits MLP on Adam learns the digits 0-4
for 250 steps, then all ten (a curriculum's next stage). The loss jumps from ~0.01 to ~5
at the change, with gradients to match. Prints the held-out loss on all ten digits."""

import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=600)
ap.add_argument("--change", type=int, default=250)
args = ap.parse_args()

x_all, y_all = load_digits(return_X_y=True)
X = torch.tensor(x_all, dtype=torch.float32) / 16
Y = torch.tensor(y_all)
first = (Y[:1400] < 5).nonzero().squeeze(1)
every = torch.arange(1400)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                      nn.Linear(128, 10))
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
g = torch.Generator().manual_seed(0)
for step in range(args.steps):
    pool = first if step < args.change else every
    i = pool[torch.randint(len(pool), (64,), generator=g)]
    loss = F.cross_entropy(model(X[i]), Y[i])
    opt.zero_grad()
    loss.backward()
    opt.step()
with torch.no_grad():
    held_out = F.cross_entropy(model(X[1400:]), Y[1400:]).item()
print(f"held-out loss {held_out:.4f}")
