"""``gradguard demo``: the same unstable training run, unguarded and guarded.

A 6-layer ReLU MLP trained with SGD + momentum on a synthetic regression task meets the
faults of a real run: batches whose inputs are blown up by :data:`SPIKE_SCALE` (a bad
shard, an unnormalised feature) and one batch with a NaN feature. Unguarded, the first
corrupted batch drives the weights to Inf/NaN and the run is lost. Guarded by
``Guard(clip=ZClip(), recovery=Recovery())`` the spiking steps and the NaN steps are
skipped at the step, the recovery ladder reacts, and training reaches the same loss as a
clean run.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..clipping import ZClip
from ..events import read_jsonl
from ..guard import Guard, TrainingDiverged
from ..recovery import Recovery
from ..sinks import JsonlSink

#: A corrupted batch has its inputs scaled by this factor.
SPIKE_SCALE = 1e4
BATCH = 64
#: Consecutive NaN batches in the corrupted shard.
NAN_SHARD = 4
LR = 0.05


@dataclass
class RunSummary:
    """What happened in one demo run.

    Attributes:
        name: ``"unguarded"`` or ``"guarded"``.
        final_loss: loss of the final model on the whole (clean) data set.
        first_nan_step: first step whose loss was NaN/Inf, or None.
        skips: optimizer steps skipped by the guard.
        clipped_steps: steps whose gradients were clipped.
        rollbacks, lr_backoffs: recovery actions taken.
        weights_finite: every parameter finite at the end.
        aborted: the recovery ladder raised ``TrainingDiverged``.
        events: event messages, in order.
    """

    name: str
    final_loss: float
    first_nan_step: int | None
    skips: int = 0
    clipped_steps: int = 0
    rollbacks: int = 0
    lr_backoffs: int = 0
    weights_finite: bool = True
    aborted: bool = False
    events: list[str] = field(default_factory=list)

    @property
    def broke(self) -> bool:
        """The run ended with non-finite weights or loss, or the guard aborted it."""
        return self.aborted or not self.weights_finite or not math.isfinite(self.final_loss)


def make_data(seed: int, n: int = 2048, d: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, 1, generator=g) / math.sqrt(d)
    y = torch.tanh(x @ w) + 0.05 * torch.randn(n, 1, generator=g)
    return x, y


def make_model(seed: int, d: int = 32, width: int = 128, depth: int = 6) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    dim = d
    for _ in range(depth):
        layers += [nn.Linear(dim, width), nn.ReLU()]
        dim = width
    layers.append(nn.Linear(dim, 1))
    return nn.Sequential(*layers)


def fault_schedule(steps: int) -> dict[int, str]:
    """Which step gets which fault: ``"spike"`` (inputs scaled by :data:`SPIKE_SCALE`) or
    ``"nan"`` (a NaN feature). A corrupted shard of :data:`NAN_SHARD` consecutive NaN
    batches sits in the middle: more than one skip can absorb, so the ladder acts."""
    faults = {steps // 4: "spike", 3 * steps // 4: "spike"}
    faults.update({steps // 2 + i: "nan" for i in range(NAN_SHARD)})
    return faults


def train(
    *,
    guarded: bool,
    steps: int,
    seed: int,
    out: Path | None,
    faults: dict[int, str],
    on_step: Callable[[], None] | None = None,
) -> RunSummary:
    """Train once; ``on_step`` is called after every step (progress display)."""
    x, y = make_data(seed)
    model = make_model(seed)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    guard = None
    if guarded:
        sinks: list[Any] = [JsonlSink(out)] if out is not None else []
        guard = Guard(
            model, opt, clip=ZClip(), recovery=Recovery(), every=25, sinks=sinks,
            watch_activations=True,  # names the first non-finite forward output
        )
    g = torch.Generator().manual_seed(seed + 1)
    # one flag per step, kept on the device and read once at the end
    nonfinite = torch.zeros(steps, dtype=torch.bool)
    aborted = False
    try:
        for step in range(steps):
            idx = torch.randint(0, x.shape[0], (BATCH,), generator=g)
            xb, yb = x[idx], y[idx]
            fault = faults.get(step)
            if fault == "spike":
                xb = xb * SPIKE_SCALE
            elif fault == "nan":
                xb = xb.clone()
                xb[0, 0] = math.nan
            loss = nn.functional.mse_loss(model(xb), yb)
            loss.backward()
            nonfinite[step] = ~torch.isfinite(loss.detach())
            if guard is not None:
                guard.step(loss)
            else:
                opt.step()
            opt.zero_grad()
            if on_step is not None:
                on_step()
    except TrainingDiverged:  # the ladder gave up: report it as a broken run
        aborted = True
    with torch.no_grad():
        final = nn.functional.mse_loss(model(x), y).item()
        weights_finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    bad = nonfinite.nonzero().flatten().tolist()
    first_nan = bad[0] if bad else None
    summary = RunSummary("guarded" if guarded else "unguarded", final, first_nan)
    summary.weights_finite = weights_finite
    summary.aborted = aborted
    if guard is None:
        return summary
    guard.close()
    kinds = Counter(e.kind for e in guard.events)
    summary.skips = guard.skipped_steps
    summary.rollbacks = kinds.get("rollback", 0)
    summary.lr_backoffs = kinds.get("lr_backoff", 0)
    summary.events = [e.message for e in guard.events]
    if out is not None:
        summary.clipped_steps = sum(
            1
            for r in read_jsonl(out / "metrics.jsonl")
            if r["type"] == "step" and r["clip_coef"] is not None and r["clip_coef"] < 1.0
            and not r.get("skipped")  # a skipped step took no clipped update
        )
    return summary


#: What the demo writes into its directory (and replaces there).
DEMO_FILES = ("events.jsonl", "metrics.jsonl", "report.html", "guard.json")
#: The file that marks a directory as the demo's: its files may be replaced.
DEMO_MARK = "demo.json"


def run_demo(
    *,
    out: str | Path = "runs/demo",
    steps: int = 400,
    seed: int = 0,
    progress: Callable[[str, int], Callable[[], None]] | None = None,
) -> tuple[RunSummary, RunSummary]:
    """Train the same model twice on data with corrupted batches; return both summaries.

    The guarded run's JSONL files go to ``out`` (previous ones are replaced); a directory
    that holds any other file (another run's) is refused with a ValueError.
    ``progress(name, total)`` may return a per-step callback.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 40:
        raise ValueError(f"run_demo(steps={steps!r}): must be an int >= 40")
    out = Path(out)
    other = sorted(p.name for p in out.iterdir() if p.name not in (*DEMO_FILES, DEMO_MARK)) \
        if out.is_dir() else []
    legacy = out == Path("runs/demo")  # the default: the demo's, marked or not (older ones)
    if not other and out.is_dir() and not (out / DEMO_MARK).is_file() and not legacy:
        # the demo's own file names, but not written by the demo: a run of the README's
        # loop (JsonlSink) writes the same three (found by a stranger)
        other = [f for f in DEMO_FILES if (out / f).is_file()
                 and f not in ("report.html", "guard.json")]
    if other:
        # found by a stranger: a run directory given as --out lost its metrics, events and
        # report without a word, and kept its run.json and guard state beside the demo's
        raise ValueError(
            f"run_demo(out={str(out)!r}): the directory holds files the demo did not write "
            f"({', '.join(other[:5])}{', ...' if len(other) > 5 else ''}): another run's; give "
            f"the demo a directory of its own (it replaces only the files it wrote, marked by "
            f"its {DEMO_MARK})")
    out.mkdir(parents=True, exist_ok=True)
    for f in DEMO_FILES:
        (out / f).unlink(missing_ok=True)
    (out / DEMO_MARK).write_text(json.dumps({"demo": True, "steps": steps, "seed": seed}) + "\n")
    faults = fault_schedule(steps)

    def cb(name: str) -> Callable[[], None] | None:
        return progress(name, steps) if progress is not None else None

    a = train(guarded=False, steps=steps, seed=seed, out=None, faults=faults, on_step=cb("unguarded"))
    b = train(guarded=True, steps=steps, seed=seed, out=out, faults=faults, on_step=cb("guarded"))
    return a, b


def _fmt(x: float) -> str:
    return f"{x:.4g}" if math.isfinite(x) else str(x)


def summary_rows(a: RunSummary, b: RunSummary) -> list[tuple[str, str, str]]:
    """The side-by-side table: (what, unguarded, guarded)."""
    return [
        ("final loss (clean data)", _fmt(a.final_loss), _fmt(b.final_loss)),
        ("weights finite at the end", str(a.weights_finite), str(b.weights_finite)),
        ("first NaN step (loss)", str(a.first_nan_step), str(b.first_nan_step)),
        ("skipped steps", "-", str(b.skips)),
        ("clipped steps", "-", str(b.clipped_steps)),
        ("LR back-offs", "-", str(b.lr_backoffs)),
        ("rollbacks", "-", str(b.rollbacks)),
        ("outcome", "BROKE" if a.broke else "ok", "BROKE" if b.broke else "recovered"),
    ]


def format_summary(a: RunSummary, b: RunSummary, out: str | Path) -> str:
    """Plain-text side-by-side summary (used when stdout is not a terminal)."""
    rows = [("", "unguarded", "guarded (ZClip + Recovery)"), *summary_rows(a, b)]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [f"{r[0]:<{w0}}  {r[1]:<{w1}}  {r[2]}" for r in rows]
    lines.append(f"run directory: {Path(out).resolve()}")
    return "\n".join(lines)


def rich_summary(a: RunSummary, b: RunSummary) -> Any:
    """The same summary as a ``rich`` table."""
    from rich.table import Table

    t = Table(title="gradguard demo: the same unstable run, twice")
    t.add_column("")
    t.add_column("unguarded", justify="right")
    t.add_column("guarded (ZClip + Recovery)", justify="right")
    for what, u, gd in summary_rows(a, b):
        t.add_row(
            what,
            f"[red]{u}[/]" if u in ("BROKE", "nan", "inf", "False") else u,
            f"[green]{gd}[/]" if gd == "recovered" else gd,
        )
    return t


# ---- the subcommand ----------------------------------------------------------------
def register(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="train an unstable model unguarded and guarded, compare, write a report",
        description=(
            "Train the same 6-layer MLP twice on data with corrupted batches (inputs blown "
            "up by 1e4, one NaN feature): once unguarded (it diverges to NaN), once under "
            "Guard(clip=ZClip(), recovery=Recovery()) (it recovers). Prints a side-by-side "
            "summary, writes the guarded run's JSONL files and an HTML report to --out, and "
            "prints the report's path. Takes seconds on a CPU; downloads nothing.\n\n"
            "Exit codes: 0 the unguarded run broke and the guarded one recovered, "
            "1 otherwise, 2 usage error."
        ),
        epilog="example:  gradguard demo --out runs/demo --steps 400 --seed 0",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    p.add_argument("--steps", type=int, default=400, help="training steps per run (default: 400)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.set_defaults(func=command)


def _progress() -> tuple[AbstractContextManager[Any], Callable[[str, int], Callable[[], None]] | None]:
    """A rich progress bar on a terminal (stderr); nothing otherwise."""
    if not sys.stderr.isatty():
        return nullcontext(), None
    try:
        from rich.progress import Progress
    except ImportError:
        return nullcontext(), None
    bar = Progress(transient=True)

    def start(name: str, total: int) -> Callable[[], None]:
        task = bar.add_task(f"training {name}", total=total)
        return lambda: bar.advance(task)

    return bar, start


def command(args: argparse.Namespace) -> int:
    from . import EXIT_FINDINGS, EXIT_OK, UsageError

    if args.steps < 40:
        raise UsageError(f"--steps {args.steps}: must be >= 40 so the corrupted batches land")
    from ..rundir import dir_problem

    if (problem := dir_problem(args.out)) is not None:
        # found by a stranger: --out naming a file ended in a FileExistsError traceback
        raise UsageError(f"--out {args.out}: {problem}")
    ctx, progress = _progress()
    with ctx:
        try:
            a, b = run_demo(out=args.out, steps=args.steps, seed=args.seed, progress=progress)
        except ValueError as e:  # --out holds another run's files
            raise UsageError(f"--out {args.out}: {str(e).split(': ', 1)[1]}") from None
    if sys.stdout.isatty():
        try:
            from rich.console import Console

            Console().print(rich_summary(a, b))
        except ImportError:
            print(format_summary(a, b, args.out))
    else:
        print(format_summary(a, b, args.out))
    try:
        from ..report import report
        from ..report._data import load_run
        from ..report._summary import summary_sentence

        path = report(args.out, Path(args.out) / "report.html")
        sentence = re.sub(r"`([^`]+)`", r"layer '\1'", summary_sentence(load_run(args.out)))
        print(f"guarded run: {sentence}")
        print(f"report: {path.resolve()}")
    except ImportError as e:
        print(f"gradguard demo: no HTML report: {e}", file=sys.stderr)
    return EXIT_OK if (a.broke and not b.broke) else EXIT_FINDINGS
