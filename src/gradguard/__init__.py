"""gradguard: detect, diagnose and fix exploding and vanishing gradients in PyTorch."""

from __future__ import annotations

from . import init
from .clipping import AGC, AutoClip, ClipPolicy, NormClip, ValueClip, ZClip, chain
from .config import GuardConfig
from .doctor import Diagnosis, Finding, doctor, gradcheck
from .errors import GradGuardWarning, NonFiniteGradientError, StateMismatch, TrainingDiverged
from .events import Event, Flush, Sink, read_jsonl
from .guard import Guard
from .recovery import DiskSnapshotStore, MemorySnapshotStore, Recovery, SnapshotError
from .report import ReportError, report
from .sinks import ConsoleSink, JsonlSink, TensorBoardSink, WandbSink
from .telemetry import StepStats, Telemetry, Window

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # gg.lab loads on first use: it pulls in matplotlib/scikit-learn inside its experiments
    if name == "lab":
        import importlib

        return importlib.import_module(".lab", __name__)
    raise AttributeError(f"module 'gradguard' has no attribute {name!r}")

__all__ = [
    "AGC",
    "AutoClip",
    "ClipPolicy",
    "ConsoleSink",
    "Diagnosis",
    "DiskSnapshotStore",
    "Event",
    "Finding",
    "Flush",
    "GradGuardWarning",
    "Guard",
    "GuardConfig",
    "JsonlSink",
    "MemorySnapshotStore",
    "NonFiniteGradientError",
    "NormClip",
    "Recovery",
    "ReportError",
    "Sink",
    "SnapshotError",
    "StateMismatch",
    "StepStats",
    "Telemetry",
    "TensorBoardSink",
    "TrainingDiverged",
    "ValueClip",
    "WandbSink",
    "Window",
    "ZClip",
    "__version__",
    "chain",
    "doctor",
    "gradcheck",
    "init",
    "lab",
    "read_jsonl",
    "report",
]
