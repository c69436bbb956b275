"""The lab's plots: matplotlib on the Agg backend (imported on first use), saving a figure
into a :class:`~gradguard.lab._common.Result`, smoothed loss curves."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from ._common import Result, Trace


DPI = 90


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (needs the ``lab`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "gradguard lab plots need matplotlib: pip install 'gradguard[lab]'"
        ) from e
    return plt


def save(fig: Any, out: Path, name: str, result: Result) -> None:
    out.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out / name, dpi=DPI)
    pyplot().close(fig)
    result.plots.append(name)


def smooth(x: Tensor, k: int = 10) -> Tensor:
    """Moving average (for plotting noisy losses)."""
    if x.numel() < k or k <= 1:
        return x
    kern = torch.ones(1, 1, k) / k
    y = torch.nn.functional.conv1d(x.reshape(1, 1, -1).float(), kern).reshape(-1)
    return torch.cat([torch.full((k - 1,), math.nan), y])


def plot_losses(
    traces: dict[str, Trace], out: Path, name: str, result: Result, *, title: str, k: int = 10
) -> None:
    """Loss curves (smoothed) of several traces on a log axis."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for label, tr in traces.items():
        ax.plot(smooth(tr.loss, k).numpy(), label=label)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    save(fig, out, name, result)
