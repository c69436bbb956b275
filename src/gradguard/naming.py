"""Layer names: which module each parameter belongs to, in the model's own order.

Names are module paths of the *user's* model (``encoder.layers.3.attn.q_proj.weight``):
wrappers that add a prefix or a path segment (DDP's ``module.``, ``torch.compile``'s
``_orig_mod.``, activation checkpointing, FSDP1) are looked through
(:func:`gradguard.distributed.unwrap`, :func:`gradguard.distributed.clean_name`). Parameters are listed in module registration order, not in param-group
order: with the usual decay/no-decay groups the head would otherwise come before the
LayerNorms, and "the first bad layer" and "the layers after it" would be wrong.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from .distributed.world import clean_name, unwrap
from .errors import GradGuardWarning, caller_stacklevel

#: Layer name of parameters registered directly on the root module.
ROOT_LAYER = "(root)"
#: Name prefix of parameters that no module of the model holds.
OPTIMIZER_PREFIX = "optimizer.param_groups."


def layer_of(param_name: str) -> str:
    """The module path that owns a parameter: ``"enc.layers.3.q.weight" -> "enc.layers.3.q"``;
    parameters of the root module belong to ``"(root)"``."""
    head, _, _ = param_name.rpartition(".")
    return head or ROOT_LAYER


def named_optimizer_params(
    model: nn.Module, optimizer: torch.optim.Optimizer, *, warn: bool = True
) -> list[tuple[str, Tensor]]:
    """``(name, param)`` for every parameter the optimizer steps, named by the model, in
    the model's registration order; parameters the model does not hold come last, named
    ``optimizer.param_groups.<g>.params.<i>`` (with a warning: rollback and layer names
    cover them, but a model that holds all of them gives better names).

    Raises:
        ValueError: when the optimizer holds none of the model's parameters.
    """
    model = unwrap(model)
    order = {id(p): (i, clean_name(n))
             for i, (n, p) in enumerate(model.named_parameters(remove_duplicate=True))}
    known: list[tuple[int, str, Tensor]] = []
    other: list[tuple[str, Tensor]] = []
    seen: set[int] = set()
    for gi, group in enumerate(optimizer.param_groups):
        for pi, p in enumerate(group["params"]):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if id(p) in order:
                i, name = order[id(p)]
                known.append((i, name, p))
            else:
                other.append((f"{OPTIMIZER_PREFIX}{gi}.params.{pi}", p))
    if not seen:
        raise ValueError("optimizer has no parameters")
    if not known:
        raise ValueError(
            "optimizer holds none of the model's parameters: pass the model whose "
            "parameters the optimizer updates (model=..., optimizer=...)"
        )
    refuse_lazy([(n, p) for _, n, p in known] + other, "Guard(optimizer=...)", "build the guard")
    if other and warn:
        warnings.warn(
            f"Guard(model={type(model).__name__}): the optimizer also updates {len(other)} "
            "parameter(s) this model does not hold; they are guarded and rolled back, but "
            "named by position. Pass a module that holds them all (e.g. "
            "nn.ModuleList([model_a, model_b])) for layer names.",
            GradGuardWarning, stacklevel=caller_stacklevel(),
        )
    return [(n, p) for _, n, p in sorted(known, key=lambda t: t[0])] + other


def refuse_lazy(named: Iterable[tuple[str, Tensor]], who: str, then: str) -> None:
    """Raise ``ValueError`` naming the parameters of lazy modules (``nn.LazyLinear``) that
    no forward has given a shape yet: nothing can be measured of them."""
    lazy = [n for n, p in named if is_lazy(p)]
    if lazy:
        raise ValueError(
            f"{who}: {len(lazy)} of its parameters are not initialized yet "
            f"({', '.join(f'`{n}`' for n in lazy[:3])}{' ...' if len(lazy) > 3 else ''}: "
            "lazy modules such as nn.LazyLinear take their shapes from the first forward); "
            f"run one forward pass with a batch (the dry run torch asks for before the "
            f"optimizer is used), then {then}")


def head_params(model: nn.Module) -> set[int]:
    """``id``s of the parameters of the model's last module that has any, counting tied
    weights where they are *used* (GPT-2's ``lm_head.weight`` is ``wte.weight``): the
    output head, which AGC leaves unclipped by default."""
    named = [(clean_name(n), p) for n, p in unwrap(model).named_parameters(remove_duplicate=False)]
    if not named:
        return set()
    last = layer_of(named[-1][0])
    heads = {layer_of(n) for n, _ in named}
    if len(heads) < 2:
        return set()  # a single module is not a head on top of anything
    return {id(p) for n, p in named if layer_of(n) == last}


def optimizer_layout(optimizer: torch.optim.Optimizer) -> tuple[int, ...]:
    """Param-group sizes: changes when ``add_param_group`` (or an edit of a group's
    params) changes what the optimizer steps. Cheap enough to check every step."""
    return tuple(len(g["params"]) for g in optimizer.param_groups)


def norm_layers(model: nn.Module) -> list[str]:
    """The module paths of the model's normalisation layers (BatchNorm, LayerNorm,
    GroupNorm, RMSNorm, and any module whose class name ends in ``Norm``: `transformers`'
    ``LlamaRMSNorm``, ``T5LayerNorm``), affine or not. A remedy that says "add
    normalisation" to a network that has it is wrong (found by a stranger: a post-LN
    transformer on Adam 1e-2 without warm-up, told to add LayerNorm or residual
    connections, had both in every block)."""
    kinds = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
    return [clean_name(name) or ROOT_LAYER for name, m in model.named_modules()
            if isinstance(m, kinds) or type(m).__name__.endswith("Norm")]
