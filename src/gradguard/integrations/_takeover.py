"""Which run an optimizer's steps belong to under ``gradguard run``.

A script that builds a new optimizer each epoch, swaps Adam for SGD midway, or trains a
head first and then the whole model with a new optimizer, trains one run: the new
optimizer takes over the run of the one it replaces (:class:`Succession` decides,
:func:`succeed` hands it on). An optimizer that a ``gg.Guard`` of the script's own is
stepping is that guard's (:func:`driven`).
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.amp.grad_scaler import GradScaler

from .. import _lifecycle as lifecycle
from .. import checkpoint
from .._outside import INSIDE
from ._hooked import hooked_guard
from ._names import ParamTable, find_model

if TYPE_CHECKING:
    from ..guard import Guard
    from ._session import ZeroCodeSession


@dataclass
class Unit:
    """One guarded part of the run: an optimizer the script steps, or a trainer."""

    index: int
    kind: str  # "optimizer" | "lightning" | "transformers"
    run_dir: Path | None
    guard: Guard | None = None
    callback: Any = None
    optimizer: torch.optim.Optimizer | None = None
    name: str | None = None
    model_name: str | None = None
    trainer: Any = None
    external: bool = False  # a callback the script added itself
    last: int = -1  # the session's step count at this unit's last guarded step
    replaced: int = 0  # optimizers over the same parameters that took over the run
    #: a parameter the optimizer steps and its version counter after the last step: an
    #: in-place write since (a re-initialisation, load_state_dict) starts a new run
    mark: tuple[Tensor, int] | None = None


def param_ids(optimizer: torch.optim.Optimizer) -> frozenset[int]:
    return frozenset(id(p) for g in optimizer.param_groups for p in g["params"])


class Succession:
    """The session's clock of guarded steps, when each optimizer was built on it, and the
    rule for which unit a new optimizer's run goes on from (:meth:`predecessor`)."""

    def __init__(self) -> None:
        self.clock = 0  # guarded optimizer steps so far, all units together
        self._born: dict[int, int] = {}  # id(optimizer) -> the clock when it was built

    def built(self, optimizer: Any) -> None:
        self._born[id(optimizer)] = self.clock

    def tick(self, unit: Unit) -> None:
        """``unit`` took a guarded step."""
        self.clock += 1
        unit.last = self.clock

    @staticmethod
    def stepped(unit: Unit | None, optimizer: Any) -> None:
        """After the optimizer's update: the version its first parameter is left at."""
        if unit is not None and unit.optimizer is not None and unit.optimizer is optimizer:
            p = unit.optimizer.param_groups[0]["params"][0]
            unit.mark = (p, p._version)

    def predecessor(self, units: list[Unit], optimizer: torch.optim.Optimizer) -> Unit | None:
        """The unit whose run a new optimizer takes over: one guarding an optimizer over
        some of the same parameters that has not stepped since this one was built (a
        script that builds a new optimizer each epoch, switches Adam for SGD midway, or
        trains a head first and then the whole model with a new optimizer), and whose
        weights nothing wrote since its last step (a k-fold loop that resets the same
        model's weights for each fold, or loads a checkpoint, starts a new run). Two
        optimizers stepped in turn (a GAN's, or one per task) are never the same run:
        each stepped after the other was built."""
        ids = param_ids(optimizer)
        born = self._born.get(id(optimizer), -1)  # built before the session: before all
        return next((u for u in reversed(units)
                     if u.kind == "optimizer" and u.guard is not None and not u.guard._closed
                     and u.optimizer is not None and u.last <= born
                     and (u.mark is None or u.mark[0]._version == u.mark[1])
                     and param_ids(u.optimizer) & ids), None)


def succeed(session: ZeroCodeSession, unit: Unit, optimizer: torch.optim.Optimizer,
            frame: types.FrameType | None, scaler: GradScaler | None) -> Unit:
    """Hand ``unit``'s run on to ``optimizer``: a guard over it that loads the old
    guard's state (step count, clip statistics, pending window, events, detector
    history, the ladder's LR factor), restores the snapshots taken so far where the
    optimizers are of one kind (else the weights at the handover stand in for them, as
    after a resume), and writes the same run directory through the same sinks, so the
    run reads as one, numbered by the script's own steps. Over other parameters (the
    whole model after its head) it is what ``add_param_group`` does: the old layout's
    window is flushed first, its snapshots are dropped and the gradient norm is learnt
    anew (:func:`gradguard._lifecycle.relayout`)."""
    old = unit.guard
    assert old is not None and unit.optimizer is not None
    same = param_ids(unit.optimizer) == param_ids(optimizer)
    model = old.model
    if not same:
        old.flush()  # the old layout's steps, through the sinks it hands over
        found, unit.model_name, _ = find_model(optimizer, frame)
        model = found if found is not None else ParamTable.of(optimizer)
    state = old.state_dict()
    sinks = lifecycle.retire(old)
    cfg = session.guard_config(unit.index, unit.run_dir, sinks=sinks)
    guard = hooked_guard(model, optimizer, cfg, scaler=scaler)
    if old.recovery is not None and guard.recovery is not None:
        # the old optimizer's state loads into one of its kind and layout
        guard.recovery.adopt(old.recovery, snapshots=same and (
            type(old.optimizer) is type(optimizer)))
    checkpoint.load_state_dict(guard, state, telemetry=same)
    if not same:
        lifecycle.forget_norms(guard)
        if guard.recovery is not None:
            guard.recovery.relayout(guard)
    unit.guard, unit.optimizer = guard, optimizer
    unit.replaced += 1
    session._by_id[id(optimizer)] = unit
    return unit


def driven(session: ZeroCodeSession, optimizer: Any) -> bool:
    """Whether a ``gg.Guard`` the script built itself is stepping ``optimizer`` (it
    guards, and writes, on its own: noted once, as a trainer's own callback is)."""
    if getattr(optimizer, INSIDE, 0) <= 0:
        return False
    session._loss.take()
    if not any(u.optimizer is optimizer and u.external for u in session.units):
        session.units.append(Unit(len(session.units), "optimizer", None, optimizer=optimizer,
                                  name=type(optimizer).__name__, external=True))
    return True
