"""Plots (matplotlib, Agg backend: no display needed): the quality/bytes Pareto plot and one retrieval
heatmap (context length x needle depth) per method."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def slug(spec: str) -> str:
    """A file-name-safe form of a method spec."""
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", spec).strip("_") or "method"


def pareto_plot(rows: list[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """Bytes per token relative to a 16-bit cache (x) vs perplexity increase over ``none`` (y)."""
    pts = [r for r in rows if r.get("delta_ppl") is not None and r.get("bytes_per_token")]
    if not pts:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    xs = [r["bytes_per_token"] / r["fp16_bytes_per_token"] for r in pts]
    ys = [r["delta_ppl"] for r in pts]
    ax.scatter(xs, ys, zorder=3)
    for x, y, r in zip(xs, ys, pts):
        ax.annotate(r["method"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    # the Pareto front: no other point has both fewer bytes and a smaller perplexity increase
    front = sorted((x, y) for x, y in zip(xs, ys) if not any(x2 <= x and y2 <= y and (x2, y2) != (x, y)
                                                                 for x2, y2 in zip(xs, ys)))
    if len(front) > 1:
        ax.plot(*zip(*front), linestyle="--", linewidth=1, color="gray", zorder=2)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.axvline(1.0, color="gray", linewidth=0.8, linestyle=":")
    ax.annotate("16-bit cache", (1.0, 0), textcoords="offset points", xytext=(3, -12), fontsize=7, color="gray")
    ax.set_xlabel("KV bytes per token / 16-bit cache's (measured)")
    ax.set_ylabel("perplexity increase over 'none' (ΔPPL)")
    ax.set_xlim(left=0)
    ax.set_title(title or "KV cache: bytes vs quality", fontsize=9)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def heatmap(grid: dict[str, dict[str, float]], path: Path, title: str) -> Path:
    """Accuracy per (context length, needle depth) cell: rows = lengths, columns = depths."""
    plt = _plt()
    lengths = sorted(grid, key=int)
    depths = sorted({d for row in grid.values() for d in row}, key=float)
    data = [[grid[L].get(d, float("nan")) for d in depths] for L in lengths]
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * len(depths), 1.2 + 0.5 * len(lengths)), dpi=120)
    im = ax.imshow(data, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
    ax.set_xticks(range(len(depths)), [f"{float(d):.0%}" for d in depths])
    ax.set_yticks(range(len(lengths)), lengths)
    ax.set_xlabel("needle depth")
    ax.set_ylabel("context tokens")
    for i, row in enumerate(data):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="accuracy")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
