"""Step-time overhead of gradguard against a bare optimizer step, measured in one process.

Each variant runs the full training step (forward, backward, clipping/guard, optimizer
step, zero_grad) on its own copy of the same model. Variants are interleaved round-robin so
that machine drift hits them alike; the figure for a variant is the median over rounds of
its mean step time in that round, reported as a ratio to bare AdamW.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import nn

from ..clipping import NormClip, ZClip
from ..guard import Guard
from ..recovery import Recovery

#: One full training step; returns the CPU time of this thread spent after the backward
#: (clip or guard, optimizer step, zero_grad): the only part the variants differ in.
StepFn = Callable[[], float]
#: ``progress(workload, stage, done, total)``: called between timed steps, never inside
#: one; ``stage`` is ``"warmup <variant>"`` or ``"round i/n"``, ``done`` counts finished
#: units out of ``total`` (one per variant warm-up plus one per round) for that workload.
ProgressFn = Callable[[str, str, int, int], None]


@dataclass
class Workload:
    name: str
    model: nn.Module
    batch: tuple[torch.Tensor, torch.Tensor]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def mlp_workload(width: int = 1024, depth: int = 6, batch: int = 256) -> Workload:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, 10))
    x = torch.randn(batch, width)
    y = torch.randint(0, 10, (batch,))
    return Workload(f"mlp_{depth}x{width}_b{batch}", nn.Sequential(*layers), (x, y), nn.functional.cross_entropy)


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 512, d: int = 256, layers: int = 4, heads: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.emb(tokens)))


def transformer_workload(d: int = 256, layers: int = 4, batch: int = 16, seq: int = 64) -> Workload:
    torch.manual_seed(0)
    model = TinyTransformer(d=d, layers=layers)
    x = torch.randint(0, 512, (batch, seq))
    y = torch.randint(0, 512, (batch, seq))

    def loss_fn(out: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), tgt.reshape(-1))

    return Workload(f"transformer_{layers}x{d}_b{batch}_s{seq}", model, (x, y), loss_fn)


def _variants(wl: Workload) -> dict[str, StepFn]:
    """Build one step function per variant, each on its own copy of the model."""
    x, y = wl.batch
    out: dict[str, StepFn] = {}

    def make(name: str, fused: bool, after_backward: Callable[[nn.Module, torch.optim.Optimizer], Callable[[torch.Tensor], None]]) -> None:
        model = copy.deepcopy(wl.model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
        finish = after_backward(model, opt)

        def step() -> float:
            loss = wl.loss_fn(model(x), y)
            loss.backward()
            t0 = time.thread_time()
            finish(loss)
            opt.zero_grad(set_to_none=True)
            return time.thread_time() - t0

        out[name] = step

    def bare(model: nn.Module, opt: torch.optim.Optimizer) -> Callable[[torch.Tensor], None]:
        return lambda loss: opt.step()

    def clip_norm(model: nn.Module, opt: torch.optim.Optimizer) -> Callable[[torch.Tensor], None]:
        params = list(model.parameters())

        def f(loss: torch.Tensor) -> None:
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
            opt.step()

        return f

    def guard_with(
        policy: Callable[[], Any], every: int = 50, recovery: bool = False
    ) -> Callable[[nn.Module, torch.optim.Optimizer], Callable[[torch.Tensor], None]]:
        def build(model: nn.Module, opt: torch.optim.Optimizer) -> Callable[[torch.Tensor], None]:
            guard = Guard(model, opt, clip=policy(), every=every,
                          recovery=Recovery() if recovery else None)
            return lambda loss: guard.step(loss)  # type: ignore[return-value]

        return build

    make("adamw", False, bare)
    make("adamw+clip_grad_norm_", False, clip_norm)
    make("adamw+Guard(NormClip)", False, guard_with(lambda: NormClip(1.0)))
    make("adamw+Guard(ZClip)", False, guard_with(ZClip))
    make("adamw+Guard(ZClip)+Recovery", False, guard_with(ZClip, recovery=True))
    # the cadence while the ladder is at work: a flush every ten steps
    make("adamw+Guard(ZClip)+Recovery,every=10", False, guard_with(ZClip, every=10, recovery=True))
    make("adamw_fused", True, bare)
    make("adamw_fused+clip_grad_norm_", True, clip_norm)
    make("adamw_fused+Guard(ZClip)", True, guard_with(ZClip))
    make("adamw_fused+Guard(ZClip)+Recovery", True, guard_with(ZClip, recovery=True))

    if importlib.util.find_spec("zclip") is not None:
        from zclip import ZClip as PeerZClip  # type: ignore[import-not-found]

        def peer_zclip(model: nn.Module, opt: torch.optim.Optimizer) -> Callable[[torch.Tensor], None]:
            z = PeerZClip(max_grad_norm=None)

            def f(loss: torch.Tensor) -> None:
                z.step(model)
                opt.step()

            return f

        make("adamw+zclip(pkg)", False, peer_zclip)
    if importlib.util.find_spec("autoclip") is not None:
        from autoclip.torch import QuantileClip  # type: ignore[import-not-found]

        def peer_autoclip(model: nn.Module, opt: torch.optim.Optimizer) -> Callable[[torch.Tensor], None]:
            c = QuantileClip(model.parameters(), quantile=0.1, history_length=1000, global_threshold=True)

            def f(loss: torch.Tensor) -> None:
                c.step()
                opt.step()

            return f

        make("adamw+autoclip(pkg)", False, peer_autoclip)
    return out


def measure(
    wl: Workload, *, rounds: int = 40, warmup: int = 3, seed: int = 0, progress: ProgressFn | None = None
) -> dict[str, Any]:
    """Time every variant on one workload; return seconds per step and ratios.

    Each round runs one step of every variant in a fresh random order, so drift and
    position effects hit all variants alike; a variant's figure is its median step time.
    ``progress`` (see :data:`ProgressFn`) is called before each variant's warm-up, before
    each round and once at the end, always outside the timed region.
    """
    variants = _variants(wl)
    total = len(variants) + rounds
    for i, (vname, fn) in enumerate(variants.items()):
        if progress is not None:
            progress(wl.name, f"warmup {vname}", i, total)
        for _ in range(warmup):
            fn()
    rng = random.Random(seed)
    names = list(variants)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(rounds):
        if progress is not None:
            progress(wl.name, f"round {r + 1}/{rounds}", len(variants) + r, total)
        rng.shuffle(names)
        for name in names:
            fn = variants[name]
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    if progress is not None:
        progress(wl.name, "done", total, total)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["adamw"]
    return {
        "workload": wl.name,
        "params": sum(p.numel() for p in wl.model.parameters()),
        "seconds_per_step": med,
        "ratio_to_adamw": {k: v / base for k, v in med.items()},
        "ratio_to_same_optimizer_with_clip_grad_norm": {
            k: v / med["adamw_fused+clip_grad_norm_" if "fused" in k else "adamw+clip_grad_norm_"]
            for k, v in med.items()
            if "Guard" in k or "(pkg)" in k
        },
        "ratio_to_same_bare_optimizer": {
            k: v / med["adamw_fused" if "fused" in k else "adamw"] for k, v in med.items()
        },
        "rounds": rounds,
    }


def run(
    *, quick: bool = False, out: str | Path | None = None, threads: int = 1, progress: ProgressFn | None = None
) -> dict[str, Any]:
    """Run the overhead benchmark; write JSON to ``out`` when given.

    ``progress`` is passed to :func:`measure` for each workload.

    Example:
        >>> from gradguard.cli.bench import run
        >>> res = run(quick=True)   # doctest: +SKIP
    """
    torch.set_num_threads(threads)
    if quick:
        workloads = [mlp_workload(width=256, depth=4, batch=64), transformer_workload(d=64, layers=2, batch=4, seq=32)]
        kw = {"rounds": 15, "warmup": 2}
    else:
        workloads = [mlp_workload(), transformer_workload()]
        kw = {"rounds": 41, "warmup": 3}
    results = [measure(wl, **kw, progress=progress) for wl in workloads]
    report = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": threads,
        "machine": platform.machine(),
        "quick": quick,
        "method": "median step time (fwd+bwd+clip/guard+step+zero_grad) over rounds; each round runs one step of every variant in random order",
        "results": results,
    }
    if out is not None:
        p = Path(out)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(report, indent=2))
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = []
    for r in report["results"]:
        lines.append(f"{r['workload']}  ({r['params'] / 1e6:.1f}M params)")
        for k, v in r["ratio_to_adamw"].items():
            ms = r["seconds_per_step"][k] * 1e3
            same = r["ratio_to_same_bare_optimizer"][k]
            lines.append(f"  {k:<30} {ms:8.2f} ms/step  {v:6.3f}x bare AdamW  {same:6.3f}x same optimizer bare")
    return "\n".join(lines) if lines else "no results"


# ---- the subcommand ----------------------------------------------------------------
def register(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="measure gradguard's step-time overhead against bare AdamW",
        description=(
            "Time a full training step (MLP 6x1024 and a 4-layer d=256 transformer, 1 thread) "
            "for bare AdamW, AdamW + clip_grad_norm_, and AdamW under gradguard's Guard, "
            "interleaved in one process; print ratios and optionally write JSON. Takes "
            "minutes (seconds with --quick): progress per workload and variant is shown as a "
            "rich bar on a terminal, as plain lines on stderr otherwise.\n\n"
            "Exit codes: 0 measured, 2 usage error."
        ),
        epilog="example:  gradguard bench --quick --out overhead.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="small models, few repeats (seconds)")
    p.add_argument("--out", default=None, help="write the results as JSON to this file")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    p.set_defaults(func=command)




@contextmanager
def progress_display(terminal: bool, file: TextIO | None = None) -> Iterator[ProgressFn]:
    """Yield a ``progress(workload, stage, done, total)`` callback for :func:`gradguard.cli.bench.run`.

    On a terminal (and with ``rich`` installed): one rich progress bar per workload, with
    the variant being warmed up or the round being timed. Otherwise: plain lines on
    ``file`` (default ``sys.stderr``, so the report on stdout stays clean) for each new
    workload, each variant's warm-up, every quarter of the rounds, and the end.
    """
    rich_progress: Any = None
    if terminal:
        try:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )
        except ImportError:  # rich is optional: plain lines instead
            pass
        else:
            console = Console(file=file, force_terminal=True)
            rich_progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
            )
    if rich_progress is not None:
        tasks: dict[str, Any] = {}

        def on_rich(workload: str, stage: str, done: int, total: int) -> None:
            if workload not in tasks:
                tasks[workload] = rich_progress.add_task(workload, total=total)
            rich_progress.update(
                tasks[workload], completed=done, total=total, description=f"{workload}: {stage}"
            )

        with rich_progress:
            yield on_rich
        return

    out = file if file is not None else sys.stderr
    seen: set[str] = set()

    def on_plain(workload: str, stage: str, done: int, total: int) -> None:
        if workload not in seen:
            seen.add(workload)
            print(f"bench: {workload}", file=out, flush=True)
        if stage.startswith("round "):
            i, n = (int(v) for v in stage.split()[1].split("/"))
            if i != 1 and i % max(n // 4, 1) != 0:
                return
        print(f"bench: {workload}: {stage} ({done}/{total})", file=out, flush=True)

    yield on_plain


def command(args: argparse.Namespace) -> int:
    from . import EXIT_OK, UsageError

    if args.threads < 1:
        raise UsageError(f"--threads {args.threads}: must be >= 1")
    with progress_display(sys.stdout.isatty()) as progress:
        report = run(quick=args.quick, out=args.out, threads=args.threads, progress=progress)
    print(format_report(report))
    return EXIT_OK
