"""gradguard: detect, diagnose and fix exploding and vanishing gradients in PyTorch."""

from __future__ import annotations

from .clipping import AGC, AutoClip, ClipPolicy, NormClip, ValueClip, ZClip
from .events import Event, Flush, JsonlSink, Sink, read_jsonl
from .guard import (
    GradGuardWarning,
    Guard,
    NonFiniteGradientError,
    TrainingDiverged,
)
from .telemetry import StepStats, Telemetry, Window

__version__ = "0.1.0"

__all__ = [
    "AGC",
    "AutoClip",
    "ClipPolicy",
    "Event",
    "Flush",
    "GradGuardWarning",
    "Guard",
    "JsonlSink",
    "NonFiniteGradientError",
    "NormClip",
    "Sink",
    "StepStats",
    "Telemetry",
    "TrainingDiverged",
    "ValueClip",
    "Window",
    "ZClip",
    "__version__",
    "read_jsonl",
]
