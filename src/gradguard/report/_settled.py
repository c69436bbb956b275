"""The run summary's sentence on the LR the recovery ladder found stable (:mod:`._summary`):
the LR to set in the config, the edge of what trains, or a scale gone wrong."""

from __future__ import annotations

from typing import Any

from ._remedy import LOWERED_STALL


def _growth_cut(events: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The run's one act of the ladder when it is the early-growth rule's rollback with its
    LR cap (:mod:`gradguard.recovery.growth`); None otherwise."""
    cuts = [e for e in events if e.get("kind") in ("lr_backoff", "rollback")
            and e.get("severity") in ("warning", "error")]
    return cuts[0] if len(cuts) == 1 and "in the first 20 steps" in str(
        cuts[0].get("message", "")) else None


def _growth_capped(events: list[dict[str, Any]], settled: dict[str, Any]) -> bool:
    """Whether the LR a ``lr_settled`` event names is the cap the early-growth rule set,
    with no act of the ladder lowering it since (its rollback the one cut; the ladder
    records the LR before it as failed, and the settled factor may sit a little above
    the rollback's back-off: found by a helper checking the docs, a real run never got
    this sentence, only "it failed at lr 0.03", an LR its unguarded twin trained at)."""
    return isinstance(settled.get("factor"), (int, float)) and _growth_cut(events) is not None


def growth_cap(events: list[dict[str, Any]]) -> str | None:
    """The sentence for a run whose one act was the early-growth rule's rollback with its
    LR cap, and that ended before the ladder called the LR settled: the cap is what the
    run trained at from there, and the LR to set (found by a stranger: a GPT-2 under the
    HF Trainer at 30x its LR, rolled back at step 60 and trained at x0.056 for the last 90
    of its 150 steps, 1.01x its healthy twin, had no cause and no remedy); None
    otherwise."""
    if any(e.get("kind") in ("lr_settled", "lr_probe") for e in events):
        return None  # settled, or a probe of the LR that may have moved it since
    cut = _growth_cut(events)
    factor = None if cut is None else (cut.get("data") or {}).get("factor")
    if cut is None or not (isinstance(factor, (int, float)) and 0 < factor < 1):
        return None
    return (f"From step {cut['step']} it trained at x{factor:.3g} of your LR, the cap the "
            "growth of the first weights set (an estimate, not an edge found failing): lower "
            "your LR to about that in your config, or try a few times higher.")


def settled_low(events: list[dict[str, Any]]) -> bool:
    """Whether the ladder left the run at an LR under the one set: settled there (an
    ``lr_settled`` event with a factor under 1), or capped by the growth rule before it
    settled (:func:`growth_cap`)."""
    return growth_cap(events) is not None or any(
        e.get("kind") == "lr_settled" and isinstance(f := (e.get("data") or {}).get("factor"),
                                                     (int, float)) and f < 1 for e in events)


def _lr_list(lrs: list[Any]) -> str:
    """Param groups' LRs as text, each distinct one once."""
    return ", ".join(f"{float(x):.3g}" for x in dict.fromkeys(lrs) if isinstance(x, (int, float)))


#: A settled LR factor below this, at an LR below ``TINY_LR``, is no LR to set but a sign
#: of a scale gone wrong (an LR of 10 typed for Adam settles at 0.0096: an LR to set).
FAR_BELOW = 1e-3
TINY_LR = 1e-5


def settled_sentences(ev: list[dict[str, Any]], cause: str | None) -> list[str]:
    """The summary's sentence on the LR the ladder found stable (an ``lr_settled`` event):
    what to set in the config, or why this LR is none to set."""
    parts: list[str] = []
    settled = [e for e in ev if e.get("kind") == "lr_settled"]
    if settled and cause not in ("dead_units", LOWERED_STALL):  # the LR the ladder found stable: what
        # the user should set (not where the network died: it did not train there)
        s = settled[-1]
        sdata = s.get("data") or {}
        shown = _lr_list(sdata.get("lr") or [s.get("value")])
        # under a schedule that moved the LR (a warm-up, a decay) the LR now is no config
        # value: the factor of the schedule is what held, the advice scales the config's
        stable = (f"Stable at x{sdata.get('factor'):g} of your schedule (lr {shown} at step "
                  f"{s.get('step')})" if sdata.get("scheduled") else f"Stable at lr {shown}")
        # a back-off or rollback after it below its factor: that LR failed too (found by a
        # stranger: a sum-reduced loss on SGD was told "set lr 0.00399 in your config", the
        # LR the run diverged at 60 steps later)
        relapsed = next((e for e in ev if e.get("kind") in ("lr_backoff", "rollback")
                       and e.get("step", -1) > s.get("step", -1)
                       and isinstance(f := (e.get("data") or {}).get("factor"), (int, float))
                       and isinstance(sdata.get("factor"), (int, float))
                       and f < sdata["factor"]), None)
        if shown and relapsed is not None:
            parts.append(f"The LR it had found stable, lr {shown} at step {s.get('step')}, "
                         f"failed again at step {relapsed['step']}: no stable LR was found, "
                         "lower the LR itself (or look for what scales the gradients: a loss "
                         "summed where it is meant averaged, an unnormalised input).")
        elif shown and not sdata.get("raised") and isinstance(
                factor := sdata.get("factor"), (int, float)) and 0 < factor < FAR_BELOW and all(
                isinstance(x, (int, float)) and x < TINY_LR for x in sdata.get("lr") or [None]):
            # found by a stranger: tabular features on a scale of 1e3 on SGD settled at
            # x5e-5 of the LR, "recovered", told to set 2.6e-7 in the config, no word of
            # the inputs
            parts.append(f"{stable}, {1 / factor:.3g}x below yours: no usual LR, but a "
                         "sign that something scales the gradients up (inputs or targets "
                         "not normalised, a loss summed where it is meant averaged, weights "
                         "initialised too large); fix that (run gg.doctor on a batch) "
                         "rather than set this LR.")
        elif shown and sdata.get("raised") and float(sdata.get("factor") or 0) >= 1:
            # a retry found the LR the trouble lowered trains after all (recovery.probe)
            parts.append(f"Back at your lr {shown} from step {s.get('step')}: the trouble "
                         "was not the LR's.")
        elif shown and sdata.get("raised") and sdata.get("advise"):  # part of the way back
            parts.append(f"{stable}, where a retry of the LR the trouble lowered found it "
                         f"trains: set {_lr_list(sdata['advise'])} in your config.")
        elif shown and sdata.get("retry") and not sdata.get("raised") and isinstance(
                tried := sdata.get("tried"), (int, float)) and isinstance(
                factor := sdata.get("factor"), (int, float)) and tried > factor > 0:
            # a retry of a higher LR from the weights mid-run did not hold: the edge lies
            # between (found by a stranger: an LSTM at Adam 30x capped by the growth rule,
            # a retry at 4.2x the cap failed, was told "the cap ... try a few times higher")
            half = _lr_list(sdata.get("advise") or []) or shown
            parts.append(f"{stable}; a retry at {tried / factor:.3g}x it, from the weights "
                         "mid-run, did not hold: the edge of what trains lies between; set "
                         f"half of it, {half}, in your config.")
        elif shown and _growth_capped(ev, sdata):
            # found by a stranger: a char LSTM on SGD at 30x, its LR capped by the growth
            # rule at x0.0106, was told "the edge of what trains; set half of it, 0.159",
            # where every LR up to 13.7 trains (0.159 ends 27% worse than its twin). The LR
            # named: the config's at the cap (the advice, where the ladder recorded the LR
            # before it as failed), else the LR in force
            at = (sdata.get("failed_lr") and _lr_list(sdata.get("advise") or [])) or shown
            parts.append(f"{stable}: the cap the growth of the first weights set, an "
                         f"estimate, not an edge found failing; set lr {at} in your config, "
                         "or try a few times higher.")
        elif shown and sdata.get("failed_lr"):  # a jump below the LR that failed: no edge
            ratio = sdata["failed"] / sdata["factor"] if sdata.get("factor") else None
            times = f", {ratio:.3g}x higher" if ratio else ""
            failed = (f"x{sdata['failed']:g}" if sdata.get("scheduled")
                      else f"lr {_lr_list(sdata['failed_lr'])}")
            parts.append(f"{stable}; it failed at {failed}{times}: set lr "
                         f"{_lr_list(sdata.get('advise') or []) or shown} in your config (the "
                         "edge of what trains lies between).")
        elif shown and sdata.get("advise"):  # half of it for the config (recovery.tally)
            half = _lr_list(sdata["advise"])
            held = (f", with the gradients clipped on {sdata['clipped']} of the "
                    f"{sdata['steps']} steps since the LR was lowered to it"
                    if "clipped" in sdata else "")
            parts.append(f"{stable}{held}: the edge of what trains; set half of "
                         f"it, {half}, in your config.")
        elif shown:
            parts.append(f"Stable at lr {shown}; set it in your config.")
    elif cause not in ("dead_units", LOWERED_STALL) and (capped := growth_cap(ev)) is not None:
        parts.append(capped)
    return parts
