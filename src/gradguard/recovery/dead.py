"""Layers that died: they had a gradient and have had none at all since (the partner of
the loss-rise test in :mod:`.rise`, whose module docstring says how the two decide a
rollback together)."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence

from ..detectors.config import NEGLIGIBLE
from .rise import BLOCK

#: Taken steps of the last ``2 * BLOCK`` on which a dead layer had no gradient at all.
DEAD = 15
#: Dead layers with a loss that has not fallen by ``STALL_FALL`` over this many steps since
#: they were first found dead: the network died (:meth:`DeadLayers.stalled`).
STALL_STEPS = 50
#: ... the share of its level then that a network still learning gives up in that time.
STALL_FALL = 0.05


class DeadLayers:
    """Layers that had a gradient once and have had none at all (exactly zero) on at least
    ``DEAD`` of their last ``2 * BLOCK`` taken steps, or on the last ``BLOCK`` in a row:
    killed units pass no gradient down, and a batch now and then that still wakes one does
    not bring the layer back. A layer that never had one (frozen, unused) is not dead, nor
    is one whose gradient was never above ``NEGLIGIBLE`` x the step's largest layer norm
    (a signal that vanished on its way there, whose underflow is exactly zero at times).
    A step whose graph did not reach a layer (no gradient tensor at all: a task head, an
    expert or an adapter that batch did not use) says nothing of it either way: dead units
    leave a gradient of zeros, not none. Dead units pass no gradient back, so the dead
    layers are the first ones, in the order the model registers them: a layer found so
    after one that still has a gradient is not dead (a task head on a trunk that trains,
    where the step's graph cannot be read: under torch.distributed, whose ranks' graphs
    are their own, or with ``zero_grad(set_to_none=False)``, which leaves an unused head a
    gradient of zeros). Host values only, fed once per flush.

    Example:
        >>> dead = DeadLayers()
        >>> dead.update(["conv", "head"], [[1.0, 1.0]] * 5 + [[0.0, 0.3]] * 15, [False] * 20)
        ['conv']
    """

    def __init__(self) -> None:
        self.alive: set[str] = set()  # layers that have had a gradient
        self._zero: dict[str, deque[bool]] = {}  # layer -> its last 2 * BLOCK taken steps: zero?
        #: the step and the loss level at which layers were first found dead, while they are
        self.since: tuple[int, float] | None = None

    def update(self, layers: Sequence[str], norms: Sequence[Sequence[float]],
               skipped: Sequence[bool], absent: Sequence[frozenset[int]] | None = None,
               ) -> list[str]:
        """Take a flushed window in (per step, each layer's gradient norm; ``absent``: per
        step, the layers with no gradient tensor, :meth:`Window.layers_absent
        <gradguard.window.Window.layers_absent>`) and return the dead layers."""
        for k, (row, sk) in enumerate(zip(norms, skipped)):
            if sk or not all(math.isfinite(x) for x in row):
                continue
            top = max(row, default=0.0)
            away = absent[k] if absent is not None else ()
            for j, (name, x) in enumerate(zip(layers, row)):
                if j in away:  # not in this step's graph
                    continue
                if x > NEGLIGIBLE * top:  # not the underflow of a vanished signal
                    self.alive.add(name)
                if name in self.alive:
                    self._zero.setdefault(name, deque(maxlen=2 * BLOCK)).append(x == 0.0)
        dead = {n for n in layers if n in self.alive and _dead(self._zero.get(n, ()))}
        # dead units pass no gradient back: the layers before them (in module order) have
        # none either, and a layer whose gradient still reaches one before it is not dead
        # (a task head that takes turns with others on a trunk that trains)
        out = []
        for n in layers:
            if n not in self.alive:
                continue
            if n not in dead:
                break
            out.append(n)
        if not out:
            self.since = None
        return out

    def stalled(self, step: int, level: float | None, dead: Sequence[str],
                layers: Sequence[str]) -> bool:
        """Whether every layer of ``layers`` that ever had a gradient but the last is in
        ``dead`` (the network's features are constant: it predicts the same for every
        input) and the loss ``level`` at ``step`` has not fallen by ``STALL_FALL`` of its
        level when they were first found so, ``STALL_STEPS`` or more steps before (called
        at judged flushes that found dead layers; the first such call sets that level).
        Where the loss such a network sits at is lower than the fresh model's (inputs x100
        on a ReLU MLP: a fresh loss of 50 nats, at chance 2.3 once every layer but the head
        died within ten steps) the loss-level test cannot tell it
        (:meth:`.rise.LossRise.returned`); a loss that still falls is a network that
        learns, through a path around its dead layers."""
        lived = [n for n in layers if n in self.alive]
        if level is None or not math.isfinite(level) or len(lived) < 2 or (
                list(dead) != lived[:-1]):
            return False
        if self.since is None:
            self.since = (step, level)
            return False
        at, then = self.since
        return step - at >= STALL_STEPS and level > (1 - STALL_FALL) * then

    def state_dict(self) -> dict[str, object]:
        return {"alive": sorted(self.alive), "zero": {k: list(v) for k, v in self._zero.items()},
                "since": None if self.since is None else list(self.since)}

    def load_state_dict(self, sd: dict[str, object]) -> None:
        self.alive = set(sd.get("alive") or [])  # type: ignore[call-overload]
        since = sd.get("since")  # none in older checkpoints
        self.since = None if since is None else (int(since[0]), float(since[1]))  # type: ignore[index]
        zero = dict(sd.get("zero") or {})  # type: ignore[call-overload]
        # older checkpoints kept a count of zero steps in a row
        self._zero = {k: deque([True] * v if isinstance(v, int) else v, maxlen=2 * BLOCK)
                      for k, v in zero.items()}


def _dead(zero: Sequence[bool]) -> bool:
    """No gradient on ``DEAD`` of the last ``2 * BLOCK`` taken steps, or on the last
    ``BLOCK`` of them in a row (a network that has just died)."""
    zero = list(zero)
    return sum(zero) >= DEAD or (len(zero) >= BLOCK and all(zero[-BLOCK:]))
