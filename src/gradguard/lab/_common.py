"""Shared machinery of the lab: results and claims, a guarded training loop that records
gradguard's own telemetry, the default guard, the doctor hook, data sets and plotting (the
data sets and models live in :mod:`._data`, the one-pass gradient norms in :mod:`._grads`
and the plots in :mod:`._plots`; all re-exported here).

Everything heavy (matplotlib, scikit-learn) is imported inside the function that needs it.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..clipping import ZClip
from ..events import Event, Flush
from ..guard import Guard, TrainingDiverged
from ..telemetry import Window
from ._data import Batch, LossFn, accuracy, adding_batch, digits, minibatches, mlp, split_digits
from ._grads import layer_grad_norms, layer_grad_rms, param_grad_norms
from ._plots import DPI, plot_losses, pyplot, save, smooth

__all__ = [
    "DPI", "WITHIN_FACTOR", "Batch", "Claim", "LossFn", "Result", "Timer", "Trace", "accuracy",
    "adding_batch", "default_guard", "digits", "doctor_record", "fit", "guard_record",
    "guarded_fit", "layer_grad_norms", "layer_grad_rms", "minibatches", "mlp",
    "param_grad_norms", "plot_losses", "pyplot", "save", "smooth", "split_digits",
]

#: A guarded failing run "came close" to its healthy twin when its final loss is within
#: this factor of the twin's (issue 7's goal for faults within reach of a guard).
WITHIN_FACTOR = 2.0
#: A healthy twin under the default guard should end within this factor of the same run
#: without it (one seed: a clip moves a run's path, see benchmarks/quality.py).
HEALTHY_WITHIN = 1.02


def _num(x: Any) -> Any:
    """JSON-safe number: NaN/Inf become the strings ``"nan"``/``"inf"``/``"-inf"``."""
    if isinstance(x, Tensor):
        x = x.tolist()
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return float(f"{x:.6g}")
    if isinstance(x, dict):
        return {str(k): _num(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_num(v) for v in x]
    return x


@dataclass
class Claim:
    """One claim of an experiment, checked against a margin.

    Attributes:
        name: short identifier (``"sigmoid_vanishes"``).
        statement: the claim in words.
        measured: the figure(s) this run measured.
        reference: the reference figure(s) (measured on a 2-core CPU for issue 7), or None.
        criterion: the check that decides ``passed``, in words (with its margin).
        passed: whether the measured figures satisfy the criterion.
    """

    name: str
    statement: str
    measured: Any
    reference: Any
    criterion: str
    passed: bool


@dataclass
class Result:
    """The outcome of one experiment (written as ``result.json`` next to its plots)."""

    id: str
    title: str
    fast: bool
    figures: dict[str, Any] = field(default_factory=dict)
    claims: list[Claim] = field(default_factory=list)
    guard: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        """True when every claim passed."""
        return all(c.passed for c in self.claims)

    def claim(
        self,
        name: str,
        statement: str,
        *,
        measured: Any,
        reference: Any,
        criterion: str,
        passed: bool,
    ) -> Claim:
        c = Claim(name, statement, measured, reference, criterion, bool(passed))
        self.claims.append(c)
        return c

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["passed"] = self.passed
        d["mode"] = "fast" if self.fast else "full"
        return _num(d)  # type: ignore[no-any-return]

    def write(self, out: Path) -> Path:
        out.mkdir(parents=True, exist_ok=True)
        path = out / "result.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(path)
        return path


class _Collect:
    """An in-memory sink: keeps every flushed telemetry window and event."""

    def __init__(self) -> None:
        self.windows: list[Window] = []
        self.events: list[Event] = []

    def write(self, flush: Flush) -> None:
        if flush.window is not None:
            self.windows.append(flush.window)
        self.events.extend(flush.events)

    def close(self) -> None:
        pass


@dataclass
class Trace:
    """What gradguard's telemetry recorded over one training run (host tensors).

    ``loss``, ``grad_norm``, ``clip_coef``: ``[steps]``; ``skipped``: ``[steps]`` bool;
    ``layer_norms``: ``[steps, n_layers]`` per-layer gradient norms (pre-clip);
    ``weight_norms``: ``[(step, [n_layers])]`` sampled at every flush.
    """

    loss: Tensor
    grad_norm: Tensor
    clip_coef: Tensor
    skipped: Tensor
    layers: list[str]
    layer_norms: Tensor
    weight_norms: list[tuple[int, Tensor]]
    events: list[Event]
    aborted: str | None = None

    @property
    def steps(self) -> int:
        return int(self.loss.numel())

    @property
    def finite(self) -> bool:
        """No non-finite loss, and the run was not aborted."""
        return self.aborted is None and bool(torch.isfinite(self.loss).all())

    def final_loss(self, last: int = 20) -> float:
        """Mean loss over the last ``last`` steps (NaN when any of them is non-finite)."""
        if self.steps == 0:
            return math.nan
        return float(self.loss[-last:].double().mean())

    def first_nonfinite(self) -> int | None:
        bad = (~torch.isfinite(self.loss)).nonzero()
        return int(bad[0, 0]) if bad.numel() else None

    @property
    def interventions(self) -> int:
        """Steps where the guard clipped (coefficient < 1) or skipped."""
        return int(((self.clip_coef < 1.0) | self.skipped).sum())

    def max_grad_norm(self) -> float:
        """The largest finite pre-clip gradient norm (inf when a norm overflowed)."""
        g = self.grad_norm
        if bool(torch.isinf(g).any()):
            return math.inf
        fin = g[torch.isfinite(g)]
        return float(fin.max()) if fin.numel() else math.nan


def fit(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    batch_fn: Callable[[int], Batch],
    loss_fn: LossFn,
    steps: int,
    *,
    clip: Any = None,
    recovery: Any = None,
    on_nonfinite: str = "off",
    grad_hook: Callable[[int, nn.Module], None] | None = None,
    every: int = 50,
    stop_on_nan: bool = True,
) -> Trace:
    """Train ``steps`` steps under a :class:`~gradguard.Guard` and return its telemetry.

    The unprotected arms use ``clip=None, on_nonfinite="off"``: the guard then only
    measures (the optimizer steps on whatever the gradients are). ``grad_hook(step,
    model)`` runs after ``backward`` and before the guard (fault injection). A run whose
    loss has gone non-finite is stopped at the next flush (``stop_on_nan``); the remaining
    steps are recorded as NaN so that every trace has ``steps`` rows.
    """
    sink = _Collect()
    guard = Guard(
        model,
        opt,
        clip=clip,
        recovery=recovery,
        on_nonfinite=on_nonfinite,  # type: ignore[arg-type]
        every=every,
        sinks=[sink],
    )
    aborted: str | None = None
    done = 0
    try:
        for step in range(steps):
            x, y = batch_fn(step)
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_hook is not None:
                grad_hook(step, model)
            guard.step(loss.detach())
            done = step + 1
            if (
                stop_on_nan
                and sink.windows
                and len(sink.windows[-1])
                and guard.telemetry.pending == 0
            ):
                last = sink.windows[-1].loss
                if not bool(torch.isfinite(last[-1])):
                    break
    except TrainingDiverged as e:
        aborted = str(e)
    finally:
        guard.close()
    return _trace(sink, guard.telemetry.layers, steps, done, aborted)


def _trace(sink: _Collect, layers: list[str], steps: int, done: int, aborted: str | None) -> Trace:
    ws = sink.windows
    n_l = len(layers)

    def cat(get: Callable[[Window], Tensor], fill: float) -> Tensor:
        parts = [get(w).float() for w in ws]
        have = sum(int(p.shape[0]) for p in parts)
        tail_shape = parts[0].shape[1:] if parts else ()
        if have < steps:
            parts.append(torch.full((steps - have, *tail_shape), fill))
        return torch.cat(parts)[:steps] if parts else torch.full((steps,), fill)

    loss = cat(lambda w: w.loss, math.nan)
    grad = cat(lambda w: w.total_norm, math.nan)
    coef = cat(lambda w: w.clip_coef, 1.0)
    skipped = cat(lambda w: w.skipped.float(), 0.0) > 0.5
    if ws:
        ln = cat(lambda w: w.layer_norms(), math.nan)
    else:
        ln = torch.full((steps, n_l), math.nan)
    weights: list[tuple[int, Tensor]] = []
    for w in ws:
        lw = w.layer_weight_norms()
        if lw is not None:
            weights.append((w.steps[-1], lw))
    if done < steps:
        loss[done:] = math.nan
    return Trace(loss, grad, coef, skipped, layers, ln, weights, sink.events, aborted)


# ---- the default guard and the doctor ---------------------------------------------------
def default_guard() -> tuple[Any, Any, str]:
    """The default guard's parts: ``(ZClip(), Recovery() or None, description)``.

    ``gg.Recovery`` is used when this installation has it; otherwise the guard runs with
    clipping and non-finite skipping only, and the description says so.
    """
    import gradguard as gg

    rec_cls = getattr(gg, "Recovery", None)
    if rec_cls is None:
        return ZClip(), None, "Guard(clip=ZClip(), on_nonfinite='skip') (gg.Recovery not available)"
    return ZClip(), rec_cls(), "Guard(clip=ZClip(), recovery=Recovery(), on_nonfinite='skip')"


def guarded_fit(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    batch_fn: Callable[[int], Batch],
    loss_fn: LossFn,
    steps: int,
    **kw: Any,
) -> tuple[Trace, str]:
    """:func:`fit` under the default guard; returns the trace and the guard's description."""
    clip, recovery, desc = default_guard()
    return fit(
        model,
        opt,
        batch_fn,
        loss_fn,
        steps,
        clip=clip,
        recovery=recovery,
        on_nonfinite="skip",
        **kw,
    ), desc


def guard_record(
    guarded: Trace, healthy_loss: float, desc: str, *, in_reach: bool, last: int = 20
) -> dict[str, Any]:
    """How a failing configuration fared under the default guard, next to its healthy twin."""
    final = guarded.final_loss(last)
    ratio = final / healthy_loss if healthy_loss > 0 else math.inf
    within = guarded.finite and math.isfinite(final) and ratio <= WITHIN_FACTOR
    kinds: dict[str, int] = {}
    for ev in guarded.events:
        kinds[ev.kind] = kinds.get(ev.kind, 0) + 1
    return {
        "guard": desc,
        "finite": guarded.finite,
        "aborted": guarded.aborted,
        "final_loss": final,
        "healthy_final_loss": healthy_loss,
        "ratio_to_healthy": ratio,
        "within_2x": within,
        "fix_in_reach_of_a_guard": in_reach,
        "interventions": guarded.interventions,
        "skipped_steps": int(guarded.skipped.sum()),
        "events": kinds,
    }


def healthy_guard_record(guarded: Trace, bare: Trace, *, last: int = 20) -> dict[str, Any]:
    """The healthy twin under the default guard against the same run (same initial
    weights, same batches) without it: the guard must leave a healthy run alone."""
    final, base = guarded.final_loss(last), bare.final_loss(last)
    ratio = final / base if base > 0 else math.inf
    return {
        "final_loss": final,
        "unguarded_final_loss": base,
        "ratio": ratio,
        "within_2pct": guarded.finite and ratio <= HEALTHY_WITHIN,
        "warnings": [f"{e.kind}@{e.step}" for e in guarded.events if e.severity != "info"],
        "interventions": guarded.interventions,
    }


def doctor_record(
    model: nn.Module, batch: Batch, loss_fn: LossFn, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, Any]:
    """What ``gg.doctor`` says about a configuration (``available: False`` without it)."""
    import gradguard as gg

    doctor = getattr(gg, "doctor", None)
    if doctor is None:
        return {"available": False, "note": "gg.doctor is not available in this installation"}
    try:
        diag = doctor(model, batch, loss_fn, optimizer=optimizer)
    except Exception as e:  # a doctor bug must not lose the experiment; it is recorded
        warnings.warn(f"gradguard lab: gg.doctor failed: {e!r}", RuntimeWarning, stacklevel=2)
        return {"available": True, "error": repr(e)}
    top = getattr(diag, "top", None)
    return {
        "available": True,
        "top": None if top is None else top.cause,
        "causes": [f.cause for f in getattr(diag, "findings", [])],
        "healthy": bool(getattr(diag, "healthy", False)),
        "summary": str(diag),
    }


class Timer:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0
