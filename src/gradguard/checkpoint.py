"""What a guard saves and restores: everything that changes a later decision.

The step count, the clip policy's statistics, the pending telemetry window, the monitor
(event history, detector history, LR tracker, GradScaler overflow rows, skipped steps),
the activation watch's ring, the record of the first update from the weights (the run's, or
a rollback's) and the recovery ladder. A guard resumed from it, with the
model's and optimizer's own state dicts, continues exactly as the uninterrupted run:
parameters, optimizer state and events (tests/test_checkpoint.py).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from .errors import StateMismatch
from .measure import _local

if TYPE_CHECKING:
    from .guard import Guard

VERSION = 1


def state_dict(guard: Guard) -> dict[str, Any]:
    """The guard's state (see the module docstring)."""
    return {
        "version": VERSION,
        "step_count": guard.step_count,
        "clip": None if guard.clip is None else guard.clip.state_dict(),
        "clip_policy": None if guard.clip is None else type(guard.clip).__name__,
        "telemetry": guard.telemetry.state_dict(),
        "monitor": guard.monitor.state_dict(),
        "watch": None if guard._watch is None else guard._watch.state_dict(),
        "updates": None if guard._sampler is None else guard._sampler.state_dict(),
        "recovery": None if guard.recovery is None else guard.recovery.state_dict(),
        # where the script's own optimizer and weights were: a resume under `gradguard run`
        # tells from them a script that went back to a checkpoint of its own, or started
        # from scratch (integrations._rundir.resume_guard)
        "optimizer_steps": own_step(guard.optimizer),
        "optimizer_stepped": any(guard.optimizer.state.values()),
        "weight_norms": weight_norms(guard.telemetry.params),
        # and of the same weights rounded to half precision: those a checkpoint saved so
        # hold, loaded back (see same_weights)
        "rounded_norms": {str(t).removeprefix("torch."): weight_norms(guard.telemetry.params, t)
                          for t in ROUNDOFF},
    }


def own_step(optimizer: torch.optim.Optimizer) -> int | None:
    """The optimizer's own count of the updates it took, as its state keeps it (``step``:
    Adam, AdamW, RMSprop, Adagrad ...; 0 for one that keeps a state once it steps,
    ``betas`` or a momentum in its groups, and holds none yet); None when its state keeps
    no count (SGD). One host read of a tensor count."""
    counts = [s["step"] for s in optimizer.state.values()
              if isinstance(s, dict) and "step" in s]
    if counts:
        return int(max(_per_device_max(counts)))
    stateful = any("betas" in g or (g.get("momentum") or 0) > 0 for g in optimizer.param_groups)
    if stateful and not any(optimizer.state.values()):
        return 0
    return None


def _per_device_max(values: list[Any]) -> list[float]:
    """The largest of ``values`` (numbers or 0-d tensors) per device: one host read each."""
    out = [float(v) for v in values if not isinstance(v, torch.Tensor)]
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for v in values:
        if isinstance(v, torch.Tensor):
            by_device.setdefault(v.device, []).append(v.detach().float().reshape(()))
    out += [float(torch.stack(vs).max()) for vs in by_device.values()]
    return out


def weight_norms(params: list[torch.Tensor], rounded: torch.dtype | None = None) -> list[float]:
    """Each parameter's norm (of its local shard, for a DTensor): what tells the weights a
    state was saved with from others; ``rounded``: of the parameter rounded to that type
    first. One host read per device."""
    with torch.no_grad():
        norms = [torch.linalg.vector_norm(
            (_local(p.detach()) if rounded is None else _local(p.detach()).to(rounded)).float())
            for p in params]
    by_device: dict[torch.device, list[int]] = {}
    for i, n in enumerate(norms):
        by_device.setdefault(n.device, []).append(i)
    out = [0.0] * len(norms)
    for idx in by_device.values():
        for i, v in zip(idx, torch.stack([norms[i] for i in idx]).tolist()):
            out[i] = float(v)
    return out



#: The half-precision types weights may be saved in and loaded back from (see same_weights).
ROUNDOFF = (torch.bfloat16, torch.float16)


def same_weights(saved: Any, params: list[torch.Tensor], rounded: Any = None) -> bool:
    """Whether ``params`` have the norms :func:`weight_norms` saved (to 1e-5); a parameter
    every element of which is exact in a half-precision type is compared with the saved
    weights' norm rounded to that type (``rounded``: type name -> norms, saved with them):
    weights saved in bfloat16 and loaded into a float32 model are the same (found by a
    regression hunt: such a ``--resume`` was taken for a from-scratch run and its first
    session left out), and pretrained weights in bfloat16 loaded again are not those a
    gentle fine-tune ended with (a first form of this rule allowed the roundoff, 0.4%, on
    any such norm, and took them for the run going on)."""
    if not isinstance(saved, list) or len(saved) != len(params):
        return False
    rounded = rounded if isinstance(rounded, dict) else {}
    now = weight_norms(params)
    exact = _rounded(params)
    for i, (a, b) in enumerate(zip(saved, now)):
        if math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-12):
            continue
        ref = rounded.get(exact[i]) if exact[i] else None
        if not (isinstance(ref, list) and len(ref) == len(params)
                and math.isclose(ref[i], b, rel_tol=1e-5, abs_tol=1e-12)):
            return False
    return True


def _rounded(params: list[torch.Tensor]) -> list[str]:
    """Per parameter, the name of the coarsest half-precision type all its elements are
    exact in ("" for none): one host read per device."""
    out = [""] * len(params)
    for dtype in ROUNDOFF:  # bfloat16 first: the coarser
        with torch.no_grad():
            flags = [(_local(p.detach()) == _local(p.detach()).to(dtype).to(p.dtype)).all()
                     if p.is_floating_point() and p.dtype not in ROUNDOFF else
                     torch.zeros((), dtype=torch.bool, device=p.device) for p in params]
        by_device: dict[torch.device, list[int]] = {}
        for i, f in enumerate(flags):
            by_device.setdefault(f.device, []).append(i)
        for idx in by_device.values():
            for i, exact in zip(idx, torch.stack([flags[i] for i in idx]).tolist()):
                if exact and not out[i]:
                    out[i] = str(dtype).removeprefix("torch.")
    return out


def load_state_dict(guard: Guard, sd: dict[str, Any], *, telemetry: bool = True) -> None:
    """Restore :func:`state_dict` into ``guard`` (tensors to the live parameters' device).
    ``telemetry`` False: ``sd`` was taken over other parameters, after a flush (a run
    handed on to an optimizer over more of the model, ``gradguard run``): the telemetry
    window, which is per parameter, is not restored."""
    if not isinstance(sd, dict):
        # found by a stranger: None or a string gave "'NoneType' object has no attribute 'get'"
        raise TypeError(f"Guard.load_state_dict: expected the dict Guard.state_dict() "
                        f"returns, got {type(sd).__name__}")
    if "version" not in sd:
        raise ValueError("Guard.load_state_dict: this is not a Guard state (no 'version'; "
                         "pass the dict Guard.state_dict() returned, not the model's or the "
                         "optimizer's)")
    if sd.get("version") != VERSION:
        raise ValueError(f"Guard.load_state_dict: unsupported version {sd.get('version')!r}")
    missing = [k for k in ("step_count", "telemetry")[:2 if telemetry else 1] if k not in sd]
    if missing:  # found by a stranger: a state missing one gave a bare KeyError
        raise ValueError(f"Guard.load_state_dict: the state lacks {missing}, which "
                         "Guard.state_dict() writes: pass the whole dict it returned")
    saved = sd.get("clip_policy")  # absent from checkpoints before it was recorded
    if guard.clip is not None and saved is not None and saved != type(guard.clip).__name__:
        raise StateMismatch(
            f"the state was saved by a guard with clip={saved}, this guard's is "
            f"{type(guard.clip).__name__}",
            f"their statistics do not carry over; build the guard with the clip policy it "
            f"was saved with ({saved})")
    if telemetry:  # what differs is said before anything is changed
        guard.telemetry.check_state_dict(sd["telemetry"])
    guard.step_count = int(sd["step_count"])
    if guard.clip is not None and sd.get("clip") is not None:
        guard.clip.load_state_dict(sd["clip"])
    if telemetry:
        guard.telemetry.load_state_dict(sd["telemetry"])
    if "monitor" in sd:
        guard.monitor.load_state_dict(sd["monitor"], guard.telemetry.device)
    else:  # written by gradguard 0.1
        guard.monitor.skipped_steps = int(sd.get("skipped_steps", 0))
        if sd.get("detectors") is not None:
            guard.monitor.detector_state.load_state_dict(sd["detectors"])
    if guard._watch is not None and sd.get("watch") is not None:
        guard._watch.load_state_dict(sd["watch"])
    if guard._sampler is not None:
        guard._sampler.load_state_dict(sd.get("updates"), guard.step_count)
    if guard.recovery is not None and sd.get("recovery") is not None:
        guard.recovery.load_state_dict(sd["recovery"])
