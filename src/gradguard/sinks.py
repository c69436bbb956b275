"""Sinks: JSONL run directories (:class:`JsonlSink`, from :mod:`gradguard.rundir`), TensorBoard,
Weights & Biases and the console.

Every sink receives a :class:`gradguard.events.Flush` every ``Guard(every=N)`` steps and at
close, never per step. The extra each one needs (``tensorboard``, ``wandb``, ``rich``) is
imported when the sink is created, with an error that names the extra to install. A sink
that raises while training is reported once by the guard and then skipped
(:func:`gradguard.events.call_sinks`): I/O trouble never stops a run.
"""

from __future__ import annotations

import math
import os
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from .events import Event, Flush
from .rundir import (
    JsonlSink,  # re-exported: the run directory's writer lives there
    dir_arg,
)

__all__ = ["LAYERS_PER_SECTION", "ConsoleSink", "JsonlSink", "TensorBoardSink", "WandbSink",
           "layer_sections"]

#: Per-layer scalars are grouped into sections of at most this many layers, so the
#: TensorBoard / W&B UI stays usable on models with hundreds of layers.
LAYERS_PER_SECTION = 32


def _missing_extra(what: str, extra: str, err: ImportError) -> ImportError:
    return ImportError(f"{what} needs the optional extra: pip install gradguard[{extra}] ({err})")


def layer_sections(layers: Sequence[str], size: int = LAYERS_PER_SECTION) -> dict[str, str]:
    """Section name for each layer: its top-level module, split into chunks of ``size``.

    Example:
        >>> layer_sections(["enc.0", "enc.1", "head"], size=1)
        {'enc.0': 'enc[0]', 'enc.1': 'enc[1]', 'head': 'head'}
    """
    by_top: dict[str, list[str]] = defaultdict(list)
    for name in layers:
        by_top[name.split(".", 1)[0]].append(name)
    out: dict[str, str] = {}
    for top, names in by_top.items():
        if len(names) <= size:
            out.update(dict.fromkeys(names, top))
            continue
        for i, name in enumerate(names):
            out[name] = f"{top}[{i // size}]"
    return out


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _other_rank() -> bool:
    """Under torch.distributed, on a rank other than 0."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_rank() != 0


def _event_line(e: Event) -> str:
    where = f" in `{e.layer}`" if e.layer else ""
    fix = f" Remedy: {e.remedy}" if e.remedy else ""
    return f"[{e.severity}] step {e.step} {e.kind}{where}: {e.message}{fix}"



class TensorBoardSink:
    """Write gradguard telemetry as TensorBoard scalars, histograms and text.

    Scalars per step: ``gradguard/loss``, ``gradguard/grad_norm`` (pre-clip total norm),
    ``gradguard/clip_coef``, ``gradguard/skips`` (cumulative skipped steps). Per flush:
    ``grad_norm_layers.<section>/<layer>`` (mean over the window; sections of at most
    :data:`LAYERS_PER_SECTION` layers keep the UI usable on 100+ layers), a histogram
    ``gradguard/layer_grad_norms`` of the log10 per-layer norms, and every event as text
    under ``gradguard/events``.

    Args:
        log_dir: TensorBoard log directory (created if missing).
        per_layer: write per-layer scalars (the histogram is always written).
        flush_secs: passed to ``SummaryWriter``.

    Example:
        >>> import tempfile, gradguard as gg
        >>> sink = gg.TensorBoardSink(tempfile.mkdtemp())
        >>> sink.close()
    """

    def __init__(
        self, log_dir: str | os.PathLike[str], *, per_layer: bool = True, flush_secs: int = 30
    ) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise _missing_extra("TensorBoardSink", "tensorboard", e) from e
        dir_arg(log_dir, "TensorBoardSink log_dir")
        if not isinstance(flush_secs, int) or flush_secs < 1:
            raise ValueError(f"TensorBoardSink(flush_secs={flush_secs!r}): must be an int >= 1")
        self.log_dir = Path(log_dir)
        self.per_layer = per_layer
        self._flush_secs = flush_secs
        # a rank other than 0 opens its event file at its first write (see WandbSink)
        self._writer_: Any = None if _other_rank() else SummaryWriter(
            log_dir=str(self.log_dir), flush_secs=flush_secs)
        self._closed = False
        self._skips = 0
        self._sections: dict[str, str] = {}

    def write(self, flush: Flush) -> None:
        import numpy as np

        w = self._writer
        for r in flush.steps:
            s = r["step"]
            self._skips += bool(r["skipped"])
            if _finite(r["loss"]):
                w.add_scalar("gradguard/loss", r["loss"], s)
            if _finite(r["grad_norm"]):
                w.add_scalar("gradguard/grad_norm", r["grad_norm"], s)
            if _finite(r["clip_coef"]):
                w.add_scalar("gradguard/clip_coef", r["clip_coef"], s)
            w.add_scalar("gradguard/skips", self._skips, s)
        lay = flush.layers
        if lay:
            step = lay["step"]
            names, norms = lay["layers"], lay["grad_norm"]
            if self.per_layer:
                if len(self._sections) != len(names):
                    self._sections = layer_sections(names)
                for name, v in zip(names, norms):
                    if _finite(v):
                        w.add_scalar(f"grad_norm_layers.{self._sections[name]}/{name}", v, step)
            finite = np.array([v for v in norms if _finite(v) and v > 0], dtype=np.float64)
            if finite.size:
                w.add_histogram("gradguard/layer_grad_norms_log10", np.log10(finite), step)
        for e in flush.events:
            w.add_text("gradguard/events", _event_line(e), e.step)
        w.flush()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def _writer(self) -> Any:
        if self._writer_ is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer_ = SummaryWriter(log_dir=str(self.log_dir), flush_secs=self._flush_secs)
        return self._writer_

    def close(self) -> None:
        self._closed = True
        if self._writer_ is not None:
            self._writer_.close()

    def on_abort(self, error: BaseException) -> None:
        """Training was given up: flush and close the event file now, whether or not
        ``guard.close()`` is reached."""
        self.close()


#: The x-axis of gradguard's rows in a W&B run the loop also logs to.
STEP_KEY = "gradguard/step"


class WandbSink:
    """Log gradguard telemetry to Weights & Biases (offline mode works without network).

    Per step: ``gradguard/loss``, ``gradguard/grad_norm``, ``gradguard/clip_coef``,
    ``gradguard/skips``; per flush: ``grad_norm_layers.<section>/<layer>`` (sections as in
    :class:`TensorBoardSink`), a ``wandb.Histogram`` ``gradguard/layer_grad_norms_log10``
    of the log10 per-layer norms (always logged, like TensorBoard's) and
    ``gradguard/events`` counts; at close, or at once when training is aborted, a table
    ``gradguard/events_table`` with every event and its remedy. Events are also printed
    to the W&B log once each.

    Args:
        run: an existing ``wandb`` run to log into, or None to start one with
            ``wandb.init(**init_kwargs)`` (finished again at close or abort; a run you
            pass is left running). In a run you pass, the loop's own ``run.log`` moves
            W&B's step on, so gradguard's rows go at W&B's next steps with their own
            x-axis, ``gradguard/step`` (``define_metric``): logged at their own steps,
            most were dropped. Log your metrics without ``step=`` (or on an axis of yours).
        per_layer: log per-layer scalars (the histogram is always logged).
        **init_kwargs: passed to ``wandb.init`` (e.g. ``project=``, ``dir=``,
            ``mode="offline"``).

    Example:
        >>> import gradguard as gg
        >>> gg.WandbSink.__name__
        'WandbSink'
    """

    #: Bins of the per-layer gradient-norm histogram (fewer when there are fewer layers).
    HISTOGRAM_BINS = 64

    def __init__(self, run: Any | None = None, *, per_layer: bool = True, **init_kwargs: Any) -> None:
        try:
            import wandb
        except ImportError as e:
            raise _missing_extra("WandbSink", "wandb", e) from e
        self._wandb = wandb
        self._own = run is None
        self._init_kwargs = init_kwargs
        # a rank other than 0 starts its run at its first write: the guard writes from rank
        # 0 only (sink_rank), and every rank builds the same sinks (found by a stranger: an
        # N-process job added N-1 empty runs to the W&B project)
        self._run: Any | None = run if run is not None or _other_rank() else wandb.init(
            **init_kwargs)
        if not self._own:  # a run the loop logs to as well: gradguard's own x-axis
            for pattern in ("gradguard/*", "grad_norm_layers.*"):
                self.run.define_metric(pattern, step_metric=STEP_KEY)
        self.per_layer = per_layer
        self._skips = 0
        self._last_step = -1
        self._events: list[Event] = []
        self._sections: dict[str, str] = {}
        self._closed = False

    def write(self, flush: Flush) -> None:
        rows: dict[int, dict[str, Any]] = {}
        for r in flush.steps:
            self._skips += bool(r["skipped"])
            row = rows.setdefault(r["step"], {})
            for key in ("loss", "grad_norm", "clip_coef"):
                if _finite(r[key]):
                    row[f"gradguard/{key}"] = r[key]
            row["gradguard/skips"] = self._skips
        lay = flush.layers
        if lay:
            names, norms = lay["layers"], lay["grad_norm"]
            row = rows.setdefault(lay["step"], {})
            if self.per_layer:
                if len(self._sections) != len(names):
                    self._sections = layer_sections(names)
                for name, v in zip(names, norms):
                    if _finite(v):
                        row[f"grad_norm_layers.{self._sections[name]}/{name}"] = v
            logs = [math.log10(v) for v in norms if _finite(v) and v > 0]
            if logs:
                bins = min(self.HISTOGRAM_BINS, len(logs))
                row["gradguard/layer_grad_norms_log10"] = self._wandb.Histogram(logs, num_bins=bins)
        # W&B steps must increase: an event about an already-logged step goes on the next row
        for e in flush.events:
            s = e.step if e.step > self._last_step else self._last_step + 1
            row = rows.setdefault(s, {})
            key = f"gradguard/events/{e.kind}"
            row[key] = row.get(key, 0) + 1
            self._events.append(e)
            self._wandb.termlog(f"gradguard: {_event_line(e)}")
        for s in sorted(rows):
            step = s if s > self._last_step else self._last_step + 1
            if self._own:
                self.run.log(rows[s], step=step)
            else:
                # the loop's own run.log has moved W&B's step past this window's steps: an
                # explicit step would be dropped ("this data will be ignored": 45 of 50
                # rows lost); each row goes at W&B's next step, on gradguard's own axis
                self.run.log({**rows[s], STEP_KEY: step})
            self._last_step = step

    @property
    def run(self) -> Any:
        """The W&B run logged to (started here, on a rank other than 0, at first use)."""
        if self._run is None:
            self._run = self._wandb.init(**self._init_kwargs)
        return self._run

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Log the events table and the summary, and finish the run if the sink started it
        (idempotent: a second call does nothing; a run never started stays so)."""
        if self._closed:
            return
        self._closed = True
        if self._run is None:
            return
        try:
            if self._events:
                cols: list[Any] = ["step", "severity", "kind", "layer", "message", "remedy"]
                table = self._wandb.Table(
                    columns=cols,
                    data=[[e.step, e.severity, e.kind, e.layer, e.message, e.remedy]
                          for e in self._events],
                )
                self.run.log({"gradguard/events_table": table}, step=max(self._last_step, 0))
            self.run.summary["gradguard/skips"] = self._skips
            self.run.summary["gradguard/n_events"] = len(self._events)
        finally:  # a run left unfinished loses what it buffered
            if self._own:
                self.run.finish()

    def on_abort(self, error: BaseException) -> None:
        """Training was given up: log the events table (ending with the ``abort``) and
        finish the run now, whether or not ``guard.close()`` is reached."""
        self.close()


class ConsoleSink:
    """A live status line in the terminal; plain lines when the output is not a terminal.

    At each flush it shows ``step, loss, grad norm, clip %, skips, last event`` (a rich
    live table on a terminal, one plain line otherwise) and prints each event exactly once.

    Args:
        file: where to write (default ``sys.stdout``).
        force_terminal: override terminal detection (None: detect).

    Example:
        >>> import io, gradguard as gg
        >>> from gradguard.events import Flush
        >>> buf = io.StringIO()
        >>> sink = gg.ConsoleSink(file=buf)
        >>> sink.write(Flush(steps=[{"step": 9, "loss": 0.5, "grad_norm": 2.0,
        ...     "clip_coef": 0.5, "skipped": False, "finite": True}], layers={}, events=[]))
        >>> sink.close()
        >>> print(buf.getvalue().strip())
        step 9 | loss 0.5 | grad norm 2 | clip 100% | skips 0 | last event: -
    """

    def __init__(self, file: TextIO | None = None, *, force_terminal: bool | None = None) -> None:
        if file is not None and not callable(getattr(file, "write", None)):
            # found by a stranger: a path gave "'str' object has no attribute 'isatty'"
            raise TypeError(f"ConsoleSink(file={file!r}): expected a text stream (an open "
                            "file, sys.stderr, io.StringIO) or None for stdout")
        self.file = file
        out = file if file is not None else sys.stdout
        self.terminal = out.isatty() if force_terminal is None else bool(force_terminal)
        self._console: Any = None
        self._live: Any = None
        if self.terminal:
            try:
                from rich.console import Console
            except ImportError as e:
                raise _missing_extra("ConsoleSink", "report", e) from e
            self._console = Console(file=out, force_terminal=True)
        self._skips = 0
        self._steps = 0
        self._clipped = 0
        self._last_event: Event | None = None
        self._closed = False

    @property
    def _out(self) -> TextIO:
        return self.file if self.file is not None else sys.stdout

    def _status(self, last: dict[str, Any]) -> dict[str, str]:
        def num(x: Any) -> str:
            return f"{x:.4g}" if _finite(x) else "nan"

        ev = self._last_event
        return {
            "step": str(last["step"]),
            "loss": num(last["loss"]),
            "grad norm": num(last["grad_norm"]),
            "clip": f"{100.0 * self._clipped / max(self._steps, 1):.0f}%",
            "skips": str(self._skips),
            "last event": f"{ev.kind} @ {ev.step}" if ev else "-",
        }

    def write(self, flush: Flush) -> None:
        for r in flush.steps:
            self._steps += 1
            self._skips += bool(r["skipped"])
            coef = r["clip_coef"]
            self._clipped += bool(_finite(coef) and coef < 1.0)
        for e in flush.events:
            self._last_event = e
            if self._console is not None:
                style = {"error": "bold red", "warning": "yellow"}.get(e.severity, "")
                self._console.print(_event_line(e), style=style, markup=False, highlight=False)
            else:
                print(_event_line(e), file=self._out, flush=True)
        if not flush.steps:
            return
        status = self._status(flush.steps[-1])
        if self._console is None:
            line = " | ".join(f"{k} {v}" for k, v in status.items() if k != "last event")
            print(f"{line} | last event: {status['last event']}", file=self._out, flush=True)
            return
        from rich.live import Live
        from rich.table import Table

        table = Table(title="gradguard", expand=False)
        for k in status:
            table.add_column(k, justify="right" if k != "last event" else "left")
        table.add_row(*status.values())
        if self._live is None:
            self._live = Live(table, console=self._console, auto_refresh=False, transient=False)
            self._live.start()
        else:
            self._live.update(table)
        self._live.refresh()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        self._closed = True
        if self._live is not None:
            self._live.stop()
            self._live = None

    def on_abort(self, error: BaseException) -> None:
        """Training was given up: stop the live table, so the error prints below it."""
        self.close()
