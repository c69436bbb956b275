"""What the recovery ladder did, as the run summary tells it: its back-offs and rollbacks,
less those the next step undid (the batches were at fault, the weights sound)."""

from __future__ import annotations

from typing import Any

#: The data events (:mod:`gradguard.recovery.messages`) that say the batches were at fault.
DATA_KINDS = ("nonfinite_input", "unscaled_input", "grad_spike")


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _undone(ev: list[dict[str, Any]], backoffs: list[dict[str, Any]],
            rollbacks: list[dict[str, Any]]) -> tuple[set[int], set[int]]:
    """The positions in ``backoffs`` and ``rollbacks`` of those the next step undid: a
    back-off the next step found sound (``data["undone"]``: the last back-off before it),
    and a rollback whose batches were found at fault on the restored weights too
    (``data["rollback_undone"]``: the weights it replaced are back, with the LR from
    before the streak: the last rollback before it and the back-offs of its streak)."""
    off: set[int] = set()
    rolled: set[int] = set()
    since = -1  # the step of the last undo: a streak's back-offs come after it
    for e in ev:
        data = e.get("data") or {}
        if e.get("kind") not in DATA_KINDS:
            continue
        step = int(e.get("step", -1))
        if data.get("undone"):
            hit = [i for i, b in enumerate(backoffs) if b["step"] <= step and i not in off]
            off.update(hit[-1:])
        elif data.get("rollback_undone"):
            rb = [i for i, r in enumerate(rollbacks) if r["step"] <= step and i not in rolled]
            if rb:
                rolled.add(rb[-1])
                off.update(i for i, b in enumerate(backoffs) if since < b["step"] <= step)
        else:
            continue
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
    actions: list[str] = []
    if backoffs and len(off) == len(backoffs) and not rollbacks:
        return ["backed off the LR, and restored it at the next step (sound on the same "
                "weights: the batches were at fault)"]
    if backoffs and len(off) == len(backoffs) and len(rolled) == len(rollbacks):
        what = "the rollback" if len(rollbacks) == 1 else plural(len(rollbacks), "rollback")
        return [f"undid the LR back-off{'s' if len(backoffs) > 1 else ''} and {what} it took "
                "(the batches were at fault: the weights restored spiked on them too)"]
    kept = [b for i, b in enumerate(backoffs) if i not in off]
    undid = f", {len(off)} undone" if off else ""
    if kept:
        factor = (kept[-1].get("data") or {}).get("factor")
        # a rollback after the last back-off sets the LR in force from the weights it restores
        # (found by a stranger: "cut the LR to x0.1" where the rollback past an LR burst
        # kept x1, or set x0.0118)
        after = [f for i, e in enumerate(rollbacks) if e["step"] >= kept[-1]["step"]
                 and i not in rolled
                 and isinstance(f := (e.get("data") or {}).get("factor"), (int, float))]
        factor = after[-1] if after else factor
        if after and after[-1] >= 1:
            times = "" if len(backoffs) == 1 else f" {len(backoffs)} times"
            actions.append(f"backed off the LR{times} (the rollback after it restored it)")
        elif len(backoffs) == 1 and factor == 0.5:
            actions.append("halved the LR")
        elif isinstance(factor, (int, float)):
            times = "" if len(backoffs) == 1 else f" ({len(backoffs)} back-offs{undid})"
            ended = [e for e in ev if (e.get("data") or {}).get("reason") == "burst_ended"
                     and e["step"] > kept[-1]["step"]]
            during = "" if not ended else (
                f" during the LR burst (x{(ended[-1].get('data') or {}).get('factor', 1.0):.3g}"
                " of the schedule once it ended)")
            actions.append(f"cut the LR to x{factor:.3g}{during}{times}")
        else:
            actions.append(f"backed off the LR {plural(len(backoffs), 'time')}{undid}")
    elif backoffs:
        actions.append(f"backed off the LR {plural(len(backoffs), 'time')}, each undone at "
                       "the next step")
    if rollbacks:
        actions.append(f"rolled back {plural(len(rollbacks), 'time')}"
                       + (f", {len(rolled)} undone at the next step" if rolled else ""))
    return actions
