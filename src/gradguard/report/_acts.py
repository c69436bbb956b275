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


def _undone(ev: list[dict[str, Any]], backoffs: list[dict[str, Any]],
            rollbacks: list[dict[str, Any]]) -> tuple[set[int], set[int]]:
    """The positions in ``backoffs`` and ``rollbacks`` of those the next step undid. A
    streak's back-offs (at 3 and 6 skips) are undone together when the step after it is
    sound on its weights (``data["undone"]``: the state before the streak returns), and
    with the rollback it took when the weights restored give the same trouble
    (``data["rollback_undone"]``: the weights it replaced are back, with the LR from
    before the streak). A streak's back-offs are those after the last rollback that stood
    and the last undo."""
    off: set[int] = set()
    rolled: set[int] = set()
    since = -1  # the step of the last undo
    for e in ev:
        data = e.get("data") or {}
        if e.get("kind") not in DATA_KINDS or not (data.get("undone") or data.get("rollback_undone")):
            continue
        step = int(e.get("step", -1))
        before = [i for i, r in enumerate(rollbacks) if r["step"] <= step and i not in rolled]
        if data.get("rollback_undone") and before:
            rolled.add(before.pop())
        start = max([since, *(rollbacks[i]["step"] for i in before)])
        off.update(i for i, b in enumerate(backoffs) if start < b["step"] <= step)
        since = step
    return off, rolled


def ladder_actions(ev: list[dict[str, Any]], late: list[dict[str, Any]]) -> list[str]:
    """The summary's words for the ladder's back-offs and rollbacks (``late``: decided after
    the script ended, not applied). A burst's end that hands the LR back to the schedule
    (an ``lr_backoff`` info) is no back-off (found by a stranger: an LR x300 burst on two
    param groups, rescued, was "cut the LR to x1 (2 back-offs)"); a back-off and rollback
    the next step undid are told undone (a x100 loss storm whose rollback the next step
    undid, the LR back in full, was "cut the LR to x0.0118 and rolled back 1 time")."""
    backoffs = [e for e in ev if e.get("kind") == "lr_backoff" and e not in late
                and (e.get("data") or {}).get("reason") != "burst_ended"]
    rollbacks = [e for e in ev if e.get("kind") == "rollback" and e not in late]
    off, rolled = _undone(ev, backoffs, rollbacks)
    standing = [r for i, r in enumerate(rollbacks) if i not in rolled]
    if backoffs and len(off) == len(backoffs) and rollbacks and not standing:
        what = "the rollback" if len(rollbacks) == 1 else plural(len(rollbacks), "rollback")
        return [f"undid the LR back-off{'s' if len(backoffs) > 1 else ''} and {what} it took "
                "(the batches were at fault: the weights restored spiked on them too)"]
    actions: list[str] = []
    kept = [b for i, b in enumerate(backoffs) if i not in off]
    if backoffs and not kept:
        actions.append("backed off the LR, and restored it at the next step (sound on the "
                       "same weights: the batches were at fault)")
    elif kept:
        # a rollback after the last back-off sets the LR in force from the weights it restores
        # (found by a stranger: "cut the LR to x0.1" where the rollback past an LR burst
        # kept x1, or set x0.0118)
        after = [f for e in standing if e["step"] >= kept[-1]["step"]
                 and (f := _factor(e)) is not None]
        factor = after[-1] if after else _factor(kept[-1])
        undid = f", {len(off)} undone" if off else ""
        if after and after[-1] >= 1:
            times = "" if len(backoffs) == 1 else f" {len(backoffs)} times{undid}"
            actions.append(f"backed off the LR{times} (the rollback after it restored it)")
        elif len(backoffs) == 1 and factor == 0.5:
            actions.append("halved the LR")
        elif factor is not None:
            times = "" if len(backoffs) == 1 else f" ({len(backoffs)} back-offs{undid})"
            ended = [e for e in ev if (e.get("data") or {}).get("reason") == "burst_ended"
                     and e["step"] > kept[-1]["step"]]
            during = "" if not ended or (f := _factor(ended[-1])) is None else (
                f" during the LR burst (x{f:.3g} of the schedule once it ended)")
            actions.append(f"cut the LR to x{factor:.3g}{during}{times}")
        else:
            actions.append(f"backed off the LR {plural(len(backoffs), 'time')}{undid}")
    if rollbacks:
        actions.append(f"rolled back {plural(len(rollbacks), 'time')}"
                       + (f", {len(rolled)} undone at the next step" if rolled else ""))
    return actions
