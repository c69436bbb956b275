"""Every benchmark script imports against the current package: a module that moved (the
``gradguard.bench`` -> ``gradguard.cli.bench`` split left benchmarks/warning.py importing a
name that no longer existed) fails here, not 25 minutes into a benchmark run."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_script_imports(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    module = importlib.import_module(f"benchmarks.{name}")
    assert module.__doc__, f"benchmarks/{name}.py has no module docstring"


def test_rescue_reads_the_settled_lr_of_an_lr_settled_event(monkeypatch: pytest.MonkeyPatch) -> None:
    """An ``lr_settled`` event's ``data["lr"]`` is a list (one LR per param group): the
    rescue benchmark crashed on it before reading ``value`` (found running a 600-step case)."""
    import gradguard as gg

    monkeypatch.syspath_prepend(str(ROOT))
    rescue = importlib.import_module("benchmarks.rescue")
    ev = gg.Event(kind="lr_settled", step=400, severity="info", value=0.0375,
                  message="stable", data={"factor": 0.25, "lr": [0.0375, 0.0375]})
    out = rescue.Outcome(events=[ev], lr_end=0.15, lr_factor=0.25)
    recipe = rescue.rc.Recipe(torch.optim.SGD, 0.15)
    fields = rescue.guard_fields(out, recipe)
    assert fields["settled_lr"] == 0.0375
    assert fields["settled_lr_source"] == "lr_settled event"
