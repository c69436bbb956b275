"""Probes: where a non-finite value first appears, float16 headroom, parameters without
a gradient."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ._capture import Capture, is_weight_layer
from ._report import Finding

FP16_MAX = float(torch.finfo(torch.float16).max)
#: float16 activations/gradients above this share of the float16 range are one bad batch
#: away from overflowing.
FP16_HEADROOM = 0.5
_HALF = (torch.float16,)
#: A finite loss, or activation, this large: a backward that overflows float32 (3.4e38) does
#: so by the forward's scale (products of such values and the weights), not at a singular op.
HUGE_LOSS = 1e8
HUGE_ACTIVATION = 1e15


def _first_nonfinite(cap: Capture) -> tuple[str | None, str, torch.dtype | None, float]:
    """(module path, kind, dtype, largest finite input) of the innermost first module whose
    output is non-finite while its inputs were finite."""
    for c in sorted(cap.calls, key=lambda c: c.order):  # completion order: inner first
        if not c.out_finite and c.in_finite:
            return c.path or "(model)", "forward", c.out_dtype, c.in_absmax
    return None, "", None, 0.0


#: torch's default ``ignore_index`` (``F.cross_entropy``, ``nn.NLLLoss``, Hugging Face's labels).
IGNORE_INDEX = -100


def _label_tensors(x: Any, key: str = "") -> list[tuple[str, torch.Tensor]]:
    """The integer tensors of a batch part that hold labels: the targets themselves, or a
    mapping's ``labels``-like entries (a Hugging Face batch)."""
    if isinstance(x, torch.Tensor):
        return [(key, x)] if not x.is_floating_point() and not x.is_complex() and x.numel() else []
    if isinstance(x, dict):
        return [t for k, v in x.items() if "label" in str(k) or "target" in str(k)
                for t in _label_tensors(v, str(k))]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _label_tensors(v, key)]
    return []


def probe_masked_targets(inputs: Any, targets: Any) -> list[Finding]:
    """A non-finite loss whose batch's labels are all ``IGNORE_INDEX``: a mean over no
    target is 0/0 (found by a stranger: a GPT-2 whose labels a masking bug set to -100
    everywhere was told to clamp a log at ``(model)`` "|x| <= 0", and with its loss in
    ``loss_fn`` to use ``F.cross_entropy`` on logits, which it did)."""
    found = [(k, t) for k, t in (_label_tensors(targets, "targets")
                                 + _label_tensors(inputs, "inputs"))
             if bool((t == IGNORE_INDEX).all())]
    if not found:
        return []
    name, t = found[0]
    return [Finding(
        "nonfinite_loss", "error", "batch",
        {"labels": name, "shape": list(t.shape), "ignore_index": IGNORE_INDEX},
        f"every label of the batch ({name}, shape {tuple(t.shape)}) is {IGNORE_INDEX}, the "
        "ignore_index: the mean loss over no label is 0/0 = NaN. Check the label masking (a "
        "pad mask applied everywhere, labels shifted out, a batch of prompts only); a batch "
        "with nothing to learn from may be skipped",
        0.95)]


def probe_nonfinite(cap: Capture, model: nn.Module) -> list[Finding]:
    """A non-finite loss or gradient from finite inputs: localise it and name the cause."""
    path, _, dtype, in_absmax = _first_nonfinite(cap)
    named = [(n, g) for n, g in cap.param_grads.items() if g is not None]
    # one norm per gradient (a NaN/Inf anywhere makes it non-finite), one host copy
    norms = torch.stack([g.detach().float().norm() for _, g in named]).tolist() if named else []
    grads_bad = [n for (n, _), v in zip(named, norms) if not math.isfinite(v)]
    loss_bad = not math.isfinite(cap.loss)
    if path is None and not loss_bad and not grads_bad:
        return []
    if path is not None and dtype in _HALF:
        return [
            Finding(
                "half_precision_overflow",
                "error",
                path,
                {"dtype": str(dtype), "largest_finite_input": in_absmax, "fp16_max": FP16_MAX},
                f"`{path}` overflows float16 (max {FP16_MAX:.0f}; its inputs reach "
                f"{in_absmax:.3g}): run it in float32 or bfloat16 (torch.autocast(dtype="
                f"torch.bfloat16)), or add LayerNorm / scale the activations down before it.",
                0.95,
            )
        ]
    if path is not None and (bad := _nonfinite_weights(model, path)) is not None:
        return [
            Finding(
                "nonfinite_loss",
                "error",
                path,
                {"first_nonfinite_module": path, "largest_finite_input": in_absmax, "loss": cap.loss,
                 "weights_nonfinite": list(bad)},
                f"`{path}` has NaN/Inf weights ({bad[0]:,} of {bad[1]:,} values), so finite inputs "
                "give NaN/Inf: an update put them there (an LR too high, a NaN batch or gradient "
                "that reached the optimizer). Restore a checkpoint from before, and guard the "
                "step: gg.Guard skips a non-finite step before it reaches the weights.",
                0.95,
            )
        ]
    if path is not None:
        return [
            Finding(
                "nonfinite_loss",
                "error",
                path,
                {"first_nonfinite_module": path, "largest_finite_input": in_absmax, "loss": cap.loss},
                f"`{path}` turns finite inputs (|x| ≤ {in_absmax:.3g}) into NaN/Inf: guard its "
                f"log/div/sqrt/exp with a clamp or an eps (e.g. torch.log(x.clamp_min(1e-12))).",
                0.8,
            )
        ]
    if loss_bad:
        half = cap.loss_dtype in _HALF
        return [
            Finding(
                "half_precision_overflow" if half else "nonfinite_loss",
                "error",
                "loss_fn",
                {"loss": cap.loss, "model_output_finite": cap.output_finite, "loss_dtype": str(cap.loss_dtype)},
                "the loss overflows float16: compute it in float32 (loss_fn(out.float(), y))"
                if half
                else "the model's output is finite but the loss is NaN/Inf (log 0, x/0, overflow "
                "in the loss): use the fused, stable form (F.cross_entropy on logits, "
                "BCEWithLogitsLoss) or clamp with an eps.",
                0.95,
            )
        ]
    params = dict(model.named_parameters())
    half = any(params[n].dtype in _HALF for n in grads_bad)
    acts = [c for c in cap.calls if math.isfinite(c.out_absmax)]
    top = max(acts, key=lambda c: c.out_absmax) if acts else None
    # a forward whose values are already huge overflows its backward by their scale alone
    # (found by a stranger: a transformer without LayerNorm, its weights x10, a loss of
    # 1.7e14, was told to put an eps in a sqrt/log/pow it does not have)
    huge = abs(cap.loss) > HUGE_LOSS or (top is not None and top.out_absmax > HUGE_ACTIVATION)
    evidence = {"loss": cap.loss, "params_nonfinite_grad": grads_bad[:10],
                "n_params_nonfinite_grad": len(grads_bad)}
    if top is not None:
        evidence.update(max_abs_activation=top.out_absmax, at=top.path or "(model)")
    if half:
        remedy = "float16 gradients overflow: use torch.amp.GradScaler or bfloat16"
    elif huge:
        remedy = (f"the loss is finite ({cap.loss:.4g}) but so large that the backward pass "
                  f"overflows float32 in {len(grads_bad)} parameters (activations up to "
                  f"{top.out_absmax if top else math.nan:.3g}): the forward's scale grows "
                  "through the layers. Check the initialisation (gg.init.apply_(model, ...)) "
                  "and the inputs' scale, or normalise the blocks (LayerNorm).")
    else:
        remedy = (f"the loss is finite ({cap.loss:.4g}) but the backward pass gives NaN/Inf in "
                  f"{len(grads_bad)} parameters (the derivative of sqrt/log/pow at 0 is "
                  "infinite): add an eps inside those ops (torch.sqrt(x + 1e-12)).")
    return [
        Finding(
            "half_precision_overflow" if half else "nonfinite_loss",
            "error",
            grads_bad[-1].rpartition(".")[0] or "(model)",
            evidence,
            remedy,
            0.85,
        )
    ]


def probe_half_headroom(cap: Capture) -> list[Finding]:
    """float16 activations close to the float16 maximum (not yet overflowing)."""
    near = [
        c
        for c in cap.calls
        if c.out_dtype in _HALF and math.isfinite(c.out_absmax) and c.out_absmax > FP16_HEADROOM * FP16_MAX
    ]
    if not near:
        return []
    worst = max(near, key=lambda c: c.out_absmax)
    return [
        Finding(
            "half_precision_overflow",
            "warning",
            worst.path or "(model)",
            {"max_abs_activation": worst.out_absmax, "fp16_max": FP16_MAX, "headroom": FP16_MAX / worst.out_absmax},
            f"`{worst.path}` reaches {worst.out_absmax:.3g} in float16, {worst.out_absmax / FP16_MAX:.0%} "
            f"of its range: use bfloat16 or float32 for it, or normalise its input.",
            0.7,
        )
    ]


def _chosen_siblings(unused: list[str], ran: set[str]) -> tuple[str, str] | None:
    """``("heads", "heads.2")`` when every unused layer is an element of one container
    (``heads.1``) of which another element ran: a branch the model picks per batch, or
    one it forgot to use; None otherwise."""
    parents = {lay.rpartition(".")[0] for lay in unused}
    if not unused or "" in parents or len(parents) != 1:
        return None
    parent = parents.pop()
    took = sorted(p for p in ran if p.rpartition(".")[0] == parent and p not in unused)
    return (parent, took[0]) if took else None


def probe_disconnected(cap: Capture, model: nn.Module) -> list[Finding]:
    """Trainable parameters that receive no gradient from the loss.

    A layer cut off (never run, detached, under ``no_grad``) is a warning. A parameter that
    is the only one without a gradient in a layer whose other parameters got theirs is an
    optional input of that layer (a mask token used only when masking, a position table the
    batch does not reach): an info."""
    none = [n for n, g in cap.param_grads.items() if g is None]
    if not none:
        return []
    by_layer: dict[str, list[str]] = {}
    for n in none:
        by_layer.setdefault(n.rpartition(".")[0] or "(root)", []).append(n)
    got = [n for n, g in cap.param_grads.items() if g is not None]
    # a layer is cut off when nothing in it (its own parameters or its children's) gets a gradient
    cut = [lay for lay in by_layer if not any(n.startswith(lay + ".") or lay == "(root)" for n in got)]
    layers = cut or list(by_layer)
    ran = {c.path for c in cap.calls}
    unused = [lay for lay in layers if lay not in ran]
    none_cut = [n for lay in layers for n in by_layer[lay]]
    n_el = sum(p.numel() for n, p in model.named_parameters() if n in set(none_cut))
    if cut:
        why = (
            f"{len(unused)} of them never ran in forward (an unused branch)"
            if unused
            else "they ran but their output was detached, computed under no_grad, or not used by the loss"
        )
        remedy = (
            f"{len(none_cut)} trainable parameter(s) in {len(layers)} layer(s) ({', '.join(layers[:4])}"
            f"{', ...' if len(layers) > 4 else ''}) get no gradient; {why}: remove .detach()/no_grad "
            f"on that path, use the branch in the loss, or freeze it (requires_grad_(False))."
        )
        chosen = _chosen_siblings(unused, ran)
        if chosen:
            remedy += (f" If the model picks one of `{chosen[0]}.*` per batch (task heads, "
                       f"experts; this batch ran `{chosen[1]}`), that is expected of this "
                       "batch: diagnose one batch per branch.")
    else:
        remedy = (
            f"{len(none_cut)} parameter(s) ({', '.join(none_cut[:4])}{', ...' if len(none_cut) > 4 else ''}) "
            f"get no gradient while the rest of their layer does: an input used only in some "
            f"calls (a mask token, an optional embedding); freeze it if it is never meant to train."
        )
    return [
        Finding(
            "disconnected_layer",
            "warning" if cut else "info",
            layers[0],
            {"params_without_grad": none_cut[:20], "n_params_without_grad": len(none_cut), "n_elements": n_el, "layers": layers[:20]},
            remedy,
            0.9 if cut else 0.4,
        )
    ]


def _nonfinite_weights(model: nn.Module, path: str) -> tuple[int, int] | None:
    """``(non-finite values, values)`` of the module at ``path``'s own parameters when any is
    NaN/Inf, else None: a layer with NaN weights turns finite inputs into NaN, and the
    clamp-your-log advice is wrong for it (found mid-run: a VGG-11 and a ResNet trained at
    100x their LR, whose first conv then "turned finite inputs into NaN/Inf")."""
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return None
    own = [p.detach() for p in module.parameters(recurse=False)]
    if not own:
        return None
    bad = int(sum(int((~torch.isfinite(p)).sum()) for p in own))  # doctor: host values are fine
    return (bad, sum(p.numel() for p in own)) if bad else None


def probe_zero_flow(cap: Capture, model: nn.Module) -> list[Finding]:
    """No weight matrix gets any gradient: every trainable matrix's gradient is exactly
    zero (biases and gains may get theirs). No optimizer moves them, ever: all-zero weights
    (a network zeroed by mistake, an init that never ran) pass no signal forward and no
    gradient back. ReLU nets show it as dead units; with GELU, SiLU or Hardswish (a
    derivative that is not zero at 0) nothing else does: found as a stranger, timm's ViT,
    ConvNeXt, EfficientNet and Swin zeroed were "healthy: no finding", their loss at ln 10
    for good. A zero-initialised head is not this: its own weight gets a gradient (the
    features reach it), and the layers below get theirs after its first step."""
    named = dict(model.named_parameters())
    mats = [(n, g) for n, g in cap.param_grads.items()
            if g is not None and n in named and named[n].ndim >= 2]
    if not mats:
        return []
    # one host copy: the largest |gradient| of each matrix
    top = torch.stack([g.detach().abs().amax().float() for _, g in mats]).tolist()
    if any(v != 0.0 for v in top):
        return []
    zero = [n for n, p in named.items() if p.requires_grad and p.ndim >= 2
            and bool(p.detach().abs().amax() == 0)]
    if not zero:  # weights that pass nothing on (dead units, saturation): their probes say so
        return []
    where = zero[0].rpartition(".")[0] or zero[0]
    return [Finding(
        "init_too_small", "error", where,
        {"matrices": len(mats), "matrices_all_zero": len(zero), "zero_weights": zero[:20]},
        f"none of the {len(mats)} trainable weight matrices gets a gradient (every one exactly "
        f"0), and {len(zero)} are all zero, from `{where}` on: they pass no signal forward and "
        "no gradient back, and no optimizer ever moves them; initialise them (the model's "
        "own init, nn.init.kaiming_normal_, xavier_uniform_) rather than zeros.", 0.95)]


#: A fresh classifier's logits sit near 0 (its loss near ln C); logits of this rms or more
#: at the start, with the loss ``OVERCONFIDENT`` times ln C or more, were drawn too large.
LOGIT_RMS = 3.0
OVERCONFIDENT = 2.0


def probe_logit_scale(cap: Capture, inputs: Any, targets: Any) -> list[Finding]:
    """A classifier whose first logits are far from 0, its loss many times the ``ln C`` of
    a uniform guess: the layer that computes them was drawn too large (found by a stranger:
    a GPT-2 whose embedding was re-created as ``nn.Embedding``, N(0, 1), and tied to its
    head started at a loss of 45 against ln 128 = 4.85 and ended 33% worse; the doctor said
    healthy, while ``gg.init.audit`` saw the head 9.85x too large)."""
    labels = [t for _, t in _label_tensors(targets, "targets") + _label_tensors(inputs, "inputs")]
    if not labels or not math.isfinite(cap.loss):
        return []
    counts = {t.numel() for t in labels}
    heads = [c for c in cap.calls if c.out is not None and c.out.ndim >= 2
             and is_weight_layer(c.module) and c.out.shape[-1] >= 2
             and c.out.numel() // c.out.shape[-1] in counts]
    if not heads:
        return []
    head = max(heads, key=lambda c: c.order)  # the last: the classifier's
    classes = int(head.out.shape[-1]) if head.out is not None else 0
    uniform = math.log(classes)
    if not (head.out_rms >= LOGIT_RMS and cap.loss >= OVERCONFIDENT * uniform):
        return []
    return [Finding(
        "init_too_large", "warning", head.path,
        {"logit_rms": head.out_rms, "loss": cap.loss, "uniform_loss": uniform,
         "classes": classes},
        f"`{head.path}` starts with logits of rms {head.out_rms:.3g} over {classes} classes: "
        f"the loss is {cap.loss:.3g}, {cap.loss / uniform:.1f}x the {uniform:.3g} of a uniform "
        "guess, so the first updates unlearn a confidence the model never earned. Initialise "
        f"`{head.path}` (or the embedding tied to it) small: std about 1/sqrt(fan-in), or "
        "the library's own init (Hugging Face: 0.02)",
        0.8)]
