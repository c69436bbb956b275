"""A Guard driven from inside someone else's optimizer step.

Trainers (Lightning, the Hugging Face ``Trainer``) and ``gradguard run`` call
``optimizer.step()`` themselves; gradguard gets control in a hook that runs after backward
and before the parameters change. :class:`HookGuard` is a :class:`gradguard.Guard` whose
``step`` does everything except calling the optimizer:

* a kept step: nothing to do, the optimizer is about to run;
* a skipped step (non-finite norm): the gradients are taken off the parameters
  (``p.grad = None``), so the optimizer that runs next updates no parameter and no state
  (torch optimizers skip parameters without a gradient); a step post-hook on the optimizer
  puts them back afterwards, so the trainer's ``zero_grad`` sees what it expects;
* fused optimizers: the finite flag is handed over as ``found_inf`` (as ``GradScaler``
  does) and removed by the post-hook, so the skip costs no host synchronisation.

The weight/update sample (update/weight ratios) cannot bracket an update that has not
happened yet, so it measures the update of the step *before* the flush step instead.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..clipping import AGC, AutoClip, ClipPolicy, NormClip, ValueClip, ZClip
from ..events import Sink
from ..guard import DEFAULT_EVERY, Guard, OnNonfinite, validate_options


class HookGuard(Guard):
    """A :class:`gradguard.Guard` for use inside an optimizer step hook.

    Call :meth:`before_step` after backward and before the optimizer updates (a trainer's
    ``on_before_optimizer_step``/``on_pre_optimizer_step`` hook, or a
    ``torch.optim`` step pre-hook). Do not call ``optimizer.step()`` from it.

    Example:
        >>> import math, torch
        >>> from gradguard.integrations._hooked import HookGuard
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> guard = HookGuard(model, opt, every=4)
        >>> model(torch.ones(1, 2)).sum().backward()
        >>> model.weight.grad[0, 0] = math.nan
        >>> before = model.weight.detach().clone()
        >>> _ = guard.before_step()
        >>> opt.step()                       # the trainer's own step: it changes nothing
        >>> torch.equal(model.weight, before), guard.telemetry.pending
        (True, 1)
        >>> guard.close()
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        clip: ClipPolicy | None = None,
        on_nonfinite: OnNonfinite = "skip",
        recovery: Any | None = None,
        every: int = DEFAULT_EVERY,
        sinks: Sequence[Sink] = (),
        sample_updates: bool = True,
    ) -> None:
        super().__init__(
            model,
            optimizer,
            clip=clip,
            on_nonfinite=on_nonfinite,
            recovery=recovery,
            every=every,
            sinks=sinks,
            sample_updates=False,  # sampled around the real update, see before_step
        )
        self._sample_updates_hooked = sample_updates
        self._sampling = False
        self._stash: list[tuple[Tensor, Tensor]] = []
        self._attrs_set = False
        self._post_handle = optimizer.register_step_post_hook(self._after_optimizer_step)

    # ---- Guard overrides ----------------------------------------------------------
    def _optimizer_step(self, found_inf: Tensor | None = None) -> None:
        if found_inf is None:
            return  # the optimizer is about to step on its own
        opt: Any = self.optimizer
        opt.grad_scale = None
        opt.found_inf = found_inf
        self._attrs_set = True

    def _skip_optimizer_step(self) -> None:
        for p in self.telemetry.params:
            if p.grad is not None:
                self._stash.append((p, p.grad))
                p.grad = None

    # ---- driving ------------------------------------------------------------------
    def before_step(self, loss: Tensor | float | None = None) -> Tensor:
        """Measure, clip and decide for the optimizer step that is about to run.

        Returns:
            The pre-clip total gradient norm (a device tensor).
        """
        self.restore()  # a previous step that never ran (e.g. a GradScaler skip)
        if self._sampling:
            self.telemetry.end_update_sample()  # the update of the previous step
            self._sampling = False
        norm = self.step(loss)
        if self._sample_updates_hooked and self.telemetry.flush_due:
            self.telemetry.begin_update_sample()
            self._sampling = True
        return norm

    def restore(self) -> None:
        """Undo what a skip or a ``found_inf`` hand-over did to the optimizer and grads."""
        if self._attrs_set:
            self.optimizer.__dict__.pop("grad_scale", None)
            self.optimizer.__dict__.pop("found_inf", None)
            self._attrs_set = False
        for p, g in self._stash:
            p.grad = g
        self._stash = []

    def _after_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.restore()

    def close(self) -> None:
        self.restore()
        self._post_handle.remove()
        super().close()


class LossTracker:
    """The loss behind the next optimizer step, kept on the device (no host sync).

    Losses passed to ``add`` (one per backward) are summed until an optimizer step takes
    them: the sum is the loss whose gradient that step applies (with gradient accumulation
    each micro-batch loss is usually already divided by the number of micro-batches). A
    step with no new backward since the previous step (two optimizers sharing one
    backward) gets the same loss as that previous step.

    Example:
        >>> import torch
        >>> t = LossTracker()
        >>> t.add(torch.tensor(1.0)); t.add(torch.tensor(2.0))
        >>> t.take(), t.take()
        (tensor(3.), tensor(3.))
    """

    def __init__(self, *, mean: bool = False) -> None:
        self.mean = mean  # average instead (losses that were not divided per micro-batch)
        self._sum: Tensor | None = None
        self._n = 0
        self._last: Tensor | None = None

    def add(self, loss: Tensor) -> None:
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            return
        v = loss.detach().reshape(()).float()
        self._sum = v if self._sum is None else self._sum + v
        self._n += 1

    def take(self) -> Tensor | None:
        if self._sum is not None:
            self._last = self._sum / self._n if self.mean else self._sum
            self._sum, self._n = None, 0
        return self._last


class CallbackOptions:
    """The guard options both trainer callbacks take, validated once at construction (so a
    mistake fails before training starts), and the guard they build from them."""

    def _init_options(
        self,
        owner: str,
        *,
        clip: ClipPolicy | None,
        on_nonfinite: OnNonfinite,
        recovery: Any | None,
        every: int,
        sinks: Sequence[Sink],
        run_dir: str | os.PathLike[str] | None,
        report: bool,
    ) -> None:
        validate_options(
            owner, clip=clip, on_nonfinite=on_nonfinite, every=every, sinks=sinks,
            recovery=recovery,
        )
        self.clip = clip
        self.on_nonfinite: OnNonfinite = on_nonfinite
        self.recovery = recovery
        self.every = every
        self.sinks = list(sinks)
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.report = report

    def _new_guard(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        sinks: list[Sink],
        *,
        clip: ClipPolicy | None,
        recovery: Any | None,
    ) -> HookGuard:
        return HookGuard(
            model, optimizer, clip=clip, on_nonfinite=self.on_nonfinite, recovery=recovery,
            every=self.every, sinks=sinks,
        )


CLIP_CHOICES = ("zclip", "autoclip", "norm:MAX", "value:MAX", "agc", "none")


def parse_clip(spec: str) -> ClipPolicy | None:
    """A clip policy from its command-line spelling (a fresh, stateless instance).

    Example:
        >>> parse_clip("norm:0.5")
        NormClip(max_norm=0.5...)
        >>> parse_clip("none") is None
        True
    """
    s = spec.strip().lower()
    name, _, arg = s.partition(":")
    if name in ("none", "off") and not arg:
        return None
    if name == "zclip" and not arg:
        return ZClip()
    if name == "autoclip":
        return AutoClip(percentile=float(arg)) if arg else AutoClip()
    if name == "agc":
        return AGC(clipping=float(arg)) if arg else AGC()
    if name in ("norm", "value"):
        try:
            v = float(arg)
        except ValueError:
            v = math.nan
        if not (v > 0 and math.isfinite(v)):
            raise ValueError(
                f"clip={spec!r}: {name}:MAX needs a positive number, e.g. {name}:1.0"
            )
        return NormClip(max_norm=v) if name == "norm" else ValueClip(v)
    raise ValueError(f"clip={spec!r}: allowed values are {', '.join(CLIP_CHOICES)}")


def check_version(package: str, version: str, low: str, high: str) -> None:
    """Raise ``ImportError`` when ``low <= version < high`` does not hold.

    Example:
        >>> check_version("lightning", "2.6.1", "2.1", "3")
        >>> check_version("lightning", "1.9.0", "2.1", "3")
        Traceback (most recent call last):
        ...
        ImportError: gradguard.integrations supports lightning >=2.1,<3; found 1.9.0 ...
    """

    def key(v: str) -> tuple[int, ...]:
        m = re.match(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?", v)
        return tuple(int(x or 0) for x in m.groups()) if m else (0,)

    if not (key(low) <= key(version) < key(high)):
        raise ImportError(
            f"gradguard.integrations supports {package} >={low},<{high}; found {version} "
            f"(install a supported version: pip install 'gradguard[{_EXTRA[package]}]')"
        )


_EXTRA = {"lightning": "lightning", "transformers": "hf"}
