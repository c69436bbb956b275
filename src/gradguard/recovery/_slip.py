"""The ladder's LR factors across an LR burst (a jump reported as ``lr_too_high``, the LR
back under the peak it jumped from later): every factor the ladder holds is a share of
the LR the schedule sets, and a rung taken during the burst found its share of the
burst's LR. When the burst ends, those factors are expressed again in the schedule's
LR: each is multiplied by the burst's height (its highest LR over the peak it jumped
from), and the ceiling and the factor in force no higher than the ceiling before it.

Found by a stranger: a digits MLP on AdamW whose ``LambdaLR`` put the LR up x300 for
steps 100-119 was rolled back at step 106 with the LR capped at x0.0095, about the LR
that trains while the burst lasted; the cap stayed a share of the schedule, so from
step 120 the run trained at 1% of its LR (9.5e-6) to the end: 1.8-2.2x its twin.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from ..events import Event

if TYPE_CHECKING:
    from ..guard import Guard
    from ._recovery import Recovery
    from .ladder import LadderState

#: The most LR jumps whose ladder state :attr:`Recovery._jumps` keeps (a jump's burst
#: ends within ``SLIP_STEPS``; a rollback goes back at most the ring's span).
KEPT_JUMPS = 16

#: The ladder's fields that are shares of the schedule's LR and are capped by the ceiling
#: from before the burst.
CAPPED = ("factor", "backoff_level", "ceiling", "settled", "episode_ceiling", "shift_ceiling",
          "raised_from")


def observe(rec: Recovery, guard: Guard) -> None:
    """Before each step: keep the ceiling in force when the LR jumps; when a burst ended,
    rescale what the ladder set during it (see the module's text)."""
    tracker = guard.monitor.lr_tracker
    step = guard.step_count
    if tracker.jumped(step) and step not in rec._jumps:
        rec._jumps[step] = rec.state
        for old_step in sorted(rec._jumps)[:-KEPT_JUMPS]:
            del rec._jumps[old_step]
    for start, height in tracker.pop_ended():
        at_jump = rec._jumps.get(start)
        st = rec.state
        if at_jump is None or height <= 1.0 or st.last_trigger is None or (
                st.last_trigger < start):
            continue  # the ladder did not act during it: its factors are the schedule's
        before, old = at_jump.ceiling, st.factor
        changes: dict[str, Any] = {
            f: min(before, v * height) for f in CAPPED
            if isinstance(v := getattr(st, f), float)}
        if st.failed is not None:
            changes["failed"] = st.failed * height  # the share that failed, unbounded
        rec.state = dataclasses.replace(st, **changes)
        if rec.state.factor <= old * (1 + 1e-9):
            continue
        guard.add_event(Event(
            kind="lr_backoff", step=step, severity="info", value=rec.state.factor,
            message=(f"step {step}: the LR burst from step {start} ended (it went up to "
                     f"{height:.3g}x the schedule's peak): the LR the ladder set during it, "
                     f"x{old:.3g} of the burst's, is x{rec.state.factor:.3g} of the schedule "
                     f"now (ceiling x{rec.state.ceiling:.3g})"),
            remedy="Check the LR schedule or the manual LR changes that made the burst.",
            data={"factor": rec.state.factor, "ceiling": rec.state.ceiling,
                  "reason": "burst_ended", "burst_step": start, "height": height},
        ))


def before_burst(rec: Recovery, guard: Guard, step: int) -> LadderState | None:
    """The ladder's state at the first LR jump after ``step`` (a snapshot's), when a burst
    came and went since then (None: none did, or its jump is no longer kept): a rollback
    to weights from before the burst goes on at the LR the ladder had then."""
    if not guard.monitor.lr_tracker.burst_since(step):
        return None
    after = [s for s in rec._jumps if s > step]
    return rec._jumps[min(after)] if after else None
