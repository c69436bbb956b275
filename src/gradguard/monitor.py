"""The flush path: window -> detectors -> events -> sinks (host side, once per flush).

:class:`Monitor` owns what a guard knows about its run between flushes: the event history,
the detectors' state, the learning-rate tracker, the routine loss-scale overflows, and the
sinks. :class:`~gradguard.Guard` hands it each flushed window; recovery sits between
detection and delivery (the guard orders the three).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from . import detectors, distributed
from .detectors.lr import blame_jump
from .errors import GradGuardWarning, caller_stacklevel
from .events import Event, Flush, Sink, call_sinks, json_float
from .naming import layer_of
from .telemetry import StepStats, Telemetry, Window

if TYPE_CHECKING:
    from ._watch import ActivationWatch


class AmpLedger:
    """Steps that ran under a GradScaler -> ``[routine overflow (0/1), scale]`` on the
    device; read (one host copy) at the flush that covers them."""

    def __init__(self) -> None:
        self.rows: dict[int, Tensor] = {}

    def record(self, step: int, row: Tensor | None) -> None:
        if row is not None:
            self.rows[step] = row

    def overflows(self, window: Window) -> dict[int, float]:
        """Steps of ``window`` that were routine loss-scale overflows -> their scale."""
        if not self.rows:
            return {}
        rows = [(s, self.rows.pop(s)) for s in window.steps if s in self.rows]
        for s in [s for s in self.rows if s <= window.steps[-1]]:
            del self.rows[s]  # steps the window no longer holds
        if not rows:
            return {}
        vals = torch.stack([r for _, r in rows]).tolist()
        out = {s: v[1] for (s, _), v in zip(rows, vals) if v[0]}
        # a step whose loss is non-finite in the window is no routine overflow: under
        # torch.distributed the window's loss is the ranks' mean, and a rank whose own loss
        # was finite took another rank's NaN batch (all-reduced into its gradients) for
        # one (rank 0 wrote it as "routine in mixed precision", an info)
        given = window.loss_given.tolist() if window.loss_given is not None else None
        for i, (s, loss) in enumerate(zip(window.steps, window.loss.tolist())):
            if s in out and not math.isfinite(loss) and (given is None or given[i]):
                del out[s]
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"rows": {s: r.detach().cpu().clone() for s, r in self.rows.items()}}

    def load_state_dict(self, sd: dict[str, Any], device: torch.device) -> None:
        self.rows = {int(s): r.to(device, copy=True) for s, r in sd.get("rows", {}).items()}


class Monitor:
    """Events, detector state and sinks of one guard.

    Args:
        sinks: the sinks this process writes (empty on ranks that do not write).
        config: detector thresholds.
        dist: the distributed context, or None in one process.
    """

    def __init__(
        self,
        sinks: tuple[Sink, ...],
        config: detectors.DetectorConfig,
        dist: distributed.DistContext | None,
        writes_sinks: bool,
    ) -> None:
        self.sinks = list(sinks)
        self.config = config
        self.dist = dist
        self.writes_sinks = writes_sinks
        self.events: list[Event] = []
        self.pending: list[Event] = []
        self.failed_sinks: set[int] = set()
        self.detector_state = detectors.DetectorState(history=config.spike_history)
        self.lr_tracker = detectors.LrTracker(config.lr_jump_ratio)
        self.amp = AmpLedger()
        self.last_window: Window | None = None
        self.skipped_steps = 0
        #: step -> the layers whose weights were NaN/Inf at that non-finite step (what an
        #: update wrote from finite gradients: :mod:`gradguard.recovery.ladder_weights`)
        self.bad_weights: dict[int, list[str]] = {}

    def add_event(self, event: Event) -> None:
        """Record an event; it reaches the sinks at the next flush."""
        self.events.append(event)
        self.pending.append(event)

    def agree(self, rows: Tensor, absent: list[frozenset[int] | None] | None = None,
              steps: list[int] | None = None) -> list[list[int]] | None:
        """Under torch.distributed, make the pending window identical on every rank and
        merge the ranks' events; returns the origin ranks of each step (None alone).
        ``absent``: the telemetry's pending per-step parameters without a gradient, made
        those without one on every rank (in place)."""
        if self.dist is None:
            return None
        local = self.pending
        origins, merged, split = distributed.agree_window_(rows, local, self.dist, absent)
        # every rank keeps the same history: its own pending events become the merged ones
        del self.events[len(self.events) - len(local):]
        self.events.extend(merged)
        self.pending = list(merged)
        if steps is not None:  # what each rank decided at the step (a spike's skip) too
            for ev in merged:
                distributed.name_ranks(ev, steps, origins, self.dist.world_size)
        if split and steps is not None:
            i, ranks = split[0]
            took = [r for r in range(self.dist.world_size) if r not in ranks]
            self.add_event(Event(
                "ranks_diverged", steps[i], "error",
                f"step {steps[i]}: rank(s) {', '.join(map(str, ranks))} skipped the update and "
                f"rank(s) {', '.join(map(str, took))} took it ({len(split)} such step(s) in this "
                "window): their gradients differed after the all-reduce (a hook or an "
                "in-place change on one rank, a faulty device), and their replicas differ "
                "from here on", value=float(len(split)),
                remedy="Restart from a checkpoint taken before that step; look for code that "
                       "changes gradients on one rank after backward, or a faulty device.",
                data={"skipped_ranks": ranks, "steps": [steps[j] for j, _ in split]}))
        return origins

    def collect(
        self, telemetry: Telemetry, watch: ActivationWatch | None, sample_activations: bool,
        *, collective: bool = True, precursor_inputs: Any = None,
    ) -> tuple[Window | None, dict[int, float]]:
        """Take the pending window off the device (agreed across ranks unless
        ``collective`` is False: a failing rank never enters a collective) and run the
        detectors over it. Returns the window and its routine loss-scale overflows."""
        absent = telemetry.pending_absent()
        origins = (self.agree(telemetry.pending_rows(), absent, telemetry.pending_steps())
                   if collective else None)
        if self.dist is not None and not collective and absent is not None:
            absent[:] = [None] * len(absent)  # this rank's own: not for verdicts
        window = telemetry.flush()
        if window is None:
            return None, {}
        self.skipped_steps += int((window.skipped & ~window.voided()).sum())
        return window, self.detect(window, origins, watch, sample_activations, precursor_inputs)

    def detect(
        self, window: Window, origins: list[list[int]] | None, watch: ActivationWatch | None,
        sample_activations: bool, precursor_inputs: Any = None,
    ) -> dict[int, float]:
        """Run the detectors over ``window``; returns its routine loss-scale overflows."""
        overflows = self.amp.overflows(window)
        inputs: dict[str, Any] = {"precursor_inputs": precursor_inputs}
        last = window.steps[-1]
        if self.bad_weights:  # heard up to this window's end; a late-heard step's is dropped
            inputs["bad_weights"] = {s: w for s, w in self.bad_weights.items() if s <= last}
            self.bad_weights = {s: w for s, w in self.bad_weights.items() if s > last}
        if watch is not None:
            total = window.total_norm.tolist()
            bad = [i for i, t in enumerate(total) if not math.isfinite(t)]
            inputs["forward_origins"] = watch.origins(window.steps, bad)
            watch.reset_window()
            if sample_activations:
                inputs["activations"] = watch.take_samples()
        for ev in detectors.detect(
            window, state=self.detector_state, config=self.config,
            lr_events=self.lr_tracker.pop_events(), amp_overflows=overflows,
            lr_annealed=self.lr_tracker.annealed(), **inputs,
        ):
            if origins is not None and self.dist is not None:
                distributed.name_ranks(ev, window.steps, origins, self.dist.world_size)
            ev = blame_jump(ev, self.lr_tracker.last_jump)
            if ev.kind == "clip" and "cap" in (ev.data or {}):  # a setup that blinds the guard
                warnings.warn(f"gradguard: {ev.message}. {ev.remedy}", GradGuardWarning,
                              stacklevel=caller_stacklevel())
            self.add_event(ev)
        return overflows

    def deliver(self, window: Window | None, next_step: int | None = None) -> None:
        """Send the window's records and the pending events to the sinks (``next_step``:
        the guard's step count, :attr:`Flush.next_step`)."""
        if window is not None:
            self.last_window = window
            flush = Flush(steps=step_records(window), layers=layer_record(window),
                          events=self._pop(), window=window, next_step=next_step)
        elif self.pending:
            flush = Flush(steps=[], layers={}, events=self._pop(), next_step=next_step)
        else:
            return
        if self.writes_sinks:
            call_sinks(self.sinks, flush, self.failed_sinks)

    def _pop(self) -> list[Event]:
        """The pending events, in step order (a window's skips are recorded after what the
        recovery did about them at its flush): the tail of ``events`` is reordered alike."""
        ev, self.pending = sorted(self.pending, key=_in_step_order), []
        if ev:
            self.events[len(self.events) - len(ev):] = ev
        return ev

    def close_sinks(self) -> None:
        """Close every sink, each on its own: one failing close does not keep the others
        open (reported as a warning)."""
        for i, s in enumerate(self.sinks):
            try:
                s.close()
            except Exception as e:
                warnings.warn(f"gradguard: closing sink {type(s).__name__} failed: {e}",
                              RuntimeWarning, stacklevel=3)
                self.failed_sinks.add(i)

    def abort_sinks(self, error: BaseException) -> str | None:
        """Training was given up: each sink with an ``on_abort`` reacts (a JSONL sink renders
        the incident report); returns the first report path. Failures are warnings: the
        abort is the error to raise."""
        report = None
        for sink in self.sinks if self.writes_sinks else ():
            on_abort = getattr(sink, "on_abort", None)
            if not callable(on_abort):
                continue
            try:
                path = on_abort(error)
            except Exception as e:
                warnings.warn(f"gradguard: {type(sink).__name__}.on_abort failed: {e}",
                              RuntimeWarning, stacklevel=3)
                continue
            report = report or (None if path is None else str(path))
        return report

    def run_dir(self) -> str | None:
        """The run directory of the first sink that has one."""
        for s in self.sinks:
            d = getattr(s, "run_dir", None)
            if d is not None:
                return str(d)
        return None

    def state_dict(self) -> dict[str, Any]:
        return {
            "detectors": self.detector_state.state_dict(),
            "lr_tracker": self.lr_tracker.state_dict(),
            "amp": self.amp.state_dict(),
            "events": [e.to_json() for e in self.events],
            "pending": len(self.pending),
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, sd: dict[str, Any], device: torch.device) -> None:
        self.detector_state.load_state_dict(sd["detectors"])
        if "lr_tracker" in sd:
            self.lr_tracker.load_state_dict(sd["lr_tracker"])
        if "amp" in sd:
            self.amp.load_state_dict(sd["amp"], device)
        self.skipped_steps = int(sd.get("skipped_steps", self.skipped_steps))
        if "events" in sd:
            self.events = [Event.from_json(e) for e in sd["events"]]
            n = int(sd.get("pending", 0))
            self.pending = self.events[len(self.events) - n:] if n else []


def step_records(window: Window) -> list[dict[str, Any]]:
    """One JSON-ready record per step of the window. ``skipped``: the guard skipped the
    step (trouble, or a spike); a step whose update a restore voided is ``voided`` instead
    (its update was not applied either, but nothing was wrong with it)."""
    out = []
    voided = window.voided()
    loss, total, coef, skipped, void = (
        window.loss.tolist(),
        window.total_norm.tolist(),
        window.clip_coef.tolist(),
        (window.skipped & ~voided).tolist(),
        voided.tolist(),
    )
    for i, step in enumerate(window.steps):
        rec = {
            "step": step,
            "loss": json_float(loss[i]),
            "grad_norm": json_float(total[i]),
            "clip_coef": json_float(coef[i]),
            "skipped": bool(skipped[i]),
            "finite": math.isfinite(total[i]),
        }
        if void[i]:
            rec["voided"] = True
        out.append(rec)
    return out


def layer_record(window: Window) -> dict[str, Any]:
    """Per-layer gradient norms of a window (mean and max over finite steps), plus weight
    norms and update/weight ratios sampled at the window's last step."""
    ln = window.layer_norms()  # [n, L]
    finite_rows = torch.isfinite(ln).all(dim=1)
    ok = ln[finite_rows] if bool(finite_rows.any()) else ln
    mean = ok.mean(dim=0).tolist()
    mx = ok.max(dim=0).values.tolist()
    rec: dict[str, Any] = {
        "step": window.steps[-1],
        "first_step": window.steps[0],
        "layers": list(window.layers),
        "grad_norm": [json_float(x) for x in mean],
        "grad_norm_max": [json_float(x) for x in mx],
    }
    w, u = window.layer_weight_norms(), window.layer_update_norms()
    if w is not None and u is not None:
        rec["weight_norm"] = [json_float(x) for x in w.tolist()]
        rec["update_ratio"] = [json_float(x) for x in (u / w.clamp_min(1e-12)).tolist()]
    return rec


def describe_nonfinite(step: int, names: Sequence[str], stats: StepStats) -> tuple[str, list[str]]:
    """A sentence about a non-finite step and the layers whose gradients are non-finite
    (host reads: only called once a non-finite step is already known)."""
    norms = stats.param_norms.detach().float().cpu().tolist()
    layers = list(dict.fromkeys(layer_of(n) for n, v in zip(names, norms) if not math.isfinite(v)))
    total = stats.total_norm.float().cpu().item()
    return (f"step {step}: non-finite gradient norm ({total}); layers with non-finite "
            f"gradients: {', '.join(layers) or 'none found'}"), layers


#: Event kinds that say what the recovery did (at a flush, after the window's findings).
_ACTED = frozenset(("lr_backoff", "lr_settled", "lr_probe", "loss_level_off", "data_shift",
                    "rollback", "abort"))


def _in_step_order(event: Event) -> tuple[int, bool]:
    """Events by step; within a step, what was found (a skip, a spike) before what the
    recovery did about it, each in the order it was recorded."""
    return event.step, event.kind in _ACTED

