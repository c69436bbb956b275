"""Restoring a snapshot into a model whose ``state_dict`` keys changed since it was taken.

A snapshot holds the model's ``state_dict``, keyed by name. Some changes a script makes
mid-run rename what the optimizer steps without replacing it: pruning
(``torch.nn.utils.prune``) moves a layer's ``weight`` Parameter to ``weight_orig`` and adds
a ``weight_mask`` buffer, the same Parameter object under a new name. A snapshot from
before such a change no longer loads by name (``load_state_dict``: missing
``0.weight_orig``, unexpected ``0.weight``), and a rollback to it raised from inside
``guard.step``. The snapshot also records which live tensor each key named
(:func:`tensor_ids`, ``id`` of the Parameter or buffer), so :func:`load_model` finds
each saved value's tensor by its name, or else by that identity, and copies it in; what
the snapshot does not hold (the new mask) keeps its live value. Identities hold within
one process only: those of a snapshot read back from disk by another process (a resumed
run) are not used. A snapshot that leaves a
trained parameter of the live model without a value, or whose values do not fit their
tensors' shapes, cannot be restored (:func:`fits` says so before a rollback uses it).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

#: This process's mark on the identities it records (ids are addresses, reused by others).
PROCESS = uuid.uuid4().hex


def tensor_ids(model: nn.Module) -> dict[str, Any]:
    """The ``id`` of the live tensor behind each tensor key of ``model.state_dict()``,
    marked with this process (under the key ``""``, which no state_dict key is)."""
    ids: dict[str, Any] = {k: id(v) for k, v in model.state_dict(keep_vars=True).items()
                           if isinstance(v, Tensor)}
    return {"": PROCESS, **ids}


def _targets(model: nn.Module, snap: Mapping[str, Any]) -> dict[str, Tensor] | None:
    """Each saved tensor's live tensor, when the keys changed; None when they did not
    (``load_state_dict`` does it); raises ``ValueError`` when the snapshot does not fit."""
    saved: Mapping[str, Any] = snap["model"]
    live = model.state_dict(keep_vars=True)
    if set(saved) == set(live):
        return None
    ids = snap.get("model_ids") or {}
    if ids.get("") != PROCESS:  # taken by another process: its ids name nothing here
        ids = {}
    by_id = {id(v): v for v in live.values() if isinstance(v, Tensor)}
    targets: dict[str, Tensor] = {}
    for k, v in saved.items():
        t = live.get(k) if k in live else by_id.get(ids.get(k, -1))
        if not isinstance(v, Tensor) or not isinstance(t, Tensor) or t.shape != v.shape:
            raise ValueError(f"the snapshot's `{k}` has no tensor of its shape in the model")
        targets[k] = t
    covered = {id(t) for t in targets.values()}
    left = [k for k, v in live.items()
            if isinstance(v, nn.Parameter) and v.requires_grad and id(v) not in covered]
    if left:
        raise ValueError(f"the snapshot holds no value for `{left[0]}`")
    return targets


def fits(model: nn.Module, snap: Mapping[str, Any]) -> bool:
    """Whether :func:`load_model` can restore ``snap`` into ``model``."""
    try:
        _targets(model, snap)
    except ValueError:
        return False
    return True


def load_model(model: nn.Module, snap: Mapping[str, Any], skip: set[int] | None = None,
               ) -> None:
    """Load ``snap["model"]`` into ``model``: by ``load_state_dict`` while the keys are the
    same, else tensor by tensor through the names and identities recorded with it.
    ``skip``: the ids of live tensors left as they are (parameters another guard steps,
    :mod:`gradguard._owners`)."""
    targets = _targets(model, snap)
    if targets is None and not skip:
        model.load_state_dict(snap["model"])
        return
    if targets is None:
        live = model.state_dict(keep_vars=True)
        targets = {k: t for k, t in live.items() if isinstance(t, Tensor) and k in snap["model"]}
    with torch.no_grad():
        for k, t in targets.items():
            if skip and id(t) in skip:
                continue
            t.copy_(snap["model"][k])
