"""A GAN under the guards a stranger writes: ``gg.Guard(G, opt_G)`` and ``gg.Guard(D, opt_D)``
with their defaults, on the classic 8-Gaussian ring, against the same loop unguarded.

Run:  OMP_NUM_THREADS=1 python benchmarks/gan.py [--seeds N] [--steps N] [--out F]
Writes benchmarks/results/gan.json (about 2 minutes).

An adversarial objective is no loss to minimise: the generator's loss rises as the
discriminator sharpens, and both gradient norms grow while the game goes well. Measured:
the samples' quality (the share within 0.3 of a mode, and how many of the 8 modes they
cover) guarded and unguarded, and every warning-level event the guards raised. The early
warning (``divergence_risk``) reads a growing gradient norm on a loss that does not fall
as a precursor of divergence: on this objective it is a false alarm (docs/early-warning.md,
"Adversarial objectives"); ``DetectorConfig(precursors=None)`` turns it off, as
``Recovery(loss_rise=False)`` turns off the loss-rise test.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import gradguard as gg
from gradguard.detectors import DetectorConfig

OUT = Path(__file__).parent / "results" / "gan.json"
MODES = torch.tensor([[2 * math.cos(2 * math.pi * k / 8), 2 * math.sin(2 * math.pi * k / 8)]
                      for k in range(8)])


def run(seed: int, steps: int, guards: str) -> dict[str, Any]:
    """One GAN run; ``guards``: "none", "default" (``gg.Guard(model, opt)``), "rescue" (the
    guard that fixes runs: ZClip and a Recovery), "rescue_no_loss_rise" (the same with
    ``Recovery(loss_rise=False)``) or "no_precursors"."""
    torch.manual_seed(seed)
    gen = nn.Sequential(nn.Linear(8, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                        nn.Linear(128, 2))
    disc = nn.Sequential(nn.Linear(2, 128), nn.LeakyReLU(0.2), nn.Linear(128, 128),
                         nn.LeakyReLU(0.2), nn.Linear(128, 1))
    opt_g = torch.optim.Adam(gen.parameters(), lr=1e-3, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-3, betas=(0.5, 0.999))
    def guard(model: nn.Module, opt: torch.optim.Optimizer) -> gg.Guard:
        if guards.startswith("rescue"):  # each guard its own policy and recovery
            rec = gg.Recovery(loss_rise=guards == "rescue")
            return gg.Guard(model, opt, clip=gg.ZClip(), recovery=rec)
        if guards == "no_precursors":
            return gg.Guard(model, opt, detector_config=DetectorConfig(precursors=None))
        return gg.Guard(model, opt)

    pair = {"G": guard(gen, opt_g), "D": guard(disc, opt_d)} if guards != "none" else {}
    g = torch.Generator().manual_seed(seed)
    aborted = None
    try:
        train(gen, disc, opt_g, opt_d, pair, g, steps)
    except gg.TrainingDiverged as e:
        aborted = str(e).splitlines()[0]
    with torch.no_grad():
        x = gen(torch.randn(2000, 8, generator=torch.Generator().manual_seed(99)))
        d = torch.cdist(x, MODES)
        near = d.min(1).values < 0.3
        covered = len(set(d.argmin(1)[near].tolist()))
    out: dict[str, Any] = {"seed": seed, "guards": guards,
                           "near_a_mode": round(near.float().mean().item(), 4),
                           "modes_covered": covered, "aborted": aborted, "warnings": []}
    for name, guard in pair.items():
        guard.close()
        out["warnings"] += [{"guard": name, "kind": e.kind, "step": e.step, "message": e.message}
                            for e in guard.events if e.severity != "info"]
    return out


def train(gen: nn.Module, disc: nn.Module, opt_g: torch.optim.Optimizer,
          opt_d: torch.optim.Optimizer, pair: dict[str, gg.Guard], g: torch.Generator,
          steps: int) -> None:
    """The usual loop: a discriminator step, then a generator step, per batch."""
    bce = nn.functional.binary_cross_entropy_with_logits
    ones, zeros = torch.ones(128, 1), torch.zeros(128, 1)
    for _ in range(steps):
        real = MODES[torch.randint(0, 8, (128,), generator=g)]
        real = real + 0.05 * torch.randn(128, 2, generator=g)
        z = torch.randn(128, 8, generator=g)
        loss_d = bce(disc(real), ones) + bce(disc(gen(z).detach()), zeros)
        opt_d.zero_grad()
        loss_d.backward()
        pair["D"].step(loss_d) if pair else opt_d.step()
        loss_g = bce(disc(gen(z)), ones)
        opt_g.zero_grad()
        loss_g.backward()
        pair["G"].step(loss_g) if pair else opt_g.step()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    runs = [run(seed, args.steps, guards) for seed in range(args.seeds)
            for guards in ("none", "default", "rescue", "rescue_no_loss_rise", "no_precursors")]
    out = {"torch": torch.__version__, "threads": torch.get_num_threads(), "steps": args.steps,
           "runs": runs, "seconds": round(time.perf_counter() - t0, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    for r in runs:
        kinds = [f"{w['guard']}:{w['kind']}@{w['step']}" for w in r["warnings"]]
        print(f"seed {r['seed']} {r['guards']:<14} near a mode {r['near_a_mode']:.3f}, "
              f"{r['modes_covered']}/8 modes; warnings: {kinds or 'none'}"
              + (f"; ABORTED: {r['aborted']}" if r["aborted"] else ""))
    print(f"wrote {args.out} in {out['seconds']} s")
    return out


if __name__ == "__main__":
    main()
