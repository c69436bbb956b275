"""The telemetry window: what one flush copies to the host, the detectors' input
(:class:`~gradguard.telemetry.Telemetry` writes it on the device and copies it once)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Window:
    """The telemetry of a flush window, on the host (CPU tensors).

    Attributes:
        steps: the step index of each row.
        loss, total_norm, clip_coef: ``[n]`` float tensors (NaN where unknown/non-finite).
        skipped: ``[n]`` bool.
        param_norms: ``[n, n_params]`` per-parameter gradient norms.
        names: parameter names; ``layers`` their unique module paths in order;
            ``layer_index[i]`` is the layer of parameter ``i``.
        weight_norms, update_norms: ``[n_params]`` sampled at the last step of the window
            (None when not sampled); weight norms are exact, update norms are estimated
            from a strided sample of each parameter (:mod:`gradguard.updates`).
        skip_codes: ``[n]`` why each step was skipped: the verdict bits of
            :mod:`gradguard.executors` (1 non-finite, 2 gradient spike, 4 loss spike, 8 an
            update voided by a restore after its backward; 0 not skipped), None when unknown.
        matrix_layers: per layer, whether it holds a parameter of 2 or more dimensions (a
            weight matrix or kernel, not only norm scales and biases); None when unknown.
        norm_layers: the module paths of the model's normalisation layers
            (:func:`gradguard.naming.norm_layers`); None when unknown (no model given).
        after: per layer, the layers after it in the autograd graph (the layers its output
            flows through to the loss, :mod:`gradguard.graph_order`); None: the registration
            order (a chain).
        grad_present: per parameter, whether it had a gradient tensor (``p.grad`` not
            None) at the window's first step (sampled once per window: a host-side set,
            no device read): a frozen or unused parameter has none, a parameter behind
            dead units has a zero one; None when unknown.
        grad_absent: per step, the parameters (positions) with no gradient tensor at that
            step (a branch its graph did not reach: a task head, an expert), None where
            every one had one; host-side, no device read. Under torch.distributed, those
            without one on every rank (agreed at the flush); None when unknown (across
            pipeline stages, whose parameters differ).
        loss_given: ``[n]`` bool: a loss was passed to the step (NaN in ``loss`` otherwise);
            None when unknown.
        dying, dying_at: ``[n]``: on the steps the unit watch sampled, the largest share of
            a weight's output units that died within the last hundred steps, and that
            weight's parameter position (:mod:`gradguard.units`); NaN on other steps; None
            when unknown.
        matrix_params: per parameter, whether it is a matrix (or a kernel); None when unknown.
        reached: a call that walks the graph of the window's last loss (host-side, no
            device read; while that loss lives) and returns the layers it reaches, None when
            it cannot; None without a graph. Read only for a layer that looks dead.
        through_activation: a call that tells, for a layer, whether its output reaches the other
            layers' operations and the loss only through a ReLU-family activation in the
            graph of the window's last loss (:func:`gradguard.graph_order.through_activation`);
            None without a graph. Read only for a layer that looks dead from the start.
        amax: a call that reads, for the given layers, the largest magnitude of their
            gradients now (:func:`gradguard.underflow.grad_amax`: one host read); None when
            unknown. Read only for layers whose norm is exactly zero.
    """

    steps: list[int]
    loss: Tensor
    total_norm: Tensor
    clip_coef: Tensor
    skipped: Tensor
    param_norms: Tensor
    names: list[str]
    layers: list[str]
    layer_index: list[int]
    weight_norms: Tensor | None = None
    update_norms: Tensor | None = None
    skip_codes: Tensor | None = None
    matrix_layers: list[bool] | None = None
    norm_layers: list[str] | None = None
    after: list[list[int]] | None = None
    grad_present: list[bool] | None = None
    dying: Tensor | None = None
    dying_at: Tensor | None = None
    loss_given: Tensor | None = None
    grad_absent: list[frozenset[int] | None] | None = None
    reached: Callable[[], frozenset[int] | None] | None = None
    through_activation: Callable[[int], bool | None] | None = None
    matrix_params: list[bool] | None = None
    amax: Callable[[Sequence[int]], list[float]] | None = None
    #: :meth:`layer_norms`, computed once per window (the detectors, the monitor and the
    #: recovery all read it at the same flush); treat it as read-only
    _layer_norms: Tensor | None = field(default=None, init=False, repr=False, compare=False)
    #: :meth:`layers_absent`, computed once per window (the detectors and the recovery)
    _layers_absent: list[frozenset[int]] | None = field(default=None, init=False, repr=False,
                                                        compare=False)

    def __len__(self) -> int:
        return len(self.steps)

    def voided(self) -> Tensor:
        """``[n]`` bool: the steps whose update was not applied because the weights were
        restored after their backward (a rollback, or the LR probe's fork, heard in a
        trainer's pre-step hook: :data:`gradguard.executors.STALE`). They are in
        ``skipped`` (nothing was applied) but are no step the guard skipped for trouble."""
        from .executors import STALE

        if self.skip_codes is None:
            return torch.zeros(len(self.steps), dtype=torch.bool)
        return (self.skip_codes.nan_to_num(0.0).long() & STALE) != 0

    def _by_layer(self, per_param: Tensor) -> Tensor:
        """Combine per-parameter 2-norms (last dim) into per-layer 2-norms."""
        idx = torch.tensor(self.layer_index, dtype=torch.long)
        shape = (*per_param.shape[:-1], len(self.layers))
        sq = torch.zeros(shape, dtype=torch.float64)
        sq.index_add_(sq.dim() - 1, idx, per_param.double() ** 2)
        return sq.sqrt().float()

    def layer_norms(self) -> Tensor:
        """``[n, n_layers]`` gradient norm of each layer (its parameters together);
        computed once per window, shared by its readers: do not modify it in place."""
        if self._layer_norms is None:
            self._layer_norms = self._by_layer(self.param_norms)
        return self._layer_norms

    def layers_absent(self) -> list[frozenset[int]] | None:
        """Per step, the layers (indices into ``layers``) none of whose parameters had a
        gradient tensor at that step: not in that step's graph, so neither alive nor dead
        there. None when unknown; computed once per window, shared by its readers."""
        if self.grad_absent is None or self._layers_absent is not None:
            return self._layers_absent
        size = [0] * len(self.layers)
        for j in self.layer_index:
            size[j] += 1
        out: list[frozenset[int]] = []
        for absent in self.grad_absent:
            if not absent:
                out.append(frozenset())
                continue
            count = [0] * len(self.layers)
            for i in absent:
                count[self.layer_index[i]] += 1
            out.append(frozenset(j for j, c in enumerate(count) if c and c == size[j]))
        self._layers_absent = out
        return out

    def units_dying(self) -> tuple[float, str] | None:
        """The latest sample of the unit watch in this window: the largest share of a
        weight's output units that died within the last hundred steps, and that weight's
        parameter name; None when no step of the window was sampled."""
        if self.dying is None or self.dying_at is None:
            return None
        for share, at in zip(reversed(self.dying.tolist()), reversed(self.dying_at.tolist())):
            if math.isfinite(share) and math.isfinite(at) and 0 <= int(at) < len(self.names):
                return share, self.names[int(at)]
        return None

    def layer_weight_norms(self) -> Tensor | None:
        return None if self.weight_norms is None else self._by_layer(self.weight_norms)

    def layer_update_norms(self) -> Tensor | None:
        return None if self.update_norms is None else self._by_layer(self.update_norms)
