from __future__ import annotations

import os

import pytest
import torch

from gradguard import measure

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


class SyncCounter:
    """Counts host synchronisations by patching the Tensor methods that cause them."""

    NAMES = ("item", "__bool__", "__float__", "__int__", "tolist", "numpy", "cpu")

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        self.active = False
        for name in self.NAMES:
            orig = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, orig))

    def _wrap(self, name, orig):
        def wrapper(t, *a, **k):
            if self.active:
                self.calls.append(name)
            return orig(t, *a, **k)

        return wrapper

    def __enter__(self) -> SyncCounter:
        self.calls.clear()
        self.active = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.active = False


@pytest.fixture
def sync_counter(monkeypatch: pytest.MonkeyPatch) -> SyncCounter:
    """Counts host syncs on the path a GPU takes: gradguard reads a clip coefficient that
    lives on the CPU (``measure.READ_CPU_COEFFICIENT``: no device to wait for), which a
    CPU run would count here; turned off, the CPU takes the device path."""
    monkeypatch.setattr(measure, "READ_CPU_COEFFICIENT", False)
    return SyncCounter(monkeypatch)
