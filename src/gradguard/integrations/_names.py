"""Names for the parameters of an optimizer the script created: its model, found in the
calling frames, or a table of the optimizer's own parameters."""

from __future__ import annotations

import os
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

#: Source directories of torch and gradguard: their frames hold no user names.
_INTERNAL = tuple(
    {
        str(d) + os.sep
        for m in (torch, sys.modules[__name__.split(".")[0]])
        if m.__file__
        for d in (Path(m.__file__).parent, Path(m.__file__).resolve().parent)
    }
)
#: How many caller frames are searched for the model that owns an optimizer's parameters.
MAX_FRAMES = 40


class ParamTable(nn.Module):
    """The parameters of an optimizer that no module claims, named ``param_group<i>.p<j>``.

    Plain tensors (``torch.zeros(3, requires_grad=True)``, not ``nn.Parameter``) are held
    as buffers, so the guard measures, snapshots and restores the very tensors the
    optimizer updates; ``named_parameters`` lists them all.

    Example:
        >>> import torch
        >>> w = torch.zeros(3, requires_grad=True)
        >>> table = ParamTable.of(torch.optim.SGD([w], lr=0.1))
        >>> [(n, p is w) for n, p in table.named_parameters()]
        [('param_group0.p0', True)]
    """

    def __init__(self) -> None:
        super().__init__()
        self._table: list[tuple[str, Tensor]] = []

    @classmethod
    def of(cls, optimizer: torch.optim.Optimizer) -> ParamTable:
        root = cls()
        for gi, group in enumerate(optimizer.param_groups):
            sub = nn.Module()
            for pi, p in enumerate(group["params"]):
                if isinstance(p, nn.Parameter):
                    sub.register_parameter(f"p{pi}", p)
                else:
                    sub.register_buffer(f"p{pi}", p)
                root._table.append((f"param_group{gi}.p{pi}", p))
            root.add_module(f"param_group{gi}", sub)
        return root

    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> Iterator[tuple[str, Any]]:
        seen: set[int] = set()
        for name, p in self._table:
            if remove_duplicate and id(p) in seen:
                continue
            seen.add(id(p))
            yield (f"{prefix}.{name}" if prefix else name), p


def find_model(
    optimizer: torch.optim.Optimizer, frame: types.FrameType | None
) -> tuple[nn.Module | None, str | None, str | None]:
    """The module in the callers' frames that holds most of ``optimizer``'s parameters.

    Among modules holding the same number of them, the smallest wins (the generator, not
    the ``nn.ModuleDict`` holding generator and discriminator). Returns
    ``(module, module variable name, optimizer variable name)``; Nones when not found.
    """
    wanted = {id(p) for g in optimizer.param_groups for p in g["params"]}
    best: tuple[int, int] | None = None
    found: tuple[nn.Module | None, str | None] = (None, None)
    opt_name: str | None = None
    seen: set[int] = set()
    depth = 0
    while frame is not None and depth < MAX_FRAMES:
        if frame.f_code.co_filename.startswith(_INTERNAL):
            frame, depth = frame.f_back, depth + 1
            continue  # torch's step wrapper and gradguard itself: not the user's names
        candidates: list[tuple[str, Any]] = []
        for name, v in list(frame.f_locals.items()):
            if v is optimizer and opt_name is None:
                opt_name = name
            candidates.append((name, v))
            if not isinstance(v, (nn.Module, type, types.ModuleType)) and hasattr(v, "__dict__"):
                try:
                    attrs = list(vars(v).items())
                except TypeError:
                    attrs = []
                candidates += [(f"{name}.{k}", a) for k, a in attrs if isinstance(a, nn.Module)]
        for name, v in candidates:
            if not isinstance(v, nn.Module) or id(v) in seen:
                continue
            seen.add(id(v))
            ids = [id(p) for p in v.parameters()]
            hit = sum(1 for i in ids if i in wanted)
            if hit == 0:
                continue
            score = (hit, -len(ids))
            if best is None or score > best:
                best, found = score, (v, name)
        frame = frame.f_back
        depth += 1
    return found[0], found[1], opt_name
