"""T2 — Glorot's variance argument (Glorot & Bengio 2010, "Understanding the difficulty of
training deep feedforward neural networks", Sec. 4.2).

Five hidden layers of 1000 units. With the "standard" init ``U(-1/sqrt(n), 1/sqrt(n))``
(``n * Var(W) = 1/3``) the back-propagated gradient shrinks by about ``sqrt(1/3)`` per
layer on the way down; the "normalised" init ``U(±sqrt(6/(n_in+n_out)))`` keeps
``n * Var(W) = 1`` and the gradient std nearly constant. Sigmoid adds a factor <= 0.25 per
layer. The figure is the ratio of the back-propagated gradient (the bias gradients
``dC/db``, measured with gradguard's telemetry) between the last and the first hidden layer.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from ._common import Result, param_grad_norms, pyplot, save

DEPTH = 5


def net(act: type[nn.Module], init: str, width: int, d_in: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    d = d_in
    for _ in range(DEPTH):
        lin = nn.Linear(d, width)
        nn.init.zeros_(lin.bias)
        if init == "standard":
            nn.init.uniform_(lin.weight, -1 / math.sqrt(d), 1 / math.sqrt(d))
        else:
            nn.init.xavier_uniform_(lin.weight)
        layers += [lin, act()]
        d = width
    layers.append(nn.Linear(d, 10))
    return nn.Sequential(*layers)


def run(out: Path, fast: bool = False) -> Result:
    res = Result("T2", "Glorot's variance argument (5 x 1000 tanh / sigmoid)", fast)
    width, bs = (256, 64) if fast else (1000, 256)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(bs, width, generator=g)
    y = torch.randint(0, 10, (bs,), generator=g)
    loss_fn = nn.CrossEntropyLoss()
    ratios: dict[str, float] = {}
    profiles: dict[str, list[float]] = {}
    for act in (nn.Tanh, nn.Sigmoid):
        for init in ("standard", "normalised"):
            key = f"{act.__name__.lower()}_{init}"
            names, norms = param_grad_norms(net(act, init, width, width, 0), (x, y), loss_fn)
            b = [v for n, v in zip(names, norms.tolist()) if n.endswith(".bias")][:DEPTH]
            profiles[key] = b
            ratios[key] = b[-1] / b[0]
    res.figures = {"ratio_last_to_first": ratios, "bias_grad_norm_by_layer": profiles}
    t_std, t_norm = ratios["tanh_standard"], ratios["tanh_normalised"]
    s_std = ratios["sigmoid_standard"]
    res.claim(
        "tanh_standard_shrinks",
        "tanh, standard init: gradient std shrinks ~12x from the last to the first layer",
        measured=t_std,
        reference=12.0,
        criterion="6 <= ratio <= 24",
        passed=6.0 <= t_std <= 24.0,
    )
    res.claim(
        "tanh_normalised_flat",
        "tanh, normalised init: gradient std nearly constant across layers",
        measured=t_norm,
        reference=1.4,
        criterion="ratio < 3 and standard/normalised > 3",
        passed=t_norm < 3.0 and t_std / t_norm > 3.0,
    )
    res.claim(
        "sigmoid_standard_vanishes",
        "sigmoid, standard init: gradient std shrinks by three orders of magnitude",
        measured=s_std,
        reference=2660.0,
        criterion="ratio > 500",
        passed=s_std > 500.0,
    )
    if t_norm > 2.0:
        res.notes.append(
            f"normalised tanh ratio {t_norm:.2f} is above the reference 1.4: the figure is "
            "the batch-mean bias gradient on random inputs, not Glorot's Shapeset activations"
        )
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for key, prof in profiles.items():
        ax.plot(range(1, DEPTH + 1), prof, marker="o", label=key)
    ax.set_yscale("log")
    ax.set_xlabel("hidden layer")
    ax.set_ylabel("|dC/db| (telemetry)")
    ax.legend(fontsize=7)
    save(fig, out, "grad_by_layer.png", res)
    return res
