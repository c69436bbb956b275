"""Values an optimizer's own step writes into its param groups: training state, restored
with the weights.

A restore keeps the live param groups, hyperparameters and all, so that an LR schedule is
not rolled back (:func:`.actions.restore`). Some optimizers keep per-group *state* there
as well: schedule-free AdamW its step count ``k``, ``weight_sum`` and ``lr_max`` (which
weigh each new iterate in its running average), Prodigy and D-Adaptation their step-size
estimate ``d``. Left at their values after the damage, they undo the rollback: found as a
stranger, schedule-free AdamW on a digits MLP with an LR x300 for three steps set
``lr_max`` to the burst's LR for good, so that every step after the rollback weighed
as much as the whole run before it, the average forgot the restored weights, and with the
LR backed off the run sat at chance (three rollbacks, held-out 1.18 against 0.217).

What the optimizer's own step writes is state; what is written between steps (a
scheduler, the user, schedule-free's ``train()``/``eval()``) is a hyperparameter.
:class:`SteppedKeys` compares the groups' plain values before and after each of the
first ``WATCH`` steps and keeps the keys a step changed; after that its hooks return at
once (torch iterates over the hooks while they run: one cannot remove itself). A restore
puts the snapshot's values of those keys back. torch's optimizers write none.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

#: Optimizer steps watched for keys they write (then the hooks return at once).
WATCH = 10
#: Keys never taken for state: the parameters, and the LR (the ladder's own multiplier
#: scales it for the duration of a step).
IGNORED = frozenset({"params", "lr"})


def _plain(group: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in group.items() if k not in IGNORED and not isinstance(v, Tensor)}


def _same(a: Any, b: Any) -> bool:
    try:
        return a is b or bool(a == b)
    except Exception:  # values whose == is not a truth value
        return False


class SteppedKeys:
    """The param-group keys the optimizer's step writes, learnt over its first steps."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.keys: set[str] = set()
        self._before: list[dict[str, Any]] | None = None
        self._left = WATCH
        self._handles = [optimizer.register_step_pre_hook(self._pre),
                         optimizer.register_step_post_hook(self._post)]

    def _pre(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._left > 0:
            self._before = [_plain(g) for g in optimizer.param_groups]

    def _post(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        before, self._before = self._before, None
        if before is None or len(before) != len(optimizer.param_groups):
            return
        for old, group in zip(before, optimizer.param_groups):
            self.keys.update(k for k, v in _plain(group).items()
                             if k not in old or not _same(old[k], v))
        self._left -= 1

    def restore(self, groups: Sequence[dict[str, Any]], saved: Sequence[dict[str, Any]]) -> None:
        """Put ``saved``'s values of the stepped keys into ``groups`` (matched by position)."""
        for group, old in zip(groups, saved):
            for k in self.keys & old.keys():
                group[k] = copy.deepcopy(old[k])

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
