"""Walking the tensors inside nested arguments, and calling a model on a batch's inputs.

One copy shared by the doctor, ``gg.init`` and the activation watch: all of them accept
the same input shapes (a tensor, a tuple/list for positional arguments, a dict for keyword
arguments, nested at will), so they must agree on how those are read.

Example:
    >>> import torch
    >>> from gradguard._tensors import call_model, iter_tensors
    >>> [tuple(t.shape) for t in iter_tensors({"a": torch.ones(2), "b": [torch.ones(3), 4]})]
    [(2,), (3,)]
    >>> call_model(torch.nn.Identity(), torch.ones(1)).tolist()
    [1.0]
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from torch import Tensor, nn


def iter_tensors(x: Any) -> Iterator[Tensor]:
    """Every tensor inside nested tuples/lists/dicts (dict values), in order."""
    if isinstance(x, Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from iter_tensors(v)
    elif isinstance(x, dict):
        for v in x.values():
            yield from iter_tensors(v)


def iter_floats(x: Any) -> Iterator[Tensor]:
    """The floating-point tensors of :func:`iter_tensors`."""
    return (t for t in iter_tensors(x) if t.is_floating_point())


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(**inputs)`` for a dict, ``model(*inputs)`` for a tuple/list, else ``model(inputs)``."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def planned_lr(group: Mapping[str, Any]) -> float | None:
    """The highest LR a param group's schedule plans, as torch's schedulers record it: the
    LR it started from (``initial_lr``; a warm-up rises to it, a decay falls from it) or a
    one-cycle schedule's peak (``max_lr``); None without a scheduler that records one
    (``ReduceLROnPlateau``, an LR set by hand) or for a tensor value."""
    vals = [float(v) for k in ("initial_lr", "max_lr")
            if isinstance(v := group.get(k), (int, float)) and not isinstance(v, bool)]
    return max(vals) if vals else None


def numeric_lr(lr: Any) -> bool:
    """A param group's ``lr`` is a number (or a tensor) that can be scaled: not None, as
    Adafactor's is with ``relative_step=True`` (it computes its own step size)."""
    return isinstance(lr, (int, float, Tensor)) and not isinstance(lr, bool)
