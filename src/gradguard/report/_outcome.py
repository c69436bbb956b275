"""How a run ended, judged on its loss: healthy, recovered, not recovered, diverged, stopped.

Finite gradients at the end do not make a run healthy: a run stalled at 3.3 whose loss
was 2.6 before its incident did not recover, and a loss that climbs from the first steps
diverged, whatever the gradients did. The judgement compares robust loss *levels*
(medians over a tenth of the run) and allows for the run's own noise:

* ``start``: where the run began (the first finite loss, or the median of the first
  window when that is lower: a loss that explodes at step 1 started at step 0's value);
* ``before``: the level in the window just before the first incident (a non-finite or
  skipped step, a spike);
* ``final``: the level over the last window.

``recovered`` needs ``final`` back at ``before`` (within the tolerance), and, when a later
incident came after the loss had got well under ``before``, the level after that incident
back at the level before it; ``diverged``
means the last steps are still non-finite or skipped, or ``final`` is above ``start``:
the loss rose over the run, the signature of a learning rate that is too high
(``lr_too_high``), even when no gradient ever went non-finite. ``stalled``: gradients
vanished (``vanishing_grad`` warnings) and ``final`` is still at ``start`` (within the
tolerance): the run learnt nothing, whatever else went right (a deep sigmoid MLP on the
digits, 600 steps at chance, was called healthy and "recovered"). A flat loss with no
vanishing gradients is no stall (a fine-tune that starts at its best).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from . import _levels
from ._causes import (
    INCIDENT_KINDS,
    LADDER_KINDS,
    _cause,
    _climbed,
    _ended_on_restored,
    _evidence,
    _relapse,
    ladder_reason,
    lowered_lr,
)
from ._levels import flat_words, median, tol
from ._remedy import LOWERED_STALL, every_overflow, nonfinite_steps, remedy
from ._settled import settled_low, settled_sentences
from ._silent import FIT_LOSS, FLOOR_LOSS, MIN_LEVEL_STEPS, decayed, silent_verdict

__all__ = ["LOWERED_STALL", "Outcome", "every_overflow", "judge", "ladder_reason", "lowered_lr",
           "read_guard_config", "remedy", "summary_lead"]

if TYPE_CHECKING:
    from ._data import RunData

Status = Literal["healthy", "recovered", "not_recovered", "stalled", "diverged", "stopped",
                 "unjudged"]

#: Levels are medians over this fraction of the run's steps ...
LEVEL_FRACTION = 0.1
#: ... and over at least / at most this many steps.
MAX_LEVEL_STEPS = 50  # (MIN_LEVEL_STEPS: ._silent)
#: A run whose last window is more than this fraction skipped or non-finite did not
#: come back, whatever its loss says (a skipped step does not move the loss).
TAIL_BAD_FRACTION = 0.5
#: What a run that came back to a level it never fell from should try.
FLAT_REMEDY = ("The loss never fell over the run: the model does not learn. An LR too high "
               "sits at chance as surely as one too low: run gg.doctor(model, batch, loss_fn, "
               "optimizer=opt) on a batch (it probes the LR and the initialisation).")
#: ... and one whose LR jumped far above any it had or planned (an ``lr_too_high`` report).
ENDED_ON_RESTORED_REMEDY = (
    "The model it leaves holds the weights of step {step}, which no step after the rollback "
    "tried: evaluate them on held-out data before using them. If the batches changed after "
    "step {step} (a new stage, task or label mapping), the rollback undid what the run "
    "learnt of them: keep the checkpoint from before it, or train on with "
    "Recovery(loss_rise=False).")
JUMP_FLAT_REMEDY = (
    "The loss never fell over the run, and the learning rate jumped far above the run's at "
    "step {step}: a jump can break a network for good with no loss that rises (attention "
    "that collapsed, units that died) while its loss sits where it was. Check the LR "
    "schedule and manual LR changes, and rerun without the jump, from a checkpoint before "
    "step {step}; if the run never learnt before it either, run gg.doctor(model, batch, "
    "loss_fn, optimizer=opt) on a batch.")


@dataclass(frozen=True)
class Outcome:
    """The judged end of a run.

    Attributes:
        status: ``healthy`` (no incident, the loss did not rise), ``recovered`` (back to
            the level before the incident), ``not_recovered`` (finite, but above it),
            ``stalled`` (gradients vanished and the loss never fell),
            ``diverged`` (the loss rose over the run, or the last steps are non-finite or
            skipped), ``stopped`` (the recovery ladder gave up), ``unjudged`` (the
            ladder found that the loss does not answer the weights, ``loss_level_off``,
            or that the batches changed, ``data_shift``: no loss level judges such a run).
        cause: a cause from the vocabulary (``lr_too_high``, ``nonfinite_input`` ...) or None.
        clause: how it ended, in words ("training recovered").
        evidence: the loss levels behind the verdict, in words.
        remedy: what to try, given the guard's configuration; None when nothing is needed.
        incident_step, start, before, final: the numbers (None where unknown).
        rose: the loss ended above where it started (out of the noise).
        flat: the loss ended where it started (within the tolerance): it did not fall.
    """

    status: Status
    cause: str | None
    clause: str
    evidence: str
    remedy: str | None = None
    incident_step: int | None = None
    start: float | None = None
    before: float | None = None
    final: float | None = None
    rose: bool = False
    flat: bool = False

    @property
    def ok(self) -> bool:
        """Healthy, recovered or unjudged: nothing to fail a run for."""
        return self.status in ("healthy", "recovered", "unjudged")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_guard_config(run_dir: str | Path) -> dict[str, Any] | None:
    """The ``guard.json`` that ``gradguard run`` writes into each run directory (the
    guard's options and what it clipped), or None."""
    path = Path(run_dir) / "guard.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) else None


def judge(data: RunData, config: Mapping[str, Any] | None = None) -> Outcome:
    """Judge how the run in ``data`` ended (see the module docstring).

    Args:
        data: a loaded run (:func:`gradguard.report.load_run`).
        config: the guard's configuration (``guard.json``), for the remedy; with a
            recovery whose ``loss_rise`` is false the loss level is not judged (no "rose",
            no "flat").

    Example:
        >>> import numpy as np
        >>> from pathlib import Path
        >>> from gradguard.report._data import RunData
        >>> n = 40
        >>> loss = np.linspace(2.0, 1.0, n); loss[20:] = 1.8     # 1.5 before step 20
        >>> skipped = np.zeros(n, bool); skipped[20] = True       # a NaN step, skipped
        >>> d = RunData(Path("r"), np.arange(n), loss, np.ones(n), np.ones(n), skipped, [],
        ...             np.zeros(0, int), np.zeros((0, 0)), np.zeros((0, 0)), [])
        >>> judge(d).clause
        'training did not recover (the loss ended at 1.8, above the 1.55 it had before step 20)'
        >>> loss[20:] = np.linspace(1.5, 0.5, 20)                 # back below 1.5
        >>> judge(d).status
        'recovered'
        >>> loss[20:] = 4.0                                       # above where it started
        >>> judge(d).status, judge(d).cause
        ('diverged', 'lr_too_high')
    """
    import numpy as np

    n = data.n_steps
    k = int(min(MAX_LEVEL_STEPS, max(MIN_LEVEL_STEPS, round(n * LEVEL_FRACTION))))
    ev = data.events
    routine = {e.get("step") for e in ev if e.get("kind") == "skip" and e.get("severity") == "info"}
    bad_skip = data.skipped & ~np.isin(data.step, np.array(sorted(s for s in routine if s is not None)))
    inc = [int(e["step"]) for e in ev if e.get("kind") in (*INCIDENT_KINDS, *LADDER_KINDS)
           and e.get("severity") in ("warning", "error")]
    inc += [int(s) for s in data.step[bad_skip]]
    incident = min(inc) if inc else None
    aborts = [e for e in ev if e.get("kind") == "abort"]
    loss = np.asarray(data.loss, dtype=np.float64)
    fin = np.isfinite(loss)
    tail = slice(max(0, n - k), n)
    nonfinite_tail = ~np.isfinite(data.grad_norm[tail]) | bad_skip[tail] | ~fin[tail]
    if not fin.any():
        nonfinite_tail = ~np.isfinite(data.grad_norm[tail]) | bad_skip[tail]
    # the last step alone decides only when non-finite: one bad batch skipped at the end of
    # a healthy run is no divergence (found by a stranger: "diverged ... the last steps are
    # still non-finite", all of them finite, and --fail-on-divergence failed the job)
    last_bad = bool(~np.isfinite(data.grad_norm[-1]) | (fin.any() & ~fin[-1])) if n else False
    # nor is one non-finite batch skipped at the end, right after a step taken finite: the
    # weights it leaves are that step's (found by a stranger: a NaN batch at the last step
    # of a healthy run, skipped, the weights as good as the clean run's, was "diverged",
    # and --fail-on-divergence failed the job; the same batch at the step before, recovered)
    if last_bad and n >= 2 and data.skipped[-1] and not data.skipped[-2] and fin[-2] \
            and np.isfinite(data.grad_norm[-2]):
        last_bad = False
    tail_bad = last_bad or float(nonfinite_tail.mean() if n else 0) > TAIL_BAD_FRACTION

    start = final = before = None
    rose = flat = by_ladder = climbed = False
    end = window = first = np.zeros(0)
    # the loss levels are the taken steps': a skipped step's loss is its batch's, on weights
    # that never saw it (a run aborted when every batch became x1e4, all skipped, was
    # "the loss rose ... the learning rate is too high")
    taken = fin & ~data.skipped
    fin = taken if taken.any() else fin
    floored = False  # the loss ended fit, at its float floor: no level compares there
    judged = True  # the loss level is evidence (see below)
    if fin.any():
        first = loss[fin][:k]
        start = min(float(first[0]), float(np.median(first)))
        if first[0] == 0.0 and start == 0.0 < float(np.median(first)):
            # a first batch with nothing to learn from (every label masked: a loss of
            # exactly 0) is no start level (found by a regression hunt: runs that learnt
            # from 2.3 to 0.08 were "stalled ... 0 at the start")
            start = float(np.median(first))
        end = loss[tail][fin[tail]]
        final = median(end)
        # found by a stranger: blob classifiers whose cross-entropy fell from 1.4 to 1e-8
        # within ten steps were "diverged (the loss rose from 3.7e-09 to 1.75e-06)", "did
        # not recover (5.8e-07, above the 0 it had)", "stalled (0 at the start)"
        fresh = float(first[:MIN_LEVEL_STEPS].max())
        floored = final is not None and fresh > 0 and 0 <= final <= min(FIT_LOSS * fresh,
                                                                        FLOOR_LOSS)
        # a run whose loss may rise when healthy (``loss_rise=False``: a GAN's players, RL
        # returns, a curriculum) is not judged on its level: a GAN at its balance point was
        # "DIVERGED ... the learning rate is too high", and --fail-on-divergence failed it
        # (``loss_rise`` is recorded false without a recovery too: no say on the loss there)
        # nor with no step taken (a VAE on x255 inputs, every step skipped, "rose": the LR)
        judged = bool(taken.any()) and (config is None or config.get("loss_rise") is not False
                                        or config.get("recovery") is False)
        # the start and end levels from the same steps say nothing of a change (a 3-step
        # run's loss 10, 5, 2.5 was "did not fall (5 at the start, 5 at the end)")
        if final is not None and judged and n >= 2 * k and not floored:
            rose = _levels.rose(start, final, end)
            flat = not rose and _levels.flat(start, final, first)
        if incident is not None:
            pre = (data.step < incident) & fin
            window = loss[pre][-k:]
            if len(window) >= MIN_LEVEL_STEPS:
                before = float(np.median(window))
            # the ladder acts at a flush, after a rise: the level it saw before the trouble
            said: list[float] = [before] if before is not None else []
            for e in ev:
                x = (e.get("data") or {}).get("level_before")
                if e.get("kind") in LADDER_KINDS and e.get("step") == incident and \
                        isinstance(x, (int, float)) and math.isfinite(x):
                    said.append(float(x))
            before = min(said) if said else None
            # the ladder's level is below the window's: the window before its flush is the
            # trouble's own (a rise it acted on at the next flush), and its spread no noise
            by_ladder = before is not None and len(said) > 1 and before < said[0]
            if before is not None and judged:
                climbed = _climbed(start, float(np.median(first)), before,
                                   np.zeros(0) if by_ladder else window)

    # the step by which the start level was measured: a level before an incident earlier
    # than it is no climb from it
    start_end = int(data.step[fin][:k][-1]) if fin.any() else None
    # a loss that is not judged (loss_rise off) tells no climb either
    cause = _cause(data, incident, climbed, rose, start_end)
    if aborts:
        status: Status = "stopped"
        clause = f"training was stopped at step {aborts[0]['step']}"
        if exc := (aborts[0].get("data") or {}).get("exception"):
            clause += f" by {exc}"  # the loop raised out of a `with Guard(...)` block
    elif tail_bad:
        status = "diverged"
        clause = "training did not recover (the last steps are still non-finite)"
    elif off := [e for e in ev if e.get("kind") == "loss_level_off"]:
        status, cause, rose = "unjudged", None, False
        clause = (f"from step {off[0]['step']} the loss did not answer the weights gradguard "
                  "restored (an objective that moves, or data that changed): the run is not "
                  "judged on it")
    elif shifts := [e for e in ev if e.get("kind") == "data_shift"]:
        status, cause, rose = "unjudged", None, False
        clause = (f"at step {shifts[-1]['step']} the weights gradguard restored gave the "
                  "trouble's loss: the batches changed, and the run is not judged on the "
                  "loss levels from before")
    elif rose:
        status, cause = "diverged", "lr_too_high"
        clause = "training diverged (the loss rose over the run)"
    elif incident is None:
        status, clause = "healthy", ""
    elif final is None and any(e.get("kind") not in ("nonfinite_grad", "grad_spike", "skip")
                               and e.get("severity") in ("warning", "error") for e in ev):
        # no loss to judge an incident the gradients do not show (an LR jump, the ladder's
        # acts); a non-finite or spiking gradient that went away is judged by the gradients
        # (found by a stranger: an HF Trainer with label smoothing, whose model returns no
        # loss, was "training recovered" after an LR jump, at 1.1x its twin)
        status, cause = "unjudged", None
        clause = ("no finite loss was recorded (none reached gradguard), so the run is not "
                  "judged on its loss")
    elif before is None or final is None or floored or not judged or (
            _levels.back_at(before, final, end) if by_ladder else final <= before + tol(
                before, pre_window := loss[(data.step < incident) & fin][-k:])
            or _levels.floor_back(pre_window, end)):  # (a ladder's level: its own window)
        # a loss that may rise when healthy (not judged) is no level to come back to either
        # (found by a stranger: a WGAN-GP generator under --no-loss-rise, its loss from
        # -0.66 to 1.18, "NOT RECOVERED ... lower the learning rate")
        status, clause = "recovered", "training recovered"
        relapse = None if before is None or floored or not judged else _relapse(
            data, inc, loss, fin, k, before)
        if relapse is not None:
            # back under the first incident's level, but not at the one it had reached
            # since, before a later incident (found by a stranger: an LR retry blew a run up
            # at step 382 of 400, its loss 30x its level, and the run was "recovered"
            # against its level before step 4's wreck)
            status, (incident, before, final) = "not_recovered", relapse
            clause = (f"training did not recover from step {relapse[0]} (the loss ended at "
                      f"{relapse[2]:.3g}, above the {relapse[1]:.3g} it had before it)")
        elif flat and start is not None and final is not None and (
                lowered := lowered_lr(ev, incident)) is not None:
            # back at its level, but that level is where it started, at an LR gradguard
            # lowered: nothing was learnt, maybe for the LR it left (found by strangers: a
            # vanilla RNN at chance through the whole run, its LR capped at step 20, and a
            # GRU on Adam that learns its task at any LR from 0.01 to 0.2 unguarded, were
            # "training recovered", told to set an LR that never trains)
            status, cause = "stalled", LOWERED_STALL
            clause = (f"training stalled: over the run {flat_words(start, final)}, after "
                      f"gradguard lowered the LR at step {lowered}")
        elif flat and start is not None and final is not None:
            # back at its level, but that level is where it started: nothing was learnt
            clause = f"training recovered, but over the run {flat_words(start, final)}"
    else:
        status = "not_recovered"
        clause = (f"training did not recover (the loss ended at {final:.3g}, above the "
                  f"{before:.3g} it had before step {incident})")
    if status in ("healthy", "recovered") and flat and start is not None and final is not None \
            and (vanished := [e for e in ev if e.get("kind") == "vanishing_grad"
                         and e.get("severity") in ("warning", "error")]):
        status, cause = "stalled", cause or "vanishing_grad"
        incident = int(vanished[0]["step"]) if incident is None else incident
        clause = f"training stalled: {flat_words(start, final)}"
    if status == "stalled" and decayed(ev) is not None:
        # its weight decay alone moved the weights by a third of their update or more
        # (found by a stranger: SGD with weight_decay=0.1 shrank a digits MLP to 0 at
        # chance, "stalled ... at the LR gradguard left", where a lower LR did not help)
        cause = "weight_decay"
    restored = None
    if status in ("healthy", "recovered", "not_recovered") and (
            restored := _ended_on_restored(data)) is not None:
        # the run ended right after a rollback: its last losses are of the weights replaced,
        # and the model it leaves was not tried since (found by a regression hunt: a 50-step
        # run at Adam 30x rolled back at step 49 to the fresh weights, held-out loss at
        # chance, was "training recovered"; a stranger's task switch rolled back at the
        # last flush to the old task's weights, 4.4x its unguarded loss on the new one)
        (at, snapshot), incident = restored, restored[0] if incident is None else incident
        status = "not_recovered"
        clause = (f"training did not recover: it ended {data.step[-1] - at} step(s) after "
                  f"gradguard rolled back, at step {at}, to "
                  + ("the weights before its first step, and the model it leaves is untrained"
                     if snapshot == -1 else
                     f"the weights of step {snapshot}, and the model it leaves was not tried "
                     "on the batches since"))
    status, cause, incident, clause = silent_verdict(
        data, (status, cause, incident, clause), flat=flat, final=final, start=start,
        floored=floored, k=k)
    todo = remedy(status, cause, config, data, incident)
    if restored is not None and restored[1] >= 0 and status == "not_recovered":
        # the weights it leaves are a mid-run snapshot's, untried on the last batches (found
        # by a stranger: ResNets whose labels were permuted for good at step 100 were rolled
        # back at the last flush to step 49's weights, 9-14x unguarded, and told to lower
        # an LR that trained the new labels unguarded)
        todo = ENDED_ON_RESTORED_REMEDY.format(step=restored[1])
    unsettled = next((e for e in data.events if (e.get("data") or {}).get("unsettled")), None)
    if todo is None and unsettled is not None:
        # a growth the run ended before the Recovery decided on (gradguard.recovery.growth):
        # nothing was done about it, and the LR is the fix
        todo = str(unsettled.get("remedy") or "") or None
    if status == "recovered" and todo is None and settled_low(data.events) and (
            advice := settled_sentences(data.events, cause)):
        # the LR the ladder settled at, as the summary says it, is the remedy, and the LR the
        # cause (SGD at 3.0 settled at 0.03 had neither in run.json: found by a stranger)
        todo, cause = advice[0], cause or "lr_too_high"
    if todo is None and status == "recovered" and flat:
        # back at its level, which is where it started: nothing to fix in the trouble, but
        # the run does not learn (found by a stranger: an encoder-decoder at Adam 30x sat at
        # chance, "training recovered", with no remedy)
        jump = next((e for e in data.events if e.get("kind") == "lr_too_high"
                     and e.get("severity") in ("warning", "error")), None)
        todo = FLAT_REMEDY if jump is None else JUMP_FLAT_REMEDY.format(step=jump["step"])
    if todo is None and status == "recovered":
        todo = nonfinite_steps(data)  # NaN/Inf steps skipped, no cause found: their batches
    return Outcome(status, cause, clause, _evidence(start, before, final, incident),
                   todo, incident, start, before, final, rose, flat)


def summary_lead(data: RunData, outcome: Outcome) -> str | None:
    """The first sentence when the loss itself tells the story (it rose over the run),
    instead of the first gradient event (which is then a consequence)."""
    if not outcome.rose or outcome.start is None or outcome.final is None:
        return None
    import numpy as np

    fin = data.loss[np.isfinite(data.loss)]
    peak = float(fin.max()) if fin.size else math.nan
    return (f"The loss rose from {outcome.start:.3g} to {outcome.final:.3g} (peak {peak:.3g}): "
            "the learning rate is too high (`lr_too_high`).")
