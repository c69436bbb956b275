"""Forward hooks behind ``Guard(watch_activations=True, sample_activations=True)``.

* **Forward origin** (``watch_activations``): during every grad-enabled forward, each
  submodule's output (and the model's floating inputs) is reduced to one float32 sum on the
  device: the sum is non-finite exactly when some element is (or when finite values
  overflow float32, which is the same trouble a moment early). At ``guard.step`` the sums
  become one device integer, the index of the first non-finite output, written into a
  ring the size of the flush window. The host reads that ring only for a window that had a
  non-finite step. Hooks fire when a module *finishes*, so the first flagged output is the
  innermost, earliest module that produced NaN/Inf.
* **Activation sampling** (``sample_activations``): armed for the forward of a flush step
  only; ReLU-family outputs give the fraction of units never positive on the batch,
  sigmoid/tanh outputs the fraction within ``SATURATION_MARGIN`` of their bounds.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ._tensors import iter_floats
from .detectors import INPUT_ORIGIN, SATURATION_MARGIN, ForwardOrigin

_HALF = (torch.float16, torch.bfloat16)
#: Output records kept per step (a runaway loop of forwards without guard.step stays bounded).
MAX_CALLS = 4096

# What an activation module's output means (a small registry, dispatched on module type
# name so that user subclasses of nn.ReLU count too).
RELU_FAMILY = frozenset(
    {"ReLU", "ReLU6", "LeakyReLU", "PReLU", "RReLU", "ELU", "SELU", "CELU", "GELU", "SiLU",
     "Mish", "Hardswish"}
)
#: module type -> (lower bound, upper bound) of a saturating activation
SATURATING: dict[str, tuple[float, float]] = {
    "Sigmoid": (0.0, 1.0), "Tanh": (-1.0, 1.0), "Hardtanh": (-1.0, 1.0),
    "Hardsigmoid": (0.0, 1.0), "Softsign": (-1.0, 1.0),
}


#: Modules that cannot be the first to produce NaN/Inf from finite inputs (they compute
#: nothing, or only rescale): not hooked for the forward origin, to keep the watch cheap.
PASS_THROUGH = frozenset(
    {"Sequential", "ModuleList", "ModuleDict", "Identity", "Flatten", "Unflatten", "Dropout",
     "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout", "FeatureAlphaDropout"}
)


def _kind(m: nn.Module) -> str | None:
    for cls in type(m).__mro__:
        if cls.__name__ in RELU_FAMILY:
            return "dead"
        if cls.__name__ in SATURATING:
            return cls.__name__
    return None


def _unit_dim(t: Tensor) -> int:
    # [B, F] and [B, T, F]: units are features (last dim); [B, C, H, W(, D)]: channels
    return 1 if t.dim() >= 4 else t.dim() - 1


class ActivationWatch:
    """Hooks on every submodule of ``model``; see the module docstring."""

    def __init__(
        self, model: nn.Module, *, every: int, nonfinite: bool, sample: bool,
        device: torch.device,
    ) -> None:
        self.nonfinite = nonfinite
        self.sample = sample
        self.names: list[str] = []
        self._handles: list[RemovableHandle] = []
        self._sums: list[Tensor] = []
        self._who: list[int] = []  # module index per sum; -1 = the model's input
        self._dtypes: list[str] = []
        self._ring = torch.full((every,), -1, dtype=torch.long, device=device)
        self._ring_who: list[tuple[list[int], list[str]] | None] = [None] * every
        self.armed = False
        self._samples: dict[int, Tensor] = {}
        self._kinds: dict[int, str] = {}
        if nonfinite:
            self._handles.append(model.register_forward_pre_hook(self._input_hook))
        for name, m in model.named_modules():
            if not name:
                continue
            idx = len(self.names)
            self.names.append(name)
            kind = _kind(m)
            if kind is not None:
                self._kinds[idx] = kind
            watch = nonfinite and type(m).__name__ not in PASS_THROUGH
            if watch or kind is not None:
                self._handles.append(m.register_forward_hook(self._make_hook(idx, watch)))

    @classmethod
    def for_config(cls, model: nn.Module, config: Any, telemetry: Any) -> ActivationWatch | None:
        """The watch a guard's config asks for (``watch_activations``/``sample_activations``),
        armed for the first flush step; None when neither is on."""
        if not (config.watch_activations or config.sample_activations):
            return None
        watch = cls(model, every=config.every, nonfinite=config.watch_activations,
                    sample=config.sample_activations, device=telemetry.device)
        watch.armed = config.sample_activations and telemetry.flush_due
        return watch

    # ---- hooks (device ops only) ---------------------------------------------------------
    def _record(self, who: int, x: Any) -> None:
        for t in iter_floats(x):
            if len(self._sums) >= MAX_CALLS:
                return
            self._sums.append(t.detach().sum(dtype=torch.float32))
            self._who.append(who)
            dt = t.dtype
            dev = t.device.type
            if dt not in _HALF and torch.is_autocast_enabled(dev):
                dt = torch.get_autocast_dtype(dev)  # computed in half, handed on widened
            self._dtypes.append(str(dt))

    def _input_hook(self, module: nn.Module, args: Any) -> None:
        if torch.is_grad_enabled():
            self._record(-1, args)

    def _make_hook(self, idx: int, watch: bool) -> Any:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if not torch.is_grad_enabled():
                return  # evaluation forwards are not training steps
            if watch:
                self._record(idx, out)
            if self.armed and idx in self._kinds and idx not in self._samples:
                t = next(iter_floats(out), None)
                if t is not None and t.numel() > 0:
                    self._samples[idx] = self._measure(self._kinds[idx], t.detach())
        return hook

    @staticmethod
    def _measure(kind: str, t: Tensor) -> Tensor:
        if kind == "dead":
            d = _unit_dim(t)
            fired = (t > 0).movedim(d, -1).reshape(-1, t.shape[d]).any(dim=0)
            return 1.0 - fired.float().mean()
        lo, hi = SATURATING[kind]
        return ((t < lo + SATURATION_MARGIN) | (t > hi - SATURATION_MARGIN)).float().mean()

    # ---- called by the guard ---------------------------------------------------------------
    def end_step(self, pos: int) -> None:
        """Fold this step's output sums into ring slot ``pos`` (device ops, no sync)."""
        if self.nonfinite and pos < self._ring.numel():
            if self._sums:
                bad = ~torch.isfinite(torch.stack(self._sums))
                first = torch.where(bad.any(), bad.long().argmax(), -1)
                self._ring[pos].copy_(first)
                self._ring_who[pos] = (self._who, self._dtypes)
            else:
                self._ring[pos].fill_(-1)
                self._ring_who[pos] = None
        self._sums, self._who, self._dtypes = [], [], []

    def origins(self, steps: list[int], nonfinite_rows: list[int]) -> dict[int, ForwardOrigin]:
        """Step -> first non-finite forward output, for the given rows of the window.

        Reads the ring (one small host copy); call it only when a row is non-finite."""
        if not self.nonfinite or not nonfinite_rows:
            return {}
        firsts = self._ring[: len(steps)].tolist()
        out: dict[int, ForwardOrigin] = {}
        for i in nonfinite_rows:
            rec = self._ring_who[i] if i < len(self._ring_who) else None
            f = firsts[i] if i < len(firsts) else -1
            if rec is None or f < 0 or f >= len(rec[0]):
                continue
            who = rec[0][f]
            out[steps[i]] = ForwardOrigin(INPUT_ORIGIN if who < 0 else self.names[who], rec[1][f])
        return out

    def reset_window(self) -> None:
        self._ring.fill_(-1)
        self._ring_who = [None] * self._ring.numel()

    def take_samples(self) -> dict[str, dict[str, float]]:
        """Activation samples of the armed forward (one small host copy), then disarm."""
        self.armed = False
        if not self._samples:
            return {}
        keys = list(self._samples)
        vals = torch.stack([self._samples[k] for k in keys]).tolist()
        self._samples = {}
        return {
            self.names[k]: {"dead" if self._kinds[k] == "dead" else "saturated": v}
            for k, v in zip(keys, vals)
        }

    def detach(self) -> None:
        """Remove the hooks (the guard's ``close`` calls it)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    # ---- checkpointing ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The window's forward origins so far (a resumed run still names them)."""
        return {"ring": self._ring.detach().cpu().clone(), "who": list(self._ring_who),
                "armed": self.armed}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        ring = sd["ring"]
        if ring.shape != self._ring.shape:
            raise ValueError(
                f"ActivationWatch.load_state_dict: ring of {tuple(ring.shape)} for a window of "
                f"{tuple(self._ring.shape)} (was the guard's `every` changed?)"
            )
        self._ring.copy_(ring)
        self._ring_who = list(sd["who"])
        self.armed = bool(sd.get("armed", False))
