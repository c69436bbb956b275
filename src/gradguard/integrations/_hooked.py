"""What the integrations share: a guard driven from inside someone else's optimizer step.

Trainers (Lightning, the Hugging Face ``Trainer``) and ``gradguard run`` call
``optimizer.step()`` themselves; gradguard gets control in a hook that runs after backward
and before the parameters change. :func:`hooked_guard` builds a plain
:class:`gradguard.Guard` whose executor is a :class:`gradguard.executors.Hook`: calling
``guard.step(loss)`` from that hook measures, clips and decides, and a skip is carried out
on the optimizer step that follows (see :mod:`gradguard.executors`). The integrations
never reach into the guard's private methods.
"""

from __future__ import annotations

import copy
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.amp.grad_scaler import GradScaler

from .._owners import couple
from ..clipping import AGC, AutoClip, ClipPolicy, NormClip, ValueClip, ZClip
from ..config import GuardConfig, resolve_config
from ..events import Sink
from ..executors import Hook
from ..guard import Guard
from ..recovery import Recovery
from ..recovery.snapshots import DiskSnapshotStore
from ..rundir import dir_arg


def recovery_for(template: Recovery | None, k: int) -> Recovery | None:
    """The k-th optimizer's own recovery ladder: a copy of ``template`` (never bound to a
    guard), its snapshots on disk in ``snapshot_dir``'s ``optimizer<k>`` for k > 0."""
    if template is None:
        return None
    rec = copy.deepcopy(template)
    if k and rec.snapshot_dir is not None:
        rec.snapshot_dir = Path(rec.snapshot_dir) / f"optimizer{k}"
        rec.disk = DiskSnapshotStore(rec.snapshot_dir, keep=rec.config.keep, run=True)
    return rec


def no_gradients(optimizer: torch.optim.Optimizer) -> bool:
    """No parameter of ``optimizer`` has a gradient: torch's step does nothing, nor is it a
    guard step (a batch the script or the trainer skipped before its backward)."""
    return all(p.grad is None for g in optimizer.param_groups for p in g["params"])


def hooked_guard(
    model: nn.Module, optimizer: torch.optim.Optimizer, config: GuardConfig, *,
    scaler: GradScaler | None = None,
) -> Guard:
    """A guard for use inside an optimizer step hook: call ``guard.step(loss)`` after
    backward and before the optimizer updates (a trainer's ``on_before_optimizer_step``/
    ``on_pre_optimizer_step``, or a ``torch.optim`` step pre-hook); never call
    ``optimizer.step()`` from it.

    Args:
        scaler: the trainer's ``GradScaler`` when it steps this optimizer (the gradients
            must be unscaled when ``guard.step`` runs).

    Example:
        >>> import math, torch, gradguard as gg
        >>> from gradguard.integrations._hooked import hooked_guard
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> guard = hooked_guard(model, opt, gg.GuardConfig(every=4))
        >>> model(torch.ones(1, 2)).sum().backward()
        >>> model.weight.grad[0, 0] = math.nan
        >>> before = model.weight.detach().clone()
        >>> _ = guard.step()
        >>> opt.step()                       # the trainer's own step: it changes nothing
        >>> torch.equal(model.weight, before), guard.telemetry.pending
        (True, 1)
        >>> guard.close()
    """
    return Guard(model, optimizer, config=config, executor=Hook(optimizer, scaler))


class LossTracker:
    """The loss behind the next optimizer step, kept on the device (no host sync).

    Losses passed to ``add`` (one per backward) are summed until an optimizer step takes
    them: the sum is the loss whose gradient that step applies (with gradient accumulation
    each micro-batch loss is usually already divided by the number of micro-batches); a
    ``zero_grad()`` between them drops those before it (:meth:`discard`). A
    step with no new backward since the previous step (two optimizers sharing one
    backward) gets the same loss as that previous step. The first step taken from a single
    backward gets that loss itself, graph and all (the telemetry reads the layers' order
    from it once, :mod:`gradguard.graph_order`); every other, a detached value.

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
        self._alias: tuple[Tensor, Tensor] | None = None
        self._graph: Tensor | None = None  # the pending sum's one loss, with its graph
        self._graph_given = False  # handed over once
        self._taker: Any = None  # the guard that took the last loss (gradguard._owners)

    def alias(self, scaled: Tensor, loss: Tensor) -> None:
        """``scaled`` (``GradScaler.scale(loss)``) stands for ``loss``: a backward of
        ``scaled`` records ``loss``, not the loss times the scale."""
        self._alias = (scaled, loss)

    def add(self, loss: Tensor) -> None:
        if self._alias is not None and loss is self._alias[0]:
            loss, self._alias = self._alias[1], None
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            return
        v = loss.detach().reshape(()).float()
        self._graph = loss if self._sum is None and not self._graph_given else None
        self._sum = v if self._sum is None else self._sum + v
        self._n += 1

    def pending(self) -> Tensor | None:
        """The loss of the backwards since the last step that no step has taken yet."""
        if self._sum is None:
            return None
        return self._sum / self._n if self.mean else self._sum

    def discard(self) -> None:
        """The gradients of the losses added since the last step were zeroed (a
        ``zero_grad()`` before the step: SAM's first backward, whose gradient only
        perturbs the weights): they are behind no step."""
        self._sum, self._n, self._graph = None, 0, None

    def take(self, taker: Any = None) -> Tensor | None:
        """The loss of the step ``taker`` (a guard) is about to take; one taken again (no
        backward since) couples ``taker`` with the guard that took it first: one loss
        depends on both's weights (:func:`gradguard._owners.couple`)."""
        if taker is not None:
            if self._sum is None and self._taker is not None:
                couple(self._taker, taker)
            self._taker = taker
        if self._sum is not None:
            self._last = self._sum / self._n if self.mean else self._sum
            self._sum, self._n = None, 0
            if self._graph is not None and self._graph.grad_fn is not None:
                self._graph_given = True
                graph, self._graph = self._graph.reshape(()).float(), None
                return graph
        return self._last


class CallbackOptions:
    """The options both trainer callbacks take: a :class:`~gradguard.GuardConfig` (or its
    options as keywords), validated once at construction so that a mistake fails before
    training starts, plus where the run directory and report go. Without a ``config``
    and without ``recovery=``, the callback guards with a :class:`gradguard.Recovery`
    ladder, as ``gradguard run`` does (it acts only on trouble; ``recovery=None`` turns
    it off): the run is fixed, not only watched."""

    def _init_options(
        self, owner: str, config: GuardConfig | None, options: dict[str, Any],
        run_dir: str | os.PathLike[str] | None, report: bool,
    ) -> None:
        #: the recovery is the callback's default, not the user's (see the Lightning
        #: callback's adversarial players)
        self.default_recovery = config is None and "recovery" not in options
        if self.default_recovery:
            options = {**options, "recovery": Recovery()}
        self.config = resolve_config(owner, config, options)
        self.run_dir = None if run_dir is None else dir_arg(run_dir, f"{owner} run_dir")
        self.report = report

    @property
    def clip(self) -> ClipPolicy | None:
        return self.config.clip

    @property
    def on_nonfinite(self) -> str:
        return self.config.on_nonfinite

    @property
    def recovery(self) -> Any:
        return self.config.recovery

    @property
    def every(self) -> int:
        return self.config.every

    @property
    def sinks(self) -> tuple[Sink, ...]:
        return self.config.sinks


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
