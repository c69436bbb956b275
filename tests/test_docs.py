"""Every code snippet in README.md and docs/*.md runs, and every docstring example passes."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import gradguard

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"```python\n(.*?)```", re.S)


def snippets():
    for path in DOCS:
        for i, code in enumerate(FENCE.findall(path.read_text())):
            yield pytest.param(code, id=f"{path.name}[{i}]")


@pytest.mark.parametrize("code", list(snippets()))
def test_markdown_snippet_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "<snippet>", "exec"), {"__name__": "__snippet__"})


def modules():
    for info in pkgutil.walk_packages(gradguard.__path__, "gradguard."):
        if info.name.endswith("__main__"):
            continue
        yield info.name


@pytest.mark.parametrize("name", list(modules()))
def test_docstring_examples(name):
    try:
        mod = importlib.import_module(name)
    except ImportError as e:  # an optional extra that is not installed
        pytest.skip(f"{name}: {e}")
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
