"""Runs in which gradients went silent: layers that died, or an optimizer that no gradient
reached at all (a loop without ``loss.backward()``, ``zero_grad()`` between the backward
and the step). No loss level shows either: a network that does not train sits still."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._data import RunData


def died_layers(events: list[dict[str, Any]]) -> tuple[int, list[str]] | None:
    """``(since, layers)``: layers reported dead (``disconnected_layer`` warnings with
    ``data["died"]``: they had a gradient and then none for 50 steps in a row) and the
    first step without one, unless a rollback after the last report may have brought
    them back; else None."""
    dead = [e for e in events if e.get("kind") == "disconnected_layer"
            and e.get("severity") in ("warning", "error") and (e.get("data") or {}).get("died")]
    if not dead:
        return None
    last = max(int(e["step"]) for e in dead)
    if any(e.get("kind") == "rollback" and int(e.get("step", -1)) > last for e in events):
        return None
    since = min(int(e["step"]) - int((e.get("data") or {}).get("steps", 1)) + 1 for e in dead)
    return max(0, since), [str(e.get("layer")) for e in dead]


def no_gradient_since(data: RunData) -> tuple[int, bool] | None:
    """``(since, zero)``: the first step of the stretch, lasting to the end of the run, in
    which no taken step had a non-zero finite gradient norm, when a ``disconnected_layer``
    warning with no layer (the whole optimizer) reported it from inside that stretch, and
    whether it said the gradient tensors were there, all zero (``data["zero"]``: dead
    units, not a missing backward); else None.

    Example:
        >>> import numpy as np
        >>> from pathlib import Path
        >>> from gradguard.report._data import RunData
        >>> n = 60
        >>> ev = [{"kind": "disconnected_layer", "severity": "warning", "step": 49,
        ...        "data": {"steps": 50}}]
        >>> d = RunData(Path("r"), np.arange(n), np.ones(n), np.zeros(n), np.ones(n),
        ...             np.zeros(n, bool), [], np.zeros(0, int), np.zeros((0, 0)),
        ...             np.zeros((0, 0)), ev)
        >>> no_gradient_since(d)
        (0, False)
        >>> d.grad_norm[55] = 0.3          # a gradient came back: not silent to the end
        >>> no_gradient_since(d) is None
        True
    """
    import numpy as np

    said = [e for e in data.events if e.get("kind") == "disconnected_layer"
            and e.get("layer") is None and e.get("severity") in ("warning", "error")
            and not (e.get("data") or {}).get("died")]
    if not said or not data.n_steps:
        return None
    norm = np.asarray(data.grad_norm, dtype=np.float64)
    live = np.isfinite(norm) & (norm != 0) & ~np.asarray(data.skipped, dtype=bool)
    if live[-1]:
        return None
    last_live = np.flatnonzero(live)
    since = int(data.step[last_live[-1] + 1]) if last_live.size else int(data.step[0])
    late = [e for e in said if int(e["step"]) >= since]
    if not late:
        return None
    return since, bool((late[-1].get("data") or {}).get("zero"))
