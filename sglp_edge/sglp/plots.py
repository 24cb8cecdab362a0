"""Figures of a prune plan (matplotlib, headless)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np


def cka_heatmap_png(plan: dict[str, Any], title: str | None = None) -> bytes:
    """CKA matrix with segment boundaries; removed units' ticks in red. Returns PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cka = np.asarray(plan["cka"], dtype=float)
    names = [u["name"] for u in plan["units"]]
    kept = [u["kept"] for u in plan["units"]]
    n = len(names)
    size = max(5.0, min(14.0, 0.28 * n + 3))
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    im = ax.imshow(cka, vmin=0.0, vmax=1.0, cmap="magma", origin="upper")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="linear CKA")
    for a, b in plan.get("segments") or []:
        ax.add_patch(matplotlib.patches.Rectangle((a - 0.5, a - 0.5), b - a, b - a, fill=False,
                                                  edgecolor="cyan", linewidth=2))
        if a > 0:
            ax.axhline(a - 0.5, color="cyan", linewidth=0.6, alpha=0.6)
            ax.axvline(a - 0.5, color="cyan", linewidth=0.6, alpha=0.6)
    step = 1 if n <= 40 else max(1, n // 40)
    ticks = list(range(0, n, step))
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.set_xticklabels([names[i] for i in ticks], rotation=90, fontsize=7)
    ax.set_yticklabels([names[i] for i in ticks], fontsize=7)
    for lab, i in zip(ax.get_xticklabels(), ticks):
        lab.set_color("black" if kept[i] else "red")
    for lab, i in zip(ax.get_yticklabels(), ticks):
        lab.set_color("black" if kept[i] else "red")
    k = plan.get("k")
    ax.set_title(title or f"CKA between layer units - {k} segments (cyan); removed units in red")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
