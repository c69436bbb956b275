"""A user's script whose gradients vanish: a deep sigmoid MLP (default init) on the digits,
plain SGD. At ``--depth 12`` the first layers' gradients are ~1e-9 of the last's and the
loss sits at chance (2.30) from first step to last; at ``--depth 1`` it learns. No NaN, no
spike."""

import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=300)
ap.add_argument("--depth", type=int, default=12)
args = ap.parse_args()

d = load_digits()
X = torch.tensor(d.data, dtype=torch.float32) / 16.0
Y = torch.tensor(d.target)
torch.manual_seed(0)
layers: list[nn.Module] = []
for _ in range(args.depth):
    layers += [nn.Linear(64, 64), nn.Sigmoid()]
model = nn.Sequential(*layers, nn.Linear(64, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.5)
g = torch.Generator().manual_seed(0)
for _step in range(args.steps):
    idx = torch.randint(0, len(X), (32,), generator=g)
    loss = F.cross_entropy(model(X[idx]), Y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
print(f"final loss {loss.item():.3f}")
