"""GAN-style alternating optimizers: a tiny generator and discriminator on 2-D data.

Each iteration steps the discriminator, then the generator (each with its own backward).

    gradguard run --clip zclip examples/gan.py --steps 40
"""

import argparse

import torch
from torch import nn


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()

    torch.manual_seed(0)
    gen = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 2))
    disc = nn.Sequential(nn.Linear(2, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1))
    opt_g = torch.optim.Adam(gen.parameters(), lr=2e-3, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=2e-3, betas=(0.5, 0.999))
    bce = nn.BCEWithLogitsLoss()
    ones, zeros = torch.ones(64, 1), torch.zeros(64, 1)
    for _ in range(args.steps):
        real = torch.randn(64, 2) * 0.5 + torch.tensor([2.0, -1.0])
        fake = gen(torch.randn(64, 4))
        # discriminator step
        d_loss = bce(disc(real), ones) + bce(disc(fake.detach()), zeros)
        d_loss.backward()
        opt_d.step()
        opt_d.zero_grad()
        # generator step (the discriminator's grads from it are zeroed before its next step)
        g_loss = bce(disc(fake), ones)
        g_loss.backward()
        opt_g.step()
        opt_g.zero_grad()
        opt_d.zero_grad()
    print(f"gan: {args.steps} iterations, d_loss {d_loss.item():.3f}, g_loss {g_loss.item():.3f}")


if __name__ == "__main__":
    main()
