"""``GuardConfig``: every option of a guard in one frozen, validated object.

The same object configures :class:`~gradguard.Guard`, the Lightning and Hugging Face
callbacks and ``gradguard run``, so an option is spelled, defaulted and checked in one
place. Each of them also takes the options as keywords.

Example:
    >>> import gradguard as gg
    >>> cfg = gg.GuardConfig(clip=gg.ZClip(), every=25)
    >>> cfg.replace(every=10).every, cfg.on_nonfinite
    (10, 'skip')
    >>> gg.GuardConfig(every=0)
    Traceback (most recent call last):
    ...
    ValueError: GuardConfig(every=0): must be an int from 1 to 100000 (the steps of a window are held on the device until it is flushed)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .decision import ON_NONFINITE, OnNonfinite
from .detectors import DetectorConfig
from .events import Sink

#: Telemetry flush interval (steps): large enough that the one host copy per flush is
#: negligible, small enough that a person sees trouble within seconds.
DEFAULT_EVERY = 50
#: The longest flush interval: a window of steps is held on the device until it is flushed.
MAX_EVERY = 100_000


def _instance(name: str, value: Any, owner: str, what: str, methods: tuple[str, ...]) -> None:
    if isinstance(value, type):
        raise TypeError(
            f"{owner}({name}={value.__module__}.{value.__name__}): pass an instance, e.g. "
            f"{name}={value.__name__}()"
        )
    if not all(callable(getattr(value, m, None)) for m in methods):
        raise TypeError(f"{owner}({name}={value!r}): expected {what}")


def as_sinks(sinks: Any, owner: str = "GuardConfig") -> tuple[Sink, ...]:
    """``sinks`` as a tuple: None -> (), one sink -> (sink,), an iterable of sinks."""
    if sinks is None:
        return ()
    items: Iterable[Any] = (
        (sinks,) if callable(getattr(sinks, "write", None)) or isinstance(sinks, type) else sinks
    )
    if isinstance(sinks, (str, bytes)) or not isinstance(items, Iterable):
        raise TypeError(f"{owner}(sinks={sinks!r}): expected a sink or a list of sinks")
    out = tuple(items)
    for s in out:
        _instance("sinks", s, owner, "a sink with write() and close() (see gradguard.Sink)",
                  ("write", "close"))
    return out


@dataclass(frozen=True, kw_only=True)
class GuardConfig:
    """The options of a guard (defaults are the recommended values).

    Attributes:
        clip: a clip policy (``gg.NormClip``, ``ValueClip``, ``AutoClip``, ``ZClip``,
            ``AGC``, ``gg.chain(...)``, or any object with ``apply_``/``clip_`` and
            ``state_dict``/``load_state_dict``), or None. An instance belongs to one guard.
        on_nonfinite: what a step with a NaN/Inf gradient norm does: ``"skip"`` the
            optimizer step (parameters and optimizer state stay bit-identical), ``"raise"``
            :class:`~gradguard.NonFiniteGradientError`, ``"warn"`` and skip, or ``"off"``.
        recovery: a :class:`gradguard.Recovery` ladder, or None.
        every: telemetry flush interval in steps (one device-to-host copy each).
        sinks: where flushed metrics and events go: a sink, a list of sinks, or None.
        sample_updates: measure weight norms and update/weight ratios at flush steps.
        sink_rank: under torch.distributed, the rank that writes the sinks (None: all).
        watch_activations: forward hooks name the first module whose output went NaN/Inf.
        sample_activations: at flush steps, measure dead ReLU-family units and saturated
            sigmoid/tanh outputs.
        detector_config: detector thresholds (:class:`gradguard.detectors.DetectorConfig`).
        pipeline_group: under pipeline parallelism, the process group of the ranks that
            hold the other stages (e.g. ``mesh["pp"].get_group()``): the total gradient
            norm is then the whole model's, identical on every stage (docs/distributed.md).
    """

    clip: Any = None
    on_nonfinite: OnNonfinite = "skip"
    recovery: Any = None
    every: int = DEFAULT_EVERY
    sinks: Any = ()
    sample_updates: bool = True
    sink_rank: int | None = 0
    watch_activations: bool = False
    sample_activations: bool = False
    detector_config: DetectorConfig | None = None
    pipeline_group: Any = None

    def __post_init__(self) -> None:
        self.validate("GuardConfig")

    def validate(self, owner: str) -> None:
        """Check every option; errors name ``owner``, the argument and what is allowed."""
        if self.clip is not None:
            _instance("clip", self.clip, owner,
                      "a clip policy (NormClip, ValueClip, AutoClip, ZClip, AGC, chain) or None",
                      ("state_dict", "load_state_dict"))
            if not (callable(getattr(self.clip, "apply_", None))
                    or callable(getattr(self.clip, "clip_", None))):
                raise TypeError(f"{owner}(clip={self.clip!r}): has neither apply_() nor clip_()")
        if self.on_nonfinite not in ON_NONFINITE:
            raise ValueError(
                f"{owner}(on_nonfinite={self.on_nonfinite!r}): allowed values are {ON_NONFINITE}"
            )
        if isinstance(self.every, bool) or not isinstance(self.every, int) or \
                not 1 <= self.every <= MAX_EVERY:
            # found by a stranger: every=10**9 died in the allocator (a 40 GB window)
            raise ValueError(f"{owner}(every={self.every!r}): must be an int from 1 to "
                             f"{MAX_EVERY} (the steps of a window are held on the device "
                             "until it is flushed)")
        if self.recovery is not None:
            _instance("recovery", self.recovery, owner, "a gradguard.Recovery or None",
                      ("attach", "before_step", "verdict", "after_step", "flush_every",
                       "on_flush", "state_dict", "load_state_dict"))
        object.__setattr__(self, "sinks", as_sinks(self.sinks, owner))
        r = self.sink_rank
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 0):
            raise ValueError(f"{owner}(sink_rank={r!r}): must be an int >= 0 or None")
        for name in ("sample_updates", "watch_activations", "sample_activations"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{owner}({name}={getattr(self, name)!r}): must be True or False")
        dc = self.detector_config
        if dc is not None and not isinstance(dc, DetectorConfig):
            raise TypeError(
                f"{owner}(detector_config={dc!r}): expected a gradguard.detectors.DetectorConfig"
            )

    def replace(self, **changes: Any) -> GuardConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)


def resolve_config(owner: str, config: GuardConfig | None, options: dict[str, Any]) -> GuardConfig:
    """The config of a guard built from ``config=`` and/or keyword options: keywords
    override the config's values; unknown keywords are an error naming them."""
    if config is not None and not isinstance(config, GuardConfig):
        raise TypeError(f"{owner}(config={config!r}): expected a gradguard.GuardConfig or None")
    known = {f.name for f in dataclasses.fields(GuardConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"{owner}(): unknown option(s) {unknown}; allowed: {sorted(known)}")
    base = config or GuardConfig()
    try:
        cfg = dataclasses.replace(base, **options) if options else base
    except (TypeError, ValueError) as e:
        raise type(e)(str(e).replace("GuardConfig(", f"{owner}(", 1)) from None
    return cfg
