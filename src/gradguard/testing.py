"""Fault injection: break training on purpose and check that the guard copes.

Injectors (each one small, usable in your own tests):

* :func:`corrupt_grad_` — NaN/Inf into one element of a chosen layer's gradient;
* :func:`scale_grads_` — a gradient spike (x1000 by default), in one layer or all;
* :func:`poison_loss` — a NaN/Inf loss that keeps the graph (every gradient goes bad);
* :func:`poison_batch` — NaN/Inf in an input batch;
* :func:`lr_scaled` — the learning rate x100 for a while (a context manager);
* :func:`fp16_overflow` — a module whose float16 output overflows (run the forward under
  ``torch.autocast(..., dtype=torch.float16)``).

:func:`run_with_faults` trains a model under a :class:`~gradguard.Guard` with a list of
:class:`Fault` and reports what happened (:class:`FaultRun`), checking after every step that
no NaN/Inf reached a parameter or an optimizer state. :func:`make_setup` builds the small
models the fault matrix uses (``"mlp"``, ``"cnn"``, ``"lstm"``, ``"transformer"``).

Example:
    >>> import gradguard as gg
    >>> from gradguard.testing import Fault, make_setup, run_with_faults
    >>> s = make_setup("mlp")
    >>> run = run_with_faults(s, [Fault("nan_grad", step=12, layer=s.middle)], steps=20,
    ...                       guard_kwargs={"clip": gg.ZClip(), "every": 10})
    >>> [(e.kind, e.step, e.layer) for e in run.events if e.kind == "nonfinite_grad"]
    [('nonfinite_grad', 12, '2')]
    >>> run.state_nonfinite_steps, run.steps_run
    ([], 20)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .events import Event
from .guard import Guard

FAULT_KINDS: tuple[str, ...] = (
    "nan_grad", "inf_grad", "nan_loss", "nan_input", "inf_input", "grad_spike",
    "lr_spike", "fp16_overflow",
)
#: Multiplier of a gradient spike (the calibration setup uses x1000).
SPIKE_FACTOR = 1000.0
#: Multiplier of an LR fault.
LR_FACTOR = 100.0
#: Scale that pushes a float16 output past its largest finite value (65504).
FP16_OVERFLOW_SCALE = 1e6


# ---- injectors -----------------------------------------------------------------------------
def _layer_params(model: nn.Module, layer: str) -> list[Tensor]:
    try:
        mod = model.get_submodule(layer)
    except AttributeError as e:
        names = [n for n, _ in model.named_modules() if n]
        raise ValueError(f"layer={layer!r} is not a module of the model; known: {names}") from e
    params: list[Tensor] = list(mod.parameters(recurse=False))
    if not params:
        raise ValueError(f"layer={layer!r} has no parameters of its own")
    return params


def corrupt_grad_(model: nn.Module, layer: str, value: float = math.nan) -> None:
    """Write ``value`` into one element of each gradient of ``layer`` (after backward).

    Example:
        >>> import math, torch
        >>> from gradguard.testing import corrupt_grad_
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> net(torch.ones(1, 2)).sum().backward()
        >>> corrupt_grad_(net, "0", math.inf)
        >>> bool(torch.isinf(net[0].weight.grad).any())
        True
    """
    with torch.no_grad():
        for p in _layer_params(model, layer):
            if p.grad is None:
                raise ValueError(f"layer={layer!r}: no gradient yet (call backward first)")
            p.grad.view(-1)[0] = value


def scale_grads_(model: nn.Module, factor: float = SPIKE_FACTOR, layer: str | None = None) -> None:
    """Multiply the gradients of ``layer`` (or of the whole model) by ``factor``."""
    params = list(model.parameters()) if layer is None else _layer_params(model, layer)
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p.grad.mul_(factor)


def poison_loss(loss: Tensor, value: float = math.nan) -> Tensor:
    """``loss`` turned NaN/Inf, keeping the graph so that backward spreads it."""
    return loss * value if math.isnan(value) else loss + value


def poison_batch(x: Tensor, value: float = math.nan) -> Tensor:
    """A copy of ``x`` with its first element set to ``value``."""
    y = x.clone()
    y.view(-1)[0] = value
    return y


@contextlib.contextmanager
def lr_scaled(optimizer: torch.optim.Optimizer, factor: float = LR_FACTOR) -> Iterator[None]:
    """Multiply every param group's LR by ``factor`` inside the block (and divide after, so
    that a recovery ladder changing the LR meanwhile composes with it)."""
    for g in optimizer.param_groups:
        g["lr"] = g["lr"] * factor
    try:
        yield
    finally:
        for g in optimizer.param_groups:
            g["lr"] = g["lr"] / factor


@contextlib.contextmanager
def fp16_overflow(module: nn.Module, scale: float = FP16_OVERFLOW_SCALE) -> Iterator[None]:
    """Inside the block, ``module`` runs under float16 autocast and its output is scaled past
    float16's range (65504), where it overflows to Inf, as a too-large activation does in
    mixed precision. The output is handed on in the module's usual dtype so that the rest
    of the model runs unchanged."""
    device_type = next(module.parameters(), torch.empty(0)).device.type
    ctx: dict[str, Any] = {}

    def enter(mod: nn.Module, args: Any) -> None:
        ctx["ac"] = torch.autocast(device_type, dtype=torch.float16)
        ctx["ac"].__enter__()

    def overflow(mod: nn.Module, args: Any, out: Tensor) -> Tensor:
        dtype = next((a.dtype for a in args if isinstance(a, Tensor) and a.is_floating_point()),
                     torch.float32)
        return (out.float() * scale).to(torch.float16).to(dtype)

    def leave(mod: nn.Module, args: Any, out: Any) -> None:
        ctx.pop("ac").__exit__(None, None, None)

    # the overflow is prepended: hooks registered earlier (the guard's watch) see it, and
    # run while autocast is still on; autocast ends after every other hook
    handles = [
        module.register_forward_pre_hook(enter, prepend=True),
        module.register_forward_hook(overflow, prepend=True),
        module.register_forward_hook(leave),
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ---- setups ------------------------------------------------------------------------------
@dataclass
class Setup:
    """A small model with its data, for fault-injection runs.

    Attributes:
        name: ``"mlp"``, ``"cnn"``, ``"lstm"`` or ``"transformer"``.
        model, optimizer, loss_fn: as usual.
        batch: ``batch(step) -> (inputs, targets)``, deterministic.
        middle: a layer in the middle of the model (where gradient faults go).
        half: a layer that can run under float16 autocast on this device (fp16 faults).
    """

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    batch: Callable[[int], tuple[Tensor, Tensor]]
    middle: str
    half: str = ""

    def __post_init__(self) -> None:
        self.half = self.half or self.middle


class _LSTMNet(nn.Module):
    def __init__(self, d_in: int = 4, hidden: int = 16) -> None:
        super().__init__()
        self.lstm = nn.LSTM(d_in, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


class _TinyTransformer(nn.Module):
    def __init__(self, d_in: int = 4, d: int = 16) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d)
        self.block = nn.TransformerEncoderLayer(d, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.block(self.proj(x)).mean(dim=1))


SETUPS: tuple[str, ...] = ("mlp", "cnn", "lstm", "transformer")


def make_setup(name: str, *, seed: int = 0, lr: float = 1e-3, batch_size: int = 16,
               width: int = 32) -> Setup:
    """A small model + Adam + deterministic synthetic data (nothing is downloaded)."""
    if name not in SETUPS:
        raise ValueError(f"make_setup(name={name!r}): allowed values are {SETUPS}")
    torch.manual_seed(seed)
    model: nn.Module
    shape: tuple[int, ...]
    if name == "mlp":
        model = nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                              nn.Linear(width, 1))
        shape, middle = (8,), "2"
    elif name == "cnn":
        model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
                              nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                              nn.Linear(4 * 8 * 8, 1))
        shape, middle = (1, 8, 8), "2"
    elif name == "lstm":
        model = _LSTMNet()
        shape, middle = (6, 4), "lstm"
    else:
        model = _TinyTransformer()
        shape, middle = (6, 4), "block.linear1"
    w = torch.randn(int(torch.tensor(shape).prod()), generator=torch.Generator().manual_seed(seed))

    def batch(step: int) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(seed * 100_003 + step)
        x = torch.randn(batch_size, *shape, generator=g)
        y = torch.sin(x.reshape(batch_size, -1) @ w / math.sqrt(w.numel())).unsqueeze(1)
        return x, y

    opt = torch.optim.Adam(model.parameters(), lr=lr)
    # CPU LSTM kernels have no float16 autocast path: overflow the head there instead
    half = "head" if name == "lstm" else middle
    return Setup(name, model, opt, nn.functional.mse_loss, batch, middle, half)


# ---- the harness -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Fault:
    """One fault to inject.

    Attributes:
        kind: one of :data:`FAULT_KINDS`.
        step: the step (0-based ``guard.step`` count) it hits.
        layer: module path for gradient faults and ``fp16_overflow`` (None: every layer
            for ``grad_spike``).
        factor: multiplier for ``grad_spike`` / ``lr_spike``.
        steps: how many steps it lasts (``lr_spike``; others hit one step).
    """

    kind: str
    step: int
    layer: str | None = None
    factor: float | None = None
    steps: int = 1

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"Fault(kind={self.kind!r}): allowed values are {FAULT_KINDS}")
        if self.kind in ("nan_grad", "inf_grad", "fp16_overflow") and self.layer is None:
            raise ValueError(f"Fault(kind={self.kind!r}) needs layer=...")
        if self.steps < 1 or self.step < 0:
            raise ValueError(f"Fault(step={self.step}, steps={self.steps}): must be >= 0 / >= 1")

    def hits(self, step: int) -> bool:
        return self.step <= step < self.step + self.steps


@dataclass
class FaultRun:
    """What happened in :func:`run_with_faults`.

    Attributes:
        losses: the loss of every step (float, NaN where non-finite).
        events: every event the guard recorded.
        state_nonfinite_steps: steps after which a parameter or an optimizer state held
            NaN/Inf (must be empty).
        steps_run: steps completed.
        error: the exception that stopped the run (e.g. TrainingDiverged), or None.
        guard: the (closed) guard.
    """

    losses: list[float]
    events: list[Event]
    state_nonfinite_steps: list[int]
    steps_run: int
    error: BaseException | None
    guard: Guard
    lr: list[float] = field(default_factory=list)

    def kinds_at(self, step: int) -> list[str]:
        return [e.kind for e in self.events if e.step == step]

    def final_loss(self, last: int = 20) -> float:
        """Mean loss over the last ``last`` finite steps."""
        tail = [x for x in self.losses if math.isfinite(x)][-last:]
        return sum(tail) / len(tail) if tail else math.nan


def state_finite(model: nn.Module, optimizer: torch.optim.Optimizer) -> bool:
    """True when every parameter and every floating optimizer state is finite (syncs)."""
    tensors = [p.detach() for p in model.parameters()]
    for st in optimizer.state.values():
        tensors += [v for v in st.values() if isinstance(v, Tensor) and v.is_floating_point()]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def run_with_faults(
    setup: Setup,
    faults: Sequence[Fault],
    *,
    steps: int,
    guard_kwargs: dict[str, Any] | None = None,
    autocast_dtype: torch.dtype | None = None,
    check_state: bool = True,
) -> FaultRun:
    """Train ``setup`` for ``steps`` steps under ``Guard(**guard_kwargs)``, injecting
    ``faults``. Exceptions from the guard (TrainingDiverged, NonFiniteGradientError) stop
    the run and are returned in :attr:`FaultRun.error`, not raised.

    ``autocast_dtype`` runs every forward under ``torch.autocast`` with that dtype;
    ``fp16_overflow`` runs its module under float16 autocast on its step.
    """
    model, opt = setup.model, setup.optimizer
    guard = Guard(model, opt, **(guard_kwargs or {}))
    losses: list[float] = []
    lrs: list[float] = []
    bad: list[int] = []
    error: BaseException | None = None
    done = 0
    device_type = next(model.parameters()).device.type
    active_lr: dict[Fault, contextlib.ExitStack] = {}
    try:
        for step in range(steps):
            now = [f for f in faults if f.hits(step)]
            for f in faults:  # LR faults span steps: enter at the first, leave after the last
                if f.kind != "lr_spike":
                    continue
                if f.step == step:
                    es = contextlib.ExitStack()
                    es.enter_context(lr_scaled(opt, f.factor or LR_FACTOR))
                    active_lr[f] = es
                elif step == f.step + f.steps and f in active_lr:
                    active_lr.pop(f).close()
            x, y = setup.batch(step)
            for f in now:
                if f.kind in ("nan_input", "inf_input"):
                    x = poison_batch(x, math.nan if f.kind == "nan_input" else math.inf)
            with contextlib.ExitStack() as fwd:
                dtype = autocast_dtype
                for f in now:
                    if f.kind == "fp16_overflow":
                        assert f.layer is not None
                        fwd.enter_context(fp16_overflow(model.get_submodule(f.layer)))
                if dtype is not None:
                    fwd.enter_context(torch.autocast(device_type, dtype=dtype))
                out = model(x)
            loss = setup.loss_fn(out.float(), y)
            for f in now:
                if f.kind == "nan_loss":
                    loss = poison_loss(loss)
            losses.append(float(loss.detach()))
            loss.backward()
            for f in now:
                if f.kind in ("nan_grad", "inf_grad"):
                    assert f.layer is not None
                    corrupt_grad_(model, f.layer, math.nan if f.kind == "nan_grad" else math.inf)
                elif f.kind == "grad_spike":
                    scale_grads_(model, f.factor or SPIKE_FACTOR, f.layer)
            lrs.append(float(opt.param_groups[0]["lr"]))
            try:
                guard.step(loss)
            except Exception as e:  # the run's outcome, reported to the caller
                error = e
                opt.zero_grad()
                break
            opt.zero_grad()
            done = step + 1
            if check_state and not state_finite(model, opt):
                bad.append(step)
    finally:
        for es in active_lr.values():
            es.close()
    guard.close()
    return FaultRun(losses, list(guard.events), bad, done, error, guard, lrs)
