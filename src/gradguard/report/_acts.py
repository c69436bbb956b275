"""What the recovery ladder did, as the run summary tells it: its back-offs and rollbacks,
less those the next step undid (the batches were at fault, the weights sound)."""

from __future__ import annotations

from typing import Any

#: The data events (:mod:`gradguard.recovery.messages`) that say the batches were at fault.
DATA_KINDS = ("nonfinite_input", "unscaled_input", "grad_spike")


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _factor(e: dict[str, Any]) -> float | None:
    f = (e.get("data") or {}).get("factor")
    return float(f) if isinstance(f, (int, float)) else None


def _undos(ev: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The events that undid a rung: the next step's (a data event, ``data["undone"]`` or
    ``data["rollback_undone"]``) and the shift test's (``data_shift``, ``data["undone"]``:
    it puts back the weights a rollback replaced; found by a regression hunt)."""
    return [e for e in ev if e.get("kind") in (*DATA_KINDS, "data_shift") and (
        (e.get("data") or {}).get("undone") or (e.get("data") or {}).get("rollback_undone"))]


def _undone(ev: list[dict[str, Any]], backoffs: list[dict[str, Any]],
            rollbacks: list[dict[str, Any]]) -> tuple[set[int], set[int]]:
    """The positions in ``backoffs`` and ``rollbacks`` of those the next step undid. A
    rollback whose restored weights gave the same trouble is undone (``data
    ["rollback_undone"]``: the weights it replaced are back); a streak's back-offs (at 3
    and 6 skips, after the last rollback that stood and the last undo) are undone when the
    step after the streak gave the LR back (``data["undone"]``: sound on the same weights;
    or with the rollback): the event's ``factor`` above the streak's lowest. An undone
    rollback may leave the LR cut (found by a regression hunt: "restored it at the next
    step" on a run whose LR stayed at x0.0118 after the weights came back)."""
    off: set[int] = set()
    rolled: set[int] = set()
    since = -1  # the step of the last undo
    for e in _undos(ev):
        data = e.get("data") or {}
        step = int(e.get("step", -1))
        before = [i for i, r in enumerate(rollbacks) if r["step"] <= step and i not in rolled]
        if (data.get("rollback_undone") or e.get("kind") == "data_shift") and before:
            rolled.add(last := before.pop())
            streak_low = _factor(rollbacks[last])
        else:
            streak_low = None
        start = max([since, *(rollbacks[i]["step"] for i in before)])
        streak = [i for i, b in enumerate(backoffs) if start < b["step"] <= step]
        lows = [f for f in [streak_low, *(_factor(backoffs[i]) for i in streak)] if f is not None]
        given = _factor(e)
        if given is None or not lows or given > min(lows):
            off.update(streak)
        since = step
    return off, rolled


def ladder_actions(ev: list[dict[str, Any]], late: list[dict[str, Any]]) -> list[str]:
    """The summary's words for the ladder's back-offs and rollbacks (``late``: decided after
    the script ended, not applied). A burst's end that hands the LR back to the schedule
    (an ``lr_backoff`` info) is no back-off (found by a stranger: an LR x300 burst on two
    param groups, rescued, was "cut the LR to x1 (2 back-offs)"); a back-off and rollback
    the next step undid are told undone (a x100 loss storm whose rollback the next step
    undid, the LR back in full, was "cut the LR to x0.0118 and rolled back 1 time"). The
    LR named is the one the last act that stood set: a back-off, a rollback after the first
    back-off (it sets the LR of the weights it restores), or an undo (its ``factor``)."""
    backoffs = [e for e in ev if e.get("kind") == "lr_backoff" and e not in late
                and (e.get("data") or {}).get("reason") != "burst_ended"]
    rollbacks = [e for e in ev if e.get("kind") == "rollback" and e not in late]
    off, rolled = _undone(ev, backoffs, rollbacks)
    standing = [r for i, r in enumerate(rollbacks) if i not in rolled]
    kept = [b for i, b in enumerate(backoffs) if i not in off]
    actions: list[str] = []
    if backoffs:
        first = backoffs[0]["step"]
        undos = [e for e in _undos(ev) if e["step"] >= first]
        lr_acts = sorted([*kept, *(e for e in [*standing, *undos] if e["step"] >= first
                                   and _factor(e) is not None)], key=lambda e: e["step"])
        factor = _factor(lr_acts[-1]) if lr_acts else None
        undid = f", {len(off)} undone" if off else ""
        times = "" if len(backoffs) == 1 else f" ({len(backoffs)} back-offs{undid})"
        if not kept and rollbacks and not standing and (factor is None or factor >= 1):
            what = "the rollback" if len(rollbacks) == 1 else plural(len(rollbacks), "rollback")
            # what the restored weights showed, by the kind of the last undo (found by a
            # helper checking the docs: NaN batches were told "spiked")
            showed = {"nonfinite_input": "gave NaN/Inf on them too",
                      "unscaled_input": "met them on another scale too"}.get(
                          str(undos[-1].get("kind")) if undos else "", "spiked on them too")
            return [f"undid the LR back-off{'s' if len(backoffs) > 1 else ''} and {what} it "
                    f"took (the batches were at fault: the weights restored {showed})"]
        if not lr_acts or (not kept and (factor is None or factor >= 1)):
            actions.append("backed off the LR, and restored it at the next step (sound on the "
                           "same weights: the batches were at fault)")
        elif factor is not None and factor >= 1:
            times = "" if len(backoffs) == 1 else f" {len(backoffs)} times{undid}"
            actions.append(f"backed off the LR{times} (the rollback after it restored it)")
        elif len(backoffs) == 1 and factor == 0.5:
            actions.append("halved the LR")
        elif factor is not None:
            ended = [e for e in ev if (e.get("data") or {}).get("reason") == "burst_ended"
                     and e["step"] > lr_acts[-1]["step"]]
            during = "" if not ended or (f := _factor(ended[-1])) is None else (
                f" during the LR burst (x{f:.3g} of the schedule once it ended)")
            actions.append(f"cut the LR to x{factor:.3g}{during}{times}")
        else:
            actions.append(f"backed off the LR {plural(len(backoffs), 'time')}{undid}")
    if rollbacks:
        actions.append(f"rolled back {plural(len(rollbacks), 'time')}"
                       + (f", {len(rolled)} undone" if rolled else ""))
    return actions
