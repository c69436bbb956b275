"""The run in one or two sentences: the first trouble, what gradguard did about it, and
how it ended (judged on the loss, :mod:`._outcome`)."""

from __future__ import annotations

import math
from typing import Any

from ..events import listed
from ._acts import ladder_actions
from ._acts import plural as _plural
from ._data import TROUBLE_KINDS, RunData
from ._settled import settled_sentences
from ._silent import not_learning


def _nonfinite_kind(e: dict[str, Any]) -> str:
    msg = e.get("message") or ""
    return "Inf" if " Inf" in msg else "NaN"


#: Trouble at most this many steps after an LR jump is told after the jump.
JUMP_LEADS = 20


def _nonfinite_sentence(e: dict[str, Any], *, later: bool = False) -> str:
    """What a ``nonfinite_grad`` event says happened, without the final period (``later``:
    after the run's first trouble). The loss or the input batch itself non-finite is no
    explosion of the gradients, nor are weights an update made NaN (cause
    ``nonfinite_weights``)."""
    kind, s, origin = _nonfinite_kind(e), e["step"], e.get("layer")
    if (e.get("data") or {}).get("script_skipped"):  # integrations._script_skips
        kind = str(e["data"].get("norm") or kind)
        return (f"The script's own clip_grad_norm_ measured a {kind} gradient norm before step "
                f"{s}, and the script skipped that step itself")
    if (e.get("data") or {}).get("cause") == "nonfinite_weights":
        of = f" of `{origin}`" if origin else ""
        return (f"The weights{of} were NaN/Inf at step {s}: the optimizer's update before "
                "it wrote them from finite gradients")
    if origin == "(loss)":  # the loss's own kind (an Inf loss gives NaN gradients)
        loss = (e.get("data") or {}).get("loss")
        kind = loss if loss in ("NaN", "Inf") else kind
        return f"The loss was {kind} at step {s}, and the gradients with it"
    if origin == "(input)":
        return f"The input batch of step {s} held {kind}"
    if (e.get("data") or {}).get("unseen_loss"):
        return (f"Every layer's gradient was {kind} at step {s} under a finite loss: a loss "
                "guard.step was not given held it (a micro-batch before the last, under "
                "gradient accumulation), or the loss's own backward")
    if later:
        return f"Gradients became {kind} at step {s}{_where(e)}"
    return f"Gradients exploded at step {s}{_where(e)} ({kind})"


def _where(e: dict[str, Any]) -> str:
    layer = e.get("layer")
    if not layer:
        return ""
    special = {"(loss)": " in the loss", "(input)": " in the input batch"}
    return special.get(layer, f" in `{layer}`")


#: An ``lr_decayed`` event before this share of the run's steps is a schedule that took
#: the LR away early (a scheduler stepped per batch), not one that ends at 0.
EARLY_DECAY = 0.9


def _offscale_sentence(off: list[dict[str, Any]]) -> str:
    """Steps skipped because their batch moved the batch norm statistics alone (see
    ``gradguard._running``): nothing spiked, so say what did."""
    n, ratio = len(off), off[0].get("threshold")
    by = f"by more than {ratio:g}" if isinstance(ratio, (int, float)) else "several times over"
    jump = (off[0].get("data") or {}).get("lr_jump")
    if jump is not None:  # the weights an LR jump wrote (gradguard.detectors.lr.blame_jump)
        return (f"The learning rate jumped far above any the run had or planned at step "
                f"{jump}: from step {off[0]['step']} on, the weights its update wrote moved "
                f"a batch norm layer's running variance {by} in one step "
                f"({n} step{'s' if n > 1 else ''}).")
    return (f"{n} batch{'es' if n > 1 else ''} from step {off[0]['step']} on "
            f"{'were' if n > 1 else 'was'} on another scale: each multiplied a batch norm "
            f"layer's running variance {by} while the loss and the gradients stayed as they "
            "were (inputs in other units?).")


#: The largest of a run's first ``HEAD`` gradient norms this many times the median of its
#: next ``SETTLE`` after step ``SETTLE`` is a gradient out of scale at init (no learning
#: lowers a norm that much in ten steps; over a whole run a loss that goes to ~0 does).
START_RATIO = 100.0
HEAD, SETTLE = 3, 10
#: A loss down to this share of its first level over the same steps: the norm fell with it.
FIT_FALL = 0.1


def out_of_scale_start(norms: Any, losses: Any = None) -> str | None:
    """A sentence when the run's first gradient norms were ``START_RATIO`` times or more
    its later ones: out of scale before any update could cause it (a transformers ConvNeXt
    on zero-background digits: 1.8e4, then under 10 from step 2, a LayerNorm over blank
    patches: :mod:`gradguard.doctor.norms`); None otherwise, and None when the loss fell
    to ``FIT_FALL`` of its first level or less over the same steps (``losses``, finite
    ones, in step order): a fit takes the gradient down with the loss (found by a
    stranger: an MLP on separable blobs, its loss 4.7 to 1e-5 in ten steps, was told "a
    gradient out of scale at init")."""
    import numpy as np

    if len(norms) < 2 * SETTLE:
        return None
    head, later = float(np.max(norms[:HEAD])), float(np.median(norms[SETTLE:2 * SETTLE]))
    if not (later > 0 and head >= START_RATIO * later):
        return None
    if losses is not None and len(losses) >= 2 * SETTLE:
        first, fit = float(np.max(losses[:HEAD])), float(np.median(losses[SETTLE:2 * SETTLE]))
        if first > 0 and fit <= FIT_FALL * first:
            return None
    return (f"It started at {head:.3g}, {head / later:.3g}x its level ten steps later: a "
            "gradient out of scale at init, before any update could cause it (run gg.doctor "
            "on a batch).")


def summary_sentence(data: RunData, config: dict[str, Any] | None = None) -> str:
    """One or two sentences: what went wrong, what gradguard did, how it ended.

    How it ended is judged on the loss (:func:`gradguard.report._outcome.judge`):
    "recovered" only when the loss is back at its level before the incident; a loss that
    rose over the run is called out first, as ``lr_too_high``. ``config``: the guard's
    options (default: the run directory's ``guard.json``, written by ``gradguard run``).
    Layer names are wrapped in backticks (rendered as code in the HTML).
    """
    import numpy as np

    from ._levels import flat_words
    from ._outcome import (
        every_overflow,
        judge,
        ladder_reason,
        read_guard_config,
        summary_lead,
    )
    from ._silent import died_layers

    if config is None:
        config = read_guard_config(data.run_dir)
    outcome = judge(data, config)
    ev = data.events
    trouble = [e for e in ev if e.get("kind") in TROUBLE_KINDS]
    n_skip = int(data.skipped.sum())  # an update a restore voided is not in it
    finite_norm = data.grad_norm[np.isfinite(data.grad_norm)]
    # a clipped step the guard then skipped took no clipped update (the demo's summary said
    # "skipped 6, clipped 5" with 2 of the 5 skipped)
    clipped = int(np.sum(np.isfinite(data.clip_coef) & (data.clip_coef < 1.0) & ~data.skipped))
    # decided at the flush after the script ended (gradguard run): not applied
    late = [e for e in ev if (e.get("data") or {}).get("applied") is False]
    lead = summary_lead(data, outcome)
    parts: list[str] = [lead] if lead else []
    if lead:  # the loss tells the story; vanishing or loss spikes are its consequences
        trouble = [e for e in trouble if e.get("kind") in ("nonfinite_grad", "grad_spike")]
    if trouble:
        e = trouble[0]
        k, s = e["kind"], e["step"]
        jump = next((j for j in ev if j.get("kind") == "lr_too_high" and j.get("severity")
                     in ("warning", "error") and 0 <= s - j["step"] <= JUMP_LEADS), None)
        if jump is not None and not lead:
            # the trouble came right after the LR jumped: that is the story's start (found
            # by a stranger: "The gradient norm spiked at step 151" after a LambdaLR x100
            # at step 150, the jump left unsaid)
            ratio = jump.get("value")
            by = f" {ratio:.3g}x" if isinstance(ratio, (int, float)) else ""
            parts.append(f"The learning rate jumped{by} at step {jump['step']}, above any the "
                         "run had or planned.")
        acted = None if lead else ladder_reason(ev)
        if acted is not None and (acted[0] < s or (acted[0] == s and k not in (
                "nonfinite_grad", "grad_spike", "loss_spike"))):
            # the ladder acted first, on what no gradient event shows (weights that grew, a
            # loss that rose): that is the story's start; at the same step as a vanishing
            # or dying layer too, its consequence (found by a stranger: a BERT at 30x its LR
            # "Gradients vanished in `word_embeddings` from step 60", the weights that grew
            # 7x by then, which the rollback at 60 answered, said after it)
            parts.append(f"At step {acted[0]}, {acted[1]}.")
        if k == "nonfinite_grad":
            parts.append(_nonfinite_sentence(e) + ".")
        elif k == "grad_spike":
            parts.append(f"The gradient norm spiked at step {s}{_where(e)}.")
        elif k == "loss_spike":
            parts.append(f"The loss spiked at step {s}.")
        else:
            parts.append(f"Gradients vanished{_where(e)} from step {s}.")
        nonfinite = [x for x in ev if x.get("kind") == "nonfinite_grad"]
        n_bad = len({x["step"] for x in nonfinite if not (x.get("data") or {}).get(
            "script_skipped")}) + sum(
            1 for x in nonfinite if (x.get("data") or {}).get("script_skipped"))
        if nonfinite and k != "nonfinite_grad":
            x = nonfinite[0]
            parts.append(f"{_nonfinite_sentence(x, later=True)} "
                         f"({_plural(n_bad, 'non-finite step')} in all).")
        elif n_bad > 1:
            parts[-1] = parts[-1][:-1] + f"; {_plural(n_bad, 'non-finite step')} in all."
    elif not lead and (off := [e for e in ev if (e.get("data") or {}).get("reason")
                               == "offscale_batch"]):
        acted = ladder_reason(ev)
        if acted is not None and outcome.cause == "lr_too_high" and \
                (off[0].get("data") or {}).get("lr_jump") is None:
            # the ladder found the weights at fault (the loss rose before the skips): the LR
            # wrecked them, and their batch norm statistics with them (found by a stranger: a
            # timm ResNet at AdamW 300x was told its inputs were "on another scale")
            parts.append(f"At step {acted[0]}, {acted[1]}.")
        else:
            parts.append(_offscale_sentence(off))
    elif not lead and (lost := [e for e in ev if (e.get("data") or {}).get("reason")
                                == "nonfinite_running_stats"]):
        # a forward the guard never saw wrote NaN into the batch norm statistics (found by
        # a regression hunt: "No gradient trouble ... skipped 15 steps")
        parts.append(f"{_plural(len(lost), 'step')} from step {lost[0]['step']} on "
                     f"{'were' if len(lost) > 1 else 'was'} skipped: a forward before "
                     f"{'each' if len(lost) > 1 else 'it'} turned a batch norm layer's running "
                     "statistics NaN/Inf (a batch with NaN/Inf whose loss the loop skipped "
                     "before backward?), and they were put back.")
    elif not lead and (acted := ladder_reason(ev)) is not None:
        parts.append(f"At step {acted[0]}, {acted[1]}.")  # what the ladder saw: no gradient event
    elif not lead and (spiked := [e for e in ev if e.get("kind") == "skip" and e.get(
            "severity") == "warning" and str((e.get("data") or {}).get("reason", "")).endswith(
            "_spike")]):
        # skipped at the step before the flush detectors had the history to report a
        # spike (their warm-up; found by a stranger: "No gradient trouble in 120 steps ...
        # gradguard skipped 2 steps")
        parts.append(f"{_plural(len(spiked), 'step')} from step {spiked[0]['step']} on "
                     f"spiked and {'were' if len(spiked) > 1 else 'was'} skipped at the step.")
    elif not lead and every_overflow(data):
        parts.append(f"Every one of the {data.n_steps} steps overflowed in float16: the "
                     "GradScaler skipped them all, and no update was taken.")
    elif not lead and outcome.status == "stalled" and outcome.cause in ("no_gradient",
                                                                        "dead_units"):
        pass  # the clause tells it: "training stalled: ... no gradient reached the optimizer"
    elif not lead and (dead := died_layers(ev, data)) is not None:
        parts.append(f"From step {dead[0]}, {listed(dead[1])} got no gradient at all: "
                     "the units that feed them died.")
    elif not lead and (stop := next((e for e in ev if e.get("kind") == "abort" and (
            e.get("data") or {}).get("script_stopped")), None)) is not None:
        # the script stopped itself on a NaN/Inf loss, before any step took it
        parts.append(f"The script stopped after a backward whose loss was "
                     f"{(stop.get('data') or {}).get('loss', 'NaN')}, before any optimizer "
                     "step took it.")
    elif not lead and (jumps := [e for e in ev if e.get("kind") == "lr_too_high"]):
        # the script's LR jumped (gradguard.detectors.lr): an incident the verdict judges
        # from, though no gradient showed it (a run whose LR the script raised 30x was
        # "HEALTHY: No gradient trouble", at 2.7x its twin's held-out loss)
        ratio = jumps[0].get("value")
        by = f" {ratio:.3g}x" if isinstance(ratio, (int, float)) else ""
        parts.append(f"The learning rate jumped{by} at step {jumps[0]['step']}, above any "
                     "the run had or planned.")
    elif not lead and (untrained := [e for e in ev if e.get("kind") == "nonfinite_loss"]):
        # finite gradients, a non-finite loss (a batch of padding only: found by a stranger,
        # "No gradient trouble", its warnings' fix left out)
        n = sum(len((e.get("data") or {}).get("steps") or [e["step"]]) for e in untrained)
        why = str(untrained[0].get("message", "")).partition(" while ")[2]
        parts.append(f"The loss given to guard.step was non-finite at {_plural(n, 'step')} "
                     f"from step {untrained[0]['step']} while {why}. "
                     f"{untrained[0].get('remedy') or ''}".rstrip())
    elif not lead and (bad := int((~np.isfinite(data.grad_norm)).sum())):
        # non-finite norms with no event naming them: the events file is missing or was
        # cut (a run with 47 NaN steps was "No gradient trouble ... between 91.7 and 5e18")
        parts.append(f"{_plural(bad, 'step')} had a non-finite gradient norm (no event "
                     "recorded for them: is events.jsonl missing or cut short?).")
    elif not lead:
        lo = float(finite_norm.min()) if finite_norm.size else math.nan
        hi = float(finite_norm.max()) if finite_norm.size else math.nan
        parts.append(
            f"No gradient trouble in {_plural(data.n_steps, 'step')}: the gradient norm "
            f"stayed between {lo:.3g} and {hi:.3g}."
        )
        loss = np.asarray(data.loss, dtype=np.float64)
        if (start := out_of_scale_start(finite_norm, loss[np.isfinite(loss)])) is not None:
            parts.append(start)
        if outcome.flat and outcome.status == "healthy" and outcome.start is not None \
                and outcome.final is not None:  # no trouble, and no progress
            words = flat_words(outcome.start, outcome.final)
            # early in the run: a cosine to 0 or a OneCycle gets there in its last steps,
            # by design (found by a regression hunt: a fine-tune that starts at its best
            # was told its schedule "decays it too fast")
            decayed = next((e for e in ev if e.get("kind") == "lr_decayed"
                            and e["step"] < EARLY_DECAY * data.n_steps), None)
            if decayed is not None:  # the schedule took the LR away (detectors.lr)
                parts.append(f"{words[0].upper()}{words[1:]}, and the learning rate fell to "
                             f"{decayed.get('value', 0.0):.2g} of its peak by step "
                             f"{decayed['step']}: the schedule decays it too fast (a "
                             "scheduler stepped every batch where it is meant per epoch?).")
            else:
                parts.append(f"{words[0].upper()}{words[1:]}: nothing to recover from, but if "
                             f"the model started untrained it is not learning{not_learning(data, start)}")
    capped = next((e for e in ev if e.get("kind") == "clip" and "cap" in (e.get("data") or {})),
                  None)
    if capped is not None:  # the norms above were capped before the guard measured them
        parts.append(f"The gradients reached gradguard already clipped to "
                     f"{capped.get('value', math.nan):.3g} (seen by step {capped['step']}: "
                     "the loop clipped them itself before gradguard's step: a "
                     "clip_grad_norm_ before guard.step, a LightningModule's "
                     "self.clip_gradients), so a spike would not show here.")
    idle = next((e for e in ev if e.get("kind") == "unstepped_params"), None)
    if idle is not None:  # layers that never trained (gradguard._unstepped)
        layers = (idle.get("data") or {}).get("layers") or []
        parts.append(f"The parameters of {listed(layers) if layers else 'some layers'} got "
                     f"gradients that no optimizer stepped (seen by step {idle['step']}): they "
                     "did not train; add them to the optimizer (add_param_group) or freeze them.")
    twice = next((e for e in ev if e.get("kind") == "unguarded_step"), None)
    if twice is not None:  # the script's own optimizer.step() besides guard.step()
        parts.append(f"The script called optimizer.step() besides guard.step() (from step "
                     f"{twice['step']}); " + ("those calls were ignored, as guard.step() had "
                     "stepped or skipped their gradients" if (twice.get("data") or {}).get(
                         "ignored") else "those steps ran unguarded") +
                     ": remove optimizer.step(), guard.step() replaces it.")
    rounded = next((e for e in ev if e.get("kind") == "update_ratio"
                    and "rounded_share" in (e.get("data") or {})), None)
    if rounded is not None:  # half-precision weights too large for the LR (gradguard._construction)
        parts.append(f"When the guard was built, {rounded['data']['rounded_share']:.0%} of the "
                     "weights were so large that an update of the full LR rounds away in their "
                     "dtype: those barely trained (keep float32 weights under torch.autocast).")
    risk = [e for e in ev if e.get("kind") == "divergence_risk"]
    if risk:  # the early warning, and how long before the trouble it came
        r, signal = risk[0], (risk[0].get("data") or {}).get("signal")
        text = f"gradguard warned of a divergence risk at step {r['step']}"
        text += f" ({str(signal).replace('_', ' ')})" if signal else ""
        later = [e["step"] for e in trouble if e["step"] > r["step"]]
        parts.insert(1, text + (f", {later[0] - r['step']} steps before." if later else "."))
    actions: list[str] = []
    # a GradScaler's own skips (loss-scale overflow) are routine and not the guard's doing
    n_scaler = min(n_skip, sum(1 for e in ev if e.get("kind") == "skip" and (
        e.get("data") or {}).get("reason") == "loss_scale_overflow"))
    if n_skip > n_scaler:
        actions.append(f"skipped {_plural(n_skip - n_scaler, 'step')}")
    if clipped:
        # under gradguard run the clip may be the script's own, carried out after measuring
        whose = (config or {}).get("clip") if (config or {}).get("user_clip") is None else None
        actions.append(f"clipped {_plural(clipped, 'step')}"
                       + (f" ({whose})" if whose and whose != "none" else ""))
    actions += ladder_actions(ev, late)
    if outcome.status == "healthy":
        # vanishing layers on a loss that still fell (a stall is judged apart): say it fell
        outcome_text = ""
        if trouble and not lead and outcome.start is not None and outcome.final is not None:
            outcome_text = (f"the loss still fell, from {outcome.start:.4g} to "
                            f"{outcome.final:.4g}")
    else:
        outcome_text = outcome.clause
    if actions:
        text = "gradguard " + ", ".join(actions[:-1]) + (" and " if len(actions) > 1 else "")
        text += actions[-1] + (f"; {outcome_text}." if outcome_text else ".")
        parts.append(text)
    elif outcome_text and not (lead and outcome.status == "diverged" and outcome.rose
                               and outcome_text.startswith("training diverged")):
        parts.append(outcome_text[0].upper() + outcome_text[1:] + ".")
    if late:
        what = ("roll back" if any(e.get("kind") == "rollback" for e in late)
                else "cut the LR" if any(e.get("kind") == "lr_backoff" for e in late)
                else "act")
        parts.append(f"The script ended before gradguard judged its last steps: what it "
                     f"decided at step {late[0]['step']} ({what}) was not applied, and the "
                     "weights the script saved are from before it.")
    if n_scaler and not every_overflow(data):
        parts.append(f"The GradScaler skipped {_plural(n_scaler, 'step')} for loss-scale "
                     "overflows (routine in mixed precision).")
    parts += settled_sentences(ev, outcome.cause)
    return " ".join(parts)
