"""Assemble the self-contained HTML report (inline CSS, PNG data URIs, no scripts)."""

from __future__ import annotations

import html
import json
import os
import re
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..rundir import write_atomic
from ._data import MAX_EVENT_ROWS, RunData, load_run
from ._summary import summary_sentence

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1150px;
padding:1.5em;color:#222;background:#fff}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.2em;border-bottom:1px solid #ddd;margin-top:1.8em}
.summary{font-size:1.15em;background:#f6f8fa;border-left:4px solid #d62728;padding:.8em 1em}
.summary.ok{border-left-color:#2ca02c}
.meta,.note{color:#666;font-size:.9em}
img{max-width:100%;height:auto;display:block}
table{border-collapse:collapse;font-size:.85em;width:100%}
th,td{border:1px solid #ddd;padding:.3em .5em;text-align:left;vertical-align:top}
th{background:#f0f0f0}tr.error td:first-child{border-left:4px solid #d62728}
tr.warning td:first-child{border-left:4px solid #ff7f0e}
code{background:#f0f0f0;padding:0 .2em;border-radius:3px}
.warn{background:#fff4e5;padding:.5em 1em;border-left:4px solid #ff7f0e}
"""


def _inline(text: str) -> str:
    """Escape, then render `backticks` as code."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def _table(header: list[str], rows: list[tuple[str, list[str]]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        f'<tr class="{cls}">' + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"
        for cls, cells in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return html.escape("" if x is None else str(x))


def _events_section(data: RunData) -> str:
    ev = data.events
    if not ev:
        return '<p class="note">No events were recorded.</p>'
    counts = Counter((e.get("kind"), e.get("severity")) for e in ev)
    summary = ", ".join(f"{k} ({s}): {n}" for (k, s), n in sorted(counts.items(), key=str))
    rank = {"error": 0, "warning": 1, "info": 2}
    shown = ev
    note = ""
    if len(ev) > MAX_EVENT_ROWS:
        # keep the most severe, then the earliest; list them in step order
        shown = sorted(ev, key=lambda e: (rank.get(e.get("severity", "info"), 3), e.get("step", 0)))
        shown = sorted(shown[:MAX_EVENT_ROWS], key=lambda e: e.get("step", 0))
        note = (
            f'<p class="note">Showing {MAX_EVENT_ROWS} of {len(ev)} events (most severe '
            "first, then earliest); all are counted above and listed in events.jsonl.</p>"
        )
    rows = [
        (
            html.escape(str(e.get("severity", ""))),
            [
                _fmt(e.get("step")),
                _fmt(e.get("severity")),
                _fmt(e.get("kind")),
                f"<code>{_fmt(e.get('layer'))}</code>" if e.get("layer") else "",
                _inline(str(e.get("message", ""))),
                _inline(str(e.get("remedy") or "")),
            ],
        )
        for e in shown
    ]
    table = _table(["step", "severity", "kind", "layer", "what happened", "remedy"], rows)
    return f'<p class="note">{html.escape(summary)}</p>{note}{table}'


def _diagnosis_section(diag: dict[str, Any]) -> str:
    findings = diag.get("findings") or []
    if not findings:
        return '<p class="note">The doctor found nothing to report: the model looks healthy.</p>'
    rows = []
    for f in findings:
        ev = f.get("evidence") or {}
        evidence = "<br>".join(
            f"{html.escape(str(k))} = {_fmt(v) if not isinstance(v, (list, dict)) else html.escape(json.dumps(v)[:200])}"
            for k, v in ev.items()
        )
        conf = f.get("confidence")
        rows.append(
            (
                html.escape(str(f.get("severity", ""))),
                [
                    _fmt(f.get("cause")),
                    _fmt(f.get("severity")),
                    f"<code>{_fmt(f.get('where'))}</code>" if f.get("where") else "",
                    evidence,
                    _inline(str(f.get("remedy") or "")),
                    f"{conf:.0%}" if isinstance(conf, (int, float)) else "",
                ],
            )
        )
    return _table(["cause", "severity", "where", "evidence", "remedy", "confidence"], rows)


def render_html(data: RunData, progress: Callable[[str], None] | None = None) -> str:
    """The report page for loaded run data."""
    from ._plots import flow_plot, grad_norm_plot, heatmap_plot, loss_plot

    def tick(what: str) -> None:
        if progress is not None:
            progress(what)

    sentence = summary_sentence(data)
    ok = sentence.startswith("No gradient trouble")
    tick("loss")
    loss = loss_plot(data)
    tick("grad norm")
    gnorm = grad_norm_plot(data)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>gradguard report: {html.escape(data.run_dir.name)}</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>gradguard incident report</h1>",
        f'<p class="meta">run <code>{html.escape(str(data.run_dir.resolve()))}</code> · '
        f"{data.n_steps} steps · {len(data.layers)} layers · {len(data.events)} events</p>",
        '<h2 id="summary">Summary</h2>',
        f'<p class="summary{" ok" if ok else ""}">{_inline(sentence)}</p>',
    ]
    if data.warnings:
        items = "".join(f"<li>{html.escape(w)}</li>" for w in data.warnings)
        parts.append(f'<div class="warn">Warnings while reading the run:<ul>{items}</ul></div>')
    parts += [
        '<h2 id="loss">Loss</h2>',
        '<p class="note">Vertical lines: warning and error events (colour by kind).</p>',
        f'<img alt="loss curve" src="{loss}">',
        '<h2 id="grad-norm">Gradient norm and clipping</h2>',
        f'<img alt="total gradient norm" src="{gnorm}">',
    ]
    if data.layers:
        tick("heatmap")
        heat, note = heatmap_plot(data)
        tick("gradient flow")
        flow = flow_plot(data)
        parts += [
            '<h2 id="layers">Per-layer gradient norms</h2>',
            '<p class="note">Cold rows at the top (early layers): vanishing gradients. '
            f"Hot columns: explosions. {html.escape(note)}</p>",
            f'<img alt="per-layer gradient norm heatmap" src="{heat}">',
            '<h2 id="flow">Gradient flow</h2>',
            '<p class="note">Mean and max gradient norm of each layer over the run, from '
            "input to output: a steady fall towards the input means vanishing gradients, a "
            "rise means explosion.</p>",
            f'<img alt="gradient flow" src="{flow}">',
        ]
    parts += ['<h2 id="events">Events</h2>', _events_section(data)]
    if data.diagnosis is not None:
        parts += ['<h2 id="diagnosis">Diagnosis</h2>', _diagnosis_section(data.diagnosis)]
    parts.append("</body></html>")
    return "\n".join(parts)


def report(
    run_dir: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write a self-contained HTML incident report for a run directory.

    The page holds a summary sentence, the loss curve with events marked, the total
    gradient norm with the clip threshold, a per-layer gradient-norm heatmap, a
    gradient-flow chart, the events with their remedies, and the doctor's diagnosis when
    ``diagnosis.json`` is present. Plots are PNG data URIs: the file needs no network.

    Args:
        run_dir: a directory written by ``gg.JsonlSink`` (``metrics.jsonl``, ``events.jsonl``).
        out: where to write (default ``run_dir/report.html``).
        progress: called with the name of each figure as it is drawn.

    Returns:
        The path of the written file.

    Raises:
        gradguard.report.ReportError: missing/empty directory, a file that cannot be read,
            a corrupt line or record, a newer schema (naming the file and line). A
            truncated last line, or a partial line that a resumed run ended, is skipped
            with a ``UserWarning``.
        OSError: ``out`` cannot be written (the page is written atomically: no half file
            and no temp file is left).

    Example:
        >>> import tempfile, torch, gradguard as gg
        >>> run = tempfile.mkdtemp()
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with gg.Guard(model, opt, every=5, sinks=[gg.JsonlSink(run)]) as guard:
        ...     for _ in range(10):
        ...         model(torch.randn(8, 4)).pow(2).mean().backward()
        ...         _ = guard.step()
        ...         opt.zero_grad()
        >>> gg.report(run).name
        'report.html'
    """
    data = load_run(run_dir)
    for w in data.warnings:
        warnings.warn(w, UserWarning, stacklevel=2)
    path = Path(out) if out is not None else Path(run_dir) / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)  # fail before the drawing, not after
    return write_atomic(path, render_html(data, progress))
