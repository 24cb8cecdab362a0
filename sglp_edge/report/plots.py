"""The report's plots as base64 PNGs: one way to get pyplot headless, to turn a figure into a PNG,
and one scatter plot of original (o) against pruned (^) per group (accuracy vs latency in the run
report, tokens/s vs perplexity in the causal-LM report)."""

from __future__ import annotations

import base64
import io
from typing import Any, Optional, Sequence

#: one scatter point: (group label, "original" | "pruned", marker, x, y)
Point = tuple[str, str, str, float, float]


def pyplot() -> Any:
    """``matplotlib.pyplot`` with the headless Agg backend."""
    import matplotlib  # heavy: matplotlib only when a report is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: as above

    return plt


def figure_png(fig: Any) -> str:
    """``fig`` as a base64 PNG (the figure is closed)."""
    plt = pyplot()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def scatter_png(points: Sequence[Point], *, xlabel: str, ylabel: str, title: str,
                log_y: bool = False) -> Optional[str]:
    """One colour per group label (sorted), one marker per point; None when there are no points."""
    if not points:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    labels = sorted({p[0] for p in points})
    cmap = plt.get_cmap("tab10")
    for i, lab in enumerate(labels):
        for group, which, marker, x, y in points:
            if group == lab:
                ax.scatter([x], [y], marker=marker, color=cmap(i % 10), s=60, label=f"{lab} {which}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return figure_png(fig)
