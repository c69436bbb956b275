"""``gradguard lab``: the classic experiments about exploding and vanishing gradients,
reproduced on CPU with gradguard's own telemetry.

Each experiment ``T0`` .. ``T11`` lives in its own module and returns a :class:`Result`:
measured figures next to reference figures, one pass/fail :class:`Claim` per claim (with a
margin), and, for the failing configurations, what gradguard's default guard made of them.
:func:`run` writes ``OUT/<ID>/result.json`` and the PNG plots (matplotlib, Agg).

``fast=True`` runs each experiment with few steps / small models (the test suite uses it);
the claims are the same, some reference figures only apply to the full mode.

Example:
    >>> import gradguard as gg
    >>> sorted(gg.lab.EXPERIMENTS)[:3]
    ['T0', 'T1', 'T10']
    >>> gg.lab.title("T0")
    'The 20-layer, one-neuron-per-layer network'
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from ._common import Claim, Result

#: Experiment id -> (module, title).
EXPERIMENTS: dict[str, tuple[str, str]] = {
    "T0": ("t00_one_neuron", "The 20-layer, one-neuron-per-layer network"),
    "T1": ("t01_he_xavier", "He vs Xavier initialisation for a deep ReLU network"),
    "T2": ("t02_glorot", "Glorot's variance argument (5 x 1000 tanh / sigmoid)"),
    "T3": ("t03_irnn_clip", "IRNN on the adding problem: explosion and norm clipping"),
    "T4": ("t04_lstm_rnn", "LSTM vs vanilla RNN on the adding problem"),
    "T5": ("t05_spikes", "Gradient spikes: unprotected vs fixed clip, AutoClip, ZClip, skip"),
    "T6": ("t06_qk_layernorm", "Tiny transformer LR sensitivity with and without qk-LayerNorm"),
    "T7": ("t07_batchnorm", "Batch normalisation at a high learning rate"),
    "T8": ("t08_residual", "Residual connections in a 50-layer MLP"),
    "T9": ("t09_l2", "L2 regularisation and weight growth"),
    "T10": ("t10_early_stopping", "Early stopping on the validation loss"),
    "T11": ("t11_leaky_relu", "Leaky ReLU vs ReLU: dead units after a high-LR phase"),
}

ORDER: tuple[str, ...] = tuple(sorted(EXPERIMENTS, key=lambda k: int(k[1:])))

#: Where results go by default.
DEFAULT_OUT = "lab_results"


def _canonical(id: str) -> str:
    key = str(id).strip().upper()
    if key.isdigit():
        key = "T" + key
    if key not in EXPERIMENTS:
        raise ValueError(
            f"lab experiment id={id!r} is not known; allowed: {', '.join(ORDER)} (or 'all')"
        )
    return key


def title(id: str) -> str:
    """The title of experiment ``id``."""
    return EXPERIMENTS[_canonical(id)][1]


def run(id: str, out: str | os.PathLike[str] = DEFAULT_OUT, fast: bool = False) -> Result:
    """Run one experiment and write ``out/<ID>/result.json`` and its plots.

    Args:
        id: ``"T0"`` .. ``"T11"`` (``"0"``/``"t3"`` work too); see :data:`EXPERIMENTS`.
        out: the results folder.
        fast: few steps / small models (seconds instead of a minute); same claims.

    Returns:
        the :class:`Result` (``result.passed`` is True when every claim held).

    Raises:
        ValueError: for an unknown ``id`` (``"all"`` is :func:`run_all`).
    """
    if str(id).strip().lower() == "all":
        raise ValueError("lab.run(id='all'): use gradguard.lab.run_all() for every experiment")
    key = _canonical(id)
    mod = importlib.import_module(f"{__name__}.{EXPERIMENTS[key][0]}")
    folder = Path(out) / key
    torch.manual_seed(0)
    from ._common import Timer

    timer = Timer()
    result: Result = mod.run(folder, fast=bool(fast))
    result.seconds = round(timer(), 2)
    result.write(folder)
    return result


def run_all(
    out: str | os.PathLike[str] = DEFAULT_OUT,
    fast: bool = False,
    ids: Iterable[str] | None = None,
    progress: Callable[[str, Result | None], None] | None = None,
) -> list[Result]:
    """Run every experiment (or ``ids``) in order; ``progress(id, result)`` is called
    before (``result=None``) and after each one. Also writes ``out/summary.md``."""
    keys = [_canonical(i) for i in ids] if ids is not None else list(ORDER)
    results = []
    for key in keys:
        if progress is not None:
            progress(key, None)
        r = run(key, out=out, fast=fast)
        results.append(r)
        if progress is not None:
            progress(key, r)
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "summary.md").write_text(summary_table(results))
    return results


def _fmt(x: object) -> str:
    if isinstance(x, float):
        return f"{x:.3g}"
    if isinstance(x, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in x.items())
    if isinstance(x, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in x) + "]"
    return "—" if x is None else str(x)


def guard_outcome(r: Result) -> str | None:
    """What the default guard did on an experiment's failing configuration, in a few words
    (None where the experiment has none): its final loss against the healthy twin's."""
    g = r.guard
    ratio = g.get("ratio_to_healthy")
    if not isinstance(ratio, (int, float)):
        return None
    if not g.get("finite", True):
        verdict = "not finite"
    elif g.get("within_2x"):
        verdict = "within 2x"
    else:
        verdict = "NOT within 2x" + ("" if g.get("fix_in_reach_of_a_guard")
                                     else " (its fix is out of a guard's reach)")
    fast = " in --fast mode (too few steps to judge a rescue: run without it)" \
        if r.fast and not g.get("within_2x") and g.get("fix_in_reach_of_a_guard") else ""
    return f"default guard {ratio:.3g}x its healthy twin, {verdict}{fast}"


def summary_table(results: Iterable[Result]) -> str:
    """A markdown table of every claim: measured vs reference and pass/fail; then what the
    default guard did on each failing configuration (:func:`guard_outcome`)."""
    results = list(results)
    lines = [
        "| exp | claim | measured | reference | criterion | pass |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        for c in r.claims:
            lines.append(
                f"| {r.id} | {c.statement} | {_fmt(c.measured)} | {_fmt(c.reference)} | "
                f"{c.criterion} | {'yes' if c.passed else '**NO**'} |"
            )
    guarded = [(r.id, text) for r in results if (text := guard_outcome(r)) is not None]
    if guarded:
        lines += ["", "The failing configurations under the default guard "
                  "(`Guard(clip=ZClip(), recovery=Recovery())`):", "",
                  "| exp | outcome |", "|---|---|"]
        lines += [f"| {i} | {text} |" for i, text in guarded]
    return "\n".join(lines) + "\n"


__all__ = [
    "DEFAULT_OUT",
    "EXPERIMENTS",
    "ORDER",
    "Claim",
    "Result",
    "guard_outcome",
    "run",
    "run_all",
    "summary_table",
    "title",
]
