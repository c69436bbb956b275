"""What to try next after a run (:func:`remedy`), aware of what the guard already did:
the remedy of :func:`gradguard.report._outcome.judge`'s verdict."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..detectors.layers import vanishing_remedy
from ..events import (
    NO_GRADIENT_REMEDY,
    SPIKE_DATA_REMEDY,
    UNIT_ERROR_REMEDY,
    WEIGHTS_REMEDY,
)
from ._silent import decayed

if TYPE_CHECKING:
    from ._data import RunData

#: The cause of a run whose loss did not fall over it after the ladder lowered its LR
#: (:func:`judge`): the LR left may be too low for it to train.
LOWERED_STALL = "lr_lowered"


def remedy(status: str, cause: str | None, config: Mapping[str, Any] | None, data: RunData,
           incident: int | None) -> str | None:
    """What to try next, aware of what the guard already did (never "clip with ZClip"
    to a run that clipped with ZClip)."""
    if status == "healthy":
        return None
    cfg = config or {}
    eps = next((e for e in data.events if (e.get("data") or {}).get("eps_underflow")), None)
    if eps is not None and eps.get("remedy") and incident is not None:
        # an eps that is 0 in float16 (said at construction): what the trouble came from
        # (found by a stranger: float16 weights on fused Adam "recovered" at 5-10x, no remedy)
        return str(eps["remedy"])
    kinds = {e.get("kind") for e in data.events}
    if status == "unjudged" and "loss_level_off" not in kinds and "data_shift" in kinds:
        shift = [e for e in data.events if e.get("kind") == "data_shift"][-1]
        return (f"If the data was meant to change at step {_shift_start(data, shift)}, nothing "
                "to do; if not, check the data pipeline there (a shard or stage that ends, "
                "shuffling off, a label mapping).")
    import numpy as np

    if status == "unjudged" and not np.isfinite(np.asarray(data.loss, dtype=np.float64)).any():
        return ("Give gradguard the loss: guard.step(loss); under the Hugging Face Trainer the "
                "callback takes the model's own loss, which it does not return with "
                "label_smoothing_factor or a loss computed outside the model.")
    if status == "unjudged":
        off = "rerun with `--no-loss-rise`" if cfg.get("zero_code") else \
            "pass gg.Recovery(loss_rise=False)"
        return ("Judge this run on its own measure (samples, returns, a held-out metric); if "
                f"its loss may rise when healthy, {off}.")
    cli = bool(cfg.get("zero_code"))
    clip = str(cfg.get("clip") or "none")
    backoffs = [e for e in data.events if e.get("kind") == "lr_backoff"]
    if status == "recovered":
        if incident is not None and cause in ("nonfinite_input", "nonfinite_loss"):
            many = sum(1 for e in data.events if e.get("kind") == "nonfinite_grad") > 1
            return (nonfinite_steps(data) if many else None) or (
                f"Check the batch of step {incident} for NaN/Inf.")
        if cause == "unscaled_input":
            # the batch norm statistics found it (an off-scale batch) or the gradients did
            # (a spiking streak the batches were at fault for: inputs or targets; a BERT
            # with its targets x1e6 was told to check its inputs and its batch norms)
            bn = any((e.get("data") or {}).get("reason") == "offscale_batch" for e in data.events)
            return UNIT_ERROR_REMEDY if bn else SPIKE_DATA_REMEDY
        if cause == "nonfinite_weights":
            return WEIGHTS_REMEDY
        return None
    unsaved = next((e for e in data.events if e.get("kind") == "abort"
                    and (e.get("data") or {}).get("unrestored")), None)
    if status == "stopped" and unsaved is not None and unsaved.get("remedy"):
        return str(unsaved["remedy"])  # no snapshot to go back to: a resume's, not the LR's
    stop = next((e for e in data.events if e.get("kind") == "abort"
                 and (e.get("data") or {}).get("script_stopped")), None)
    if status == "stopped" and stop is not None and stop.get("remedy"):
        return str(stop["remedy"])  # the script's own stop on a NaN/Inf loss
    raised = next((e for e in data.events if e.get("kind") == "abort"
                   and (e.get("data") or {}).get("exception")), None)
    if status == "stopped" and cause is None and raised is not None:
        # stopped by what the loop raised, no gradient trouble (found by a stranger: a run
        # preempted by SIGTERM was told to clip its gradients or lower its LR)
        return (f"Nothing in the gradients or the loss stopped it: see what the loop raised "
                f"({raised['data']['exception']}); if training had not finished, resume from "
                "the last checkpoint" + (" (gradguard run --resume)." if cli else ".")
                # found by a stranger: a script whose post-training code raised after its
                # last step was told to resume a training that was over
                )
    if every_overflow(data):
        return ("Every step overflowed in float16, the GradScaler skipping each: start it at a "
                "lower scale (GradScaler(init_scale=...)), or use bfloat16, or run the "
                "overflowing layers in float32.")
    if status in ("stopped", "diverged") and _nonfinite_from_start(data):
        # found by a stranger: a GNN whose mean aggregation divided by a degree of 0 was NaN
        # on every step from the first, rolled back three times to the weights it started
        # from and stopped, told to lower its learning rate
        return NONFINITE_FROM_START
    if cause == "lr_too_high":
        text = "Lower the learning rate (a factor of 10 is a good first try) or add warm-up"
        if backoffs:
            text += (f"; gradguard's {len(backoffs)} LR back-off(s) were not enough, so "
                     "lower the base learning rate itself")
        elif cfg.get("recovery") is False:
            text += ("; with `--recovery` gradguard backs the LR off by itself" if cli else
                     "; gg.Recovery() backs the LR off by itself")
        if incident is None and not backoffs and status == "diverged":
            # the loss's rise alone, no gradient trouble (found by a stranger: healthy
            # REINFORCE runs, their surrogate loss a level that means nothing, were
            # "diverged" in 4 of 6 seeds and told to lower the LR, with no word of the option)
            text += (". No gradient trouble came with the rise: if this loss may rise when "
                     "training is healthy (a policy-gradient surrogate, a GAN's player), judge "
                     "the run on its own measure and "
                     + ("rerun with `--no-loss-rise`" if cli else
                        "pass gg.Recovery(loss_rise=False)"))
        return text + "."
    if cause == "vanishing_grad":  # as the detector said it, knowing the model's norms
        first = next((e for e in data.events if e.get("kind") == "vanishing_grad"), {})
        said = first.get("data") or {}
        if said.get("underflow") and first.get("remedy"):  # below float32's squares
            return str(first["remedy"])
        return vanishing_remedy(said.get("norms"))
    if cause == "weight_decay" and (shrunk := decayed(data.events)) is not None:
        return str(shrunk.get("remedy") or "")
    if cause == LOWERED_STALL:
        growth = any("in the first 20 steps" in str(e.get("message", "")) for e in data.events)
        return ("The loss did not fall at the LR gradguard left: if the run learns at the LR "
                "you set, it is too low; "
                + ("pass gg.Recovery(early_growth=False) (the growth of the first weights "
                   "lowered it), " if growth else "")
                + "and run gg.doctor on a batch to find what keeps the loss from falling.")
    if cause == "no_gradient":
        return NO_GRADIENT_REMEDY
    if cause == "dead_units" and status == "stalled" and any(
            (e.get("data") or {}).get("from_start") for e in data.events):
        return ("Check the initialisation (biases far below zero, weights that push every unit "
                "negative) and the inputs' scale, or use LeakyReLU/GELU (run gg.doctor on a "
                "batch: it names the layers).")
    if cause == "dead_units":
        return ("Lower the learning rate, normalise the inputs, or use LeakyReLU/GELU: an update "
                "too large pushed the ReLUs below zero for good (run gg.doctor on a batch).")
    if cause == "nonfinite_input":
        return "Clean or filter the data: a batch holds NaN/Inf (torch.isfinite on inputs)."
    if cause == "nonfinite_loss":
        return "Guard log/div in the loss (clamp_min(eps)) or lower the learning rate."
    if cause == "half_precision_overflow":
        return "Run the overflowing layer in float32, use bfloat16, or use a GradScaler."
    if cause == "nonfinite_weights":
        return WEIGHTS_REMEDY
    if "ZClip" in clip or "AutoClip" in clip:
        return ("Adaptive clipping is already on: lower the learning rate or add warm-up, "
                "and run gg.doctor on a failing batch.")
    if clip == "none" and config is not None:
        return ("Clip gradients (" + ("`--clip zclip`" if cli else "gg.ZClip()") +
                " adapts to the run) or lower the learning rate.")
    return "Lower the learning rate, and run gg.doctor on a failing batch."


#: The remedy of a run whose loss or gradients were non-finite from its first step, on the
#: weights before any update, with no step taken.
NONFINITE_FROM_START = (
    "The loss (or its gradients) was NaN/Inf from the first step, on the weights before any "
    "update, and no step was taken: no learning rate mends that. Check the first batches for "
    "NaN/Inf or values far off the scale the model expects (raw 0-255 pixels, a column in "
    "other units: an exp() or a square of them overflows), and the forward and the loss for "
    "log(0) or x/0 (clamp_min(eps)); Guard(watch_activations=True) names the first module "
    "that goes non-finite.")


def nonfinite_steps(data: RunData) -> str | None:
    """The last remedy of a run that recovered with nothing else to say: its NaN/Inf steps,
    skipped, the weights sound after them: their batches or the loss on them (found by a
    stranger: a Dataset returning NaN for one sample in 500, 18 steps of 282 skipped,
    "training recovered" with no remedy). None without such steps."""
    bad = [e for e in data.events if e.get("kind") == "nonfinite_grad"
           and e.get("severity") == "error"]
    return None if not bad else (
        f"Check the batches of the {len(bad)} non-finite step(s) (the first at step "
        f"{bad[0]['step']}) for NaN/Inf, and the loss for log(0) or x/0.")


def _nonfinite_from_start(data: RunData) -> bool:
    """Whether the run's first recorded step was non-finite (its loss or gradient norm)
    and every step was skipped: the weights it started from give NaN/Inf."""
    import numpy as np

    if not data.n_steps or int(data.step[0]) != 0:
        return False
    first = not (np.isfinite(data.loss[0]) and np.isfinite(data.grad_norm[0]))
    return bool(first and np.asarray(data.skipped, dtype=bool).all())


def every_overflow(data: RunData) -> bool:
    """Every recorded step was a loss-scale overflow the GradScaler skipped: no update was
    taken, and no gradient norm is finite (a scale too high for the whole run, or a model that
    overflows in float16 at any scale). Such a run was "No gradient trouble ... between nan
    and nan", told to clip or lower its LR."""
    overflows = {e.get("step") for e in data.events if e.get("kind") == "skip"
                 and (e.get("data") or {}).get("reason") == "loss_scale_overflow"}
    return data.n_steps > 0 and len(overflows) >= data.n_steps


def _shift_start(data: RunData, shift: Mapping[str, Any]) -> int:
    """The step a change of data found at ``shift`` (a ``data_shift`` event) began: the
    first warning after the snapshot its rollback restored, where the trouble it was taken
    for began (found by a stranger: inputs x8 from step 200, a spike there, found changed
    at step 259, and told "if the data was meant to change at step 259"); the event's step
    when none is known."""
    found = int(shift["step"])
    saved = (shift.get("data") or {}).get("snapshot_step")
    if not isinstance(saved, int):
        return found
    after = [int(e["step"]) for e in data.events if e.get("severity") in ("warning", "error")
             and isinstance(e.get("step"), int) and saved < e["step"] <= found]
    return min(after, default=found)
