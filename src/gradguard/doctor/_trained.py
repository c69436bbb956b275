"""Weights the optimizer has already stepped: an ``init_too_large`` / ``init_too_small``
finding there may not be the init's doing, and then "re-init" is the wrong advice.

The depth probes (:mod:`.signal`, :mod:`.stacks`, the attention evidence of :mod:`._run`)
judge a layer's weights against the scale that keeps the signal steady (He/Xavier, or the
library's own; a normalisation layer's gains against 1). Before the first step, weights
off that scale were initialised so. ``gg.doctor`` is also what a user runs on a failing
batch in the middle of a run, with the optimizer that has been training the model; there
the same weights may have been moved by training. A 2-layer GPT-2 (width 32, from its
config) on AdamW at 0.3, 100x the LR that trains it, has weights 14x the Xavier std after
40 steps, its attention collapsed onto one key per query and its loss stuck near the
unigram model's; the doctor called it ``init_too_large`` and told the user to
re-initialise, which would throw away what the run had learnt
(``tests/test_doctor.py::test_weights_grown_in_training_are_not_blamed_on_the_init``).
The real zoo's healthy models trained 30 steps at 100x their LR on their batch: GPT-2,
Llama, Qwen2, T5, ViT, DINOv2, BEiT, PoolFormer, MobileViT, MLP-Mixer grow weights to
1.7-29x their scale, Mistral, GPT-NeoX, Phi, BLOOM, OPT, BART, Swin, PVT-v2 collapse an
attention, ConvNeXt, FocalNet and a post-LN encoder shrink a LayerNorm's gains to 0.3-0.6.

:func:`in_training` keeps the finding (the weights *are* off the scale for the depth: the
cause's meaning) and looks at the layer's optimizer state. An Adam-family optimizer moves
each weight by about its LR per step at most, so ``steps`` x the LR (the schedule's peak
where one is recorded) bounds how far training can have moved them: when that reaches
the distance from the recommended std to theirs (or, where the finding measured no std,
their whole rms), training moved them, and the remedy says so: lower the LR and go back to
weights from before they moved. Otherwise the init's advice stands (one Adam step at 1e-3
does not make an MLP's weights 3x too large: they were initialised so). An optimizer whose
step has no such bound (SGD, RMSprop: the gradient sets it) keeps the init's advice, with
the other reading added. The evidence gains ``optimizer_steps`` (None where the optimizer
keeps no count) and ``lr``.

A normalisation layer with constant groups of input (``unscaled_input`` from
:mod:`.norms`, "standardise the inputs") fed by a layer the optimizer has stepped gets the
other reading added: mid-run, such groups deep in a network are more likely channels whose
units died than the batch's blank patches.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from .._tensors import numeric_lr, planned_lr
from ._report import Finding

#: The sentence a depth finding's remedy continues with (attention evidence, :mod:`._run`).
ALSO = " Also, "
#: State keys of optimizers that move a weight by about their LR per step at most (Adam,
#: AdamW, NAdam, RAdam: the second moment; Adamax: its infinity norm). Not RMSprop: with
#: no first moment its early steps are 10x its LR.
BOUNDED = frozenset({"exp_avg_sq", "exp_inf"})
#: The other reading of a normalisation layer with constant groups of input (``unscaled_input``,
#: :mod:`.norms`) whose feeding layer the optimizer has stepped: the real zoo's MobileNets
#: and EfficientNet trained 30 steps at 100x their LR have it at BatchNorms deep in the
#: network, on standardised inputs.
DIED = ("If training got it there ({opt} has stepped the layer that feeds it), the constant "
        "groups are likely channels whose units died or stopped varying, as under a learning "
        "rate too high: lower it and restart from a checkpoint from before.")
#: The causes that blame the init, and whose weights training may have moved instead.
INIT_CAUSES = ("init_too_large", "init_too_small")


def stepped(module: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int | None, float | None] | None:
    """``(steps, lr)`` when ``optimizer`` holds state for a parameter of ``module`` (it has
    stepped them), else None. ``steps``: the largest step count among them (None where the
    optimizer keeps none: SGD's momentum buffer, RMSprop's average); ``lr``: their param
    group's numeric LR, or its schedule's planned peak when higher.

    Example:
        >>> lin = nn.Linear(2, 2)
        >>> opt = torch.optim.Adam(lin.parameters(), lr=0.1)
        >>> stepped(lin, opt) is None
        True
        >>> lin(torch.ones(1, 2)).sum().backward(); opt.step()
        >>> stepped(lin, opt)
        (1, 0.1)
    """
    params = list(module.parameters())
    held = [optimizer.state[p] for p in params if optimizer.state.get(p)]
    if not held:
        return None
    # doctor: host values are fine. Only an optimizer whose step is bounded by its LR counts
    counts = [float(st["step"]) for st in held if "step" in st and BOUNDED & st.keys()]
    steps = int(max(counts)) if counts else None
    lr = None
    for group in optimizer.param_groups:
        if any(p is q for p in params for q in group["params"]) and numeric_lr(group.get("lr")):
            lr = max(float(group["lr"]), planned_lr(group) or 0.0)
            break
    return steps, lr


def in_training(findings: list[Finding], model: nn.Module,
                optimizer: torch.optim.Optimizer | None) -> list[Finding]:
    """``findings`` with each ``init_too_large`` / ``init_too_small`` on a layer
    ``optimizer`` has stepped given the remedy for weights training moved, where it can
    have moved them that far (see the module docstring)."""
    if optimizer is None:
        return findings
    out = []
    opt = type(optimizer).__name__
    for f in findings:
        if f.cause == "unscaled_input" and isinstance(fed := f.evidence.get("fed_by"), str):
            feeder = _module(model, fed)
            if feeder is not None and stepped(feeder, optimizer) is not None:
                f = dataclasses.replace(f, remedy=f"{f.remedy} {DIED.format(opt=opt)}")
            out.append(f)
            continue
        module = _module(model, f.where) if f.cause in INIT_CAUSES else None
        done = stepped(module, optimizer) if module is not None else None
        out.append(f if module is None or done is None else _moved(f, module, opt, *done))
    return out


def _module(model: nn.Module, where: str | None) -> nn.Module | None:
    if not where:
        return None
    try:
        return model.get_submodule(where)
    except AttributeError:
        return None


def _distance(f: Finding, module: nn.Module) -> float | None:
    """How far training must have moved the layer's weights to leave them as found: from
    the recommended std to theirs where the finding measured both, else their own rms (a
    collapsed attention's projections, a normalisation layer's gains: all of it)."""
    std, rec = f.evidence.get("worst_layer_std"), f.evidence.get("recommended_std")
    if isinstance(std, float) and isinstance(rec, float) and math.isfinite(std) and math.isfinite(rec):
        return abs(std - rec)
    weights = [p.detach().float() for p in module.parameters() if p.ndim >= 1 and p.numel()]
    if not weights:
        return None
    return float(torch.cat([w.flatten() for w in weights]).pow(2).mean().sqrt())


def _moved(f: Finding, module: nn.Module, opt: str, steps: int | None, lr: float | None) -> Finding:
    ev = {**f.evidence, "optimizer_steps": steps, "lr": lr}
    need = _distance(f, module)
    if steps is None or lr is None or need is None:  # no bound on how far training moved them
        return dataclasses.replace(f, evidence=ev, remedy=(
            f"{f.remedy} If training moved them ({opt} has stepped these weights), lower the "
            "learning rate and restart from a checkpoint from before instead."))
    if lr * steps < need:  # training cannot have moved them that far: the init did
        return dataclasses.replace(f, evidence=ev)
    large = f.cause == "init_too_large"
    std, rec = f.evidence.get("worst_layer_std"), f.evidence.get("recommended_std")
    if isinstance(std, float) and isinstance(rec, float) and rec > 0:
        what = (f"`{f.where}` has weights of std {std:.3g}, {std / rec:.3g}x the {rec:.3g} that "
                "keeps the signal steady")
    elif f.evidence.get("attention_collapsed"):
        what = (f"the attention at `{f.where}` has collapsed to about one key per query (entropy "
                f"{f.evidence.get('attention_entropy_min', math.nan):.2g} of uniform): its "
                "query/key logits are too large")
    elif isinstance(gain := f.evidence.get("norm_weight_rms"), float):
        what = f"`{f.where}` has gains of rms {gain:.3g} and passes the signal on scaled down"
    else:
        what = f"the weights at `{f.where}` are too {'large' if large else 'small'} for the depth"
    also = f.remedy[f.remedy.index(ALSO):] if ALSO in f.remedy else ""
    qk = ", or add QK-LayerNorm" if f.evidence.get("attention_collapsed") and large else ""
    remedy = (f"{what}, after {steps} step{'s' if steps != 1 else ''} of {opt} at lr {lr:.3g}, "
              f"which can move each weight by up to {lr * steps:.3g}: training "
              f"{'grew' if large else 'shrank'} them, as a learning rate too high does"
              f"{'' if large else ' (or a weight decay too strong)'} (re-initialising would "
              "throw away what the run learnt). Lower the learning rate "
              "and restart from a checkpoint from before they moved (gg.Recovery rolls back and "
              f"lowers it by itself){qk}{', or add weight decay' if large else ''}.{also}")
    return dataclasses.replace(f, remedy=remedy, evidence=ev)
