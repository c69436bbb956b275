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

from torch import Tensor, nn

from .graph_order import layers_reached

if TYPE_CHECKING:
    from .guard import Guard

_GUARDS: weakref.WeakKeyDictionary[nn.Module, weakref.WeakSet[Guard]] = (
    weakref.WeakKeyDictionary())


#: Every guard built in this process (a weak set: a guard dropped leaves it).
_ALL: weakref.WeakSet[Guard] = weakref.WeakSet()
#: The guards each guard steps on one backward's loss with (:func:`couple`).
_COUPLED: weakref.WeakKeyDictionary[Guard, weakref.WeakSet[Guard]] = (
    weakref.WeakKeyDictionary())

_CLOCK = itertools.count(1)
#: The clock when the newest guard was built (any model's).
_newest_born = 0


def stepped(guard: Guard, loss: object = None) -> None:
    """Note that ``guard`` took a step now (a host counter; no device work). Its first step
    since another guard over its model was built makes it that guard's other again: the
    other leaves the statistics of its layers to it from now on (found by a regression
    hunt: a generator pretrained under its guard, then a discriminator's guard built, had
    its batch norm statistics written in place by the discriminator's guard at a NaN
    batch, and its backward raised "modified by an inplace operation")."""
    prev = guard._ticked
    guard._ticked, guard._ticked_before = next(_CLOCK), prev
    if isinstance(loss, Tensor) and loss.grad_fn is not None:  # a weak reference, host-side
        guard._loss_ref = weakref.ref(loss)
        if guard._linked < _newest_born:  # its first loss with a graph, or a guard built since
            guard._linked = _newest_born
            _link(guard, loss)
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
    open guard with a recovery whose loss depends on them (:func:`_coupled`) and that
    stepped since ``guard``'s step before its last (one loop steps them together: two
    optimizers on one loss, a GAN's generator over its discriminator) that its loss moved
    for neither its own trouble nor its batches (:meth:`~gradguard.Recovery.partner_restored`).
    Found by a stranger: an encoder on SGD and a head on Adam, each under its guard; the
    encoder's rollback to its fresh weights raised the head's loss 6x, the head's guard
    rolled back for it and then read the loss its restored weights gave on the fresh
    encoder as "the batches changed", and its own rollback in turn rolled the encoder
    back again (3.1x the run without gradguard). A guard that took no step since (a first
    phase's, left open) is no partner, nor one over an unrelated model stepped in the
    same loop (found by a regression hunt: another model's level, learnt again at each of
    its neighbour's rollbacks, missed its own LR's rise, 1.5-1.8x its twin)."""
    since = guard._ticked_before if guard._ticked_before is not None else guard._born
    for g in list(_ALL):
        rec = g.recovery
        if g is not guard and rec is not None and not g._closed and g._ticked is not None \
                and g._ticked > since and _coupled(guard, g):
            rec.partner_restored()


def _link(guard: Guard, loss: Tensor) -> None:
    """Couple ``guard`` with each open guard whose parameters the graph of ``loss`` (its
    step's) reaches: decided while the loss lives (found by a regression hunt: a loop whose
    forward, backward and step sat in a function that returned ``loss.item()`` had no live
    loss at the next step's restore, and the head's guard read the encoder's rollback as
    "the batches changed" again). A host-side walk, once per guard (and again when a guard
    is built after its last look)."""
    for g in list(_ALL):
        if g is not guard and not g._closed and g not in _COUPLED.get(guard, ()) and \
                _reaches(loss, g):
            couple(guard, g)


def couple(a: Guard, b: Guard) -> None:
    """``a`` and ``b`` step on one backward's loss (``gradguard run``: two optimizers
    stepped after one backward, the second given the first's loss, detached)."""
    if a is not b:
        _COUPLED.setdefault(a, weakref.WeakSet()).add(b)
        _COUPLED.setdefault(b, weakref.WeakSet()).add(a)


def _coupled(a: Guard, b: Guard) -> bool:
    """Whether the loss of one of the guards ``a`` and ``b`` depends on the other's
    parameters: one model, one backward's loss (:func:`couple`), or the last loss one was
    given (with its graph, still alive) reaches a parameter the other steps (a host-side
    walk of the graph, at a restore only). A loss given without a graph (a number,
    detached) tells nothing of it."""
    if a.model is b.model or b in _COUPLED.get(a, ()):
        return True
    for src, dst in ((a, b), (b, a)):
        loss = src._loss_ref() if src._loss_ref is not None else None
        if loss is not None and _reaches(loss, dst):
            return True
    return False


def _reaches(loss: Tensor, guard: Guard) -> bool:
    """Whether the graph of ``loss`` takes a parameter ``guard`` steps (host-side)."""
    return bool(layers_reached(loss, guard.telemetry.params, [0] * len(guard.telemetry.params)))


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
