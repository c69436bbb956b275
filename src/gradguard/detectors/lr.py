"""``lr_too_high`` from the learning rates the optimizer is about to use."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from .._tensors import planned_lr
from ..events import Event
from .config import ANNEALED_LR, LR_JUMP_RATIO

#: Steps after which an LR that jumped and stayed is the run's LR, a peak of its own.
SLIP_STEPS = 100
#: Off-scale batches within this many steps after an LR jump are the jump's doing.
JUMP_SPAN = 20
#: The share of its peak under which every group's LR has decayed away (``lr_decayed``).
DECAYED_LR = 1e-4
DECAYED_REMEDY = ("Check the LR schedule: a scheduler stepped every batch where it is meant "
                  "per epoch (StepLR, ExponentialLR, MultiStepLR) decays the LR hundreds of "
                  "times too fast.")
JUMP_REMEDY = ("Check the LR schedule / manual LR changes: the LR jumped far above any the "
               "run had or planned; raise it gradually (warm-up) if it is meant.")


class LrTracker:
    """Watches the learning rates the optimizer will use (host floats, read per step at no
    device cost) and reports a jump of ``ratio`` or more between consecutive steps as an
    ``lr_too_high`` event, when the new LR is also above every LR the group has had and its
    schedule's own peak (``initial_lr``/``max_lr``, set by torch's schedulers): a warm-up
    (``LinearLR(start_factor=1e-3)``) or a warm restart (``CosineAnnealingWarmRestarts``)
    returns to a value the run already had or planned, a slip of the LR does not. Tensor
    learning rates (capturable optimizers) are not read.

    Example:
        >>> from gradguard.detectors import LrTracker
        >>> tr = LrTracker()
        >>> tr.observe(0, [{"lr": 1e-3}]); tr.observe(1, [{"lr": 0.1}])
        >>> [(e.kind, e.step, e.value) for e in tr.pop_events()]
        [('lr_too_high', 1, 100.0)]
    """

    def __init__(self, ratio: float = LR_JUMP_RATIO) -> None:
        self.ratio = ratio
        self._last: list[float | None] = []
        self._peak: list[float] = []  # the highest LR each group has had or planned
        #: per group, its peak before a jump reported as ``lr_too_high`` and the step of
        #: the jump, while the LR stays above it, for at most ``SLIP_STEPS``: a slip is no
        #: peak of the schedule (None: no slip)
        self._slip: list[tuple[float, int] | None] = []
        self._last_jump: int | None = None  # the step of the last lr_too_high report
        self._top: list[float] = []  # per group, the highest LR of its slip under way
        #: slips that ended with the LR back under the peak they jumped from, not yet taken
        #: (:meth:`pop_ended`): (the step of the jump, the slip's highest LR / that peak)
        self._ended: list[tuple[int, float]] = []
        self._events: list[Event] = []
        #: whether an LR above ``ANNEALED_LR`` of its peak was seen since the last
        #: ``lr_decayed`` report (a warm-up from LR 0 has not decayed)
        self._armed = False

    def observe(self, step: int, param_groups: Sequence[Mapping[str, Any]]) -> None:
        now = [_number(g.get("lr")) for g in param_groups]
        planned = [planned_lr(g) or 0.0 for g in param_groups]
        if len(now) != len(self._peak):
            self._peak = [max(b or 0.0, p) for b, p in zip(now, planned)]
            self._slip = [None] * len(now)
            self._top = [0.0] * len(now)
        if len(now) == len(self._last):
            jumps: list[tuple[int, float, float, float]] = []  # (group, x, from, to)
            for i, (a, b) in enumerate(zip(self._last, now)):
                if a is None or b is None:
                    continue
                top = max(self._peak[i], planned[i])
                above = b > top * (1 + 1e-9)
                # from LR 0 (a warm-up's first step) a jump is one past ratio x the peak
                if above and (b >= self.ratio * a if a > 0 else top > 0 and b >= self.ratio * top):
                    jumps.append((i, b / (a if a > 0 else top), a, b))  # from 0: x the peak
                    self._slip[i] = (top, step)
                    self._top[i] = b
                    self._last_jump = step
            if jumps:
                self._events.append(_jump_event(step, jumps, self.ratio))
        self._last = now
        for i, (b, p) in enumerate(zip(now, planned)):
            slip = self._slip[i]
            if slip is not None and b is not None:
                self._top[i] = max(self._top[i], b)
            if slip is not None and (b is None or b <= slip[0] * (1 + 1e-9)
                                     or step - slip[1] >= SLIP_STEPS):
                # back under the peak it slipped from; or kept: the run's LR now (a
                # constant warm-up, then the LR it trains at: He et al.'s ResNet-110)
                if b is not None and b <= slip[0] * (1 + 1e-9) and slip[0] > 0:
                    self._ended.append((slip[1], self._top[i] / slip[0]))
                self._slip[i] = slip = None
            # the LR of a slip (a burst, a schedule's bug) is not the schedule's peak: an
            # update now was weighed against it as 1/100 of one at the peak, and a
            # rollback after an LR x100 burst capped the LR at 1% for the rest of the run
            self._peak[i] = max(self._peak[i], p, (b or 0.0) if slip is None else 0.0)
        self._decay(step, now)

    def _decay(self, step: int, now: Sequence[float | None]) -> None:
        """An ``lr_decayed`` info when every group's numeric LR fell under ``DECAYED_LR`` of
        its peak, after one had been above ``ANNEALED_LR`` of it (found by a stranger: a
        StepLR stepped per batch took the LR to 1e-23 of its start by step 500, the run
        never learnt, and the report said "healthy", pointing at the doctor)."""
        pairs = [(lr, pk) for lr, pk in zip(now, self._peak) if lr is not None and pk > 0]
        if not pairs:
            return
        share = max(lr / pk for lr, pk in pairs)
        if share >= ANNEALED_LR:
            self._armed = True
        elif self._armed and share < DECAYED_LR:
            self._armed = False
            self._events.append(Event(
                kind="lr_decayed", step=step, severity="info", value=share,
                threshold=DECAYED_LR,
                message=(f"step {step}: the learning rate fell to {share:.3g} of its peak "
                         f"({pairs[0][0]:.3g}, peak {pairs[0][1]:.3g})"),
                remedy=DECAYED_REMEDY, data={"share": share}))

    def jumped(self, step: int) -> bool:
        """Whether a param group's LR jumped (an ``lr_too_high`` report) at ``step``."""
        return any(sl is not None and sl[1] == step for sl in self._slip)

    @property
    def last_jump(self) -> int | None:
        """The step of the last ``lr_too_high`` report (None: none yet)."""
        return self._last_jump

    def burst_since(self, step: int) -> bool:
        """Whether a param group's LR jumped (an ``lr_too_high`` report) after ``step`` and
        every group is back under the peak it jumped from: updates taken since then ran at
        an LR above the one in force now (a jump that stays is the LR in force)."""
        return (self._last_jump is not None and self._last_jump > step
                and all(sl is None for sl in self._slip))

    def annealed(self, fraction: float = ANNEALED_LR) -> bool:
        """Every param group with a numeric LR is below ``fraction`` of the highest it has
        had or planned (a schedule's tail, or a back-off); False when none has a number."""
        pairs = [(lr, pk) for lr, pk in zip(self._last, self._peak) if lr is not None]
        return bool(pairs) and all(lr < fraction * pk for lr, pk in pairs)

    def fraction(self) -> float:
        """The LR in force as a share of the highest it has had or planned (the largest
        over the param groups with a numeric LR; 1.0 when none has one): an update taken
        now is this share of one taken at the schedule's peak."""
        shares = [lr / pk for lr, pk in zip(self._last, self._peak) if lr is not None and pk > 0]
        return min(1.0, max(shares)) if shares else 1.0

    def peaks(self, n: int) -> list[float | None]:
        """The highest LR each of ``n`` param groups has had or planned (None where it is
        unknown: no numeric LR seen yet, or the groups changed since)."""
        if len(self._peak) != n:
            return [None] * n
        return [pk if pk > 0 else None for pk in self._peak]

    def pop_ended(self) -> list[tuple[int, float]]:
        """The slips (LR jumps reported as ``lr_too_high``) that ended since the last call
        with the LR back under the peak they jumped from: ``(the step of the jump, the
        slip's highest LR over that peak)``, one per param group."""
        out, self._ended = self._ended, []
        return out

    def pop_events(self) -> list[Event]:
        ev, self._events = self._events, []
        return ev

    def state_dict(self) -> dict[str, Any]:
        return {"last": list(self._last), "peak": list(self._peak), "slip": list(self._slip),
                "top": list(self._top), "ended": [list(x) for x in self._ended],
                "last_jump": self._last_jump, "events": [e.to_json() for e in self._events],
                "armed": self._armed}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        self._last = list(sd["last"])
        self._peak = [float(x) for x in sd.get("peak", [])]
        slip = list(sd.get("slip") or [None] * len(self._peak))
        self._slip = [None if x is None else (float(x[0]), int(x[1])) for x in slip]
        self._top = [float(x) for x in sd.get("top") or [0.0] * len(self._slip)]
        self._ended = [(int(s), float(r)) for s, r in sd.get("ended", [])]
        jump = sd.get("last_jump")
        self._last_jump = None if jump is None else int(jump)
        self._events = [Event.from_json(e) for e in sd.get("events", [])]
        self._armed = bool(sd.get("armed", False))


def _jump_event(step: int, jumps: list[tuple[int, float, float, float]],
                ratio: float) -> Event:
    """One ``lr_too_high`` warning for the param groups whose LR jumped at ``step``
    (found by a stranger: three groups scaled by one schedule gave three warnings at one
    step)."""
    i, x, a, b = jumps[0]
    if len(jumps) == 1:
        what = f"learning rate of param group {i} jumped {x:.3g}x ({a:.3g} -> {b:.3g})"
    else:
        top = max(j[1] for j in jumps)
        what = (f"learning rates of param groups {', '.join(str(j[0]) for j in jumps)} "
                f"jumped up to {top:.3g}x (" + ", ".join(f"{j[2]:.3g} -> {j[3]:.3g}"
                                                     for j in jumps) + ")")
    return Event(
        kind="lr_too_high", step=step, severity="warning", value=max(j[1] for j in jumps),
        threshold=ratio, message=f"step {step}: {what}",
        remedy="Check the LR schedule / manual LR changes; raise the LR gradually (warm-up).",
        data={"group": i, "lr": b, "previous_lr": a,
              **({"groups": [j[0] for j in jumps]} if len(jumps) > 1 else {})})


def _number(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def blame_jump(ev: Event, last_jump: int | None) -> Event:
    """An off-scale batch skipped within ``JUMP_SPAN`` steps after an LR jump ran on the
    weights the jump's update wrote: the batch norm statistics moved with them, not with
    the inputs. Found as a stranger: a ResNet whose LR went x300 for 5 steps was told its
    inputs were "on another scale" (check the units of the data), its loss up 43x."""
    data = ev.data or {}
    if last_jump is None or data.get("reason") != "offscale_batch" or not (
            0 < ev.step - last_jump <= JUMP_SPAN):
        return ev
    return dataclasses.replace(
        ev, remedy=JUMP_REMEDY, data={**data, "cause": "lr_too_high", "lr_jump": last_jump},
        message=(f"step {ev.step}: optimizer step skipped: a batch norm layer's running "
                 f"variance moved by more than {ev.threshold:g}x in one step, on the weights "
                 f"the LR jump at step {last_jump} wrote (loss {data.get('loss') or 0:.4g}, "
                 f"gradient norm {ev.value or 0:.3g}); the weights and the running "
                 "statistics never saw it"))

