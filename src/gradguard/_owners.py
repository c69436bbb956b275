"""Which open guard steps which parameters of a model.

A model trained by several optimizers, each under its own guard (a sparse embedding on
``SparseAdam`` and the rest on ``Adam``: docs/guard.md), has each guard snapshot the whole
``state_dict``. A rollback restores the parameters its optimizer steps and leaves those
another open guard steps alone: found by a stranger, eight NaN batches in a row made both
guards of such a model roll back and then undo the rollback, and the second guard's undo
put back the weights the first guard's rollback had just restored, so the head ended at
the snapshot of step 49 (1.97-2.10x its twin's held-out loss; 1.02x with recovery off).

A guard counts as another's only while it steps: one that took no step since ``guard``
was built (the guard of a first phase, left open when a fine-tune builds a new optimizer
and guard over the same model) is no one's keeper (found by a regression hunt: a frozen
backbone's batch norm statistics, left to the first phase's guard, which no longer
stepped, were not put back after a NaN batch of the second phase, and the model evaluated
to NaN for good).
"""

from __future__ import annotations

import itertools
import weakref
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from .guard import Guard

_GUARDS: weakref.WeakKeyDictionary[nn.Module, weakref.WeakSet[Guard]] = (
    weakref.WeakKeyDictionary())


#: Every guard built in this process (a weak set: a guard dropped leaves it).
_ALL: weakref.WeakSet[Guard] = weakref.WeakSet()

_CLOCK = itertools.count(1)
#: The clock when the newest guard was built (any model's).
_newest_born = 0


def stepped(guard: Guard) -> None:
    """Note that ``guard`` took a step now (a host counter; no device work). Its first step
    since another guard over its model was built makes it that guard's other again: the
    other leaves the statistics of its layers to it from now on (found by a regression
    hunt: a generator pretrained under its guard, then a discriminator's guard built, had
    its batch norm statistics written in place by the discriminator's guard at a NaN
    batch, and its backward raised "modified by an inplace operation")."""
    prev = guard._ticked
    guard._ticked, guard._ticked_before = next(_CLOCK), prev
    if prev is not None and prev > _newest_born:
        return  # no guard was built since its last step: nothing to walk (the step's path)
    for g in list(_GUARDS.get(guard.model, ())):
        if g is not guard and (prev is None or prev < g._born):
            _leave(g)


def _leave(guard: Guard) -> None:
    """Have ``guard`` put back only the running statistics of its own layers."""
    running = getattr(guard, "_running", None)
    if running is not None and not getattr(guard, "_closed", True):
        running.leave(others(guard))


def claim(guard: Guard) -> None:
    """Record ``guard`` as one of the guards over its model; every guard over it then puts
    back, after a skipped step, only the running statistics of its own layers (found by a
    regression hunt: a discriminator's guard wrote the generator's batch norm statistics
    in place at each step, and the generator's backward, after it, raised "modified by an
    inplace operation")."""
    global _newest_born
    guard._born = _newest_born = next(_CLOCK)
    _ALL.add(guard)
    guards = _GUARDS.setdefault(guard.model, weakref.WeakSet())
    guards.add(guard)
    for g in list(guards):
        _leave(g)


def restored(guard: Guard) -> None:
    """``guard`` put weights back (a rollback, its undo, the LR probe's fork): tell each
    open guard with a recovery that stepped since ``guard``'s step before its last, so
    one loop steps them together (two optimizers on one loss, a GAN's players), that its
    loss moved for neither its own trouble nor its batches
    (:meth:`~gradguard.Recovery.partner_restored`). Found by a stranger: an encoder on SGD
    and a head on Adam, each under its guard; the encoder's rollback to its fresh weights
    raised the head's loss 6x, the head's guard rolled back for it and then read the
    loss its restored weights gave on the fresh encoder as "the batches changed", and its
    own rollback in turn rolled the encoder back again (3.1x the run without gradguard).
    A guard that took no step since (a first phase's, left open) is no partner."""
    since = guard._ticked_before if guard._ticked_before is not None else guard._born
    for g in list(_ALL):
        rec = g.recovery
        if g is not guard and rec is not None and not g._closed and g._ticked is not None \
                and g._ticked > since:
            rec.partner_restored()


def others(guard: Guard) -> set[int]:
    """The ids of the parameters the other open guards over ``guard``'s model step and
    ``guard`` does not, and of the buffers of the modules whose parameters are all theirs
    (host attributes only). A guard that has stepped, though not since ``guard`` was
    built, steps none."""
    mine = {id(p) for p in guard.telemetry.params}
    born = guard._born
    theirs = {id(p) for g in _GUARDS.get(guard.model, ()) if g is not guard
              and not g._closed and (g._ticked is None or g._ticked > born)
              for p in g.telemetry.params if id(p) not in mine}
    if not theirs:
        return theirs
    for m in guard.model.modules():
        own = [id(p) for p in m.parameters(recurse=False)]
        if own and all(i in theirs for i in own):
            theirs.update(id(b) for b in m.buffers(recurse=False))
    return theirs
