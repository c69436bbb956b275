"""Every subcommand has a described ``--help`` with an example; usage errors exit 2;
``gradguard bench`` shows progress (rich on a terminal, plain lines otherwise)."""

from __future__ import annotations

import argparse
import importlib
import re
import sys

import pytest

from gradguard.cli import SUBCOMMANDS, bench, main


def _names(module: str) -> dict[str, argparse.ArgumentParser]:
    """The subcommand parsers that ``module.register`` adds, by name."""
    sub = argparse.ArgumentParser(prog="gradguard").add_subparsers()
    importlib.import_module(module).register(sub)
    assert sub.choices, f"{module}.register added no subcommand"
    return dict(sub.choices)


SUBPARSERS = [(name, p) for mod in SUBCOMMANDS for name, p in _names(mod).items()]
NAMES = [name for name, _ in SUBPARSERS]


def test_every_registered_subcommand_is_covered():
    assert len(SUBPARSERS) >= len(SUBCOMMANDS) and len(set(NAMES)) == len(NAMES)
    assert {"demo", "report", "doctor", "run", "lab", "bench"} <= set(NAMES)


@pytest.mark.parametrize("name, parser", SUBPARSERS, ids=NAMES)
def test_help_has_description_and_example(name, parser, capsys):
    with pytest.raises(SystemExit) as exc:
        main([name, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: gradguard {name}")
    desc = " ".join((parser.description or "").split())
    assert len(desc) >= 40, f"{name}: no real description"
    assert desc in " ".join(text.split()), f"{name}: description not shown in --help"
    lines = text.splitlines()
    ex = [i for i, ln in enumerate(lines) if re.match(r"\s*examples?:", ln, re.IGNORECASE)]
    assert ex, f"{name}: no 'example:' line in --help"
    example = " ".join(lines[ex[0] : ex[0] + 2])
    assert re.search(rf"\bgradguard {name}\b", example), f"{name}: example does not run it"


def test_top_level_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in NAMES:
        assert re.search(rf"^\s+{name}\s+\S", out, re.MULTILINE), f"{name} missing from --help"


@pytest.mark.parametrize(
    "argv",
    [["no-such-command"], ["--no-such-option"]] + [[name, "--no-such-option"] for name in NAMES],
    ids=lambda a: " ".join(a),
)
def test_unknown_command_or_option_exits_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: gradguard" in err and "error:" in err


def test_bad_value_exits_2_with_a_message(capsys):
    assert main(["bench", "--threads", "0"]) == 2
    assert "--threads 0" in capsys.readouterr().err


# ---- gradguard bench progress ------------------------------------------------------------
_MLP, _TRANSFORMER = bench.mlp_workload, bench.transformer_workload


@pytest.fixture
def tiny_bench(monkeypatch):
    """Swap the benchmark's models for tiny ones (the timing method is unchanged); return
    the variant names."""

    def mlp(**kw):
        wl = _MLP(width=8, depth=1, batch=4)
        wl.name = "tiny_mlp"
        return wl

    def transformer(**kw):
        wl = _TRANSFORMER(d=16, layers=1, batch=2, seq=4)
        wl.name = "tiny_tf"
        return wl

    monkeypatch.setattr(bench, "mlp_workload", mlp)
    monkeypatch.setattr(bench, "transformer_workload", transformer)
    return list(bench._variants(mlp()))


def test_bench_plain_progress_lines_when_not_a_terminal(tiny_bench, capsys):
    assert main(["bench", "--quick"]) == 0
    cap = capsys.readouterr()
    err = cap.err.splitlines()
    assert "\x1b[" not in cap.err and "bench:" not in cap.out  # report alone on stdout
    assert "tiny_mlp" in cap.out and "tiny_tf" in cap.out and "x bare AdamW" in cap.out
    total = len(tiny_bench) + 15  # quick: 15 rounds
    for wl in ("tiny_mlp", "tiny_tf"):
        assert f"bench: {wl}" in err
        for i, variant in enumerate(tiny_bench):  # every variant's warm-up, in order
            assert f"bench: {wl}: warmup {variant} ({i}/{total})" in err
        rounds = [ln for ln in err if ln.startswith(f"bench: {wl}: round ")]
        assert 2 <= len(rounds) <= 6 and rounds[-1].startswith(f"bench: {wl}: round 15/15")
        assert err.index(f"bench: {wl}: done ({total}/{total})") > err.index(rounds[-1])


def test_bench_rich_progress_on_a_terminal(tiny_bench, capsys, monkeypatch):
    pytest.importorskip("rich")
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert main(["bench", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "\x1b[" in out  # a live rich display, not plain lines
    assert "bench: tiny_mlp" not in out
    total = len(tiny_bench) + 15
    for wl in ("tiny_mlp", "tiny_tf"):
        assert f"{wl}: done" in out and f"{total}/{total}" in out
    assert "x bare AdamW" in out
