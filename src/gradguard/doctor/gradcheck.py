"""Finite differences vs autograd, in float64, for any module (``gg.gradcheck``), and the
doctor probe that checks every custom ``torch.autograd.Function`` the model uses."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .._tensors import iter_floats
from ..naming import refuse_lazy
from ._budget import Budget
from ._report import Finding

#: Central differences in float64: truncation ~eps², rounding ~1e-16/eps; 1e-6 balances them.
FD_EPS = 1e-6
ATOL = 1e-5
RTOL = 1e-3
#: modules a custom Function is checked in before it is declared right
CHECKS_PER_FUNCTION = 2


@dataclass
class GradcheckEntry:
    """Agreement for one input or parameter."""

    name: str
    kind: str  # "input" | "param"
    max_abs_err: float
    max_rel_err: float
    checked: int
    ok: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "max_abs_err": self.max_abs_err,
            "max_rel_err": self.max_rel_err,
            "checked": self.checked,
            "ok": self.ok,
        }


@dataclass
class GradcheckReport:
    """What :func:`gradcheck` measured: one entry per floating input and parameter."""

    entries: list[GradcheckEntry] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(e.ok for e in self.entries)

    @property
    def worst(self) -> GradcheckEntry | None:
        return max(self.entries, key=lambda e: e.max_rel_err, default=None)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "entries": [e.to_dict() for e in self.entries]}

    def __str__(self) -> str:
        lines = [f"gradcheck: {'ok' if self.ok else 'MISMATCH'}"]
        for e in self.entries:
            lines.append(
                f"  {'ok ' if e.ok else 'BAD'} {e.kind:5s} {e.name}: max abs err {e.max_abs_err:.3g}, "
                f"max rel err {e.max_rel_err:.3g} ({e.checked} coordinates)"
            )
        return "\n".join(lines)


def _map(x: Any, fn: Any) -> Any:
    if isinstance(x, Tensor):
        return fn(x)
    if isinstance(x, tuple):
        return tuple(_map(v, fn) for v in x)
    if isinstance(x, list):
        return [_map(v, fn) for v in x]
    if isinstance(x, dict):
        return {k: _map(v, fn) for k, v in x.items()}
    return x


def gradcheck(
    module: nn.Module,
    *inputs: Any,
    max_checks: int = 32,
    eps: float = FD_EPS,
    atol: float = ATOL,
    rtol: float = RTOL,
    seed: int = 0,
    **kwargs: Any,
) -> GradcheckReport:
    """Compare autograd with central finite differences, in float64.

    A deep copy of ``module`` runs in float64 (the module and its arguments are not
    touched). The output is projected on a fixed random direction ``v`` so one backward
    gives ``v·J`` for every input and parameter; up to ``max_checks`` coordinates of each
    are then perturbed by ``±eps`` and the difference quotient compared with autograd.

    Args:
        module: any module (or a wrapper around a custom ``autograd.Function``).
        *inputs: its positional inputs; floating tensors are checked, others passed as is.
        max_checks: coordinates checked per tensor (all when it has fewer).
        eps, atol, rtol: finite-difference step and tolerance (``|fd - ad| ≤ atol + rtol|fd|``).
        seed: seeds ``v``, the coordinates, and every forward (dropout stays identical).
        **kwargs: keyword inputs of the module.

    Returns:
        GradcheckReport with the max absolute/relative error per input and parameter.

    Example:
        >>> import torch, gradguard as gg
        >>> rep = gg.gradcheck(torch.nn.Linear(3, 2), torch.randn(4, 3))
        >>> rep.ok, [e.name for e in rep.entries]
        (True, ['input[0]', 'weight', 'bias'])
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"gradcheck module={type(module).__name__}: expected a torch.nn.Module")
    if max_checks < 1:
        raise ValueError(f"gradcheck max_checks={max_checks}: must be >= 1")
    # found by a stranger: eps=0 raised ZeroDivisionError, a negative or NaN eps or tolerance
    # called a correct model's gradients wrong on every entry
    for name, x, low in (("eps", eps, "> 0"), ("atol", atol, ">= 0"), ("rtol", rtol, ">= 0")):
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or (
                x <= 0 if name == "eps" else x < 0):
            raise ValueError(f"gradcheck {name}={x!r}: must be a finite number {low}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"gradcheck seed={seed!r}: expected an int")
    refuse_lazy(module.named_parameters(), "gradcheck module", "check it")
    m = copy.deepcopy(module).double()
    args = _map(inputs, lambda t: t.detach().clone().double() if t.is_floating_point() else t)
    kw = _map(kwargs, lambda t: t.detach().clone().double() if t.is_floating_point() else t)
    checked: list[tuple[str, str, Tensor]] = [
        (f"input[{i}]", "input", t) for i, t in enumerate(args) if isinstance(t, Tensor) and t.is_floating_point()
    ]
    checked += [(n, "param", p) for n, p in m.named_parameters() if p.requires_grad]
    for _, _, t in checked:
        t.requires_grad_(True)
    gen = torch.Generator().manual_seed(seed)

    with torch.random.fork_rng(devices=[]):

        def f() -> Tensor:
            torch.manual_seed(seed)
            out = m(*args, **kw)
            outs = list(iter_floats(out))
            if not outs:
                raise ValueError(f"gradcheck: {type(module).__name__} returned no floating tensor")
            return sum((o.double() * vs).sum() for o, vs in zip(outs, v))  # type: ignore[return-value]

        torch.manual_seed(seed)
        first = list(iter_floats(m(*args, **kw)))
        v = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in first]
        s = f()
        ad = torch.autograd.grad(s, [t for _, _, t in checked], allow_unused=True)
        report = GradcheckReport()
        with torch.no_grad():
            for (name, kind, t), g in zip(checked, ad):
                gflat = (g if g is not None else torch.zeros_like(t)).reshape(-1)
                n = t.numel()
                idx = torch.randperm(n, generator=gen)[:max_checks] if n > max_checks else torch.arange(n)
                flat = t.view(-1)
                max_abs = max_rel = 0.0
                ok = True
                for i in idx.tolist():
                    orig = float(flat[i])
                    flat[i] = orig + eps
                    sp = float(f())
                    flat[i] = orig - eps
                    sm = float(f())
                    flat[i] = orig
                    fd = (sp - sm) / (2 * eps)
                    a = float(gflat[i])
                    err = abs(fd - a) if math.isfinite(fd) and math.isfinite(a) else math.inf
                    rel = err / max(abs(fd), abs(a), 1e-12) if err > 0 else 0.0
                    max_abs, max_rel = max(max_abs, err), max(max_rel, rel)
                    ok = ok and err <= atol + rtol * abs(fd)
                report.entries.append(GradcheckEntry(name, kind, max_abs, max_rel, int(idx.numel()), ok))
    return report


def _is_custom(node: Any) -> bool:
    return isinstance(node, torch.autograd.function.BackwardCFunction)


def custom_nodes(root: Any, limit: int = 200_000) -> list[Any]:
    """Nodes of custom ``autograd.Function``s in the graph below ``root``."""
    seen: set[Any] = set()
    stack = [root] if root is not None else []
    found = []
    while stack and len(seen) < limit:
        n = stack.pop()
        if n is None or n in seen:
            continue
        seen.add(n)
        if _is_custom(n):
            found.append(n)
        stack.extend(nxt for nxt, _ in n.next_functions)
    return found


def _owns(out_nodes: list[Any], in_nodes: set[Any], target: Any) -> bool:
    seen: set[Any] = set()
    stack = list(out_nodes)
    while stack:
        n = stack.pop()
        if n is None or n in seen or n in in_nodes:
            continue
        if n is target:
            return True
        seen.add(n)
        stack.extend(nxt for nxt, _ in n.next_functions)
    return False


def slice_batch(x: Any, n: int) -> Any:
    """The first ``n`` entries along dim 0 of every tensor inside ``x``."""
    return _map(x, lambda t: t[:n] if t.ndim >= 1 and t.shape[0] > n else t)


def _passes_through(module: nn.Module, args: Any) -> str | None:
    """``"unchanged"`` or ``"negated"`` when ``module`` (one tensor in, one of its shape
    out) hands a random output gradient back to its input exactly as is, or negated: a
    straight-through estimator's or a gradient reversal layer's backward, written so on
    purpose; None otherwise."""
    if not (isinstance(args, tuple) and len(args) == 1 and isinstance(args[0], Tensor)
            and args[0].is_floating_point()):
        return None
    x = args[0].detach().clone().requires_grad_(True)
    try:
        with torch.enable_grad():
            out = module(x)
            if not isinstance(out, Tensor) or out.shape != x.shape or not out.requires_grad:
                return None
            v = torch.randn_like(out)
            (g,) = torch.autograd.grad(out, x, v)
    except (RuntimeError, TypeError, ValueError):
        return None
    if torch.equal(g, v):
        return "unchanged"
    if torch.equal(g, -v):
        return "negated"
    return None


def probe_custom_functions(cap: Any, max_batch: int = 2, budget: Budget | None = None) -> list[Finding]:
    """One finding per custom autograd Function whose backward is wrong.

    A Function's backward is one piece of code wherever it is used, so each Function is
    checked on the innermost module around its first uses (up to
    :data:`CHECKS_PER_FUNCTION`, while ``budget`` lasts) and reported once, with every
    module that uses it in ``evidence["modules"]``."""
    nodes = custom_nodes(cap.graph_root)
    if not nodes:
        return []
    calls = sorted(cap.calls, key=lambda c: c.order)
    users: dict[str, list[Any]] = {}
    for node in nodes:
        owner = next((c for c in calls if _owns(c.out_nodes, c.in_nodes, node)), None)
        fn = getattr(node, "_forward_cls", type(node)).__name__
        if owner is not None and all(o.path != owner.path for o in users.setdefault(fn, [])):
            users[fn].append(owner)
    out: list[Finding] = []
    for fn, owners in users.items():
        owners.sort(key=lambda c: c.order)
        f = _check_function(fn, owners, max_batch, budget)
        if f is not None:
            out.append(f)
    return out


def _check_function(fn: str, owners: list[Any], max_batch: int, budget: Budget | None) -> Finding | None:
    places = [o.path or "(model)" for o in owners]
    cost = 0.0
    for i, owner in enumerate(owners[:CHECKS_PER_FUNCTION]):
        if i and budget is not None and not budget.allows(cost):
            budget.note(f"gradcheck: {fn} checked in {i} of {len(owners)} modules")
            return None
        t0 = time.perf_counter()
        try:
            rep = gradcheck(owner.module, *slice_batch(owner.args, max_batch), **slice_batch(owner.kwargs, max_batch))
        except (RuntimeError, TypeError, ValueError) as e:
            return Finding(
                "wrong_gradient",
                "info",
                owner.path or "(model)",
                {"function": fn, "error": f"{type(e).__name__}: {e}"[:300], "modules": places},
                f"custom Function {fn} could not be checked in float64 ({type(e).__name__}); "
                f"check it by hand with torch.autograd.gradcheck.",
                0.2,
            )
        cost = time.perf_counter() - t0
        if rep.ok:
            continue
        w = rep.worst
        assert w is not None
        where = f"`{owner.path or 'model'}`" + (f" and {len(places) - 1} other module(s)" if len(places) > 1 else "")
        passed = _passes_through(owner.module, slice_batch(owner.args, max_batch))
        if passed is not None:  # a straight-through estimator or a gradient reversal layer
            return Finding(
                "wrong_gradient", "info", owner.path or "(model)",
                {"function": fn, "modules": places, "n_modules": len(places),
                 "passes_gradient": passed, "max_rel_err": w.max_rel_err},
                f"the backward of custom Function {fn} (used in {where}) passes the gradient "
                f"through {passed}, not its derivative: "
                + ("a straight-through estimator (quantisation, binarised nets)"
                   if passed == "unchanged" else "a gradient reversal layer (DANN)")
                + " does so by design; if it is not meant to, fix "
                f"{fn}.backward.",
                0.3,
            )
        return Finding(
            "wrong_gradient",
            "error",
            owner.path or "(model)",
            {
                "function": fn,
                "modules": places,
                "n_modules": len(places),
                "worst": w.name,
                "max_abs_err": w.max_abs_err,
                "max_rel_err": w.max_rel_err,
                "entries": [e.to_dict() for e in rep.entries],
            },
            f"the backward of custom Function {fn} (used in {where}) disagrees with finite "
            f"differences (max rel err {w.max_rel_err:.3g} on {w.name}): fix {fn}.backward, and "
            f"re-check with gg.gradcheck(module, x) (unless it is not the derivative by design: "
            f"a straight-through estimator, a gradient reversal layer).",
            min(1.0, 0.7 + 0.3 * min(1.0, w.max_rel_err)),
        )
    return None
