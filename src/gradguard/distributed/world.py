"""Who this rank is, and what the user's modules are called under wrappers."""

from __future__ import annotations

import re

import torch.distributed as dist
from torch import nn

__all__ = ["WRAPPER_ATTRS", "clean_name", "is_distributed", "is_dtensor", "rank", "unwrap",
           "world_size"]


def is_distributed() -> bool:
    """True inside an initialised ``torch.distributed`` process group of 2+ ranks.

    Example:
        >>> import gradguard.distributed as ggd
        >>> ggd.is_distributed(), ggd.rank(), ggd.world_size()
        (False, 0, 1)
    """
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 outside torch.distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of ranks (1 outside torch.distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_dtensor(t: object) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (checked without importing it)."""
    return t is not None and hasattr(t, "device_mesh") and hasattr(t, "placements")


# ---- names: the user's module paths, not the wrappers' ---------------------------------

#: Attributes through which wrappers hold the user's module: FSDP1, activation
#: checkpointing (torchtitan wraps each block), ``torch.compile``. FSDP2 (``fully_shard``)
#: and tensor parallel (``parallelize_module``) keep the names as they are.
WRAPPER_ATTRS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")
_WRAPPER_SEGMENT = re.compile(r"(^|\.)(?:" + "|".join(WRAPPER_ATTRS) + r")(?=\.|$)")


def clean_name(name: str) -> str:
    """A parameter or module name without the path segments wrappers insert.

    Example:
        >>> clean_name("layers.0._checkpoint_wrapped_module._orig_mod.attn.wq.weight")
        'layers.0.attn.wq.weight'
        >>> clean_name("_fsdp_wrapped_module.head.bias")
        'head.bias'
    """
    return _WRAPPER_SEGMENT.sub("", name).lstrip(".")


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside ``DistributedDataParallel`` / ``DataParallel`` (their
    parameter names carry a ``module.`` prefix) and the top-level wrappers of
    :data:`WRAPPER_ATTRS`, the model itself otherwise.

    Example:
        >>> import torch, gradguard.distributed as ggd
        >>> net = torch.nn.Linear(2, 1)
        >>> ggd.unwrap(torch.nn.DataParallel(net)) is net
        True
    """
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            inner = model.module
        else:
            inner = next((getattr(model, a) for a in WRAPPER_ATTRS if hasattr(model, a)), None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner
