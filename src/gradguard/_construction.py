"""What a :class:`~gradguard.Guard` says of its optimizer at construction (and at its
first step, of weights cast since): an objective maximised, a step that evaluates its
closure again, half-precision weights whose ``eps`` is 0 or whose updates round away.
No device access: host values of the param groups only."""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING

import torch

from ._tensors import planned_lr
from .errors import GradGuardWarning, caller_stacklevel
from .events import Event
from .executors import maximizing

if TYPE_CHECKING:
    from .config import GuardConfig
    from .guard import Guard


def loss_sign(optimizer: torch.optim.Optimizer) -> float:
    """-1 when the optimizer maximizes (``maximize=True``): the value passed to
    ``guard.step`` is then the objective it ascends, and the guard records and judges its
    negation, a loss like any other (a higher objective is a lower loss). Param groups that
    disagree have no one loss: the value is taken as a loss, and a warning says so."""
    sign = maximizing(optimizer)
    if sign is None:
        warnings.warn(
            "Guard: the optimizer's param groups mix maximize=True and maximize=False; the "
            "value passed to guard.step() is judged as a loss to minimise (its spikes and "
            "rises as trouble): turn the loss tests off (Recovery(loss_rise=False, "
            "lr_probe=False)) if it is an objective to maximise", GradGuardWarning, stacklevel=caller_stacklevel())
    return -1.0 if sign else 1.0


def warn_no_loss() -> None:
    """Say once that ``guard.step()`` came without a loss while a Recovery is on: a loop
    that replaced ``optimizer.step()`` with ``guard.step()`` word for word. The gradient
    tests still act; the loss tests cannot (a digits MLP on Adam 300x its LR: 1.12x and
    0.96x its twin with the loss, 3.93x and 2.60x without; 18.7x and 20.4x unguarded)."""
    warnings.warn(
        "guard.step() got no loss: gradguard's Recovery judges the loss as well as the "
        "gradients (a first update that wrecks the weights, a loss that rises and stays up, "
        "the LR probe, a change of data), and those tests are off without it. Pass this "
        "step's loss: guard.step(loss).", GradGuardWarning, stacklevel=caller_stacklevel())


def weight_dtypes(optimizer: torch.optim.Optimizer) -> frozenset[torch.dtype]:
    """The dtypes of the parameters ``optimizer`` holds."""
    return frozenset(p.dtype for g in optimizer.param_groups for p in g["params"])


def recast(guard: Guard) -> None:
    """At the guard's first step: weights cast after it was built (``model.half()``,
    ``model.to(torch.bfloat16)`` on a model the optimizer already held) were not in the
    dtype :func:`warn_half_weights` judged at construction; judge them now, once (a
    digits MLP cast to float16 after the guard: Adam's eps of 1e-8, 0 in float16, wrote
    NaN into its weights at step 7 with no warning before)."""
    judged, guard._cast = guard._cast, None
    if weight_dtypes(guard.optimizer) != judged:
        for event in warn_half_weights(guard.optimizer, guard.step_count):
            guard.add_event(event)


def closure_config(cfg: GuardConfig, optimizer: torch.optim.Optimizer) -> GuardConfig:
    """``cfg`` for an optimizer whose ``step`` evaluates its closure again (L-BFGS's line
    search and iterations), said when it changes: no clip policy and no skip of a
    gradient or loss spike. Its curvature is built from the differences of those
    gradients, and one of them clipped by a coefficient that changes every step breaks
    them; its steps jump in norm and loss by design, and a skip of three in a row backed
    off its LR (found by a stranger: healthy L-BFGS runs on a digits MLP ended at a loss
    of 1e7 under ZClip and at chance under the recovery, 0.86-0.94 without). Non-finite
    steps are still skipped, and the ladder still acts on the loss."""
    import dataclasses

    rec = cfg.recovery
    off = (["clip"] if cfg.clip is not None else []) + (
        ["skip_spikes"] if rec is not None and rec.skip_spikes else [])
    if not off:
        return cfg
    if rec is not None:
        rec.skip_spikes = False
    warnings.warn(
        f"Guard(optimizer=...): {type(optimizer).__name__}.step evaluates its closure again "
        "within a step and builds its curvature from the differences of those gradients, "
        "whose norms jump by design: clipping the first would break them, and a skipped "
        f"spike backs off a healthy run, so this guard turns off {' and '.join(off)} (it "
        "still measures, skips non-finite steps and recovers from a rising loss). Pass "
        "clip=None and Recovery(skip_spikes=False) to silence this.",
        GradGuardWarning, stacklevel=caller_stacklevel())
    return dataclasses.replace(cfg, clip=None)


def warn_half_weights(optimizer: torch.optim.Optimizer, step: int = 0) -> list[Event]:
    """What half-precision weights cost that no guard can mend, said at construction:
    an ``eps`` that is 0 in float16 (:func:`warn_eps_underflow`) and updates that round
    away (:func:`warn_update_rounding`, also an ``update_ratio`` warning event at ``step``
    for the run's files and report: no later event shows it)."""
    events = []
    if (eps := warn_eps_underflow(optimizer)) is not None:
        # for the run's files and report too: a run whose updates blow up through it shows
        # loss spikes and rollbacks, and its verdict must name the eps (found by a stranger:
        # float16 weights on fused Adam, eps 1e-8, "recovered" at 5-10x its twin, no remedy)
        events.append(Event(
            kind="update_ratio", step=step, severity="warning", value=eps,
            message=f"step {step}: {type(optimizer).__name__}'s eps={eps:g} is 0 in float16, "
                    "the dtype of its parameters: where a gradient's square underflows, the "
                    "update divides by 0",
            remedy=EPS_REMEDY, data={"eps_underflow": eps}))
    said = warn_update_rounding(optimizer)
    if said is None:
        return events
    share, text, remedy = said
    return [*events, Event(kind="update_ratio", step=step, severity="warning", value=share,
                           message=f"step {step}: {text}", remedy=remedy,
                           data={"rounded_share": share})]


#: What to change when an optimizer's eps is 0 in float16 (:func:`warn_eps_underflow`).
EPS_REMEDY = ("Set the optimizer's eps to 1e-4 or more, or keep float32 weights and train "
              "under torch.autocast with a GradScaler.")


#: A share of the half-precision weights this large whose updates round away is warned of.
ROUNDED_SHARE = 0.1


def warn_update_rounding(optimizer: torch.optim.Optimizer) -> tuple[float, str, str] | None:
    """Weights kept in bfloat16 or float16 (not under autocast, whose weights stay float32)
    on an optimizer whose per-element update is at most about its LR (Adam's family and
    Lion: ``betas`` in the param group; RMSprop): a weight ``w`` has neighbours
    ``2**floor(log2|w|) * finfo.eps`` apart, and an update under half that is rounded
    away: an update of ``lr`` is lost on every ``|w|`` at or above the power of two past
    ``2 * lr / eps``. When ``ROUNDED_SHARE`` or more of those weights would lose even an update of the
    full LR (the schedule's peak, ``initial_lr``, when a scheduler recorded one), those
    weights do not train, and no guard can tell a step that changed nothing from a calm
    one: say so. Measured: a digits MLP in pure bfloat16 on Adam at 1e-4 ends at a loss of
    1.42 against 0.52 in float32; at 1e-5 its weights move 0.3% in 400 steps, against 2.5%.
    One device reduction per such parameter and one host read, at construction only.
    Returns the share, the sentence and the remedy when it warned."""
    lost = total = 0
    for group in optimizer.param_groups:
        if "betas" not in group and type(optimizer).__name__ != "RMSprop":
            continue
        lr = planned_lr(group) or group.get("lr")
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0:
            continue
        counts = []
        for p in group["params"]:
            if p.dtype in (torch.bfloat16, torch.float16) and p.numel():
                bound = 2.0 ** (math.floor(math.log2(2 * lr / torch.finfo(p.dtype).eps)) + 1)
                counts.append((p.detach().abs() >= bound).sum())
                total += p.numel()
        if counts:
            lost += int(torch.stack(counts).sum())
    if not total or lost < ROUNDED_SHARE * total:
        return None
    dtype = "bfloat16" if any(p.dtype == torch.bfloat16 for g in optimizer.param_groups
                              for p in g["params"]) else "float16"
    text = (f"{lost / total:.0%} of the {dtype} weights that {type(optimizer).__name__} "
            f"updates are so large that an update of the full LR is under half the spacing "
            f"of {dtype} numbers there and rounds away: those weights stop training, and "
            "nothing in the gradients shows it")
    remedy = (f"Keep float32 weights and train under torch.autocast(dtype=torch.{dtype}) "
              "(the optimizer then updates float32 copies).")
    warnings.warn(f"Guard(optimizer=...): {text}. {remedy}", GradGuardWarning,
                  stacklevel=caller_stacklevel())
    return lost / total, text, remedy


def warn_eps_underflow(optimizer: torch.optim.Optimizer) -> float | None:
    """Say at construction what no skip can stop: an ``eps`` that is 0 in float16 (Adam's
    1e-8, Adagrad's 1e-10) on float16 parameters. Where a gradient is exactly 0 (an input
    feature that is always 0, a dead unit) the update is 0 / (0 + 0) and NaN goes into the
    weights from finite gradients (a digits MLP in pure float16 on Adam: NaN weights after
    its first step, unguarded; guarded, three rollbacks and an abort). Returns the eps when
    it warned."""
    for gi, group in enumerate(optimizer.param_groups):
        eps = group.get("eps")
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps <= 0:
            continue  # Adafactor's (None, 1e-3) and the like
        halves = sum(1 for p in group["params"] if p.dtype == torch.float16)
        if halves and float(torch.tensor(eps, dtype=torch.float16)) == 0.0:
            warnings.warn(
                f"Guard(optimizer=...): {type(optimizer).__name__}'s eps={eps:g} (param group "
                f"{gi}) is 0 in float16, the dtype of {halves} of its parameters: where a "
                "gradient is exactly 0 (an input that is always 0, a dead unit) its update is "
                "0/0 and writes NaN into the weights from finite gradients, which no skip can "
                "stop. Set eps=1e-4 or more, or keep float32 weights and train under "
                "torch.autocast with a GradScaler.", GradGuardWarning, stacklevel=caller_stacklevel())
            return float(eps)
    return None
