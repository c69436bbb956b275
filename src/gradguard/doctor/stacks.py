"""Probe: stacks of repeated blocks (transformer layers, residual stages, mixer blocks),
compared block to block.

A residual block adds its branch ``f(x)`` to the stream ``x``. The chain of weight layers
cannot see two failures of residual stacks, because the identity path keeps the trunk
gradient alive:

* **inert blocks**: every block changes the stream by a tiny fraction (``|f(x)|/|x|``
  below :data:`INERT_RATIO`). When all the weights of a branch are too small, the gradient
  of each is proportional to the others: the blocks sit at a saddle and a GPT-2 with
  weights x0.01 does not learn. A branch that starts at 0 on purpose -- one factor set to
  a small constant: a zero-initialised last BN gain (timm's ``zero_init_last``), ConvNeXt's
  layer scale 1e-6, ReZero's 0 -- gets a full gradient on that factor and trains; such
  blocks are recognised by that constant factor and left alone.
* **a stream that grows block over block**: each block multiplies the stream by more than
  :data:`STREAM_GROWTH` (a too-large init in every block; additive growth of a healthy
  pre-LN stack slows down as the stream grows).

Stacks are found in the module tree: two or more sibling modules of one class that each hold
two or more weight layers and are each called once.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from torch import nn

from ._capture import Call, Capture, is_weight_layer
from ._report import Finding
from ._weights import constant_gates, weight_stats

#: |f(x)|/|x| below this is a block that does not change the stream (healthy blocks of
#: transformers' ViT, GPT-2 and Llama at their own init: 0.1-0.7; at weights x0.01
#: 0.0003-0.0014, and at 1e-3 the ViT's and Llama's were missed, 1 and 0 of their 4 blocks
#: under it, while they trained to 2.5x and 1.14x their twin's loss: found by a stranger)
INERT_RATIO = 5e-3
#: the share of a stack's blocks that must be inert before the stack is
INERT_SHARE = 0.5
#: the stream growing by more than this factor through each block (median over the stack,
#: the first block excluded: it may start from a small embedding) is a too-large init
STREAM_GROWTH = 2.5
#: fewest blocks a stack needs to be judged
MIN_BLOCKS = 2


def find_stacks(model: nn.Module) -> dict[str, list[str]]:
    """Parent path -> paths of its repeated blocks (same class, two+ weight layers each)."""
    out: dict[str, list[str]] = {}
    for name, m in model.named_modules():
        groups: dict[type, list[str]] = {}
        for k, child in m.named_children():
            if sum(1 for sub in child.modules() if is_weight_layer(sub)) >= 2:
                groups.setdefault(type(child), []).append(f"{name}.{k}" if name else k)
        for cls, paths in groups.items():
            if len(paths) >= MIN_BLOCKS:
                out[f"{name}.{cls.__name__}" if name else cls.__name__] = paths
    return out


def _blocks(cap: Capture, paths: list[str]) -> list[Call]:
    by_path = {c.path: c for c in cap.calls if cap.call_count.get(c.path) == 1}
    return [by_path[p] for p in paths if p in by_path]


def _weights_under(model: nn.Module, calls: list[Call], prefix: str) -> list[tuple[str, float, float]]:
    """(path, std, 1/sqrt(fan_in)) of the weight layers inside the blocks."""
    rows = []
    for c in calls:
        if c.path.startswith(prefix) and is_weight_layer(c.module) and not isinstance(c.module, nn.Embedding):
            std, fan_in, _ = weight_stats(c.module, c.in_features)
            rows.append((c.path, std, 1.0 / math.sqrt(max(1, fan_in))))
    return rows


def probe_stacks(cap: Capture, model: nn.Module, stacks: dict[str, list[str]]) -> list[Finding]:
    gates = constant_gates(model)
    found: list[Finding] = []
    for paths in stacks.values():
        blocks = _blocks(cap, paths)
        if len(blocks) < MIN_BLOCKS:
            continue
        parent = paths[0].rpartition(".")[0]
        f = _inert(cap, model, parent, blocks, gates) or _growth(parent, blocks)
        if f is not None:
            found.append(f)
    return found


def _inert(cap: Capture, model: nn.Module, parent: str, blocks: list[Call], gates: dict[str, float]) -> Finding | None:
    ratios = [(b, b.delta_rms / b.in_rms) for b in blocks if b.delta_rms is not None and b.in_rms > 0]
    if len(ratios) < MIN_BLOCKS:
        return None
    inert = [(b, r) for b, r in ratios if r < INERT_RATIO]
    gated = [b for b, _ in inert if any(g.startswith(b.path + ".") for g in gates)]
    stuck = [(b, r) for b, r in inert if b not in gated]
    if len(stuck) < max(MIN_BLOCKS, INERT_SHARE * len(ratios)):
        return None
    med = statistics.median(r for _, r in stuck)
    rows = [row for b, _ in stuck for row in _weights_under(model, cap.calls, b.path + ".")]
    ev: dict[str, Any] = {
        "blocks": len(ratios),
        "inert_blocks": len(stuck),
        "median_update_ratio": med,
        "threshold": INERT_RATIO,
    }
    where = parent or None
    advice = "re-initialise them at the scale their library uses (std 0.02 for transformers, He/Xavier otherwise)"
    if rows:
        path, std, ref = min(rows, key=lambda r: r[1] / r[2])
        ev.update(worst_layer=path, worst_layer_std=std, lecun_std=ref, factor=ref / max(std, 1e-30))
        advice += f"; `{path}` has std {std:.3g}, {ref / max(std, 1e-30):.3g}x below 1/sqrt(fan_in) = {ref:.3g}"
    return Finding(
        "init_too_small",
        "error" if med < INERT_RATIO**2 else "warning",
        where,
        ev,
        f"{len(stuck)} of {len(ratios)} blocks of `{parent or 'model'}` change their input by only "
        f"{med:.2g}x its size (median |f(x)|/|x|): their weights are too small for the blocks to "
        f"contribute or to get gradients (each weight's gradient is proportional to the others); "
        f"{advice}.",
        0.8,
    )


def _growth(parent: str, blocks: list[Call]) -> Finding | None:
    steps = [b.out_rms / b.in_rms for b in blocks[1:] if b.in_rms > 0 and math.isfinite(b.out_rms)]
    same = all(b.out is not None and blocks[0].out is not None and b.out.shape == blocks[0].out.shape for b in blocks)
    if len(steps) < MIN_BLOCKS or not same:
        return None
    med = statistics.median(steps)
    if not med > STREAM_GROWTH:
        return None
    total = blocks[-1].out_rms / blocks[0].in_rms if blocks[0].in_rms > 0 else math.inf
    return Finding(
        "init_too_large",
        "error" if med > STREAM_GROWTH**2 else "warning",
        parent or None,
        {"blocks": len(blocks), "median_growth_per_block": med, "stream_growth": total, "threshold": STREAM_GROWTH},
        f"the stream through the {len(blocks)} blocks of `{parent or 'model'}` grows {med:.3g}x per "
        f"block ({total:.3g}x in all): each block's branch is larger than its input; re-init their "
        f"weights at 1/sqrt(fan_in) scale (gg.init.apply_(model, 'xavier')) or scale the last "
        f"layer of each branch down (e.g. by 1/sqrt(2 x blocks), as GPT-2 does).",
        0.75,
    )
