"""Runs in which gradients went silent: layers that died, or an optimizer that no gradient
reached at all (a loop without ``loss.backward()``, ``zero_grad()`` between the backward
and the step). No loss level shows either: a network that does not train sits still."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..events import listed

if TYPE_CHECKING:
    from ._data import RunData

#: A final loss at most this share of the first is a fit: its gradients may be exactly zero.
FIT_LOSS = 1e-6
#: ... and a loss judged by no level there (its float floor) is under this too: float32's
#: resolution near a fit (a cross-entropy of 1e-6 is rounding), not a regression on targets
#: of 1e4 whose fresh MSE of 1e9 made its rise from 4 to 400 "a millionth" (found by a
#: regression hunt: "recovered" at 112x its twin's held-out loss)
FLOOR_LOSS = 1e-5
#: A network whose loss fell by this share after layers went silent still learns.
STALL_FALL = 0.05
#: A run whose loss had fallen this share under its start before layers went silent, and
#: is back at the start level since, lost what it learnt with them.
LOST_FALL = 0.2
#: The fewest steps a loss level is a median of (:mod:`._outcome`'s levels too).
MIN_LEVEL_STEPS = 3


def died_layers(events: list[dict[str, Any]],
                data: RunData | None = None) -> tuple[int, list[str]] | None:
    """``(since, layers)``: layers reported dead (``disconnected_layer`` warnings with
    ``data["died"]``: they had a gradient and then none for 50 steps in a row) and the
    first step without one, unless a rollback after the last report may have brought
    them back, or one at its flush (the report's answer) did: with the run's per-layer
    norms (``data``), every such layer had a gradient again after it; else None."""
    dead = [e for e in events if e.get("kind") == "disconnected_layer"
            and e.get("severity") in ("warning", "error") and (e.get("data") or {}).get("died")]
    if not dead:
        return None
    last = max(int(e["step"]) for e in dead)
    rolled = [int(e.get("step", -1)) for e in events
              if e.get("kind") == "rollback" and int(e.get("step", -1)) >= last]
    names = [str(e.get("layer")) for e in dead]
    if any(r > last for r in rolled) or (rolled and _back(data, names, last)):
        # (found by a regression hunt: a wide & deep model whose deep tower's ReLUs were
        # killed, rolled back at the flush that told it, trained on with 88-92% of them
        # alive and was "the network died ... and no longer learns")
        return None
    return _since(dead), names


def _since(told: list[dict[str, Any]]) -> int:
    """The first step without a gradient of the layers ``told`` silent (their events)."""
    return max(0, min(int(e["step"]) - int((e.get("data") or {}).get("steps", 1)) + 1
                      for e in told))


def _back(data: RunData | None, names: list[str], step: int) -> bool:
    """Whether each layer of ``names`` had a gradient in a flush window after ``step``
    (True when the run's per-layer norms do not tell)."""
    import numpy as np

    if data is None:
        return True
    means = np.asarray(data.layer_mean, dtype=np.float64)
    after = np.asarray(data.layer_step) > step
    cols = [data.layers.index(n) for n in names if n in data.layers]
    if means.ndim != 2 or not after.any() or len(cols) < len(names):
        return True
    seen = means[after][:, cols]
    return bool((np.nan_to_num(seen) > 0).any(axis=0).all())


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


def silent_verdict(data: RunData, verdict: tuple[str, str | None, int | None, str], *,
                   flat: bool, final: float | None, start: float | None, floored: bool,
                   k: int) -> tuple[Any, str | None, int | None, str]:
    """The verdict ``(status, cause, incident, clause)`` of :func:`._outcome.judge` once the
    silent layers are weighed: layers that died (the network no longer learns), dead from
    the start (it never did), or no gradient at all (a missing backward, dead units behind
    every layer, or a fit). ``flat``: the loss did not fall over the run; ``floored``: it
    ended fit to its float floor; ``k``: the steps a level is a median of."""
    status, cause, incident, clause = verdict
    ev = data.events
    dead = died_layers(ev, data)
    if dead is not None and final is not None and not _constant(data, dead[1]) and \
            not _ordered(ev) and _learnt_since(data, ev, final, k):
        # the loss fell well after they were told dead, and layers other than the last still
        # learn: the network learns around them (found by a stranger: a healthy MoE whose
        # unchosen experts, gated by 0, got "died" warnings where no graph order told them
        # gated, was "the network died"). Every layer but the last dead is a dead network
        # whatever the head's bias does to the loss (found by a regression hunt: a ReLU MLP
        # killed by an LR spike, the loss settling after it, was "training recovered"). Only
        # where the graph's order was unknown: with it, a layer the network learns around is
        # told gated (an info), and one told dead has no layer before it with a gradient
        # (found by a regression hunt: a regression MLP whose first layer died, its output a
        # constant, was "healthy" as its head's bias walked on to the targets' mean)
        dead = None
    if dead is None and final is not None and start is not None:
        dead = _gated_but_lost(data, ev, final, start, k)
    died = [(e.get("data") or {}) for e in ev
            if e.get("kind") == "disconnected_layer" and (e.get("data") or {}).get("died")]
    born = dead is not None and bool(died) and all(d.get("from_start") for d in died)
    if born and final is not None and start is not None and final < (1 - STALL_FALL) * start:
        dead = None  # dead from the start, and the loss fell: the rest learns
    if dead is not None and status in ("healthy", "recovered"):
        since = dead[0]  # no loss level shows it: a dead network sits still, often at chance
        status, cause = "not_recovered", cause or "dead_units"
        incident = since if incident is None else min(incident, since)
        clause = (f"training did not recover: the network died at step {since} and no "
                  "longer learns")
        if born:
            status = "stalled"  # it never lived: nothing to recover
            clause = (f"training stalled: {listed(dead[1])} got no gradient from the start: "
                      "the units around them were dead (ReLUs below zero), and nothing there "
                      "trained")
    quiet = no_gradient_since(data)
    # a loss at zero has no gradient: a fit (a hinge loss on separable data), no stall
    # (a loss of 0 from the first step is no fit: every label masked, nothing trains)
    fit = floored or (final is not None and start is not None and start > 0
                      and final <= FIT_LOSS * start)
    if quiet is not None and status in ("healthy", "recovered") and not fit:
        # found by a stranger: a loop without loss.backward() was "No gradient trouble in
        # 200 steps: the gradient norm stayed between 0 and 0", a healthy run
        since, zero = quiet
        incident = since if incident is None else min(incident, since)
        if zero and final is None:  # no loss to tell a fit from dead units (found by a
            # regression hunt: a linear SVM stepped without its loss, its hinge loss at 0
            # from step 1, was "the units that feed the layers died")
            status, cause = "unjudged", None
            clause = (f"from step {since} every gradient was exactly zero: a loss fit "
                      "exactly (a hinge or margin loss at 0), units that died, or a loss "
                      "that no longer depends on the weights; no loss reached gradguard to "
                      "tell which")
        elif zero:  # the gradient tensors are there, all zero: dead units behind every layer
            status, cause = "stalled", "dead_units"
            clause = (f"training stalled: from step {since} every gradient was exactly zero "
                      "(the units that feed the layers died, or the loss no longer depends "
                      "on the weights), so nothing trained")
        else:
            status, cause = "stalled", "no_gradient"
            clause = (f"training stalled: from step {since} no gradient reached the "
                      "optimizer (every gradient missing), so nothing trained")
    return status, cause, incident, clause


def _gated_but_lost(data: RunData, events: list[dict[str, Any]], final: float, start: float,
                    k: int) -> tuple[int, list[str]] | None:
    """``(since, layers)`` for layers told gated (an info: the network learns around them)
    whose silence took back what the run had learnt: the loss before it well under the
    start level (by ``LOST_FALL``), back over that within as many steps after it went
    silent, the final one at the start level (within ``STALL_FALL``), and no rollback since
    (found by a stranger: an MLP whose middle ReLUs died, a learned positional embedding
    added after them, its next layer's weights learning from that constant, was told gated
    and "healthy" at chance, 1.38 against 0.08 for its twin); else None."""
    import numpy as np

    gated = [e for e in events if e.get("kind") == "disconnected_layer"
             and (e.get("data") or {}).get("gated")]
    if not gated or not start > 0:
        return None
    since = _since(gated)
    if any(e.get("kind") == "rollback" and int(e.get("step", -1)) >= since for e in events):
        return None
    loss = np.asarray(data.loss, dtype=np.float64)
    taken = loss[(data.step < since) & np.isfinite(loss) & ~data.skipped]
    pre = taken[-max(MIN_LEVEL_STEPS, k // 2):]  # the level it had reached
    # the fresh model's level: the first steps' (the start level, a median of the first
    # tenth, has the first fall in it)
    fresh = max(start, float(np.median(taken[:MIN_LEVEL_STEPS]))) if len(taken) else start
    if len(pre) < MIN_LEVEL_STEPS or not float(np.median(pre)) < (1 - LOST_FALL) * fresh:
        return None
    if final < (1 - STALL_FALL) * start:
        return None
    # and at once, as they went silent: a loss that rose later rose for another reason
    # (found by a regression hunt: a mixture whose one expert was switched off at step 60,
    # its labels noisier from step 100, ended as its twin with every expert did, and was
    # "the network died at step 60")
    after = loss[(data.step >= since) & np.isfinite(loss) & ~data.skipped][:len(pre)]
    if len(after) < MIN_LEVEL_STEPS or float(np.median(after)) < (1 - LOST_FALL) * fresh:
        return None
    return since, [str(e.get("layer")) for e in gated]


def _constant(data: RunData, died: list[str]) -> bool:
    """Whether ``died`` holds every layer that had a gradient but the last (module order):
    the network's features are constant, and only its head's bias can still learn."""
    import numpy as np

    means = np.asarray(data.layer_mean, dtype=np.float64)
    if means.ndim != 2 or means.shape[1] != len(data.layers) or not len(means):
        return False
    trained = [n for j, n in enumerate(data.layers) if np.nanmax(means[:, j]) > 0]
    return len(trained) >= 2 and set(trained[:-1]) <= set(died)


def _ordered(events: list[dict[str, Any]]) -> bool:
    """Whether every layer reported dead was judged with the graph's order known."""
    dead = [e for e in events if e.get("kind") == "disconnected_layer"
            and (e.get("data") or {}).get("died") and not (e.get("data") or {}).get("from_start")]
    return bool(dead) and all((e.get("data") or {}).get("ordered") for e in dead)


def _learnt_since(data: RunData, events: list[dict[str, Any]], final: float, k: int) -> bool:
    """Whether the loss ended ``STALL_FALL`` below its level over the ``k`` taken steps from
    the first report of a dead layer on (the loss may still settle from what killed them
    before it): a network that still learns has not died."""
    import numpy as np

    told = min(int(e["step"]) for e in events if e.get("kind") == "disconnected_layer"
               and (e.get("data") or {}).get("died"))
    loss = np.asarray(data.loss, dtype=np.float64)
    at = loss[(data.step >= told) & np.isfinite(loss) & ~data.skipped][:k]
    return len(at) >= MIN_LEVEL_STEPS and final < (1 - STALL_FALL) * float(np.median(at))


#: A median update/weight ratio per step under this, over the run's second half, is an LR
#: far too low for a run whose loss did not fall (healthy runs: 1e-4 to 1e-2; Adam at 1e-6
#: on a digits MLP: 7e-6).
STILL_RATIO = 1e-5
#: ... and the largest layer's under this: embedding tables, each step updating the rows of
#: its batch's tokens alone, are the median layer of a model of two tables and a linear
#: head, at 1.1e-6 on SGD at 0.1, the head's 10-100x that (found by a regression hunt:
#: such a run was told its LR was likely far too low; 10x the LR did worse)
STILL_MAX = 1e-4


def still_ratio(data: RunData) -> float | None:
    """The median update/weight ratio over the second half of the run's flush windows when
    it is under ``STILL_RATIO`` (the median layer's per window), and the largest layer's
    under ``STILL_MAX`` (an LR far too low leaves every layer still), else None."""
    import numpy as np

    ratios = data.update_ratio
    if ratios is None or not len(ratios):
        return None
    late = ratios[len(ratios) // 2:]
    late = late[np.isfinite(late)]
    if not late.size:
        return None
    ratio = float(np.median(late))
    if data.update_max is not None and len(data.update_max) == len(ratios):
        top = data.update_max[len(ratios) // 2:]
        top = top[np.isfinite(top)]
        if top.size and float(np.median(top)) >= STILL_MAX:
            return None
    return ratio if ratio < STILL_RATIO else None


def decayed(events: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The first ``update_ratio`` warning that named weight decay (``data["decay"]``:
    :func:`gradguard.detectors.layers.detect_update_ratio`), None without one."""
    return next((e for e in events if e.get("kind") == "update_ratio"
                 and e.get("severity") == "warning" and "decay" in (e.get("data") or {})), None)


def not_learning(data: RunData, start: object) -> str:
    """The end of the summary's sentence for a healthy run whose loss did not fall, after
    "if the model started untrained it is not learning": what the run's records say of
    why (its weight decay, an LR far too low), else a pointer to the doctor."""
    if (shrunk := decayed(data.events)) is not None:
        # found by a stranger: SGD with weight_decay=0.1 shrank a digits MLP to 0 at chance
        # (the update_ratio warnings said so; a lower LR did not help)
        return (f": its weight decay alone shrinks the weights by {shrunk['data']['decay']:.2g} "
                "of their norm a step (lower weight_decay: SGD is usually run at 1e-4 to "
                "5e-4, AdamW at 0.01 to 0.1).")
    if (ratio := still_ratio(data)) is not None:
        # found by a stranger: Adam at 1e-6, flat at chance for 400 steps, was told to run
        # the doctor, which found nothing: no LR probe sees one too low (a regression hunt:
        # a fine-tune that starts at its best, on AdamW 1e-5, moves its weights as little:
        # the conclusion is the untrained model's)
        return (f": its updates moved the weights by {ratio:.2g} of their norm per step "
                "(about 1e-3 is usual when training from scratch), so its learning rate is "
                "likely far too low (a fine-tune that started at its best can ignore this).")
    return "." if start is not None else " (run gg.doctor on a batch)."
