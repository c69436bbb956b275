"""Load a run directory into arrays, downsample them, and say in one sentence what happened."""

from __future__ import annotations

import json
import math
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..events import SCHEMA_VERSION, read_jsonl

#: Line plots keep at most this many points: the min and the max of each bucket of steps,
#: so a one-step spike survives any amount of downsampling.
MAX_LINE_POINTS = 4000
#: The heatmap keeps at most this many columns (flushes) and rows (layers); columns and
#: rows are merged by taking the max, so a hot column or a hot layer is never averaged away.
MAX_HEATMAP_COLS = 1000
MAX_HEATMAP_ROWS = 500
#: Events shown in the table (all are counted in the summary).
MAX_EVENT_ROWS = 300

#: Event kinds that mean the gradients went wrong (vs. what gradguard did about it).
TROUBLE_KINDS = ("nonfinite_grad", "grad_spike", "loss_spike", "vanishing_grad")


class ReportError(ValueError):
    """The run directory cannot be reported on (missing, empty, corrupt, newer schema)."""


@dataclass
class RunData:
    """A run directory loaded for the report (numpy arrays; NaN where a value is missing).

    Attributes:
        run_dir: the directory.
        step, loss, grad_norm, clip_coef, skipped: per-step arrays.
        layers: layer names, input to output (module order).
        layer_step: ``[F]`` the last step of each flush window.
        layer_mean, layer_max: ``[F, L]`` per-layer gradient norm (mean / max over a window).
        events: event records (dicts, as in ``events.jsonl``).
        diagnosis: the doctor's ``diagnosis.json`` if present.
        warnings: problems that were tolerated (e.g. a truncated last line).
    """

    run_dir: Path
    step: Any
    loss: Any
    grad_norm: Any
    clip_coef: Any
    skipped: Any
    layers: list[str]
    layer_step: Any
    layer_mean: Any
    layer_max: Any
    events: list[dict[str, Any]]
    diagnosis: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def n_steps(self) -> int:
        return len(self.step)


def _read(path: Path, notes: list[str]) -> list[dict[str, Any]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            recs = read_jsonl(path)
        except ValueError as e:
            raise ReportError(str(e)) from e
        except OSError as e:
            raise ReportError(f"{path}: cannot be read: {e}") from e
    notes.extend(str(w.message) for w in caught)
    return recs


def _num(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else math.nan


def load_run(run_dir: str | os.PathLike[str]) -> RunData:
    """Read ``metrics.jsonl``, ``events.jsonl`` and (if present) ``diagnosis.json``.

    Raises:
        ReportError: the directory is missing or holds no gradguard files, or a file is
            corrupt or from a newer schema. A truncated *last* line (a killed run) is
            skipped and noted in ``RunData.warnings`` instead.

    Example:
        >>> import tempfile
        >>> try:
        ...     load_run(tempfile.mkdtemp())
        ... except ReportError as e:
        ...     print(str(e)[:30])
        no gradguard files in run_dir=
    """
    import numpy as np

    d = Path(run_dir)
    if not d.exists():
        raise ReportError(f"run_dir={str(run_dir)!r} does not exist")
    if not d.is_dir():
        raise ReportError(f"run_dir={str(run_dir)!r} is not a directory")
    mpath, epath, dpath = d / "metrics.jsonl", d / "events.jsonl", d / "diagnosis.json"
    if not mpath.exists() and not epath.exists():
        raise ReportError(
            f"no gradguard files in run_dir={str(run_dir)!r}: expected metrics.jsonl and "
            "events.jsonl (written by gg.JsonlSink)"
        )
    notes: list[str] = []
    metrics = _read(mpath, notes) if mpath.exists() else []
    events = [r for r in (_read(epath, notes) if epath.exists() else []) if r.get("type") == "event"]
    steps = [r for r in metrics if r.get("type") == "step"]
    if not steps:
        raise ReportError(f"{mpath}: no step records; nothing to report")
    steps.sort(key=lambda r: r["step"])
    step = np.array([r["step"] for r in steps], dtype=np.int64)
    cols = {k: np.array([_num(r.get(k)) for r in steps]) for k in ("loss", "grad_norm", "clip_coef")}
    skipped = np.array([bool(r.get("skipped")) for r in steps])

    lay = [r for r in metrics if r.get("type") == "layers"]
    names: list[str] = []
    index: dict[str, int] = {}
    for r in lay:
        for n in r["layers"]:
            if n not in index:
                index[n] = len(names)
                names.append(n)
    mean = np.full((len(lay), len(names)), np.nan)
    mx = np.full((len(lay), len(names)), np.nan)
    for i, r in enumerate(lay):
        idx = [index[n] for n in r["layers"]]
        mean[i, idx] = [_num(x) for x in r["grad_norm"]]
        mx[i, idx] = [_num(x) for x in r.get("grad_norm_max", r["grad_norm"])]
    layer_step = np.array([r["step"] for r in lay], dtype=np.int64)

    diagnosis = None
    if dpath.exists():
        try:
            diagnosis = json.loads(dpath.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ReportError(f"{dpath}: corrupt JSON: {e}") from e
        if not isinstance(diagnosis, dict) or not isinstance(diagnosis.get("findings", []), list):
            raise ReportError(f"{dpath}: expected an object with a 'findings' list")
        v = diagnosis.get("v", SCHEMA_VERSION)
        if isinstance(v, int) and v > SCHEMA_VERSION:
            raise ReportError(
                f"{dpath}: schema version {v} is newer than this gradguard understands "
                f"({SCHEMA_VERSION}); upgrade gradguard"
            )
    events.sort(key=lambda e: e.get("step", 0))
    return RunData(
        d, step, cols["loss"], cols["grad_norm"], cols["clip_coef"], skipped,
        names, layer_step, mean, mx, events, diagnosis, notes,
    )


def minmax_downsample(x: Any, y: Any, max_points: int = MAX_LINE_POINTS) -> tuple[Any, Any]:
    """Keep the min and max of each bucket of consecutive points (NaNs ignored).

    Example:
        >>> import numpy as np
        >>> x, y = minmax_downsample(np.arange(10), np.array([0, 9, 1, 1, 1, 1, 1, 1, 1, -5.0]), 4)
        >>> y.tolist()
        [0.0, 9.0, 1.0, -5.0]
    """
    import numpy as np

    n = len(y)
    if n <= max_points:
        return np.asarray(x), np.asarray(y, dtype=np.float64)
    buckets = max(max_points // 2, 1)
    k = -(-n // buckets)
    pad = buckets * k - n
    yy = np.concatenate([np.asarray(y, dtype=np.float64), np.full(pad, np.nan)]).reshape(buckets, k)
    allnan = np.isnan(yy).all(axis=1)
    lo = np.argmin(np.where(np.isnan(yy), np.inf, yy), axis=1)
    hi = np.argmax(np.where(np.isnan(yy), -np.inf, yy), axis=1)
    base = np.arange(buckets) * k
    keep = np.unique(np.concatenate([(base + lo)[~allnan], (base + hi)[~allnan]]))
    keep = keep[keep < n]
    return np.asarray(x)[keep], yy.reshape(-1)[keep]


def max_pool(a: Any, max_rows: int, max_cols: int) -> tuple[Any, int, int]:
    """Shrink a 2-D array to at most ``max_rows x max_cols`` by taking the max of blocks
    (NaN-aware). Returns the array and the block sizes (rows, cols)."""
    import numpy as np

    r, c = a.shape
    kr, kc = max(1, -(-r // max_rows)), max(1, -(-c // max_cols))
    if kr == 1 and kc == 1:
        return a, 1, 1
    pr, pc = (-r) % kr, (-c) % kc
    b = np.pad(a, ((0, pr), (0, pc)), constant_values=np.nan)
    b = b.reshape(b.shape[0] // kr, kr, b.shape[1] // kc, kc)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN blocks stay NaN
        return np.nanmax(b, axis=(1, 3)), kr, kc


def _nonfinite_kind(e: dict[str, Any]) -> str:
    msg = e.get("message") or ""
    return "Inf" if " Inf" in msg else "NaN"


def _where(e: dict[str, Any]) -> str:
    layer = e.get("layer")
    if not layer:
        return ""
    special = {"(loss)": " in the loss", "(input)": " in the input batch"}
    return special.get(layer, f" in `{layer}`")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def summary_sentence(data: RunData) -> str:
    """One or two sentences: what went wrong, what gradguard did, how it ended.

    Layer names are wrapped in backticks (rendered as code in the HTML).
    """
    import numpy as np

    ev = data.events
    trouble = [e for e in ev if e.get("kind") in TROUBLE_KINDS]
    n_skip = int(data.skipped.sum())
    finite_norm = data.grad_norm[np.isfinite(data.grad_norm)]
    clipped = int(np.sum(np.isfinite(data.clip_coef) & (data.clip_coef < 1.0)))
    kinds = Counter(e.get("kind") for e in ev)
    parts: list[str] = []
    if trouble:
        e = trouble[0]
        k, s = e["kind"], e["step"]
        if k == "nonfinite_grad":
            parts.append(f"Gradients exploded at step {s}{_where(e)} ({_nonfinite_kind(e)}).")
        elif k == "grad_spike":
            parts.append(f"The gradient norm spiked at step {s}{_where(e)}.")
        elif k == "loss_spike":
            parts.append(f"The loss spiked at step {s}.")
        else:
            parts.append(f"Gradients vanished{_where(e)} from step {s}.")
        nonfinite = [x for x in ev if x.get("kind") == "nonfinite_grad"]
        n_bad = len({x["step"] for x in nonfinite})
        if nonfinite and k != "nonfinite_grad":
            x = nonfinite[0]
            parts.append(
                f"Gradients became {_nonfinite_kind(x)} at step {x['step']}{_where(x)}"
                f" ({_plural(n_bad, 'non-finite step')} in all)."
            )
        elif n_bad > 1:
            parts[-1] = parts[-1][:-1] + f"; {_plural(n_bad, 'non-finite step')} in all."
    else:
        lo = float(finite_norm.min()) if finite_norm.size else math.nan
        hi = float(finite_norm.max()) if finite_norm.size else math.nan
        parts.append(
            f"No gradient trouble in {data.n_steps} steps: the gradient norm stayed between "
            f"{lo:.3g} and {hi:.3g}."
        )
    risk = [e for e in ev if e.get("kind") == "divergence_risk"]
    if risk:  # the early warning, and how long before the trouble it came
        r, signal = risk[0], (risk[0].get("data") or {}).get("signal")
        text = f"gradguard warned of a divergence risk at step {r['step']}"
        text += f" ({str(signal).replace('_', ' ')})" if signal else ""
        later = [e["step"] for e in trouble if e["step"] > r["step"]]
        parts.insert(1, text + (f", {later[0] - r['step']} steps before." if later else "."))
    actions: list[str] = []
    if n_skip:
        actions.append(f"skipped {_plural(n_skip, 'step')}")
    if clipped:
        actions.append(f"clipped {_plural(clipped, 'step')}")
    backoffs = [e for e in ev if e.get("kind") == "lr_backoff"]
    if backoffs:
        factor = (backoffs[-1].get("data") or {}).get("factor")
        if len(backoffs) == 1 and factor == 0.5:
            actions.append("halved the LR")
        elif isinstance(factor, (int, float)):
            times = "" if len(backoffs) == 1 else f" ({len(backoffs)} back-offs)"
            actions.append(f"cut the LR to x{factor:g}{times}")
        else:
            actions.append(f"backed off the LR {_plural(len(backoffs), 'time')}")
    if kinds.get("rollback"):
        actions.append(f"rolled back {_plural(kinds['rollback'], 'time')}")
    aborts = [e for e in ev if e.get("kind") == "abort"]
    tail = data.grad_norm[-max(1, data.n_steps // 10) :]
    tail_loss = data.loss[-max(1, data.n_steps // 10) :]
    if aborts:
        outcome = f"training was stopped at step {aborts[0]['step']}"
    elif not (trouble or n_skip):
        outcome = ""
    elif np.isfinite(tail).all() and (
        np.isfinite(tail_loss).all() or not np.isfinite(data.loss).any()  # loss not logged
    ):
        outcome = "training recovered"
    else:
        outcome = "training did not recover (the last steps are still non-finite)"
    if actions:
        text = "gradguard " + ", ".join(actions[:-1]) + (" and " if len(actions) > 1 else "")
        text += actions[-1] + (f"; {outcome}." if outcome else ".")
        parts.append(text)
    elif outcome:
        parts.append(outcome[0].upper() + outcome[1:] + ".")
    return " ".join(parts)
