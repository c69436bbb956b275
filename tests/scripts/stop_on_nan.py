"""An MLP whose script stops itself on a non-finite loss, after its backward and before
``optimizer.step()``, as scripts with their own NaN check do (``sys.exit(3)``)."""

import argparse
import math
import sys

import torch
from torch import nn

p = argparse.ArgumentParser()
p.add_argument("--nan-at", type=int, default=6)
args = p.parse_args()
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
for step in range(20):
    x = torch.randn(16, 8)
    if step == args.nan_at:
        x[0, 0] = math.nan
    loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
    loss.backward()
    if not math.isfinite(loss.item()):
        print(f"loss is {loss.item()} at step {step}: stopping")
        sys.exit(3)
    opt.step()
    opt.zero_grad()
