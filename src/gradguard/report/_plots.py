"""The report's figures, drawn with matplotlib's Agg canvas and returned as PNG data URIs."""

from __future__ import annotations

import base64
import io
from typing import Any

from ._data import (
    MAX_HEATMAP_COLS,
    MAX_HEATMAP_ROWS,
    TROUBLE_KINDS,
    RunData,
    max_pool,
    minmax_downsample,
)

#: Colour per event kind on the time plots (others are grey).
EVENT_COLORS = {
    "nonfinite_grad": "#d62728",
    "grad_spike": "#ff7f0e",
    "loss_spike": "#e377c2",
    "vanishing_grad": "#1f77b4",
    "skip": "#9467bd",
    "lr_backoff": "#8c564b",
    "rollback": "#17becf",
    "abort": "#000000",
    "divergence_risk": "#bcbd22",
}
#: Kinds drawn dashed: warnings *before* trouble rather than trouble itself.
EARLY_WARNINGS = frozenset({"divergence_risk"})
DPI = 100


def _figure(w: float, h: float) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(
            f"the HTML report needs the optional extra: pip install gradguard[report] ({e})"
        ) from e
    return Figure(figsize=(w, h), dpi=DPI, layout="constrained")


def _png(fig: Any) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _mark_events(ax: Any, data: RunData) -> None:
    """Vertical lines at event steps, one draw call per kind (fast for thousands)."""
    by_kind: dict[str, list[int]] = {}
    for e in data.events:
        if e.get("severity") in ("warning", "error"):
            by_kind.setdefault(e["kind"], []).append(e["step"])
    for kind, steps in sorted(by_kind.items()):
        ax.vlines(
            sorted(set(steps)), 0, 1, transform=ax.get_xaxis_transform(),
            colors=EVENT_COLORS.get(kind, "#7f7f7f"), linewidth=0.8, alpha=0.6,
            linestyles="--" if kind in EARLY_WARNINGS else "solid",
            label=f"{kind} ({len(steps)})",
        )


def loss_plot(data: RunData) -> str:
    """Loss over steps with warning/error events marked."""
    import numpy as np

    fig = _figure(11, 3.2)
    ax = fig.add_subplot()
    x, y = minmax_downsample(data.step, data.loss)
    ax.plot(x, y, color="#333333", linewidth=0.9, label="loss")
    bad = data.step[~np.isfinite(data.loss)]
    if bad.size:
        ax.plot(bad, np.zeros(bad.size), "x", color="#d62728", ms=4,
                transform=ax.get_xaxis_transform(), label=f"non-finite loss ({bad.size})")
    fin = y[np.isfinite(y)]
    if fin.size and fin.min() > 0 and fin.max() / fin.min() > 100:
        ax.set_yscale("log")
    _mark_events(ax, data)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(loc="upper right", fontsize=8)
    return _png(fig)


def grad_norm_plot(data: RunData) -> str:
    """Pre-clip total norm, the norm after clipping, and the clip threshold where it bit."""
    import numpy as np

    fig = _figure(11, 3.2)
    ax = fig.add_subplot()
    x, y = minmax_downsample(data.step, data.grad_norm)
    ax.plot(x, y, color="#1f77b4", linewidth=0.9, label="total grad norm (pre-clip)")
    coef = data.clip_coef
    clipped = np.isfinite(coef) & (coef < 1.0) & np.isfinite(data.grad_norm)
    if clipped.any():
        post = np.where(clipped, data.grad_norm * coef, data.grad_norm)
        xp, yp = minmax_downsample(data.step, post)
        ax.plot(xp, yp, color="#2ca02c", linewidth=0.8, alpha=0.8, label="after clipping")
        xs, ys = minmax_downsample(data.step[clipped], (data.grad_norm * coef)[clipped])
        ax.plot(xs, ys, "_", color="#d62728", ms=7, mew=1.5,
                label=f"clip threshold ({int(clipped.sum())} clipped steps)")
    bad = data.step[~np.isfinite(data.grad_norm)]
    if bad.size:
        ax.plot(bad, np.full(bad.size, 0.97), "v", color="#d62728", ms=5,
                transform=ax.get_xaxis_transform(), label=f"non-finite norm ({bad.size})")
    if np.nanmin(np.where(np.isfinite(y) & (y > 0), y, np.nan), initial=np.inf) < np.inf:
        ax.set_yscale("log")
    _mark_events(ax, data)
    ax.set_xlabel("step")
    ax.set_ylabel("gradient norm")
    ax.legend(loc="upper right", fontsize=8)
    return _png(fig)


#: Heatmap colours outside the colour scale.
NONFINITE_COLOR = "#3a9ad9"  # blue: NaN/Inf
ZERO_COLOR = "#d9d9d9"  # light grey: no gradient at all (disconnected, frozen, unused)
VANISHED_COLOR = "#2ca02c"  # green: above 0 but below the vanishing floor
#: The colour scale spans these per-run quantiles of the positive finite norms, so the
#: layers of *this* run use the whole colour range (a fixed floor such as max x 1e-12
#: paints ordinary 1-1e3 norms near-black, the colour that reads as "vanishing").
HEATMAP_QUANTILES = (0.01, 0.99)


def heatmap_colors(a: Any) -> tuple[Any, Any, dict[str, str]]:
    """RGBA cells of a ``[layers, windows]`` array of norms, the colour scale, and the
    legend of the special colours present (label -> colour).

    Example:
        >>> import numpy as np
        >>> a = np.array([[1.0, 10.0, 100.0, 1e3], [0.0, np.nan, 1e-9, 30.0]])
        >>> rgba, norm, legend = heatmap_colors(a)
        >>> 1.0 <= norm.vmin < 1.2, 900 < norm.vmax <= 1e3   # this run's own range
        (True, True)
        >>> sorted(legend)
        ['below 1e-08 (the vanishing floor)', 'no gradient (0)', 'non-finite']
    """
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm, to_rgba

    from ..detectors.config import VANISH_FLOOR

    pos = a[np.isfinite(a) & (a >= VANISH_FLOOR)]
    if pos.size:
        lo, hi = (float(10 ** q) for q in np.quantile(np.log10(pos), HEATMAP_QUANTILES))
        if hi <= lo:  # one value: a decade either side
            lo, hi = lo / 10, hi * 10
    else:
        lo, hi = VANISH_FLOOR, 1.0
    norm = LogNorm(vmin=lo, vmax=hi, clip=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        rgba = colormaps["inferno"](norm(np.where(np.isfinite(a) & (a > 0), a, lo)))
    legend: dict[str, str] = {}
    for label, mask, color in (
        ("non-finite", ~np.isfinite(a), NONFINITE_COLOR),
        ("no gradient (0)", a == 0, ZERO_COLOR),
        (f"below {VANISH_FLOOR:g} (the vanishing floor)", (a > 0) & (a < VANISH_FLOOR),
         VANISHED_COLOR),
    ):
        if mask.any():
            rgba[mask] = to_rgba(color)
            legend[label] = color
    return rgba, norm, legend


def heatmap_plot(data: RunData) -> tuple[str, str]:
    """Per-layer gradient norm, layers (input at the top) x flush windows, log colour
    anchored on this run's own range (:data:`HEATMAP_QUANTILES`).

    Returns the data URI and a note on how the data was downsampled and coloured.
    """
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.patches import Patch

    a = data.layer_max.T  # [L, F]: max per window shows explosions; vanishing rows stay cold
    a, kr, kc = max_pool(a, MAX_HEATMAP_ROWS, MAX_HEATMAP_COLS)
    n_rows = a.shape[0]
    fig = _figure(11, min(2.0 + 0.16 * n_rows, 14.0))
    ax = fig.add_subplot()
    rgba, norm, legend = heatmap_colors(a)
    steps = data.layer_step
    # column i covers its window's steps: from the run's first step to the last flush
    x0 = float(data.step[0])
    x1 = float(steps[-1]) + 1.0 if steps.size else x0 + 1.0
    ax.imshow(rgba, aspect="auto", interpolation="nearest",
              extent=(x0, x1 if x1 > x0 else x0 + 1, n_rows - 0.5, -0.5))
    fin = a[np.isfinite(a) & (a > 0)]
    extend = {(False, False): "neither", (True, False): "min", (False, True): "max",
              (True, True): "both"}[(bool(fin.size and fin.min() < norm.vmin),
                                     bool(fin.size and fin.max() > norm.vmax))]
    fig.colorbar(ScalarMappable(norm=norm, cmap=colormaps["inferno"]), ax=ax, pad=0.01,
                 extend=extend, label="gradient norm (log; this run's 1st-99th percentile)")
    handles = [Patch(color=c, label=label) for label, c in legend.items()]
    # per-layer records cover finite steps only: mark the non-finite steps above the map
    bad = data.step[~np.isfinite(data.grad_norm)]
    if bad.size:
        handles += ax.plot(bad, np.full(bad.size, 1.0), "v", color=NONFINITE_COLOR, ms=6,
                           clip_on=False, transform=ax.get_xaxis_transform(),
                           label=f"non-finite step ({bad.size})")
    if handles:
        ax.legend(handles=handles, loc="lower right", fontsize=8, bbox_to_anchor=(1.0, 1.0),
                  frameon=False, ncol=len(handles))
    names = data.layers[::kr] if kr > 1 else data.layers
    if n_rows <= 60:
        ax.set_yticks(range(n_rows), names[:n_rows], fontsize=7)
    else:
        ticks = np.linspace(0, n_rows - 1, 30).astype(int)
        ax.set_yticks(ticks, [names[i] for i in ticks], fontsize=7)
    ax.set_xlabel("step (one column per flush window)")
    ax.set_ylabel("layer (input at top)")
    note = (
        f"{len(data.layers)} layers x {len(steps)} flush windows; each cell is the largest "
        "per-step norm in its window"
    )
    if kr > 1 or kc > 1:
        note += (
            f", then the max over blocks of {kr} layer{'s' * (kr > 1)} x "
            f"{kc} window{'s' * (kc > 1)}"
        )
    return _png(fig), note + (
        ". Colours span this run's own range (dark: the lowest norms of this run, not "
        "necessarily vanishing). Blue: non-finite (cells, and triangles above the map); "
        "grey: no gradient; green: below the vanishing floor."
    )


def flow_plot(data: RunData) -> str:
    """Gradient flow: each layer's mean and max gradient norm over the run, input to output."""
    import warnings

    import numpy as np

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # layers with no finite window
        mean = np.nanmean(np.where(np.isfinite(data.layer_mean), data.layer_mean, np.nan), axis=0)
        mx = np.nanmax(np.where(np.isfinite(data.layer_max), data.layer_max, np.nan), axis=0)
    n = len(data.layers)
    fig = _figure(11, 3.6)
    ax = fig.add_subplot()
    x = np.arange(n)
    if n <= 80:
        ax.bar(x, mx, color="#ff7f0e", alpha=0.45, label="max over run")
        ax.bar(x, mean, color="#1f77b4", alpha=0.9, width=0.5, label="mean over run")
    else:
        ax.fill_between(x, mean, mx, color="#ff7f0e", alpha=0.35, label="mean..max over run")
        ax.plot(x, mean, color="#1f77b4", linewidth=1.0, label="mean over run")
    if np.isfinite(mx).any() and np.nanmax(mx) > 0:
        ax.set_yscale("log")
    if n <= 40:
        ax.set_xticks(x, data.layers, rotation=60, ha="right", fontsize=7)
    else:
        ticks = np.linspace(0, n - 1, 25).astype(int)
        ax.set_xticks(ticks, [data.layers[i] for i in ticks], rotation=60, ha="right", fontsize=7)
    ax.set_xlabel("layer (input → output)")
    ax.set_ylabel("gradient norm")
    ax.legend(loc="upper right", fontsize=8)
    return _png(fig)


__all__ = ["EARLY_WARNINGS", "EVENT_COLORS", "TROUBLE_KINDS", "flow_plot", "grad_norm_plot",
           "heatmap_colors", "heatmap_plot", "loss_plot"]
