"""Parameters that get gradients no optimizer steps: they do not train, and nothing says so.

The usual way to lose a layer: the optimizer is built over the trainable parameters
(``Adam(p for p in model.parameters() if p.requires_grad)``, as the Hugging Face
``Trainer`` builds its own) while a backbone is frozen, and the backbone is later unfrozen
with ``requires_grad_(True)`` but never added with ``add_param_group``; or the optimizer is
built over part of the model (``Adam(model.head.parameters())``). Its gradients are computed
at every backward and thrown away; the loss only says it falls more slowly.

:class:`Unstepped` watches the model's parameters the guarded optimizer does not hold, at
flushes only and host-side: ``p.grad`` present, ``requires_grad`` set, and the tensor's
version counter (``Tensor._version``, bumped by every in-place update: an optimizer's
step, ``copy_``). A parameter whose counter moved is stepped by someone else (a second
optimizer on the same model, a GAN's discriminator) and is no longer watched. One whose
counter stayed still for :data:`SPAN` steps while it had gradients may still be stepped by
a fused optimizer or ``p.data`` updates, which leave the counter alone: its values are
compared then with a sample of them taken when it was first seen, once (one device read per
run, at that flush), and only unchanged values with a nonzero gradient are reported: a
``warning`` event ``unstepped_params`` and a :class:`~gradguard.errors.GradGuardWarning`,
once per run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .distributed.world import clean_name, unwrap
from .events import Event, listed
from .naming import layer_of

#: Steps a watched parameter's version counter must stay still while it has gradients.
SPAN = 100
#: Elements of a watched parameter kept to compare (a strided sample of it).
SAMPLE = 64


@dataclass
class _Seen:
    step: int
    version: int
    sample: Tensor  # a strided sample of the values when first seen with a gradient


def _sample(p: Tensor) -> Tensor:
    flat = p.detach().reshape(-1)
    return flat[:: max(1, flat.numel() // SAMPLE)][:SAMPLE].clone()


class Unstepped:
    """The watch over a model's parameters that ``held`` (the ids of the optimizer's
    parameters) leaves out; see the module's text. DTensor parameters (FSDP2) are not
    watched."""

    def __init__(self, model: nn.Module, held: set[int], *, said: bool = False) -> None:
        self.watch: list[tuple[str, Tensor]] = [
            (clean_name(n), p) for n, p in unwrap(model).named_parameters()
            if id(p) not in held and type(p.data) is torch.Tensor]
        self._seen: dict[int, _Seen] = {}
        self.said = said  # said once per run: a rebuilt watch (add_param_group) keeps it

    def release(self, held: set[int]) -> None:
        """Stop watching the parameters ``held`` names (ids): an optimizer holds them now."""
        self.watch = [(n, p) for n, p in self.watch if id(p) not in held]

    def check(self, step: int) -> Event | None:
        """At a flush (``step``: the guard's step count): the event, the first time
        parameters have had gradients for :data:`SPAN` steps that changed nothing."""
        if self.said or not self.watch:
            return None
        still: list[tuple[str, Tensor]] = []
        keep: list[tuple[str, Tensor]] = []
        for name, p in self.watch:
            seen = self._seen.get(id(p))
            if p.grad is None or not p.requires_grad:
                keep.append((name, p))
            elif seen is None:
                self._seen[id(p)] = _Seen(step, p._version, _sample(p))
                keep.append((name, p))
            elif p._version != seen.version:
                self._seen.pop(id(p))  # stepped by another optimizer: not ours to watch
            else:
                keep.append((name, p))
                if step - seen.step >= SPAN:
                    still.append((name, p))
        self.watch = keep
        if not still:
            return None
        return self._confirm(still, step)

    def _confirm(self, still: list[tuple[str, Tensor]], step: int) -> Event | None:
        # one device read: a fused optimizer's step and p.data updates leave the counter
        flags = torch.stack([
            torch.stack([(_sample(p) != self._seen[id(p)].sample).any(),
                         p.grad.detach().ne(0).any()])  # type: ignore[union-attr]
            for _, p in still]).tolist()
        idle = [(n, p) for (n, p), (changed, nonzero) in zip(still, flags) if nonzero and not changed]
        moved = {id(p) for (_, p), (changed, _) in zip(still, flags) if changed}
        self.watch = [(n, p) for n, p in self.watch if id(p) not in moved]
        if not idle:
            return None
        self.said = True
        names = [n for n, _ in idle]
        layers = list(dict.fromkeys(layer_of(n) for n in names))
        since = min(self._seen[id(p)].step for _, p in idle)
        count = sum(p.numel() for _, p in idle)
        return Event(
            kind="unstepped_params", step=step, severity="warning", value=float(len(idle)),
            message=(f"step {step}: {listed(layers)} ({count:,} parameters) get gradients "
                     f"since step {since} or before, but no optimizer steps them: the guarded "
                     "optimizer does not hold them and their values have not changed, so "
                     "they do not train (and the guard neither clips nor restores them)"),
            remedy=("Unfrozen after the optimizer was built over the trainable parameters? "
                    "Add them with optimizer.add_param_group({'params': [...]}) (the guard "
                    "follows it) or build the optimizer over all of them; if they are meant "
                    "to stay fixed, freeze them with requires_grad_(False) and save their "
                    "backward."),
            data={"layers": layers, "params": names, "since": since},
        )
