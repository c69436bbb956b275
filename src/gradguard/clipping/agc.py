"""Adaptive gradient clipping (AGC), unit-wise, from Brock et al. 2021."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import torch
from torch import Tensor

from ..telemetry import StepStats
from .base import Policy, check_positive, ratio_coef

# AGC defaults (Brock et al. 2021, "High-Performance Large-Scale Image Recognition Without
# Normalization", Sec. 4.1: lambda = 0.01 for batch 4096, eps = 1e-3).
AGC_CLIPPING = 0.01
AGC_EPS = 1e-3


def unitwise_norm(x: Tensor) -> Tensor:
    """Norm per output unit: the whole tensor for scalars/vectors, else over all dims but 0
    (PyTorch layouts put output units first: Linear ``[out, in]``, Conv ``[out, in, kh, kw]``)."""
    if x.ndim <= 1:
        return torch.linalg.vector_norm(x.float())
    return torch.linalg.vector_norm(x.float(), dim=tuple(range(1, x.ndim)), keepdim=True)


class AGC(Policy):
    """Adaptive gradient clipping, unit-wise: ``G_i <- G_i * min(1, lambda ||W_i|| / ||G_i||)``
    with ``||W_i||`` floored at ``eps``.

    Args:
        clipping: lambda > 0 (paper: 0.01 for large batches; larger for small batches).
        eps: floor for the weight norm (paper: 1e-3), so zero-initialised weights can move.
        exclude: parameter-name patterns left unclipped (exact module path, a prefix, or
            an ``fnmatch`` pattern). ``None`` excludes the last module that has parameters,
            usually the classifier, as the paper recommends. Requires names: pass a module
            or ``named_parameters()``.

    References:
        Brock, De, Smith, Simonyan. "High-Performance Large-Scale Image Recognition Without
        Normalization." ICML 2021. arXiv:2102.06171.

    Example:
        >>> import torch, gradguard as gg
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        >>> net(torch.ones(1, 4)).sum().backward()
        >>> _ = gg.AGC(clipping=0.01).clip_(net)   # net.1 (the head) is left alone
    """

    scalar = False

    def __init__(
        self,
        clipping: float = AGC_CLIPPING,
        eps: float = AGC_EPS,
        exclude: Sequence[str] | None = None,
    ) -> None:
        self.clipping = check_positive("clipping", clipping, "AGC")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps < 0:
            raise ValueError(f"AGC(eps={eps!r}): must be a number >= 0")
        self.eps = float(eps)
        if isinstance(exclude, str):
            raise TypeError(
                f"AGC(exclude={exclude!r}): pass a sequence of names, e.g. ({exclude!r},)"
            )
        self.exclude = None if exclude is None else tuple(exclude)

    def _excluded(self, names: Sequence[str]) -> list[bool]:
        if self.exclude is None:
            # the last module (by registration order) that owns parameters
            heads = [n.rpartition(".")[0] for n in names]
            last = heads[-1] if heads else None
            return [h == last and len(set(heads)) > 1 for h in heads]
        out = []
        for n in names:
            out.append(
                any(n == p or n.startswith(p + ".") or fnmatch.fnmatch(n, p) for p in self.exclude)
            )
        return out

    def apply_(self, stats: StepStats) -> Tensor:
        excluded = self._excluded(stats.names)
        device = stats.total_norm.device
        post_sq = torch.zeros((), device=device)
        pre = stats.param_norms.float().to(device)
        for grp in stats.groups:
            for i, p, g in zip(grp.index, grp.params, grp.grads):
                if excluded[i]:
                    post_sq = post_sq + pre[i] ** 2
                    continue
                w_norm = unitwise_norm(p.detach()).clamp_min(self.eps) * self.clipping
                g_norm = unitwise_norm(g)
                trigger = g_norm > w_norm
                scale = torch.where(
                    trigger, w_norm / g_norm.clamp_min(1e-6), torch.ones_like(g_norm)
                )
                scale = torch.where(torch.isfinite(g_norm), scale, torch.ones_like(scale))
                g.mul_(scale.to(g.dtype))
                post_sq = post_sq + (torch.minimum(g_norm, w_norm) ** 2).sum().to(device)
        return ratio_coef(post_sq.sqrt(), stats)

    def __repr__(self) -> str:
        return f"AGC(clipping={self.clipping}, eps={self.eps}, exclude={self.exclude})"
