"""Sync-free gradient telemetry.

Per-parameter gradient norms (:mod:`gradguard.measure`: ``torch._foreach_norm`` grouped by
device and dtype, accumulated in at least float32) are written into a ring buffer on the
device and copied to the host once per flush. Nothing here asks the host for a value per
step. Weight and update norms of a flush step come from
:class:`~gradguard.updates.UpdateSampler`; the share of a layer's units that died, every
``SAMPLE`` steps, from :class:`~gradguard.units.UnitWatch`.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import distributed
from .errors import StateMismatch
from .graph_order import layers_after, layers_reached, through_activation
from .measure import GradGroup, StepStats, group_grads, measure, measure_grads, norm_dtype
from .naming import ROOT_LAYER, layer_of, named_optimizer_params, norm_layers
from .underflow import grad_amax
from .units import UnitWatch, watched
from .window import Window

# the measurement moved to gradguard.measure, the naming to gradguard.naming and the
# window to gradguard.window; their names stay importable from here
__all__ = [
    "ROOT_LAYER", "GradGroup", "StepStats", "Telemetry", "Window", "group_grads", "layer_of",
    "measure_grads", "named_optimizer_params", "norm_dtype",
]

# Columns of the ring buffer before the per-parameter norms. LOCAL_OK: this rank's own
# gradients were finite (before any all-reduce); it tells which rank a NaN came from.
# LOSS_GIVEN: a loss was passed (pipeline stages: only the last stage has one). DYING,
# DYING_AT: on a step the unit watch sampled, the largest share of a weight's units that
# died and that weight's parameter position (NaN on other steps; :mod:`gradguard.units`).
(_COL_LOSS, _COL_TOTAL, _COL_COEF, _COL_SKIPPED, _COL_LOCAL_OK, _COL_LOSS_GIVEN, _COL_DYING,
 _COL_DYING_AT) = range(8)
_N_SCALARS = 8


class Telemetry:
    """Per-step gradient telemetry kept on the device, flushed to the host in one copy.

    Args:
        named_params: ``(name, parameter)`` pairs; names are module paths
            (``"encoder.layers.3.attn.q_proj.weight"``).
        every: rows in the ring buffer; a flush happens when it is full.
        norm_type: order of the gradient norms (2 by default).
        pipeline_group: pipeline parallel only: the group of ranks that hold the other
            stages (a ProcessGroup or ``mesh["pp"]``). Per-layer norms stay this stage's;
            the total norm, the skip and the clip coefficient are the whole model's, still
            with one all-reduce per step. See docs/distributed.md.
        model: the module the parameters belong to: its linear and convolution weights'
            output units are watched for dying (:mod:`gradguard.units`); None: not.
        graph_order: read the layers' order from the first loss recorded with a graph
            (:mod:`gradguard.graph_order`, ``Window.after``); False: registration order
            (a guard under torch.distributed, whose ranks must judge alike).

    Example:
        >>> import torch, gradguard as gg
        >>> net = torch.nn.Linear(3, 2)
        >>> tel = gg.Telemetry(list(net.named_parameters()), every=4)
        >>> net(torch.ones(1, 3)).sum().backward()
        >>> stats = tel.measure()
        >>> tel.record(stats, loss=None, clip_coef=None, skipped=None)
        >>> window = tel.flush()
        >>> window.layers, window.steps
        (['(root)'], [0])
    """

    def __init__(
        self,
        named_params: Iterable[tuple[str, Tensor]],
        *,
        every: int = 50,
        norm_type: float = 2.0,
        pipeline_group: object = None,
        model: nn.Module | None = None,
        graph_order: bool = True,
    ) -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every={every!r} must be an int >= 1")
        named = list(named_params)
        if not named:
            raise ValueError("named_params is empty: there is nothing to measure")
        self.names = [n for n, _ in named]
        self.params: list[Tensor] = [p for _, p in named]
        self.every = every
        self.norm_type = float(norm_type)
        layers: list[str] = []
        seen: dict[str, int] = {}
        self.layer_index: list[int] = []
        for n in self.names:
            lay = layer_of(n)
            if lay not in seen:
                seen[lay] = len(layers)
                layers.append(lay)
            self.layer_index.append(seen[lay])
        self.layers = layers
        self.matrix_layers = [False] * len(layers)
        #: per layer, the layers after it in the autograd graph (:mod:`gradguard.graph_order`),
        #: read from the first loss with a graph; None: registration order. Not read with
        #: ``graph_order=False`` (a guard under torch.distributed: each rank's graph is its
        #: own, one that does not reach a layer would judge by another order than the rest,
        #: and the detectors' verdicts must be alike on every rank)
        self.after: list[list[int]] | None = None
        self._order_read = not graph_order
        self._walk = graph_order
        self._matrix_params = [p.dim() >= 2 for p in self.params]
        #: the loss last recorded with a graph, weakly (``Window.reached``)
        self._graph: weakref.ref[Tensor] | None = None
        for i, p in zip(self.layer_index, self.params):
            self.matrix_layers[i] = self.matrix_layers[i] or p.dim() >= 2
        self.device = self.params[0].device
        n_cols = _N_SCALARS + len(self.params)
        self._buf = torch.full((every, n_cols), math.nan, device=self.device)
        self._steps: list[int] = []
        self._extra: Tensor | None = None  # [2, n_params] weight and update norms
        self._present: set[int] | None = None  # params with a gradient tensor at the window's
        # first step (host-side, sampled once per window)
        #: params that require no gradient (frozen), read at each window's first step: a
        #: gradient tensor they keep (zeros, ``zero_grad(set_to_none=False)``) is none
        self._frozen: frozenset[int] = frozenset()
        #: per pending row, the params without a gradient tensor at that step (None: all
        #: had one, or unknown); host-side. Under torch.distributed which parameters a
        #: rank's graph reached is its own: the guard's flush makes them those without a
        #: gradient on every rank (:meth:`pending_absent`). Not kept across pipeline stages,
        #: whose parameters differ
        self._absent: list[frozenset[int] | None] = []
        self._track_absent = pipeline_group is None
        #: params that have had a gradient tensor at some step measured (host-side; None
        #: before the first), and the last step at which one had its first (:meth:`grew`)
        self._trained: set[int] | None = None
        self.grew_at: int | None = None
        self._next_step = 0
        #: the model's normalisation layers (:func:`gradguard.naming.norm_layers`); None:
        #: no model given
        self.norm_layers = None if model is None else norm_layers(model)
        index = [] if model is None else watched(model, self.params)
        #: the dying units' counters (None: no weight is watched)
        self.units = UnitWatch(self.params, index, self.device) if index else None
        self._no_units = torch.full((2,), math.nan, device=self.device)  # unsampled steps
        self._reducer = (
            None
            if pipeline_group is None
            else distributed.NormReducer(len(named), pipeline_group, self.names)
        )

    # ---- per step (no host sync) ------------------------------------------------------
    def measure(self, scale: Tensor | None = None) -> StepStats:
        """Gradient norms of this step (device tensors); ``scale``: a device scalar the
        norms are multiplied by (``1 / loss_scale`` while the gradients are still scaled)."""
        return measure(self.params, self.norm_type, torch.float32, self.device,
                       self.reducer(), self.names, scale=scale)

    def grew(self, stats: StepStats, step: int) -> list[int]:
        """The parameters (positions) with a gradient at ``step`` that had none at any step
        before: an unfrozen layer (``requires_grad_(True)`` on parameters the optimizer
        held all along), a branch used for the first time. Host-side (``p.grad`` is None or
        not), no device read; [] at the first step measured, which starts the record."""
        present = [i for grp in stats.groups for i in grp.index]
        if self._trained is None:
            self._trained = set(present)
            return []
        new = [i for i in present if i not in self._trained]
        if new:
            self._trained.update(new)
            self.grew_at = step
        return new

    def sample_units(self, step: int) -> Tensor | None:
        """``[share, position]`` of the units that died (:meth:`UnitWatch.sample
        <gradguard.units.UnitWatch.sample>`) when step ``step`` is sampled, else None;
        call it with the step's gradients, before the optimizer step."""
        if self.units is None or not self.units.due(step):
            return None
        return self.units.sample()

    def reducer(self) -> distributed.NormReducer | None:
        """The all-reduce of per-parameter norms (None outside torch.distributed), built
        at the first step under torch.distributed (a Telemetry may be made before
        ``init_process_group``)."""
        if self._reducer is None and dist.is_available() and dist.is_initialized():
            self._reducer = distributed.NormReducer(len(self.params), names=self.names)
        return self._reducer

    def _scalar(self, x: Tensor | float | None, default: float) -> Tensor:
        if x is None:
            return torch.full((1,), default, device=self.device)
        if isinstance(x, Tensor):
            return x.detach().reshape(1).to(self.device, torch.float32, non_blocking=True)
        return torch.full((1,), float(x), device=self.device)

    def record(
        self,
        stats: StepStats,
        *,
        loss: Tensor | float | None,
        clip_coef: Tensor | float | None,
        skipped: Tensor | float | None,
        step: int | None = None,
        units: Tensor | None = None,
    ) -> None:
        """Write one step into the ring buffer (a device copy, no sync). ``skipped``: 0 for a
        step taken, else why it was skipped (the verdict bits, see ``Window.skip_codes``);
        ``units``: :meth:`sample_units`' result on a sampled step."""
        pos = len(self._steps)
        if pos >= self.every:
            raise RuntimeError("telemetry ring buffer is full: call flush() first")
        sk: Tensor | float | None
        sk = (
            skipped.float()
            if isinstance(skipped, Tensor)
            else (None if skipped is None else float(skipped))
        )
        row = torch.cat(
            [
                self._scalar(loss, math.nan),
                self._scalar(stats.total_norm, math.nan),
                self._scalar(clip_coef, 1.0),
                self._scalar(sk, 0.0),
                self._scalar(
                    stats.finite if stats.local_finite is None else stats.local_finite, 1.0
                ),
                self._scalar(0.0 if loss is None else 1.0, 1.0),
                self._no_units if units is None else units.to(self.device, torch.float32),
                stats.param_norms.to(self.device, torch.float32, non_blocking=True),
            ]
        )
        self._buf[pos].copy_(row)
        if not self._order_read and isinstance(loss, Tensor) and loss.grad_fn is not None:
            self._order_read = True  # once: a host-side walk of the graph, no device read
            self.after = layers_after(loss, self.params, self.layer_index, len(self.layers))
        if self._walk and isinstance(loss, Tensor) and loss.grad_fn is not None:
            # every step's (a host-side weak reference): a recovery at work flushes early
            self._graph = weakref.ref(loss)
        whole = len(stats.params) == len(self.params)
        if pos == 0 and whole:  # host-known, no sync
            self._frozen = frozenset(i for i, p in enumerate(self.params) if not p.requires_grad)
            self._present = {i for grp in stats.groups for i in grp.index} - self._frozen
        self._absent.append(self._absent_now(stats) if whole and self._track_absent else None)
        self._steps.append(self._next_step if step is None else step)
        self._next_step = self._steps[-1] + 1

    def _absent_now(self, stats: StepStats) -> frozenset[int] | None:
        """The params without a gradient tensor this step (a branch the step's graph did
        not reach: a task head, an expert, an adapter), None when every one had one;
        host-side, and only counted when some had none. A frozen parameter's (see
        ``_frozen``) counts as none."""
        if not self._frozen and sum(len(grp.index) for grp in stats.groups) == len(self.params):
            return None
        present = {i for grp in stats.groups for i in grp.index} - self._frozen
        return frozenset(i for i in range(len(self.params)) if i not in present)

    def pending_absent(self) -> list[frozenset[int] | None] | None:
        """The live list of the pending steps' parameters without a gradient tensor (see
        ``Window.grad_absent``; the guard's flush agrees on it across ranks), None where
        they are not kept."""
        return self._absent if self._track_absent else None

    def pending_rows(self) -> Tensor:
        """The rows written since the last flush: a live ``[pending, 8 + n_params]`` view of
        the device ring buffer (columns: loss, total norm, clip coefficient, skipped, local
        finite flag, loss given, dying share and its parameter, then the per-parameter
        norms). Used to agree on a window across ranks; under pipeline stages, whose
        parameters differ, the first 8 columns only."""
        rows = self._buf[: len(self._steps)]
        staged = self._reducer is not None and self._reducer.stages > 1
        return rows[:, :_N_SCALARS] if staged else rows

    def pending_steps(self) -> list[int]:
        """The step numbers of the rows written since the last flush."""
        return list(self._steps)

    @property
    def pending(self) -> int:
        """Rows written since the last flush."""
        return len(self._steps)

    def pending_losses(self) -> list[float]:
        """The finite losses given to the steps taken since the last flush, oldest first:
        what no flush has judged yet (a resumed run's, from the checkpoint's window). One
        host read; not on the step path."""
        rows = self._buf[: len(self._steps)]
        cols = rows[:, [_COL_LOSS, _COL_LOSS_GIVEN, _COL_SKIPPED]].detach().cpu().tolist()
        return [loss for loss, given, skipped in cols
                if given and not skipped and math.isfinite(loss)]

    def _reached(self, graph: weakref.ref[Tensor]) -> frozenset[int] | None:
        """The layers the graph of the window's last loss reaches (while it lives)."""
        loss = graph()
        return None if loss is None else layers_reached(loss, self.params, self.layer_index)

    @property
    def flush_due(self) -> bool:
        """True when the next recorded step fills the buffer (sample updates then)."""
        return len(self._steps) == self.every - 1

    def set_update_sample(self, weight_norms: Tensor, update_norms: Tensor) -> None:
        """Attach ``[n_params]`` weight and update norms (device tensors) to the pending
        window; :class:`~gradguard.updates.UpdateSampler` measures them around a step."""
        self._extra = torch.stack([weight_norms.to(self.device, torch.float32),
                                   update_norms.to(self.device, torch.float32)])

    def units_restarted(self, counts: dict[str, object] | None = None) -> None:
        """The weights were restored: the unit watch counts afresh, or from ``counts`` (its
        state kept with weights an undone rollback puts back: their units died in them),
        and the window's samples so far, of the weights replaced, are dropped (a flush
        after a rollback read them and rolled back again: docs/recovery.md)."""
        if self.units is not None:
            self.units.reset()
            if counts is not None:
                self.units.load_state_dict(counts)
            self._buf[:, _COL_DYING:_COL_DYING_AT + 1] = math.nan

    # ---- per flush (one host copy) -----------------------------------------------------
    def flush(self) -> Window | None:
        """Copy the window to the host (exactly one device-to-host copy) and reset it."""
        n = len(self._steps)
        if n == 0:
            return None
        p = len(self.params)
        flat = self._buf[:n].reshape(-1)
        if self._extra is not None:
            flat = torch.cat([flat, self._extra.reshape(-1)])
        host = flat.cpu()  # the one device->host copy of this flush
        if host.data_ptr() == self._buf.data_ptr():
            host = host.clone()  # on a CPU device .cpu() aliases the ring buffer
        rows = host[: n * (p + _N_SCALARS)].reshape(n, p + _N_SCALARS)
        w = u = None
        if self._extra is not None:
            extra = host[n * (p + _N_SCALARS) :].reshape(2, p)
            w, u = extra[0], extra[1]
        window = Window(
            steps=list(self._steps),
            loss=rows[:, _COL_LOSS],
            total_norm=rows[:, _COL_TOTAL],
            clip_coef=rows[:, _COL_COEF],
            skipped=rows[:, _COL_SKIPPED] > 0.5,
            param_norms=rows[:, _N_SCALARS:],
            names=self.names,
            layers=self.layers,
            layer_index=self.layer_index,
            weight_norms=w,
            update_norms=u,
            skip_codes=rows[:, _COL_SKIPPED],
            matrix_layers=self.matrix_layers,
            norm_layers=self.norm_layers,
            matrix_params=self._matrix_params,
            after=self.after,
            grad_present=None if self._present is None else [i in self._present for i in range(p)],
            dying=rows[:, _COL_DYING],
            dying_at=rows[:, _COL_DYING_AT],
            loss_given=rows[:, _COL_LOSS_GIVEN] > 0.5,
            grad_absent=list(self._absent) if self._track_absent and len(self._absent) == n
            else None,
            reached=None if self._graph is None else functools.partial(self._reached, self._graph),
            through_activation=None if self._graph is None else functools.partial(
                through_activation, self._graph, self.params, self.layer_index),
            amax=functools.partial(grad_amax, self.params, self.layer_index),
        )
        self._graph = None
        self._steps = []
        self._absent = []
        self._present = None
        self._extra = None
        self._buf.fill_(math.nan)
        return window

    # ---- checkpointing ---------------------------------------------------------------
    def state_dict(self) -> dict[str, object]:
        return {
            "steps": list(self._steps),
            "buf": self._buf.clone(),
            "next_step": self._next_step,
            "names": list(self.names),
            "shapes": [list(p.shape) for p in self.params],
            "present": None if self._present is None else sorted(self._present),
            "absent": [None if a is None else sorted(a) for a in self._absent],
            "trained": None if self._trained is None else sorted(self._trained),
            "grew_at": self.grew_at,
            "units": None if self.units is None else self.units.state_dict(),
        }

    def _saved_buffer(self, sd: dict[str, object]) -> Tensor:
        """The window buffer of ``sd``, with the columns added since it was saved."""
        buf = sd["buf"]
        assert isinstance(buf, Tensor)
        p = len(self.params)
        if buf.shape[1] == p + 5:  # saved before the loss-given column
            ones = torch.ones_like(buf[:, :1])
            buf = torch.cat([buf[:, :_COL_LOSS_GIVEN], ones, buf[:, _COL_LOSS_GIVEN:]], dim=1)
        if buf.shape[1] == p + 6:  # saved before the dying-units columns
            nan = torch.full_like(buf[:, :2], math.nan)
            buf = torch.cat([buf[:, :_COL_DYING], nan, buf[:, _COL_DYING:]], dim=1)
        return buf

    def check_state_dict(self, sd: dict[str, object]) -> None:
        """Raise a ValueError naming what differs when ``sd`` was saved over other
        parameters or with another ``every``; changes nothing (found by a stranger: the
        errors said "buffer shape (10, 14) != (25, 14)", naming no option)."""
        names = sd.get("names")
        if names != self.names:
            saved = list(names) if isinstance(names, (list, tuple)) else []
            diff = next(((a, b) for a, b in zip(saved, self.names) if a != b), None)
            where = (f"; the first that differs: {diff[0]!r} saved, {diff[1]!r} here" if diff
                     else "")
            raise StateMismatch(
                f"the state was saved over other parameters ({len(saved)} parameter tensors "
                f"saved, {len(self.names)} in this guard's model{where})",
                "load it into a guard over the model it was saved with, or start a new guard")
        shapes = sd.get("shapes")  # absent from older checkpoints
        here = [list(p.shape) for p in self.params]
        if isinstance(shapes, list) and (odd := next(
                ((n, a, b) for n, a, b in zip(self.names, shapes, here) if list(a) != b), None)):
            # found by a stranger: a 16-64-32 MLP's state loaded into a 3-7-2 one unsaid
            raise StateMismatch(
                f"the state was saved over parameters of other shapes (the first: "
                f"{odd[0]!r}, {tuple(odd[1])} saved, {tuple(odd[2])} here)",
                "load it into a guard over the model it was saved with, or start a new guard")
        rows = self._saved_buffer(sd).shape
        if rows != self._buf.shape:
            raise StateMismatch(
                f"the state was saved by a guard with every={rows[0]}, this guard's is "
                f"every={self._buf.shape[0]}", f"build the guard with every={rows[0]}")

    def load_state_dict(self, sd: dict[str, object]) -> None:
        self.check_state_dict(sd)
        self._buf.copy_(self._saved_buffer(sd))
        self._steps = list(sd["steps"])  # type: ignore[call-overload]
        self._next_step = int(sd["next_step"])  # type: ignore[call-overload]
        units = sd.get("units")
        if self.units is not None and isinstance(units, dict):
            self.units.load_state_dict(units)
        present = sd.get("present")
        self._present = None if present is None else {int(i) for i in present}  # type: ignore[attr-defined]
        absent = sd.get("absent")  # absent from older checkpoints: unknown for those rows
        self._absent = ([None if a is None else frozenset(int(i) for i in a) for a in absent]  # type: ignore[attr-defined]
                        if isinstance(absent, list) and len(absent) == len(self._steps)
                        else [None] * len(self._steps))
        trained = sd.get("trained")  # absent from older checkpoints: learnt anew
        self._trained = None if trained is None else {int(i) for i in trained}  # type: ignore[attr-defined]
        grew_at = sd.get("grew_at")
        self.grew_at = None if grew_at is None else int(grew_at)  # type: ignore[call-overload]


