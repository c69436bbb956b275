"""Adaptive gradient clipping (AGC), unit-wise, from Brock et al. 2021.

Computed per (device, dtype) group: one reduction per tensor for the weights' and the
gradients' unit norms (a whole-tensor ``_foreach_norm`` for vectors and scalars), then the
scales of every unit of the group in one vectorised pass and one ``_foreach_mul_`` to
apply them, instead of a dozen small kernels per parameter. Scales stay in float32 (float64
for float64 weights) up to the multiplication, so a float16 gradient is scaled by the true
factor, never by one that underflowed to 0.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..distributed import unwrap
from ..errors import GradGuardWarning, caller_stacklevel
from ..measure import GradGroup, StepStats, norm_dtype
from .base import Policy, check_positive, ratio_coef

# AGC defaults (Brock et al. 2021, "High-Performance Large-Scale Image Recognition Without
# Normalization", Sec. 4.1: lambda = 0.01 for batch 4096, eps = 1e-3).
AGC_CLIPPING = 0.01
AGC_EPS = 1e-3

#: Parameters whose output units are not on dim 0, by module type: ``{name: axis}``.
#: ConvTranspose weights are ``[in, out / groups, *kernel]``: the output units are dim 1
#: (within each group). Add an entry for a custom layer, or pass ``AGC(unit_axes=...)``.
OUTPUT_AXES: dict[type[nn.Module], dict[str, int]] = {
    nn.ConvTranspose1d: {"weight": 1},
    nn.ConvTranspose2d: {"weight": 1},
    nn.ConvTranspose3d: {"weight": 1},
}

#: (axis, groups) of the output units of a parameter.
Units = tuple[int, int]


def unit_axes(model: nn.Module) -> dict[str, Units]:
    """``{parameter name: (output axis, groups)}`` for the parameters of ``model`` whose
    output units are not on dim 0 (see :data:`OUTPUT_AXES`).

    Example:
        >>> import torch
        >>> from gradguard.clipping.agc import unit_axes
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3), torch.nn.ConvTranspose2d(8, 4, 3))
        >>> unit_axes(net)
        {'1.weight': (1, 1)}
    """
    out: dict[str, Units] = {}
    for mod_name, mod in model.named_modules():
        entry = next((OUTPUT_AXES[t] for t in type(mod).__mro__ if t in OUTPUT_AXES), None)
        for pname, axis in (entry or {}).items():
            out[f"{mod_name}.{pname}" if mod_name else pname] = (axis, int(getattr(mod, "groups", 1)))
    return out


def _unit_view(x: Tensor, units: Units) -> tuple[Tensor, tuple[int, ...]]:
    """``x`` viewed so that its output units are the dims *not* in the returned reduction
    dims (a view: scaling it in place scales ``x``)."""
    axis, groups = units
    if x.ndim <= 1:
        return x, tuple(range(x.ndim))
    if groups > 1 and axis == 1:
        # [in, out/g, *k] -> [g, in/g, out/g, *k]: a unit is (group, output channel)
        x = x.view(groups, x.shape[0] // groups, *x.shape[1:])
        return x, (1, *range(3, x.ndim))
    return x, tuple(d for d in range(x.ndim) if d != axis)


def unitwise_norm(x: Tensor, axis: int = 0, groups: int = 1) -> Tensor:
    """Norm per output unit, computed in at least float32, with the reduced dims kept: the
    whole tensor for scalars/vectors, else over every dim but ``axis`` (PyTorch layouts put
    output units first: Linear ``[out, in]``, Conv ``[out, in, kh, kw]``; ConvTranspose
    ``[in, out/groups, kh, kw]`` has ``axis=1``)."""
    view, dims = _unit_view(x, (axis, groups))
    return torch.linalg.vector_norm(
        view, dim=dims, keepdim=x.ndim > 1, dtype=norm_dtype(x.dtype, torch.float32)
    )


class AGC(Policy):
    """Adaptive gradient clipping, unit-wise: ``G_i <- G_i * min(1, lambda ||W_i|| / ||G_i||)``
    with ``||W_i||`` floored at ``eps``.

    Units are output units: rows of a Linear/Conv weight (dim 0), the output channels of a
    ConvTranspose weight (dim 1, per group), the whole tensor for biases and norms' scales.
    The ConvTranspose axis is found from the model's modules (:data:`OUTPUT_AXES`) when the
    policy sees the model: ``clip_(module)``, or the model of the Guard it is bound to.
    Sparse gradients (``nn.Embedding(sparse=True)``) are clipped per embedding row.

    Args:
        clipping: lambda > 0 (paper: 0.01 for large batches; larger for small batches).
        eps: floor for the weight norm (paper: 1e-3), so zero-initialised weights can move.
        exclude: parameter-name patterns left unclipped (exact module path, a prefix, or
            an ``fnmatch`` pattern). ``None`` excludes the last module that has parameters,
            usually the classifier, as the paper recommends. Requires names: pass a module
            or ``named_parameters()``.
        unit_axes: ``{parameter name: output axis}`` for parameters of layers not in
            :data:`OUTPUT_AXES` (overrides what is found from the model).

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
        *,
        unit_axes: Mapping[str, int] | None = None,
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
        given = dict(unit_axes or {})
        for name, axis in given.items():
            if isinstance(axis, bool) or not isinstance(axis, int) or axis < 0:
                raise ValueError(
                    f"AGC(unit_axes={{{name!r}: {axis!r}}}): an axis must be an int >= 0"
                )
        self._given: dict[str, Units] = {n: (a, 1) for n, a in given.items()}
        self._found: dict[str, Units] = {}
        self._cache: tuple[Any, list[bool], list[Units], Tensor] | None = None

    def attach_model(self, model: nn.Module) -> None:
        """Learn the output axes of ``model``'s parameters (see :data:`OUTPUT_AXES`)."""
        self._found = unit_axes(unwrap(model))
        self._cache = None

    def bind(self, owner: object) -> None:
        super().bind(owner)
        model = getattr(owner, "model", None)
        if isinstance(model, nn.Module):
            self.attach_model(model)

    def _units(self, name: str) -> Units:
        return self._given.get(name) or self._found.get(name) or (0, 1)

    def _excluded(self, names: Sequence[str]) -> list[bool]:
        if self.exclude is None:
            # the last module (by registration order) that owns parameters
            heads = [n.rpartition(".")[0] for n in names]
            last = heads[-1] if heads else None
            if len(heads) > 1 and len(set(heads)) == 1 and all(n.isdigit() for n in names) \
                    and not getattr(self, "_unnamed_said", False):
                # found by a stranger: AGC().clip_(model.parameters()) clipped the classifier
                # the docs say is left alone, without a word
                self._unnamed_said = True
                warnings.warn(
                    "AGC(exclude=None) leaves the last layer unclipped by its name, and these "
                    "parameters came without names (model.parameters(), a list): nothing is "
                    "excluded. Pass the module or model.named_parameters() to clip_, or "
                    "exclude=[] to clip every layer.", GradGuardWarning,
                    stacklevel=caller_stacklevel())
            return [h == last and len(set(heads)) > 1 for h in heads]
        def hit(n: str, p: str) -> bool:
            return n == p or n.startswith(p + ".") or fnmatch.fnmatch(n, p)

        named = not all(n.isdigit() for n in names)
        missed = [p for p in self.exclude if named and not any(hit(n, p) for n in names)]
        if missed and not getattr(self, "_missed_said", False):
            # found by a stranger: exclude=["fc.bais"] clipped the layer it meant to spare,
            # without a word
            self._missed_said = True
            warnings.warn(
                f"AGC(exclude={self.exclude!r}): {', '.join(map(repr, missed))} matches no "
                f"parameter name, so nothing is left unclipped by it; the names are like "
                f"{', '.join(map(repr, names[:3]))}{', ...' if len(names) > 3 else ''} "
                "(model.named_parameters()).", GradGuardWarning,
                stacklevel=caller_stacklevel())
        return [any(hit(n, p) for p in self.exclude) for n in names]

    def _scales(self, w_norm: Tensor, g_norm: Tensor) -> tuple[Tensor, Tensor]:
        """(scale per unit, post-clip sum of squares) from flat unit norms."""
        limit = w_norm.clamp_min(self.eps) * self.clipping
        clip = (g_norm > limit) & torch.isfinite(g_norm)
        scale = torch.where(clip, limit / g_norm.clamp_min(1e-6), torch.ones_like(g_norm))
        return scale, (torch.minimum(g_norm, limit) ** 2).sum()

    def _plan(self, stats: StepStats) -> tuple[list[bool], list[Units], Tensor]:
        """Per parameter: excluded?, unit layout; and the excluded positions as a device
        index (cached: built once per parameter list, so later steps copy nothing)."""
        key = (tuple(stats.names), stats.total_norm.device)
        if self._cache is None or self._cache[0] != key:
            excluded = self._excluded(stats.names)
            units = [self._units(n) for n in stats.names]
            idx = torch.tensor([i for i, x in enumerate(excluded) if x], dtype=torch.long)
            self._cache = (key, excluded, units, idx.to(key[1]))
        return self._cache[1], self._cache[2], self._cache[3]

    def _dense(self, grp: GradGroup, keep: list[int], units: list[Units]) -> Tensor | None:
        ws, gs, dims = [], [], []
        for k in keep:
            w, d = _unit_view(grp.params[k].detach(), units[grp.index[k]])
            g, _ = _unit_view(grp.grads[k], units[grp.index[k]])
            ws.append(w)
            gs.append(g)
            dims.append(d)
        if not ws:
            return None
        acc = norm_dtype(grp.dtype, torch.float32)
        w_n: list[Tensor] = []
        g_n: list[Tensor] = []
        flat = [k for k, w in enumerate(ws) if w.ndim <= 1]
        if flat:  # vectors and scalars: one whole-tensor norm each, all at once
            kw = {} if acc is None else {"dtype": acc}
            fw = dict(zip(flat, torch._foreach_norm([ws[k] for k in flat], 2.0, **kw)))
            fg = dict(zip(flat, torch._foreach_norm([gs[k] for k in flat], 2.0, **kw)))
        for k, w in enumerate(ws):
            if w.ndim <= 1:
                w_n.append(fw[k])
                g_n.append(fg[k])
            else:
                w_n.append(torch.linalg.vector_norm(w, dim=dims[k], keepdim=True, dtype=acc))
                g_n.append(torch.linalg.vector_norm(gs[k], dim=dims[k], keepdim=True, dtype=acc))
        scale, post_sq = self._scales(
            torch.cat([n.reshape(-1) for n in w_n]), torch.cat([n.reshape(-1) for n in g_n])
        )
        parts = scale.split([n.numel() for n in g_n])
        torch._foreach_mul_(gs, [p.view(n.shape) for p, n in zip(parts, g_n)])
        return post_sq

    def _sparse(self, grp: GradGroup, keep: list[int], names: Sequence[str]) -> Tensor | None:
        """Sparse (embedding) gradients, per row: the rows a gradient touches are scaled by
        the factor of that row's summed gradient (coalesced: one entry per row)."""
        post: Tensor | None = None
        for k in keep:
            p, g = grp.params[k].detach(), grp.grads[k]
            if self._units(names[grp.index[k]])[0] != 0 and p.ndim > 1:
                raise TypeError(
                    f"AGC: parameter {names[grp.index[k]]!r} has a sparse gradient and its "
                    "output units off dim 0; sparse gradients are clipped per row (dim 0)"
                )
            rows, vals = g._indices()[0], g._values()
            acc = norm_dtype(vals.dtype, torch.float32)
            if p.ndim <= 1:
                w_rows = torch.linalg.vector_norm(p, dtype=acc).reshape(1)
                rows = torch.zeros_like(rows)
            else:
                w_rows = unitwise_norm(p).reshape(-1)
            per = vals.abs().to(w_rows.dtype) ** 2
            if per.ndim > 1:
                per = per.sum(dim=tuple(range(1, per.ndim)))
            g_rows = torch.zeros_like(w_rows).index_add_(0, rows, per).sqrt()
            scale, post_k = self._scales(w_rows, g_rows)
            vals.mul_(scale.index_select(0, rows).view(-1, *([1] * (vals.ndim - 1))))
            post = post_k if post is None else post + post_k
        return post

    def apply_(self, stats: StepStats) -> Tensor:
        excluded, units, skip = self._plan(stats)
        device = stats.total_norm.device
        post_sq = (stats.param_norms.float().to(device).index_select(0, skip) ** 2).sum()
        for grp in stats.groups:
            keep = [k for k, i in enumerate(grp.index) if not excluded[i]]
            if grp.sparse:
                part = self._sparse(grp, keep, stats.names)
            else:
                part = self._dense(grp, keep, units)
            if part is not None:
                post_sq = post_sq + part.to(device, torch.float32, non_blocking=True)
        return ratio_coef(post_sq.sqrt(), stats)

    def __repr__(self) -> str:
        return f"AGC(clipping={self.clipping}, eps={self.eps}, exclude={self.exclude})"

