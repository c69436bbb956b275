"""Gradient clipping policies: norm, value, AutoClip, ZClip and AGC.

Every policy is a small state machine: ``clip_(params)`` measures the gradients, scales them
in place and returns the pre-clip total norm as a tensor; ``state_dict()`` /
``load_state_dict()`` checkpoint it. Statistics live on the device and are updated with
``torch.where`` so that a non-finite norm never enters them and no value is ever read by
the host. The :class:`~gradguard.Guard` calls ``_apply`` with the norms its telemetry has
already computed, so guarded clipping makes no second pass over the gradients.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from .telemetry import StepStats, _local, measure_grads

#: ``clip_grad_norm_`` adds this to the norm before dividing (kept for bit-equality).
NORM_EPS = 1e-6

# ZClip defaults (Kumar et al. 2025, "ZClip: Adaptive Spike Mitigation for LLM
# Pre-Training", Sec. 3 and the reference implementation).
ZCLIP_ALPHA = 0.97
ZCLIP_Z_THRESH = 2.5
ZCLIP_WARMUP = 25
ZCLIP_EPS = 1e-6

# AutoClip default (Seetharaman et al. 2020, "AutoClip: Adaptive Gradient Clipping for
# Source Separation Networks": the 10th percentile worked best across their tasks).
AUTOCLIP_PERCENTILE = 10.0

# AGC defaults (Brock et al. 2021, "High-Performance Large-Scale Image Recognition Without
# Normalization", Sec. 4.1: lambda = 0.01 for batch 4096, eps = 1e-3).
AGC_CLIPPING = 0.01
AGC_EPS = 1e-3

ParamsArg = nn.Module | Tensor | Iterable[Tensor] | Iterable[tuple[str, Tensor]]


def as_named_params(params: ParamsArg) -> list[tuple[str, Tensor]]:
    """Normalise a module / tensor / iterable of tensors or (name, tensor) pairs."""
    if isinstance(params, nn.Module):
        return list(params.named_parameters())
    if isinstance(params, Tensor):
        return [("0", params)]
    out: list[tuple[str, Tensor]] = []
    for i, item in enumerate(params):
        if isinstance(item, Tensor):
            out.append((str(i), item))
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], Tensor):
            out.append((str(item[0]), item[1]))
        else:
            raise TypeError(
                f"params[{i}] is {type(item).__name__}; expected a Tensor or (name, Tensor)"
            )
    return out


def _check_positive(name: str, value: Any, owner: str, *, allow_inf: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner}({name}={value!r}): expected a positive number")
    v = float(value)
    if not (v > 0) or (math.isinf(v) and not allow_inf):
        raise ValueError(f"{owner}({name}={value!r}): must be a finite number > 0")
    return v


def scale_grads_(stats: StepStats, coef: Tensor) -> None:
    """Multiply every gradient by ``coef`` in place, one ``_foreach_mul_`` per group.

    DTensor (FSDP2) gradients are scaled through their local shards: the coefficient is
    already global, and plain tensors skip DTensor dispatch."""
    for grp in stats.groups:
        grads = [_local(g) for g in grp.grads]
        torch._foreach_mul_(grads, coef.to(grp.device, non_blocking=True))


def _norm_coef(total: Tensor, finite: Tensor, threshold: Tensor | float) -> Tensor:
    """``min(1, threshold / (total + 1e-6))``; 1 where the norm is not finite."""
    coef = torch.clamp(threshold / (total + NORM_EPS), max=1.0)
    return torch.where(finite, coef, torch.ones_like(coef))


@runtime_checkable
class ClipPolicy(Protocol):
    """What the Guard needs from a clipping policy."""

    def clip_(self, params: ParamsArg) -> Tensor: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


class _Policy:
    """Shared plumbing: measure once, ``_apply`` the policy, return the pre-clip norm."""

    norm_type: float = 2.0
    #: None: measure in each gradient's dtype (as torch does); float32 otherwise.
    _measure_dtype: torch.dtype | None = torch.float32

    def clip_(self, params: ParamsArg) -> Tensor:
        """Clip the gradients of ``params`` in place; return the pre-clip total norm."""
        named = as_named_params(params)
        plist = [p for _, p in named]
        stats = measure_grads(plist, norm_type=self.norm_type, accumulate_dtype=self._measure_dtype)
        with torch.no_grad():
            self._apply(stats, [n for n, _ in named])
        return stats.total_norm

    __call__ = clip_

    def _apply(self, stats: StepStats, names: Sequence[str]) -> Tensor:
        """Clip in place using precomputed ``stats``; return the clip coefficient (device
        scalar: post-clip norm / pre-clip norm, 1 when nothing was clipped)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        return None

    def _check_keys(self, sd: dict[str, Any], keys: Iterable[str]) -> None:
        missing = [k for k in keys if k not in sd]
        if missing:
            raise ValueError(f"{type(self).__name__}.load_state_dict: missing keys {missing}")


class NormClip(_Policy):
    """Clip the total gradient norm to ``max_norm`` (drop-in for ``clip_grad_norm_``).

    Standalone ``clip_`` gives bit-identical results to
    ``torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)`` for finite gradients,
    for float32, bfloat16, float16 and mixed lists. A non-finite total norm leaves the
    gradients unscaled (torch would multiply them by NaN).

    Args:
        max_norm: the largest allowed total norm (> 0).
        norm_type: the norm order (> 0, or ``math.inf``).

    Example:
        >>> import torch, gradguard as gg
        >>> w = torch.nn.Parameter(torch.ones(4)); w.grad = torch.full((4,), 3.0)
        >>> gg.NormClip(max_norm=1.0).clip_([w])
        tensor(6.)
        >>> round(w.grad.norm().item(), 4)
        1.0
    """

    _measure_dtype = None

    def __init__(self, max_norm: float = 1.0, norm_type: float = 2.0) -> None:
        self.max_norm = _check_positive("max_norm", max_norm, "NormClip")
        self.norm_type = _check_positive("norm_type", norm_type, "NormClip", allow_inf=True)

    def _apply(self, stats: StepStats, names: Sequence[str]) -> Tensor:
        if stats.norm_type != self.norm_type:
            stats = measure_grads(
                stats.params, norm_type=self.norm_type, device=stats.total_norm.device
            )
        coef = _norm_coef(stats.total_norm, stats.finite, self.max_norm)
        scale_grads_(stats, coef)
        return coef.float()

    def __repr__(self) -> str:
        return f"NormClip(max_norm={self.max_norm}, norm_type={self.norm_type})"


class ValueClip(_Policy):
    """Clamp every gradient element to ``[-clip_value, clip_value]`` (``clip_grad_value_``).

    Returns the pre-clip total 2-norm. The coefficient recorded by the Guard is the
    post-clip norm over the pre-clip norm (one extra norm pass).

    Example:
        >>> import torch, gradguard as gg
        >>> w = torch.nn.Parameter(torch.zeros(2)); w.grad = torch.tensor([3.0, -0.1])
        >>> _ = gg.ValueClip(0.5).clip_([w]); w.grad
        tensor([ 0.5000, -0.1000])
    """

    def __init__(self, clip_value: float = 1.0) -> None:
        self.clip_value = _check_positive("clip_value", clip_value, "ValueClip")

    def _apply(self, stats: StepStats, names: Sequence[str]) -> Tensor:
        for grp in stats.groups:
            grads = [_local(g) for g in grp.grads]  # element-wise: shards clamp alone
            torch._foreach_clamp_min_(grads, -self.clip_value)
            torch._foreach_clamp_max_(grads, self.clip_value)
        after = measure_grads(stats.params, device=stats.total_norm.device).total_norm
        coef = after / stats.total_norm.clamp_min(1e-30)
        return torch.where(stats.finite, coef.clamp(max=1.0), torch.ones_like(coef))

    def __repr__(self) -> str:
        return f"ValueClip(clip_value={self.clip_value})"


class AutoClip(_Policy):
    """AutoClip: clip to the p-th percentile of the history of total gradient norms.

    At each step the current norm is appended to the history (finite norms only), the
    threshold is the ``percentile``-th percentile (linear interpolation, as
    ``numpy.percentile``) of the history *including* the current norm, and gradients are
    scaled by ``min(1, threshold / (norm + 1e-6))``.

    Args:
        percentile: in (0, 100]; the paper's default is 10.
        history_size: keep only the last N finite norms (None: the whole run, as in the
            paper).

    References:
        Seetharaman, Wichern, Pardo, Le Roux. "AutoClip: Adaptive Gradient Clipping for
        Source Separation Networks." MLSP 2020. arXiv:2007.14469.

    Example:
        >>> import torch, gradguard as gg
        >>> policy = gg.AutoClip(percentile=10.0)
        >>> w = torch.nn.Parameter(torch.zeros(3)); w.grad = torch.ones(3)
        >>> policy.clip_([w]).round(decimals=4)
        tensor(1.7321)
    """

    def __init__(
        self, percentile: float = AUTOCLIP_PERCENTILE, *, history_size: int | None = None
    ) -> None:
        if isinstance(percentile, bool) or not isinstance(percentile, (int, float)):
            raise TypeError(f"AutoClip(percentile={percentile!r}): expected a number in (0, 100]")
        if not (0.0 < float(percentile) <= 100.0):
            raise ValueError(f"AutoClip(percentile={percentile!r}): must be in (0, 100]")
        if history_size is not None and (
            isinstance(history_size, bool) or not isinstance(history_size, int) or history_size < 1
        ):
            raise ValueError(
                f"AutoClip(history_size={history_size!r}): must be None or an int >= 1"
            )
        self.percentile = float(percentile)
        self.history_size = history_size
        self._hist: Tensor | None = None  # NaN-padded history of finite norms
        self._count: Tensor | None = None  # finite norms seen (device int64)
        self._calls = 0  # host-side upper bound on _count, for growing the buffer

    def _ensure(self, device: torch.device) -> None:
        if self._hist is None:
            cap = self.history_size or 64
            self._hist = torch.full((cap,), math.nan, device=device)
            self._count = torch.zeros((), dtype=torch.long, device=device)
        elif self.history_size is None and self._calls >= self._hist.numel():
            grow = torch.full_like(self._hist, math.nan)
            self._hist = torch.cat([self._hist, grow])

    def threshold(self) -> Tensor | None:
        """The current clipping threshold (a device tensor; NaN before any finite norm)."""
        if self._hist is None:
            return None
        return torch.nanquantile(self._hist, self.percentile / 100.0)

    def _apply(self, stats: StepStats, names: Sequence[str]) -> Tensor:
        total = stats.total_norm.float()
        self._ensure(total.device)
        assert self._hist is not None and self._count is not None
        cap = self._hist.numel()
        idx = (self._count % cap).reshape(1) if self.history_size else self._count.reshape(1)
        old = self._hist.index_select(0, idx)
        self._hist.index_copy_(0, idx, torch.where(stats.finite, total.reshape(1), old))
        self._count += stats.finite.long()
        self._calls += 1
        thr = torch.nanquantile(self._hist, self.percentile / 100.0)
        coef = _norm_coef(total, stats.finite & ~torch.isnan(thr), torch.nan_to_num(thr, nan=1.0))
        scale_grads_(stats, coef)
        return coef

    def state_dict(self) -> dict[str, Any]:
        return {
            "percentile": self.percentile,
            "history_size": self.history_size,
            "history": None if self._hist is None else self._hist.clone(),
            "count": None if self._count is None else self._count.clone(),
            "calls": self._calls,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._check_keys(state_dict, ("history", "count", "calls"))
        hist, count = state_dict["history"], state_dict["count"]
        self._hist = None if hist is None else hist.clone()
        self._count = None if count is None else count.clone()
        self._calls = int(state_dict["calls"])
        self.percentile = float(state_dict.get("percentile", self.percentile))
        self.history_size = state_dict.get("history_size", self.history_size)

    def __repr__(self) -> str:
        return f"AutoClip(percentile={self.percentile}, history_size={self.history_size})"


class ZClip(_Policy):
    """ZClip: z-score based adaptive clipping with EMA statistics of the gradient norm.

    Warm-up: the first ``warmup_steps`` *finite* norms are collected; their plain mean and
    (population) variance initialise the EMA. No clipping happens during warm-up unless
    ``max_norm`` is given. Afterwards, with ``z = (g - mu) / (sigma + eps)``:

    * if ``z > z_thresh`` the norm is clipped to ``mu + z_thresh**2 / z * sigma``
      (``mode="reciprocal"``, the paper's default) or ``mu + z_thresh * sigma``
      (``mode="percentile"``) or ``mu`` (``mode="mean"``);
    * the EMA is updated with the *clipped* norm:
      ``mu <- a mu + (1-a) g_c``, ``var <- a var + (1-a) (g_c - mu)**2`` (new ``mu``).

    Non-finite norms never enter the statistics, so a NaN during warm-up does not disable
    clipping. No absolute cap is applied unless ``max_norm`` is set.

    Args:
        alpha: EMA factor in (0, 1); paper default 0.97.
        z_thresh: z-score threshold > 0; paper default 2.5.
        warmup_steps: finite steps before clipping starts (>= 1); paper default 25.
        mode: ``"reciprocal"`` | ``"percentile"`` | ``"mean"``.
        max_norm: optional absolute cap, applied always (None: none).
        eps: added to sigma in the z-score.

    References:
        Kumar, Owen, Ashraf, Ahmed, Rehman, Pettersson. "ZClip: Adaptive Spike Mitigation
        for LLM Pre-Training." 2025. arXiv:2504.02507.

    Example:
        >>> import torch, gradguard as gg
        >>> policy = gg.ZClip(warmup_steps=3)
        >>> w = torch.nn.Parameter(torch.zeros(1))
        >>> for g in [1.0, 1.1, 0.9, 50.0]:
        ...     w.grad = torch.tensor([g]); _ = policy.clip_([w])
        >>> bool(w.grad.item() < 2.0)
        True
    """

    MODES = ("reciprocal", "percentile", "mean")

    def __init__(
        self,
        alpha: float = ZCLIP_ALPHA,
        z_thresh: float = ZCLIP_Z_THRESH,
        warmup_steps: int = ZCLIP_WARMUP,
        *,
        mode: str = "reciprocal",
        max_norm: float | None = None,
        eps: float = ZCLIP_EPS,
    ) -> None:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise TypeError(f"ZClip(alpha={alpha!r}): expected a number in (0, 1)")
        if not (0.0 < float(alpha) < 1.0):
            raise ValueError(f"ZClip(alpha={alpha!r}): must be in (0, 1)")
        self.alpha = float(alpha)
        self.z_thresh = _check_positive("z_thresh", z_thresh, "ZClip")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"ZClip(warmup_steps={warmup_steps!r}): must be an int >= 1")
        self.warmup_steps = warmup_steps
        if mode not in self.MODES:
            raise ValueError(f"ZClip(mode={mode!r}): allowed values are {self.MODES}")
        self.mode = mode
        self.max_norm = None if max_norm is None else _check_positive("max_norm", max_norm, "ZClip")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps < 0:
            raise ValueError(f"ZClip(eps={eps!r}): must be a number >= 0")
        self.eps = float(eps)
        self._state: dict[str, Tensor] | None = None

    def _ensure(self, device: torch.device) -> dict[str, Tensor]:
        if self._state is None:
            self._state = {
                "mean": torch.zeros((), device=device),
                "var": torch.zeros((), device=device),
                "count": torch.zeros((), dtype=torch.long, device=device),
                "buffer": torch.zeros(self.warmup_steps, device=device),
            }
        return self._state

    @property
    def mean(self) -> Tensor | None:
        return None if self._state is None else self._state["mean"]

    @property
    def var(self) -> Tensor | None:
        return None if self._state is None else self._state["var"]

    def _apply(self, stats: StepStats, names: Sequence[str]) -> Tensor:
        g = stats.total_norm.float()
        fin = stats.finite
        s = self._ensure(g.device)
        mean, var, count, buf = s["mean"], s["var"], s["count"], s["buffer"]
        warm = count < self.warmup_steps
        active = ~warm & fin
        std = var.sqrt()
        z = (g - mean) / (std + self.eps)
        if self.mode == "reciprocal":
            # z > z_thresh > 0 here, so the division is safe where it is used
            thr = mean + (self.z_thresh**2) * std / torch.where(z > 0, z, torch.ones_like(z))
        elif self.mode == "percentile":
            thr = mean + self.z_thresh * std
        else:
            thr = mean.clone()
        clip = active & (z > self.z_thresh) & (thr < g)
        threshold = torch.where(clip, thr, torch.full_like(g, math.inf))
        if self.max_norm is not None:
            threshold = threshold.clamp(max=self.max_norm)
        coef = _norm_coef(g, fin, threshold)
        scale_grads_(stats, coef)
        # EMA update with the clipped norm (finite steps after warm-up only)
        g_c = torch.minimum(g, thr.where(clip, g))
        new_mean = self.alpha * mean + (1 - self.alpha) * g_c
        new_var = self.alpha * var + (1 - self.alpha) * (g_c - new_mean) ** 2
        # warm-up: collect finite norms, initialise mean/var from them when complete
        take = warm & fin
        idx = count.clamp(max=self.warmup_steps - 1).reshape(1)
        buf.index_copy_(
            0, idx, torch.where(take, g, buf.index_select(0, idx).squeeze(0)).reshape(1)
        )
        new_count = count + take.long()
        done = warm & (new_count == self.warmup_steps)
        mean.copy_(torch.where(active, new_mean, torch.where(done, buf.mean(), mean)))
        var.copy_(torch.where(active, new_var, torch.where(done, buf.var(unbiased=False), var)))
        count.copy_(new_count)
        return coef

    def state_dict(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "z_thresh": self.z_thresh,
            "warmup_steps": self.warmup_steps,
            "mode": self.mode,
            "max_norm": self.max_norm,
            "state": None
            if self._state is None
            else {k: v.clone() for k, v in self._state.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._check_keys(state_dict, ("state",))
        st = state_dict["state"]
        if st is not None and st["buffer"].numel() != state_dict.get(
            "warmup_steps", self.warmup_steps
        ):
            raise ValueError("ZClip.load_state_dict: warm-up buffer does not match warmup_steps")
        self.warmup_steps = int(state_dict.get("warmup_steps", self.warmup_steps))
        self._state = None if st is None else {k: v.clone() for k, v in st.items()}

    def __repr__(self) -> str:
        return (
            f"ZClip(alpha={self.alpha}, z_thresh={self.z_thresh}, warmup_steps={self.warmup_steps}, "
            f"mode={self.mode!r}, max_norm={self.max_norm})"
        )


def unitwise_norm(x: Tensor) -> Tensor:
    """Norm per output unit: the whole tensor for scalars/vectors, else over all dims but 0
    (PyTorch layouts put output units first: Linear ``[out, in]``, Conv ``[out, in, kh, kw]``)."""
    if x.ndim <= 1:
        return torch.linalg.vector_norm(x.float())
    return torch.linalg.vector_norm(x.float(), dim=tuple(range(1, x.ndim)), keepdim=True)


class AGC(_Policy):
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

    def __init__(
        self,
        clipping: float = AGC_CLIPPING,
        eps: float = AGC_EPS,
        exclude: Sequence[str] | None = None,
    ) -> None:
        self.clipping = _check_positive("clipping", clipping, "AGC")
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

    def _apply(self, stats: StepStats, names: Sequence[str]) -> Tensor:
        excluded = self._excluded(names)
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
        coef = post_sq.sqrt() / stats.total_norm.float().clamp_min(1e-30)
        return torch.where(stats.finite, coef.clamp(max=1.0), torch.ones_like(coef))

    def __repr__(self) -> str:
        return f"AGC(clipping={self.clipping}, eps={self.eps}, exclude={self.exclude})"


POLICIES: tuple[type, ...] = (NormClip, ValueClip, AutoClip, ZClip, AGC)
