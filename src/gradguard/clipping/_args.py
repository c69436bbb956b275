"""The arguments clip policies take: the parameters to clip and the checks of their options
(each error names the option and what it accepts)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

ParamsArg = nn.Module | Tensor | Iterable[Tensor] | Iterable[tuple[str, Tensor]]


def as_named_params(params: ParamsArg) -> list[tuple[str, Tensor]]:
    """Normalise a module / tensor / iterable of tensors or (name, tensor) pairs."""
    if isinstance(params, nn.Module):
        return list(params.named_parameters())
    if isinstance(params, Tensor):
        return [("0", params)]
    out: list[tuple[str, Tensor]] = []
    for i, item in enumerate(params):
        if isinstance(item, Tensor):
            out.append((str(i), item))
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], Tensor):
            out.append((str(item[0]), item[1]))
        else:
            raise TypeError(
                f"params[{i}] is {type(item).__name__}; expected a Tensor or (name, Tensor)"
            )
    return out


def check_positive(name: str, value: Any, owner: str, *, allow_inf: bool = False) -> float:
    """``float(value)`` when it is a number > 0 (finite unless ``allow_inf``); else an error
    naming ``owner(name=value)``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner}({name}={value!r}): expected a positive number")
    v = float(value)
    if not (v > 0) or (math.isinf(v) and not allow_inf):
        raise ValueError(f"{owner}({name}={value!r}): must be a finite number > 0")
    return v


def check_norm_type(value: Any, owner: str) -> float:
    """A norm order as ``clip_grad_norm_`` takes it: a number > 0 or ``inf``, also spelled
    as a string (``"inf"``, ``"2"``)."""
    try:
        v = float(value) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else None
    except ValueError:
        v = None
    if v is None or not (v > 0):
        raise ValueError(
            f"{owner}(norm_type={value!r}): must be a number > 0 or inf (e.g. 2.0, 1, "
            "math.inf, 'inf')"
        )
    return v


def check_foreach(value: Any, owner: str) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"{owner}(foreach={value!r}): must be None, True or False")
    return value
