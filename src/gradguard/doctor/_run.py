"""``doctor()``: validate the arguments, run the probes, leave everything as it was."""

from __future__ import annotations

import dataclasses
import math
import re
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from .._tensors import call_model, iter_tensors, numeric_lr
from ..naming import refuse_lazy
from ._attention import attention_evidence
from ._budget import Budget, default_budget
from ._capture import is_weight_layer, run_capture
from ._report import Diagnosis, Finding
from ._steps import FirstStep
from ._trained import in_training
from .gradcheck import probe_custom_functions, slice_batch
from .inputs import probe_input_scale, probe_nonfinite_input, probe_target_scale
from .lr import LR_PROBE_STEPS, probe_lr
from .norms import probe_norm_gain
from .numerics import (
    probe_disconnected,
    probe_half_headroom,
    probe_logit_scale,
    probe_masked_targets,
    probe_nonfinite,
    probe_zero_flow,
)
from .recurrent import probe_recurrent
from .sharpness import SHARPNESS_BATCH
from .signal import probe_signal
from .stacks import find_stacks, probe_stacks

# messages of torch errors that mean "these tensors do not fit together"
_SHAPE_ERR = re.compile(
    r"shape|size mismatch|sizes? of tensors|mat1 and mat2|must match the size|expected input|"
    r"Expected .* to have|dimension|channels|out of range|out of bounds|index out of|dtype|"
    r"scalar type",
    re.I,
)


def split_batch(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise ValueError(
        f"doctor batch: expected an (inputs, targets) pair (targets may be None), got "
        f"{type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
    )


def _shape(x: Any) -> str:
    if isinstance(x, Tensor):
        return f"{tuple(x.shape)} {str(x.dtype).replace('torch.', '')}"
    if isinstance(x, (tuple, list)):
        return "(" + ", ".join(_shape(v) for v in x) + ")"
    if isinstance(x, dict):
        return "{" + ", ".join(f"{k}: {_shape(v)}" for k, v in x.items()) + "}"
    return type(x).__name__


def _user_frames(e: BaseException) -> bool:
    """True when the exception was raised by torch ops called from the user's code."""
    return isinstance(e, (RuntimeError, IndexError)) and bool(_SHAPE_ERR.search(str(e)))


def forward_checked(model: nn.Module, inputs: Any) -> Any:
    try:
        return call_model(model, inputs)
    except (RuntimeError, IndexError) as e:
        if _user_frames(e):
            raise ValueError(
                f"doctor batch: inputs {_shape(inputs)} do not fit {type(model).__name__}: {e}"
            ) from e
        raise


def loss_checked(loss_fn: Callable[..., Any], out: Any, targets: Any, *, first: bool = False) -> Tensor:
    """``loss_fn`` on ``out`` and ``targets``, checked. ``first``: the doctor's first call,
    on the model as given, where whatever it raises is the spec's own mistake (a
    ``ValueError`` naming it: the CLI's usage error), not a finding about the model."""
    try:
        loss = loss_fn(out) if targets is None else loss_fn(out, targets)
    except Exception as e:
        if _user_frames(e):
            raise ValueError(
                f"doctor loss_fn: cannot compare the model output {_shape(out)} with targets "
                f"{_shape(targets)}: {e}"
            ) from e
        if first:
            raise ValueError(f"doctor loss_fn: raised {type(e).__name__} on the model output "
                             f"{_shape(out)} and targets {_shape(targets)}: {e}") from e
        raise
    if not isinstance(loss, Tensor):
        raise ValueError(f"doctor loss_fn: returned {type(loss).__name__}, expected a scalar Tensor")
    if loss.numel() != 1:
        raise ValueError(
            f"doctor loss_fn: returned a tensor of shape {tuple(loss.shape)}, expected a scalar "
            f"(reduce it, e.g. reduction='mean')"
        )
    if not loss.requires_grad:
        raise ValueError(
            "doctor loss_fn: the loss does not require grad: no trainable parameter reaches it "
            "(is the model frozen, or is the forward under torch.no_grad()?)"
        )
    return loss.reshape(())


@contextmanager
def preserved(model: nn.Module) -> Iterator[Callable[[], None]]:
    """Buffers (BatchNorm running stats), RNG state and ``training`` flags come back as they
    were; yields a function that puts the buffers back at any time."""
    bufs = [(b, b.detach().clone()) for b in model.buffers()]
    modes = [(m, m.training) for m in model.modules()]
    cuda = sorted({t.device.index or 0 for t in model.parameters() if t.device.type == "cuda"})

    def restore_buffers() -> None:
        with torch.no_grad():
            for b, saved in bufs:
                b.copy_(saved)

    with torch.random.fork_rng(devices=cuda):
        try:
            yield restore_buffers
        finally:
            restore_buffers()
            for m, mode in modes:
                m.training = mode


def sub_batch(inputs: Any, targets: Any, n: int) -> tuple[Any, Any] | None:
    """The first ``n`` samples of a batch whose tensors all share their first dimension (the
    batch dimension), or None when they do not or the batch is that small already."""
    sizes = {t.shape[0] for t in iter_tensors((inputs, targets)) if t.ndim >= 1}
    if len(sizes) != 1 or next(iter(sizes)) <= n:
        return None
    return slice_batch(inputs, n), slice_batch(targets, n)


def doctor(
    model: nn.Module,
    batch: Any,
    loss_fn: Callable[..., Tensor],
    optimizer: torch.optim.Optimizer | None = None,
    *,
    lr_probe_steps: int = LR_PROBE_STEPS,
    gradcheck_custom: bool = True,
    budget_s: float | None = None,
) -> Diagnosis:
    """Name the cause of exploding or vanishing gradients, with evidence and a remedy.

    One instrumented forward/backward pass on ``batch`` measures per-layer activation and
    gradient scales, activation saturation and dead units, non-finite values and where they
    first appear, gradients over time in recurrences, and parameters without a gradient;
    stacks of repeated blocks are compared block to block; custom autograd Functions are
    checked by finite differences in float64; with an ``optimizer``, a few steps at its LR
    (and smaller ones once the loss rises) test the learning rate, and for SGD the top
    curvature of the loss is compared with the stability limit.

    Nothing given is changed: parameters, their ``.grad``, buffers, the optimizer's state,
    the RNG state and ``training`` flags are as they were. The LR probe steps the model in
    place with its own optimizer and writes the parameter values back (no copy of the model).

    The probes share a time budget: the instrumented pass and the steps at the user's LR
    always run; smaller LRs, power iterations and further gradchecks run while it lasts, and
    ``Diagnosis.cut`` lists what it cut short.

    Args:
        model: the model.
        batch: ``(inputs, targets)``; ``model(inputs)`` (``model(*inputs)`` for a tuple,
            ``model(**inputs)`` for a dict) then ``loss_fn(output, targets)``
            (``loss_fn(output)`` when targets is None).
        loss_fn: returns a scalar loss tensor.
        optimizer: enables the LR probe.
        lr_probe_steps: optimizer steps per LR probe run.
        gradcheck_custom: check custom autograd Functions by finite differences.
        budget_s: seconds the probes share; default 5 s up to 30M parameters (ResNet-50 size), proportionally
            more above (:func:`gradguard.doctor._budget.default_budget`).

    Returns:
        Diagnosis: ``findings`` (most urgent first), ``top``, ``healthy``, ``to_dict()``.

    Example:
        >>> import torch, gradguard as gg
        >>> torch.manual_seed(0) and None
        >>> layers = []
        >>> for _ in range(12):
        ...     lin = torch.nn.Linear(32, 32)
        ...     _ = torch.nn.init.normal_(lin.weight, std=0.01)     # far too small
        ...     layers += [lin, torch.nn.ReLU()]
        >>> net = torch.nn.Sequential(*layers, torch.nn.Linear(32, 1))
        >>> x, y = torch.randn(64, 32), torch.randn(64, 1)
        >>> diag = gg.doctor(net, (x, y), torch.nn.MSELoss())
        >>> diag.top.cause, diag.healthy
        ('init_too_small', False)
    """
    t0 = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"doctor model: expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(inner := getattr(model, "_orig_mod", None), nn.Module):
        # a torch.compile'd module: the module it compiles, run eagerly (found by a
        # stranger: its layers were named `_orig_mod.1`, and dynamo recompiled the
        # doctor's hooks until its recompile limit, with a warning for each)
        model = inner
    refuse_lazy(model.named_parameters(), "doctor model", "call the doctor")
    params = [p for p in model.parameters()]
    if not params:
        raise ValueError(f"doctor model: {type(model).__name__} has no parameters; nothing to diagnose")
    if not any(p.requires_grad for p in params):
        raise ValueError(f"doctor model: all {len(params)} parameters of {type(model).__name__} are frozen")
    if not callable(loss_fn):
        raise TypeError(f"doctor loss_fn: expected a callable, got {type(loss_fn).__name__}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"doctor optimizer: expected a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
    if optimizer is not None:  # found by a stranger: one over another model's parameters
        mine = {id(p) for p in model.parameters()}  # probed nothing and said "healthy"
        if not any(id(p) in mine for g in optimizer.param_groups for p in g["params"]):
            raise ValueError("doctor optimizer: it holds none of the model's parameters; pass "
                             "the optimizer that updates this model (or None)")
    if lr_probe_steps < 1:
        raise ValueError(f"doctor lr_probe_steps={lr_probe_steps}: must be >= 1")
    if budget_s is not None and not (isinstance(budget_s, (int, float)) and budget_s > 0):
        raise ValueError(f"doctor budget_s={budget_s!r}: must be a number of seconds > 0, or None for the default")
    inputs, targets = split_batch(batch)
    n_params = sum(p.numel() for p in params)
    budget = Budget(float(budget_s) if budget_s is not None else default_budget(n_params), start=t0)
    findings: list[Finding] = []
    probes = ["inputs"]
    with preserved(model) as restore_buffers:
        findings += probe_nonfinite_input(inputs, targets)
        if not findings:
            stacks = find_stacks(model)
            torch.manual_seed(0)  # the LR probe's seed: its first step reuses this pass
            t_pass = time.perf_counter()
            cap = run_capture(
                model,
                lambda: forward_checked(model, inputs),
                lambda out: loss_checked(loss_fn, out, targets, first=True),
                blocks={p for paths in stacks.values() for p in paths},
            )
            # the instrumented pass costs 1.5-2 plain passes: a safe upper bound for one
            pass_s = time.perf_counter() - t_pass
            probes += ["numerics", "norms", "signal", "stacks", "recurrent", "disconnected"]
            first = min(
                (c for c in cap.calls if is_weight_layer(c.module) and not isinstance(c.module, nn.Embedding)),
                key=lambda c: c.order,
                default=None,
            )
            findings += probe_input_scale(
                inputs, first.path if first else None, first.in_absmax if first else None
            )
            findings += probe_target_scale(targets, cap.output_shapes)
            numeric = probe_nonfinite(cap, model)
            if numeric and not math.isfinite(cap.loss):
                numeric = probe_masked_targets(inputs, targets) or numeric
            findings += numeric
            if not numeric:
                findings += probe_half_headroom(cap)
            if gradcheck_custom:
                probes.append("gradcheck")
                findings += probe_custom_functions(cap, budget=budget)
            if not numeric:
                findings += probe_norm_gain(cap)
                depth = merge_depth(probe_signal(cap), probe_stacks(cap, model, stacks))
                findings += with_attention(depth, attention_evidence(cap.attention))
                findings += probe_recurrent(cap)
            findings += probe_disconnected(cap, model)
            if not numeric:
                findings += probe_zero_flow(cap, model)
            if not numeric:
                # logits far from 0: the head's own draw, or (behind another too-large
                # layer) a second finding, ranked after it
                others = {f.where for f in findings if f.cause == "init_too_large"}
                findings += [f if not others else dataclasses.replace(f, confidence=0.6)
                             for f in probe_logit_scale(cap, inputs, targets)
                             if f.where not in others]
            named = dict(model.named_parameters())
            start = (
                FirstStep(cap.loss, {id(named[n]): g for n, g in cap.param_grads.items() if g is not None})
                if optimizer is not None and not numeric
                else None
            )
            del cap
            restore_buffers()
            own = _own_step_size(optimizer) if optimizer is not None and not numeric else []
            if optimizer is not None and own:
                warnings.warn(
                    f"gg.doctor: the LR probe is not run: param group {own[0]} of "
                    f"{type(optimizer).__name__} has lr=None (the optimizer sets its own step "
                    "size, as Adafactor does with relative_step=True): there is no LR to scale",
                    RuntimeWarning, stacklevel=2)
            elif optimizer is not None and not numeric:
                probes.append("lr")
                sub = sub_batch(inputs, targets, SHARPNESS_BATCH)

                def step_loss(m: nn.Module, x: Any = inputs, y: Any = targets) -> Tensor:
                    return loss_checked(loss_fn, call_model(m, x), y)

                def curvature_loss(m: nn.Module) -> Tensor:
                    return step_loss(m, *sub) if sub is not None else step_loss(m)

                findings += probe_lr(
                    model,
                    optimizer,
                    step_loss,
                    steps=lr_probe_steps,
                    budget=budget,
                    curvature_loss=curvature_loss,
                    start=start,
                    pass_s=pass_s,
                )
    return Diagnosis(
        # mid-run, what training did to the weights reads otherwise than the init's doing
        findings=in_training(findings, model, optimizer),
        model=type(model).__name__,
        n_params=n_params,
        probes=probes,
        elapsed_s=time.perf_counter() - t0,
        budget_s=budget.total_s,
        cut=list(budget.cut),
    )


def _own_step_size(optimizer: torch.optim.Optimizer) -> list[int]:
    """The param groups whose LR is no number (None: a step size the optimizer computes
    itself, e.g. Adafactor's relative step); the LR probe scales ``group["lr"]``."""
    return [i for i, g in enumerate(optimizer.param_groups) if not numeric_lr(g.get("lr"))]


def with_attention(depth: list[Finding], attention: dict[str, Any]) -> list[Finding]:
    """Attention entropy as evidence for the init findings; a collapsed attention (one key per
    query at init) with no other init finding is one itself: its logits are too large."""
    if not attention:
        return depth
    for f in depth:
        if f.cause in ("init_too_large", "init_too_small"):
            f.evidence.update(attention)
    if not attention["attention_collapsed"]:
        return depth
    where, low = attention["attention_entropy_min_at"], attention["attention_entropy_min"]
    note = (
        f"the attention at `{where}` has collapsed to about one key per query (entropy {low:.2g} of "
        f"uniform; at a healthy init it is near 1): its query/key logits are too large"
    )
    large = [f for f in depth if f.cause == "init_too_large"]
    for f in large:
        f.confidence = max(f.confidence, 0.9)
        f.remedy += f" Also, {note}."
    if large:
        return depth
    return [
        *depth,
        Finding(
            "init_too_large",
            "warning",
            where or None,
            dict(attention),
            f"{note}, so queries and keys get almost no gradient: init their projections with std "
            f"~1/sqrt(width) (0.02 for transformers), keep the 1/sqrt(head_dim) scaling, or add "
            f"QK-LayerNorm.",
            0.7,
        )
    ]


def merge_depth(chain: list[Finding], stacks: list[Finding]) -> list[Finding]:
    """One finding per cause: a stack finding is kept only for a cause the chain of weight
    layers did not already name (the chain's finding names the worst layer)."""
    named = {f.cause for f in chain}
    return chain + [f for f in stacks if f.cause not in named]
