"""Weights an optimizer step made NaN/Inf from finite gradients (pure part of
:func:`gradguard.recovery.ladder.transition`).

A skip guards the weights from non-finite *gradients*; it cannot guard them from the update
itself. An update from finite gradients at a finite LR is finite unless the optimizer
divides by zero (Adam's ``eps=1e-8`` is 0 in float16, and where a gradient is exactly 0 its
update is 0/0; a custom ``step`` that normalises by a norm that can be 0) or the LR is
NaN/Inf (a schedule's formula that divides by zero at one step). Every step after it runs
on NaN weights: its loss and gradients are NaN and it is skipped, so the ladder's usual
course (three skips, a back-off, three more, a rollback at a lower LR) loses six steps and
lowers an LR whose size did nothing. The Recovery checks the weights at the first
non-finite step after a taken one (:func:`gradguard.recovery.finite.weights_flag`: one
reduction, its flag copied to the host without waiting, :mod:`.late`) and, when they hold
NaN/Inf, hears a ``weights`` trigger (:func:`gradguard.recovery._steps.hear_weights`)."""

from __future__ import annotations

import dataclasses

from .ladder_types import Action, LadderConfig, LadderState, Trigger


def bad_weights(cfg: LadderConfig, st: LadderState,
                trig: Trigger) -> tuple[LadderState, tuple[Action, ...]]:
    """Roll back at once to the newest snapshot, at the LR in force (factor and ceiling
    kept: no relapse, no back-off); the rollback counts towards ``max_rollbacks`` like any
    other, so a cause that stays (an ``eps`` that is 0 in float16 writes NaN at every first
    step on the restored weights) ends in an abort after ``max_rollbacks`` of them."""
    if st.rollbacks >= cfg.max_rollbacks:
        return st, (Action("abort", trig.step, trig.reason, st.factor, st.ceiling,
                           rollbacks=st.total_rollbacks),)
    st = dataclasses.replace(st, consecutive_skips=0, rollbacks=st.rollbacks + 1,
                             total_rollbacks=st.total_rollbacks + 1, undo=None)
    return st, (Action("rollback", trig.step, trig.reason, st.factor, st.ceiling,
                       rollbacks=st.rollbacks),)
