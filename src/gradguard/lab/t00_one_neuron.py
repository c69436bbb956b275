"""T0 — the 20-layer network with one neuron per layer (Nielsen, *Neural Networks and Deep
Learning*, ch. 5): the gradient at layer 1 is the product of 19 factors ``w * act'(z)``.

With ``w = 1`` a sigmoid contributes at most 0.25 per layer (vanishes by orders of
magnitude), tanh a factor near 1 that still shrinks, ReLU exactly 1; with ``w = 3`` a ReLU
chain multiplies the gradient by 3 per layer (explodes, 3**19 ≈ 1e9). The figure is the
bias gradient ``dC/db`` of each layer (the backpropagated delta), as in Nielsen's chapter.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from ._common import Result, param_grad_norms, pyplot, save

DEPTH = 20
#: (name, activation, weight) of each configuration; biases are 0, the input is 1.
CONFIGS: tuple[tuple[str, type[nn.Module], float], ...] = (
    ("sigmoid", nn.Sigmoid, 1.0),
    ("tanh", nn.Tanh, 1.0),
    ("relu", nn.ReLU, 1.0),
    ("relu_w3", nn.ReLU, 3.0),
)


def chain(act: type[nn.Module], weight: float, depth: int = DEPTH) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        lin = nn.Linear(1, 1)
        nn.init.constant_(lin.weight, weight)
        nn.init.zeros_(lin.bias)
        layers += [lin, act()]
    return nn.Sequential(*layers)


def run(out: Path, fast: bool = False) -> Result:
    res = Result("T0", "The 20-layer, one-neuron-per-layer network", fast)
    batch = (torch.ones(1, 1), torch.zeros(1, 1))

    def loss_fn(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # d loss / d output = 1: the layer gradients are the chain's products themselves
        return (o - t).sum()

    per: dict[str, list[float]] = {}
    ratio: dict[str, float] = {}
    for name, act, w in CONFIGS:
        names, norms = param_grad_norms(chain(act, w), batch, loss_fn)
        # the bias gradient of a layer is its backpropagated delta (Nielsen's dC/db)
        per[name] = [g for n, g in zip(names, norms.tolist()) if n.endswith(".bias")]
        ratio[name] = per[name][0] / per[name][-1] if per[name][-1] > 0 else math.nan
    res.figures = {
        "grad_layer1": {k: v[0] for k, v in per.items()},
        "grad_layer20": {k: v[-1] for k, v in per.items()},
        "ratio_layer1_to_layer20": ratio,
        "per_layer_grad_norm": per,
    }
    res.claim(
        "sigmoid_vanishes",
        "sigmoid: gradient at layer 1 is orders of magnitude below layer 20",
        measured=ratio["sigmoid"],
        reference=0.25**19,
        criterion="layer1/layer20 < 1e-6",
        passed=ratio["sigmoid"] < 1e-6,
    )
    res.claim(
        "tanh_between",
        "tanh: vanishes too, but far less than sigmoid",
        measured=ratio["tanh"],
        reference=None,
        criterion="sigmoid ratio < tanh ratio < 1",
        passed=ratio["sigmoid"] < ratio["tanh"] < 1.0,
    )
    res.claim(
        "relu_preserves",
        "ReLU (w=1): gradient preserved through 20 layers",
        measured=ratio["relu"],
        reference=1.0,
        criterion="0.5 <= layer1/layer20 <= 2",
        passed=0.5 <= ratio["relu"] <= 2.0,
    )
    res.claim(
        "w3_explodes",
        "weights of 3.0: gradient explodes toward layer 1",
        measured=ratio["relu_w3"],
        reference=3.0**19,
        criterion="layer1/layer20 > 1e6",
        passed=ratio["relu_w3"] > 1e6,
    )
    plt = pyplot()
    fig, axes = plt.subplots(1, len(CONFIGS), figsize=(12, 3), sharey=True)
    for ax, (name, _, w) in zip(axes, CONFIGS):
        ax.bar(range(1, DEPTH + 1), per[name])
        ax.set_yscale("log")
        ax.set_title(f"{name} (w={w:g})")
        ax.set_xlabel("layer")
    axes[0].set_ylabel("|dC/db| (telemetry)")
    save(fig, out, "per_layer_grad.png", res)
    return res
