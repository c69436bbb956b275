"""A few optimizer steps on the user's model, undone afterwards.

Deep-copying a large model and its optimizer costs time and the model's memory again.
Instead, :class:`StepRunner` keeps one copy of the parameter values, runs the steps in
place with a fresh optimizer of the user's class and hyper-parameters (its state cloned
from the user's, so a probe mid-training starts where training is), and writes the values
back after every run and on exit, even on an exception. The user's optimizer object is
never stepped: its state, its hooks and any scheduler wrapped around its ``step`` stay
untouched. The ``.grad`` tensors the user had are set aside and put back as they were, and
so is the RNG state.

Example:
    >>> import torch
    >>> from gradguard.doctor._steps import StepRunner
    >>> net = torch.nn.Linear(3, 1)
    >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
    >>> w = net.weight.detach().clone()
    >>> with StepRunner(net, opt) as run:
    ...     losses = run.losses(lambda m: m(torch.ones(4, 3)).pow(2).mean(), scale=1.0, steps=2)
    >>> len(losses), torch.equal(net.weight, w)
    (3, True)
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn

#: the loss ending above this multiple of the initial loss counts as a blow-up
LR_BLOWUP = 10.0
#: steps a run always takes, whatever the time budget says
MIN_STEPS = 2
#: a step's cost plus the closing forward pass (about a third of a step): what a run asks
#: the budget for before each further step, so a run the budget stops ends within it
CLOSE_COST = 1.4


@dataclass
class FirstStep:
    """The loss and the gradients (by ``id`` of the parameter) at the entry state under the
    runner's seed, from a pass the caller made already: the first run takes them (its first
    step then costs no forward/backward pass) and releases them -- they are as large as the
    model."""

    loss: float
    grads: dict[int, Tensor] | None

    def take(self) -> tuple[float, dict[int, Tensor]] | None:
        grads, self.grads = self.grads, None
        return None if grads is None else (self.loss, grads)


def _clone_state(v: Any) -> Any:
    return v.detach().clone() if isinstance(v, Tensor) else copy.deepcopy(v)


class StepRunner:
    """Context manager: ``losses(step_loss, scale, steps)`` runs ``steps`` optimizer steps at
    the user's learning rates times ``scale`` from the model's state on entry."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, seed: int = 0) -> None:
        self.model = model
        self.optimizer = optimizer
        self.seed = seed
        self.params = list(model.parameters())  # shared (tied) parameters once
        self.opt_params = [p for g in optimizer.param_groups for p in g["params"]]
        self._values: list[Tensor] = []
        self._buffers: list[tuple[Tensor, Tensor]] = []
        self._grads: list[Tensor | None] = []
        self.stopped_early = False  # the last run stopped before its steps (afford said no)

    def __enter__(self) -> StepRunner:
        # the runs seed the RNG (dropout draws the same masks each time): the caller's RNG
        # state comes back on exit
        cuda = sorted({p.device.index or 0 for p in self.params if p.device.type == "cuda"})
        self._rng = torch.random.fork_rng(devices=cuda)
        self._rng.__enter__()
        with torch.no_grad():
            ids = {id(p) for p in self.params}
            self._extra = [p for p in self.opt_params if id(p) not in ids]  # optimised, not in the model
            self._values = [p.detach().clone() for p in self.params + self._extra]
            self._buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        self._grads = [p.grad for p in self.params + self._extra]
        return self

    def reset(self) -> None:
        """Parameter values and buffers as on entry, no ``.grad``."""
        with torch.no_grad():
            for p, v in zip(self.params + self._extra, self._values):
                p.copy_(v)
                p.grad = None
            for b, v in self._buffers:
                b.copy_(v)

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        try:
            self.reset()
            for p, g in zip(self.params + self._extra, self._grads):
                p.grad = g
            self._values, self._buffers = [], []
        finally:
            self._rng.__exit__(et, ev, tb)

    def fresh_optimizer(self, scale: float) -> torch.optim.Optimizer:
        """An optimizer of the user's class over the same parameters, its learning rates
        times ``scale``, its state a copy of the user's."""
        opt = self.optimizer
        groups = []
        for g in opt.param_groups:
            ng = {k: v for k, v in g.items() if k != "params"}
            lr = ng.get("lr")
            if isinstance(lr, Tensor):
                ng["lr"] = lr.detach().clone().mul_(scale)
            elif lr is not None:
                ng["lr"] = lr * scale
            ng["params"] = list(g["params"])
            groups.append(ng)
        try:
            new = type(opt)(groups, **opt.defaults)
        except (TypeError, ValueError):  # a constructor that is not (params, **defaults)
            return self._copied_optimizer(scale)
        for p, st in opt.state.items():
            new.state[p] = {k: _clone_state(v) for k, v in st.items()}
        return new

    def _copied_optimizer(self, scale: float) -> torch.optim.Optimizer:
        """A deep copy of the user's optimizer that shares the parameters, with no hooks and
        no ``step`` wrapped by a scheduler (those would act on the user's objects)."""
        new = copy.deepcopy(self.optimizer, {id(p): p for p in self.opt_params})
        new.__dict__.pop("step", None)
        for k in list(vars(new)):
            if k.startswith("_optimizer_") and k.endswith("hooks"):
                setattr(new, k, type(getattr(new, k))())
        for g in new.param_groups:
            lr = g.get("lr")
            if isinstance(lr, Tensor):
                lr.mul_(scale)
            elif lr is not None:
                g["lr"] = lr * scale
        return new

    def losses(
        self,
        step_loss: Callable[[nn.Module], Tensor],
        scale: float,
        steps: int,
        more: Callable[[list[float]], int] | None = None,
        start: FirstStep | None = None,
        afford: Callable[[float], bool] | None = None,
    ) -> list[float]:
        """The loss before each step and after the last; stops early once it blows up.

        ``more(losses)``, asked after ``steps`` steps, may ask for that many more.
        ``start``: a :class:`FirstStep` the run takes, if it still holds its gradients. ``afford(seconds)``: asked before each step after
        the :data:`MIN_STEPS` th with the cost of the last one and a closing forward pass
        (:data:`CLOSE_COST`); False stops the run.

        Every evaluation uses the same random seed, so dropout draws the same masks each
        time: the losses differ only by what the steps changed."""
        self.reset()
        opt = self.fresh_optimizer(scale)
        first = start.take() if start is not None else None
        out: list[float] = []
        i = 0
        self.stopped_early = False
        while True:
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            if i == 0 and first is not None:
                v = first[0]
                for p in self.opt_params:
                    p.grad = first[1].get(id(p))  # handed over, not copied
                first = None
                loss = None
            else:
                torch.manual_seed(self.seed)
                loss = step_loss(self.model)
                v = float(loss.detach().float())
            out.append(v)
            if not math.isfinite(v) or (i and v > LR_BLOWUP * abs(out[0]) + 1e-12):
                break  # diverged: more steps cost time and tell nothing new
            if i == steps and more is not None:
                steps += more(out)
                more = None  # asked once
            if i >= steps:
                break
            if loss is not None:
                loss.backward()
            opt.step()
            i += 1
            # the next step, and the forward pass that closes the run if it is the last
            if i >= MIN_STEPS and i < steps and afford is not None and not afford(
                    CLOSE_COST * (time.perf_counter() - t0)):
                self.stopped_early = True
                torch.manual_seed(self.seed)
                out.append(float(step_loss(self.model).detach().float()))
                break
        self.reset()
        return out
