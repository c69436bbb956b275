"""What the verdict of :mod:`._outcome` reads off a run besides its loss levels: the
incident's likely cause, a relapse after a recovery, a run that ended on the fresh weights
a rollback restored, the ladder's first reason and the LR it lowered, and the evidence
line."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from . import _levels
from ._levels import NOISE_K, REL_TOL, tol
from ._silent import MIN_LEVEL_STEPS

if TYPE_CHECKING:
    from ._data import RunData

#: Event kinds that start an incident (besides a skipped step).
INCIDENT_KINDS = ("nonfinite_grad", "grad_spike", "loss_spike", "lr_too_high")
#: The recovery ladder's own actions: it acted on trouble that may show in no gradient event
#: (a loss that rose, a network that died), so the run was not healthy.
LADDER_KINDS = ("lr_backoff", "rollback")


def _ended_on_restored(data: RunData) -> tuple[int, int] | None:
    """The step of the run's last rollback and the step of the snapshot it restored (-1:
    the weights before the first step), when fewer than ``MIN_LEVEL_STEPS`` steps were
    taken after it: the run's last losses are of the weights it replaced, and those it
    leaves were not tried on the batches since. None otherwise, and when the batches after
    it were found at fault (a ``data`` decision)."""
    import numpy as np

    rolled = [e for e in data.events if e.get("kind") == "rollback"]
    if not rolled:
        return None
    at = int(rolled[-1]["step"])
    if any("rollback_undone" in (e.get("data") or {}) for e in data.events
           if int(e.get("step", -1)) >= at):
        # the batches were blamed after it (a regression hunt: x1e4 batches in the last 7
        # steps, a rollback at 298, the batches at fault at 299, the model as good as its
        # twin, called not_recovered): the weights it leaves are the ones the bad batches
        # met, undone or not, and no level of theirs is in question
        return None
    snapshot = (rolled[-1].get("data") or {}).get("snapshot_step")
    taken = (np.asarray(data.step) > at) & ~np.asarray(data.skipped, dtype=bool)
    if int(taken.sum()) >= MIN_LEVEL_STEPS or not isinstance(snapshot, int):
        return None
    return at, snapshot


def lowered_lr(events: list[dict[str, Any]], incident: int | None) -> int | None:
    """The step of the first act of the ladder from ``incident`` on that lowered its LR
    ceiling (``data["ceiling"]`` under 1), when the last act that said its ceiling left it
    under 1: a back-off alone is restored over ``restore_steps``, and one undone at the
    next step lowered nothing (found by a regression hunt: a converged fine-tune that met
    three NaN batches was "stalled ... after gradguard lowered the LR"). None otherwise."""
    acts = [(int(e["step"]), c) for e in events
            if (incident is None or e.get("step", -1) >= incident)
            and isinstance(c := (e.get("data") or {}).get("ceiling"), (int, float))]
    if not acts or acts[-1][1] >= 1.0:
        return None
    return next(step for step, c in acts if c < 1.0)


def _relapse(data: RunData, inc: list[int], loss: Any, fin: Any, k: int,
             before: float) -> tuple[int, float, float] | None:
    """The last incident, the level before it and the level after it to the end, when the
    run had come down well under the first incident's level (``before``) by then and the
    level after it is above that newer one, out of its noise; None otherwise (one incident,
    or the later ones inside the same trouble, whose level before them is the trouble's
    own). The level after is the median of the steps after the last incident: a blow-up
    in the last 18 steps of 400 leaves the median of the last 40 at the level before it."""
    import numpy as np

    last = max(inc)
    pre = loss[(data.step < last) & fin][-k:]
    post = loss[(data.step > last) & fin][-k:]  # the end, from after the last incident
    if last == min(inc) or len(pre) < MIN_LEVEL_STEPS or len(post) < MIN_LEVEL_STEPS:
        return None
    level, after = float(np.median(pre)), float(np.median(post))
    # back within the noise of either window: a few steps after a late incident are a
    # short window's median (found by a stranger: a regression whose loss divided by a
    # target of 0 on 10% of its batches, the last 6 steps before the end, ended at its
    # twin's loss and was "did not recover from step 393", 0.0054 against 0.0032)
    if level + tol(level, pre) >= before or _levels.back_at(level, after, post) \
            or _levels.back_at(level, after, pre):
        return None
    return last, level, after


def _climbed(start: float, first: float, before: float, window: Any) -> bool:
    """Whether the loss level ``before`` an incident is above the start level, out of the
    noise: above ``start`` (the lower of the first loss and the first window's median,
    ``first``) by ``REL_TOL``, and above ``first`` out of the noise of the ``window``
    before the incident, read from its step-to-step changes (a climb through it is no
    noise: :func:`._levels.step_noise`). A heavy-tailed regression whose first loss was
    its window's lowest (41,400 against a median of 47,000) was "climbing" to the 47,210
    of its steady noise before a bad batch, and its cause was ``lr_too_high`` (found by a
    stranger)."""
    if not (before > start * (1 + REL_TOL) and before > start):
        return False
    if first > 0 and before > 0 and len(window) > 2 and bool((window > 0).all()):
        return math.log(before / first) > max(math.log1p(REL_TOL),
                                              NOISE_K * _levels.step_noise(window))
    return before > first + tol(first, window)


def _cause(data: RunData, incident: int | None, climbed: bool, rose: bool,
           start_end: int | None = None) -> str | None:
    """The most likely cause of trouble: a loss that climbed before the incident
    (``climbed``: :func:`_climbed`) or over the run (``rose``) is the learning rate;
    otherwise what the non-finite events named. ``start_end``: the last step of the start
    level's window (an incident within it has no climb to show: found by a stranger, a CTC
    loss whose infeasible targets made it Inf at step 7 was `lr_too_high`, its median over
    steps 0-6 above that of the first 30 steps, which fell)."""
    if rose:
        return "lr_too_high"
    if climbed and (start_end is None or incident is None or incident > start_end):
        return "lr_too_high"  # the loss was already climbing when the incident came
    kinds = [e for e in data.events if e.get("severity") in ("warning", "error")]
    if any(e.get("kind") == "lr_too_high" for e in kinds):
        return "lr_too_high"
    for e in kinds:
        c = (e.get("data") or {}).get("cause")
        if c:
            return str(c)
    first = next((e for e in kinds if e.get("kind") in INCIDENT_KINDS), None)
    if first is not None and first.get("kind") == "loss_spike" and not _capped(data.events):
        return "lr_too_high"
    return None


def _capped(events: list[dict[str, Any]]) -> bool:
    """Whether the gradients reached the guard clipped by the loop itself (a ``clip`` event
    with its ``cap``: :mod:`gradguard.detectors.capped`): a loss spike with no gradient
    spike then says nothing of the LR, as the batch's gradient spike was clipped away
    before the guard measured it. Found by a stranger: a GRU seq2seq that clipped at 1.0
    itself, hit by 30 corrupted batches at x1e3 their loss, was given cause
    ``lr_too_high``."""
    return any(e.get("kind") == "clip" and "cap" in (e.get("data") or {}) for e in events)


def _evidence(start: float | None, before: float | None, final: float | None,
              incident: int | None) -> str:
    if final is None:
        return "no finite loss was recorded at the end"
    parts = [f"loss {final:.4g} at the end"]
    if before is not None and incident is not None:
        parts.append(f"{before:.4g} before step {incident}")
    if start is not None:
        parts.append(f"{start:.4g} at the start")
    return ", ".join(parts)


def ladder_reason(events: list[dict[str, Any]]) -> tuple[int, str] | None:
    """The step and reason of the recovery ladder's first action (a back-off or rollback),
    for a run with no gradient event to tell its story (a loss that rose, a net that died)."""
    for e in events:
        reason = (e.get("data") or {}).get("reason")
        if e.get("kind") in LADDER_KINDS and isinstance(reason, str) and reason:
            return int(e["step"]), reason
    return None
