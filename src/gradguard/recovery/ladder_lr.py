"""How the ladder moves the LR factor and its ceiling outside an escalation (pure parts of
:func:`gradguard.recovery.ladder.transition`): the restore after a back-off, the ceiling
that settles, a ceiling lowered with the weights kept (a mild trouble, the LR probe, a
wreck's measured update) or raised again by a retry."""

from __future__ import annotations

import dataclasses

from .ladder_types import Action, LadderConfig, LadderState, Trigger


def raised(st: LadderState, trig: Trigger) -> tuple[LadderState, tuple[Action, ...]]:
    """A retry (:mod:`.probe`) found the ceiling before the trouble, ``trig.value``, trains:
    ceiling and factor back at it, settled; trouble soon after is a relapse (_escalate).
    ``trig.data``: a cap the batches set (:func:`.wreck.first_batch_at_fault`): the ceiling
    back at ``trig.value``, the factor restoring towards it."""
    top = trig.value if trig.value is not None else st.ceiling
    if trig.data:
        # the cap was the batches' doing, not a ceiling that failed: lifted, and the factor
        # goes on restoring towards it from where the rollback's back-off left it (an
        # optimizer's momentum may still hold the bad batch's step)
        st = dataclasses.replace(st, ceiling=top, episode_ceiling=None, at_ceiling=None,
                                 failed=None, backoff_step=trig.step, backoff_level=st.factor)
        return st, (Action("raised", trig.step, trig.reason, st.factor, top),)
    st = dataclasses.replace(st, ceiling=top, factor=top, settled=top, episode_ceiling=None,
                             backoff_step=None, backoff_level=top, at_ceiling=None,
                             raised=trig.step, raised_from=st.ceiling)
    return st, (Action("raised", trig.step, trig.reason, top, top),)


def lower(cfg: LadderConfig, st: LadderState, trig: Trigger) -> tuple[LadderState, tuple[Action, ...]]:
    """A mild trigger: the factor in force fails for good (the ceiling drops to
    ``relapse_backoff`` times it) and the LR backs off and restores up to the new ceiling;
    the weights stay, and no progress check follows (they were not damaged)."""
    now = trig.step if trig.at is None else max(trig.step, trig.at)
    ceiling = min(st.ceiling, failed_ceiling(cfg, st))
    factor = min(st.factor * cfg.backoff, ceiling)
    lowered = ceiling < st.ceiling
    relapse = st.last_trigger is not None and trig.step - st.last_trigger <= cfg.relapse_window
    st = dataclasses.replace(st, last_trigger=trig.step, ceiling=ceiling, factor=factor,
                             backoff_level=factor, backoff_step=now, at_ceiling=None,
                             backoffs=st.backoffs + 1, untested=now)
    return st, (Action("backoff", trig.step, trig.reason, factor, ceiling, relapse, lowered,
                       by_level=trig.by_level),)


def probed(cfg: LadderConfig, st: LadderState, trig: Trigger) -> tuple[LadderState, tuple[Action, ...]]:
    """The LR probe found the LR in force too high (:mod:`.probe`): the ceiling drops to
    ``relapse_backoff`` times the factor in force and the factor to it, with no back-off
    (the weights are not damaged, the loss is not in trouble: the LR sets its noise floor);
    the lowered ceiling is on probation until it settles."""
    ceiling = failed_ceiling(cfg, st)
    st = dataclasses.replace(st, ceiling=ceiling, factor=min(st.factor, ceiling),
                             backoff_step=None, at_ceiling=None, last_trigger=trig.step,
                             episode_ceiling=None)  # the LR's own doing: nothing to retry
    return st, (Action("lower", trig.step, trig.reason, st.factor, ceiling, lowered=True),)


def capped(st: LadderState, trig: Trigger) -> tuple[LadderState, tuple[Action, ...]]:
    """A rollback for a wreck measured the update that wrecked the weights: the ceiling
    drops to ``value``, the factor under which that update would have moved the weights by
    the largest healthy share (:func:`gradguard.recovery.wreck.cap`), when that is
    lower than the ceiling the rollback set; the back-off restores up to it. The ceiling
    before it is the episode's (as for a lowered one): should the batches prove at fault
    after all (the first step on the restored weights fails too), it returns."""
    if trig.value is None or trig.value >= st.ceiling:
        return st, ()
    cap = trig.value
    first = st.ceiling if st.episode_ceiling is None else st.episode_ceiling
    return dataclasses.replace(st, ceiling=cap, factor=min(st.factor, cap), episode_ceiling=first,
                               backoff_level=None if st.backoff_level is None
                               else min(st.backoff_level, cap)), ()


def failed_ceiling(cfg: LadderConfig, st: LadderState) -> float:
    """The ceiling once the factor in force has failed: ``relapse_backoff`` times it, and
    its square, its cube at the third, fourth failure in a row of a lowered ceiling."""
    k = 1 + min(max(st.lowerings - 1, 0), 2) if st.probation else 1
    return min(st.ceiling, st.factor) * cfg.relapse_backoff ** k


def settle(cfg: LadderConfig, st: LadderState, step: int) -> tuple[LadderState, tuple[Action, ...]]:
    """A factor that stayed at a lowered ceiling for ``restore_steps`` steps is settled."""
    if not st.probation or st.factor < st.ceiling:
        return st, ()
    if st.at_ceiling is None:
        return dataclasses.replace(st, at_ceiling=step), ()
    if step - st.at_ceiling < cfg.restore_steps:
        return st, ()
    return dataclasses.replace(st, settled=st.ceiling), (Action("settled", step, factor=st.ceiling,
                                                                ceiling=st.ceiling),)


def restore(cfg: LadderConfig, st: LadderState, step: int) -> LadderState:
    """Move the factor linearly back towards the ceiling after a back-off."""
    top = st.ceiling
    if st.factor >= top or st.backoff_step is None:
        return st
    t = step - st.backoff_step - 1  # the first step after the back-off uses its factor
    f = min(top, st.backoff_level + (top - st.backoff_level) * t / cfg.restore_steps)
    if f == st.factor:
        return st
    return dataclasses.replace(st, factor=f, backoff_step=None if f >= top else st.backoff_step)
