"""An LR far too high from the first step, with no spike, no NaN and no loss that rises:
the weights grow. Measured once, ``STEP`` steps into the run; acted on at ``DECIDE``.

Some runs at an LR many times too high never trip a rung: a pre-LN ViT on AdamW at 30x
trains, its loss falls with the healthy run's for the first 40 steps, and it ends at 4.3x
its twin's held-out loss. The damage is done in the first updates: an Adam-like step moves
every weight by about the LR, and at 30x that doubles the typical layer's weights within
20 steps, past what any LR lowered later undoes (docs/recovery.md, "Weights that grow from
the first step"; lowering it from step 20's weights ended at 1.2-1.8, against 1.4 for
keeping it). What tells it is how much the weights grew: the median over the weight
matrices of ``||W_20|| / ||W_0||``. Healthy runs grow it by at most 1.57x (a char LSTM
on Adam 1e-2, benchmarks/rescue.py's healthy runs and twins; 1.38x for transformers'
GPT-2, Llama, BERT, ViT, ResNet and ConvNeXt at their usual LRs); runs at an LR 10-100x
too high on Adam, AdamW, RMSprop and SGD by 2.3x-27x.

When it reached ``GROWTH`` (2x) and the ladder has not acted yet, the Recovery keeps a copy
of the weights before the first step (kept in memory from the start) and waits until step
``DECIDE``: a run whose loss sat at ``PLATEAU`` (80%) of the fresh model's or more at
``STEP`` and is down to ``LEARNT_LATE`` (1%) of it by then (the median of its last five)
learnt at that LR, and is left alone; any other rolls back to those weights with the LR
capped (a run whose ladder rolled back meanwhile has no growth left to judge). Growth
alone does not tell the two apart: a GRU that recalls its first token on Adam 0.06 grows
its weights 4x by step 20 at the fresh model's loss, then learns to 0.1%-0.007% of it by
step 60, where its twin at a tenth of the LR never learns. The runs the rule helps (an LR 10-100x too high on Adam, AdamW, RMSprop,
SGD, a ViT, lab T6) stand at 3.6% of their fresh loss or more at step 60 (a data study
of 30 runs over 16 setups; a share of 10% there would spare a digits MLP on Adam at 30x
whose clipped loss dipped to 5% of its fresh one by step 60 and ended 2.3x its twin).

The cap: the growth scales with the LR (sign-like updates move each weight by about the
LR), so the cap ``HEALTHY / (growth - 1)`` (no lower than ``FLOOR``) aims the median layer at growing
by ``HEALTHY`` (20%) over the same steps. Matrices that start at zero (a LoRA ``B``, a
zero-initialised head) have no ratio and are left out; so are vectors (biases, norms),
and a network of a single matrix (``MIN_MATRICES``). Not under ``torch.distributed``
(each rank holds its own shards: the ranks must decide alike), nor with ``Recovery(early_growth=False)``, nor for a closure optimizer (LBFGS: a
step is several quasi-Newton updates, none scaled by the LR), nor when the loss is down to
``LEARNT`` (10%) of the fresh model's at ``STEP``: a fit. One host read, once per run
(two more when the growth reached ``GROWTH``: the losses, at ``STEP`` and ``DECIDE``).
"""

from __future__ import annotations

import copy
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..events import Event

if TYPE_CHECKING:
    from ..guard import Guard
    from ._recovery import Recovery
    from .ladder_types import Trigger

#: The step (counted from 0) before which the growth of the first updates is judged.
STEP = 20
#: The step (counted from 0) at which a growth found at ``STEP`` is acted on, unless the
#: loss learnt by then (a data study of 30 runs over 16 setups, helped and harmed: deciding
#: at 100 loses five of the runs the rule helps, whose loss dips to 4-10% of the fresh
#: model's near step 100 on Adam before it fails; at 60 one, an offset regression whose
#: fresh loss is the offset).
DECIDE = 60
#: The latest losses whose median says whether the run learnt (``LEARNT``, ``LEARNT_LATE``).
RECENT = 5
#: The median growth of the weight matrices that says the LR is far too high.
GROWTH = 2.0
#: The growth (over 1) the capped LR aims the median matrix at over ``STEP`` steps.
HEALTHY = 0.2
#: The deepest cut: an LR at most 100x too high is assumed.
FLOOR = 0.01
#: A loss down to this share of the fresh model's by ``STEP`` is a fit, whatever the weights
#: did to reach it: no LR far too high brings it there (found by strangers: a GRU that
#: recalls its first token, Adam at 0.2, had its loss at 0.6% of the fresh model's at step
#: 20, its recurrent weights grown 13x, and was rolled back from them; a GELU regression on
#: Adam 0.1, better than at 0.01 unguarded, at 7.7% and 9.4% was rolled back to 2.2-2.5x its
#: unguarded loss. The rescue suite's runs the rule rolls back are at 22% or more, the same
#: regression at Adam 0.3 and 1.0, far too high, at 44-50%).
LEARNT = 0.1
#: A loss down to this share of the fresh model's by ``DECIDE`` learnt at the LR that grew
#: the weights: the growth found at ``STEP`` is left alone, ...
LEARNT_LATE = 0.01
#: ... when the loss still sat at this share of the fresh model's or more at ``STEP``: the
#: weights grew before the run learnt anything, and what it learnt came after (a task found
#: after a plateau). A run already falling at ``STEP`` fits as its weights grow, and its
#: training loss tells no fit that generalises from one that does not (found by a stranger:
#: a GELU MLP memorising 128 digits on Adam at 33x, at 14-62% of its fresh loss at step 20
#: and under 1% by step 60, spared, ended 2.2-3.0x its twin's held-out loss; rolled back,
#: 0.94x; the GRU the deferral spares sat at 92-102% at step 20).
PLATEAU = 0.8
#: A weight matrix initialised below ``TINY_INIT`` of PyTorch's default init (its norm,
#: :func:`default_norm`) has its growth judged from ``SMALL_INIT`` of it: weights that grow
#: from a tiny init towards the usual scale are no LR far too high (found by a stranger:
#: ResNets and RegNets from `transformers` configs with every weight x0.01, under
#: BatchNorm, train on SGD as their twins do, 0.095-0.20 held-out; their weights grew 37x
#: from it by step 20, and the rollback to them with the LR capped x0.01 ended 6.5-11x
#: worse, "training recovered"; a digits MLP at N(0, 0.01), 0.14-0.2 of the default scale,
#: on Adam 3e-3, 1.17x its unguarded loss). Judged from a quarter the ResNets were still
#: rolled back (their weights at 0.6x the default scale by step 20), 2-3x.
SMALL_INIT = 0.5
#: ... an init at this share of the default scale or more is judged from its own norm
#: (found by a regression hunt: judged from half the default's, Llama and GPT-2 from
#: `transformers` configs at a width of 64, their std 0.02 a quarter of the default scale
#: there, went unrescued at AdamW 0.01, 1.46-1.69x their twin against 1.10-1.13x).
TINY_INIT = 0.25
#: The weight matrices a network needs for its growth to be judged: a single linear map
#: (a linear or logistic regression) grows to its solution's norm, whatever the LR (found
#: by a stranger: ``nn.Linear`` fitting ``x.sum`` on SGD 0.05, test MSE 1e-13 unguarded,
#: was rolled back twice and ended at 3.5-5.4; logistic regression on the digits at SGD
#: 0.5 ended at 1.9x its unguarded held-out loss).
MIN_MATRICES = 2


@dataclass
class Noted:
    """A growth found at ``STEP``, to be acted on at ``DECIDE``: its ratio, the loss's
    level then, and a copy of the weights before the first step (the ring of snapshots may
    drop them by then). A checkpoint taken between the two holds the copy too (the one
    snapshot a checkpoint holds: found by a stranger, an HF Trainer run at 33x resumed from
    its checkpoint of step 40, without ``snapshot_dir``, could not roll back at step 60 and
    ended as the unguarded run, 1.7x the run never interrupted)."""

    ratio: float
    #: the loss's level at ``STEP``, a share of the fresh model's (:func:`level`)
    share: float | None = None
    fresh: dict[str, Any] | None = field(default=None, repr=False)

    def state_dict(self) -> dict[str, Any]:
        return {"ratio": self.ratio, "share": self.share, "fresh": self.fresh}

    def spared(self, share: float | None) -> bool:
        """Whether a loss at ``share`` of the fresh model's at ``DECIDE`` learnt at the LR
        that grew the weights: down to ``LEARNT_LATE`` after it sat at ``PLATEAU`` or
        more at ``STEP``."""
        return (self.share is not None and self.share >= PLATEAU and share is not None
                and share <= LEARNT_LATE)


def take(rec: Recovery, trig: Trigger) -> Noted | None:
    """The growth noted at ``STEP`` for a rollback the ladder decided before ``DECIDE``
    (a spike, a rise, units that died, weights an update made non-finite), which then goes
    to the weights before the first step with the LR capped, as the decision at
    ``DECIDE`` would have (found in the A/B of the deferral: an MLP on SGD momentum at 30x,
    its weights grown 10x by step 20, had its units die at step 49 and was rolled back to
    its step-49 weights, then relapsed). None, leaving the noted growth, for a stretch of
    non-finite or off-scale steps (the batches' fault, perhaps: such a rollback may be
    undone, and the weights it replaced kept) and when none was noted."""
    noted = rec._grew
    if trig.fresh is not None or noted is None or trig.kind not in ("spike", "weights"):
        return None
    if noted.fresh is None:  # an older checkpoint's: on disk, with snapshot_dir
        noted.fresh = fresh_weights(rec)
        if noted.fresh is None:
            return None
    rec._grew = None
    return noted


def unsettled(noted: Noted, step: int) -> Event:
    """The warning for a growth noted at ``STEP`` that a run ended at ``step`` before
    ``DECIDE`` without a decision on (found by a stranger: a run at 33x that ended at step
    55 read "No gradient trouble", its weights grown 25x)."""
    return Event(
        kind="lr_too_high", step=step, severity="warning", value=noted.ratio,
        threshold=GROWTH,
        message=(f"step {step}: the weights grew {noted.ratio:.3g}x in the first {STEP} steps "
                 "(the median weight matrix's norm): an LR far too high, unless the loss "
                 f"learns by step {DECIDE}, where the Recovery would have rolled back to the "
                 "weights before the first step with the LR capped at "
                 f"x{cap(noted.ratio):.2g}; the run ended before that"),
        remedy=(f"Lower the learning rate (x{cap(noted.ratio):.2g} aims the weights at a "
                "healthy growth), or train longer under the guard."),
        data={"growth": noted.ratio, "unsettled": True})


def fresh_weights(rec: Recovery) -> dict[str, Any] | None:
    """The snapshot of the weights before the first step: in memory, else on disk when no
    snapshot in memory is from before it (a run resumed within its first ``growth.STEP``
    steps: found by a stranger, a resume at step 10 of an Adam run at 30x skipped the
    test that rolls the uninterrupted run back at step 20); None when neither holds it."""
    if rec.store.steps()[:1] == [-1]:
        return rec.store.load(0)
    disk = rec.ring.disk
    if disk is None or -1 in rec.store.steps():
        return None
    rec.ring.wait()
    return disk.load(0) if disk.steps()[:1] == [-1] else None


def relayout(rec: Recovery, guard: Guard) -> None:
    """The optimizer's parameter groups changed (``add_param_group``) while a growth waits
    for ``DECIDE``: the copy of the weights before the first step holds an optimizer state
    of the old groups, which no longer loads (found by a regression hunt: a layer unfrozen
    at step 40 of an Adam run at 30x, and the decision at step 60 raised "loaded state dict
    has a different number of parameter groups" with the weights already put back). Before
    the first step the optimizer had no state: the copy takes the groups as they are now,
    their state empty; a copy with a state (a resumed optimizer's) is dropped, and the
    growth with it."""
    noted = rec._grew
    if noted is None or noted.fresh is None:
        return
    saved = noted.fresh.get("optimizer") or {}
    if saved.get("state"):
        rec._grew = None
        return
    from .actions import local_optimizer  # (actions imports this module)

    now = local_optimizer(guard.optimizer).state_dict()
    noted.fresh["optimizer"] = {"state": {}, "param_groups": copy.deepcopy(now["param_groups"])}


def why(noted: Noted) -> str:
    """The words a rollback that :func:`take` redirected adds to its reason."""
    return (f" (the weights had grown {noted.ratio:.3g}x in the first {STEP} steps: back to "
            "the weights before the first step, the LR capped)")


def growth(guard: Guard, fresh: dict[str, Any]) -> float | None:
    """The median over the weight matrices the guard's optimizer steps of their norm now
    over their norm in ``fresh`` (the snapshot of the weights before the first step); None
    when fewer than ``MIN_MATRICES`` qualify. One host read. Another guard's weights over
    the same model are its own to judge (found by a stranger: a head on Adam under its
    guard, beside an encoder on SGD at 30x under another, was rolled back for the
    encoder's growth and told to set its LR 9x lower)."""
    saved = fresh["model"]
    mine = {id(p) for p in guard.telemetry.params}
    now, before = [], []
    for name, p in guard.model.named_parameters():
        w = saved.get(name)
        if w is None or id(p) not in mine or p.ndim < 2 or not p.requires_grad \
                or not p.is_floating_point():
            continue
        now.append(p.detach())
        before.append(w)
    if len(now) < MIN_MATRICES:
        return None
    device = guard.telemetry.device
    norms = torch.stack([torch.linalg.vector_norm(t.float()).to(device) for t in now + before])
    values = norms.tolist()
    n = len(now)
    # a tiny init's from SMALL_INIT x the default init's norm (see TINY_INIT)
    floors = [SMALL_INIT * d if b < TINY_INIT * d else 0.0
              for d, b in zip((default_norm(t) for t in now), values[n:])]
    ratios = [a / max(b, f) for a, b, f in zip(values[:n], values[n:], floors)
              if b > 0 and math.isfinite(a)]
    return statistics.median(ratios) if ratios else None


def default_norm(weight: torch.Tensor) -> float:
    """The norm PyTorch's default init gives a weight of this shape (``nn.Linear``'s and
    the convolutions' Kaiming uniform with ``a=sqrt(5)``: elements of variance
    ``1 / (3 * fan_in)``, ``fan_in`` the elements per output row): ``sqrt(rows / 3)``."""
    return math.sqrt(weight.shape[0] / 3) if weight.ndim >= 2 else 0.0


def level(guard: Guard, initial: float | None, flushed: Sequence[float] = ()) -> float | None:
    """The latest losses' level (the last five's median: those taken since the last flush,
    after ``flushed``, the last ones the flush before read) as a share of the fresh
    model's (``initial``, else the first of them); None with fewer than three. One host
    read."""
    losses = list(flushed) + guard.telemetry.pending_losses()
    first = initial if initial is not None else losses[0] if losses else None
    if first is None or not first > 0 or len(losses) < 3:
        return None
    return statistics.median(losses[-RECENT:]) / first


def early_inflation(optimizer: torch.optim.Optimizer) -> float:
    """How much larger than later ones the optimizer's first ``STEP`` updates are, on
    average, at one LR: ``RMSprop``'s squared-gradient average starts at zero with no bias
    correction, so its k-th update is ``1 / sqrt(1 - alpha**k)`` times a settled one (10x
    the first, 2.2x the twentieth at torch's ``alpha=0.99``: 3.9x over the first 20). Its
    growth is weighed at that discount. 1 for every other optimizer (Adam & co. correct
    the bias). ``Adagrad``'s k-th update is ``1 / sqrt(k)`` times its first: its first
    ``STEP`` average 1.7x its ``STEP``-th. Found as a stranger: ``RMSprop`` at torch's own
    default LR (1e-2) grew a digits MLP's weights 2.3x in 20 steps and was rolled back as
    "an LR far too high"; unguarded it ends best (held-out 0.146 against 0.174 over 5
    seeds)."""
    return statistics.fmean(_inflation(optimizer, k) for k in range(1, STEP + 1))


def first_inflation(optimizer: torch.optim.Optimizer) -> float:
    """How much larger than a settled one the optimizer's first update from a fresh state
    is, at one LR: 10x for ``RMSprop`` at ``alpha=0.99``, ``sqrt(STEP)`` (4.5x) for
    ``Adagrad`` (its k-th update is ``1 / sqrt(k)`` times its first: it has no settled
    update, and its ``STEP``-th stands for one), 1 for every other optimizer. The cap
    for a wreck (:func:`.wreck.cap`) weighs the run's first update at that discount: it
    aims a settled update at the share the detectors call too large, not the first (found
    as a stranger: a digits CNN on Adagrad at 1.0 capped at x0.0058, its twin's LR
    0.033-0.1: 2-2.6x its twin's held-out loss)."""
    return _inflation(optimizer, 1)


def momentum_gain(optimizer: torch.optim.Optimizer) -> float:
    """How much larger than its first update from a fresh state a settled update of
    ``SGD`` with momentum is, at one LR and gradient: ``(1 - dampening) / (1 - momentum)``
    (the heavy ball's sum of the gradients' geometric series; 10x at 0.9: the bound, when
    the gradients keep their direction), the largest
    over the parameter groups; 1 for every other optimizer (Adam's moments normalise it)."""
    if not isinstance(optimizer, torch.optim.SGD):
        return 1.0
    gains = [(1.0 - float(g.get("dampening", 0.0))) / (1.0 - float(m))
             for g in optimizer.param_groups
             if isinstance(m := g.get("momentum", 0.0), (int, float)) and 0.0 < m < 1.0]
    return max([1.0, *gains])


def _inflation(optimizer: torch.optim.Optimizer, k: int) -> float:
    """The k-th update (from 1) over a settled one (see :func:`early_inflation`)."""
    if isinstance(optimizer, torch.optim.Adagrad):
        if any(g.get("initial_accumulator_value", 0.0) != 0.0 for g in optimizer.param_groups):
            return 1.0  # its sum starts where the user set it: no first-step inflation
        return math.sqrt(STEP / k)
    if not isinstance(optimizer, torch.optim.RMSprop):
        return 1.0
    alphas = [float(a) for g in optimizer.param_groups
              if isinstance(a := g.get("alpha"), (int, float)) and 0.0 <= a < 1.0]
    if not alphas:
        return 1.0
    return 1.0 / math.sqrt(1.0 - max(alphas) ** k)


def cap(ratio: float) -> float:
    """The LR factor that aims the median matrix at ``HEALTHY`` growth."""
    return max(FLOOR, min(1.0, HEALTHY / (ratio - 1.0)))
