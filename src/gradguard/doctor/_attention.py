"""Attention entropy: how spread out each attention row is, relative to uniform.

At a healthy init the query-key logits are small and every query attends almost uniformly
over its keys: the entropy of a row is close to ``log(keys)``. Logits that are too large
(query/key weights too large, or a too-large LR step) make the softmax one-hot: the entropy
collapses and the gradient to the queries and keys vanishes with it (Zhai et al. 2023,
"Stabilizing Transformer Training by Preventing Attention Entropy Collapse"). It is measured
on explicit softmaxes over the last dim of a 4-D ``[batch, heads, queries, keys]`` tensor
and on ``F.scaled_dot_product_attention`` (recomputed on at most :data:`MAX_QUERIES` queries).

Example:
    >>> import torch
    >>> from gradguard.doctor._attention import normalized_entropy
    >>> round(normalized_entropy(torch.full((1, 1, 2, 8), 1 / 8)), 3)
    1.0
    >>> one_hot = torch.eye(8).reshape(1, 1, 8, 8)
    >>> round(normalized_entropy(one_hot, valid=torch.ones(8, 8, dtype=torch.bool)), 3)
    0.0
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

#: query rows an SDPA call is recomputed on (the cost is queries x keys per head)
MAX_QUERIES = 64
#: normalised entropy below this is a collapsed attention; at init the zoos' transformers
#: stay above 0.84 (T5, with its relative position bias), GPT-2 with weights of std 1
#: has 0.016
ATTENTION_COLLAPSE = 0.3
_SOFTMAX = {torch.softmax, F.softmax, Tensor.softmax, torch.special.softmax}


def valid_keys(logits: Tensor) -> Tensor:
    """Keys a query may attend to: logits not masked with -inf or the dtype's minimum."""
    return torch.isfinite(logits) & (logits > torch.finfo(logits.dtype).min / 2)


def normalized_entropy(p: Tensor, valid: Tensor | None = None) -> float:
    """Mean over rows with 2+ keys of ``H(row) / log(keys)``: 1 uniform, 0 one-hot. ``valid``
    marks the keys each row may attend to (broadcast to ``p``); by default those with p > 0."""
    with torch.no_grad():
        n = p.shape[-1]
        keys = (valid.expand_as(p) if valid is not None else p > 0).reshape(-1, n).sum(-1)
        p = p.detach().float().reshape(-1, n)
        rows = keys >= 2
        if not bool(rows.any()):
            return math.nan
        p = p[rows]
        h = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)
        return float((h / torch.log(keys[rows].float())).clamp(0, 1).mean())


def is_attention_softmax(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    try:
        if func not in _SOFTMAX:
            return False
    except TypeError:
        return False
    x = args[0]
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    return isinstance(x, Tensor) and x.ndim == 4 and dim in (-1, 3)


def sdpa_entropy(args: tuple[Any, ...], kwargs: dict[str, Any]) -> float:
    """The entropy of ``F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p,
    is_causal, scale, enable_gqa)`` recomputed on the last queries."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    a = dict(zip(names, args))
    a.update(kwargs)
    q, k = a["query"].detach().float(), a["key"].detach().float()
    if q.ndim < 3 or k.ndim != q.ndim:
        return math.nan
    if q.shape[-3] != k.shape[-3] and q.ndim == 4 and q.shape[-3] % k.shape[-3] == 0:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)  # grouped-query attention
    n_q, n_k = q.shape[-2], k.shape[-2]
    start = max(0, n_q - MAX_QUERIES)
    scale = a.get("scale") or 1.0 / math.sqrt(q.shape[-1])
    with torch.no_grad():
        logits = q[..., start:, :] @ k.transpose(-2, -1) * scale
        mask = a.get("attn_mask")
        if isinstance(mask, Tensor):
            mask = mask[..., start:, :] if mask.shape[-2] == n_q else mask
            logits = logits.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else logits + mask.float()
        if a.get("is_causal"):
            rows = torch.arange(start, n_q).unsqueeze(-1) + (n_k - n_q)
            logits = logits.masked_fill(torch.arange(n_k) > rows, -math.inf)
        return normalized_entropy(torch.softmax(logits, dim=-1), valid_keys(logits))


def attention_evidence(attention: list[tuple[str, float]]) -> dict[str, Any]:
    """Evidence for an init finding: the lowest and mean normalised attention entropy and
    where the lowest is; empty when no attention was seen."""
    if not attention:
        return {}
    where, low = min(attention, key=lambda a: a[1])
    return {
        "attention_entropy_min": low,
        "attention_entropy_mean": sum(h for _, h in attention) / len(attention),
        "attention_entropy_min_at": where,
        "attention_collapsed": low < ATTENTION_COLLAPSE,
    }
