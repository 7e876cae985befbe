"""Small, generic PNG plotting helpers (matplotlib, Agg backend, no display needed).

Nothing here knows about MSCP's data structures: each helper takes plain lists / nested lists
and a path, writes one PNG and returns the path. Also `cluster_order`, an average-linkage
(UPGMA) ordering of a similarity matrix that needs neither scipy nor numpy.

matplotlib is the optional extra `mscp[plots]`: without it, callers ask `plots_available()` first
and skip their figures with one line saying so (the data they plot is written either way).
"""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from typing import Sequence

NO_PLOTS = "figures skipped: matplotlib is not installed (pip install 'mscp[plots]')"
_said = False


def plots_available() -> bool:
    """True when matplotlib can be imported; else says once, on stderr, that figures are skipped."""
    global _said
    try:
        found = sys.modules.get("matplotlib", True) is not None and importlib.util.find_spec("matplotlib") is not None
    except (ImportError, ValueError):
        found = False
    if not found and not _said:
        print(f"mscp: note: {NO_PLOTS}", file=sys.stderr)
        _said = True
    return found


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Software": None})  # no version string: same data, same bytes
    _pyplot().close(fig)
    return path


def cluster_order(similarity: Sequence[Sequence[float]]) -> tuple[list[int], list[tuple[int, int, float, int]]]:
    """Average-linkage agglomerative clustering of items given a symmetric similarity in [0, 1].

    Distance = 1 - similarity. Returns (leaf order, merges); merges follow scipy's linkage format:
    (cluster a, cluster b, distance, size), clusters numbered n, n+1, ... as they form. Ties are
    broken by the lower cluster ids, so the result is deterministic.
    """
    n = len(similarity)
    if n == 0:
        return [], []
    clusters: dict[int, list[int]] = {i: [i] for i in range(n)}
    dist = lambda a, b: sum(1.0 - similarity[i][j] for i in clusters[a] for j in clusters[b]) / (
        len(clusters[a]) * len(clusters[b]))
    merges, next_id = [], n
    while len(clusters) > 1:
        ids = sorted(clusters)
        best = min(((dist(a, b), a, b) for k, a in enumerate(ids) for b in ids[k + 1:]))
        d, a, b = best
        clusters[next_id] = clusters.pop(a) + clusters.pop(b)
        merges.append((a, b, float(d), len(clusters[next_id])))
        next_id += 1
    return next(iter(clusters.values())), merges


def heatmap(path, matrix: Sequence[Sequence[float]], row_labels: Sequence[str], col_labels: Sequence[str] | None = None,
            *, title: str = "", cbar_label: str = "", vmin: float | None = None, vmax: float | None = None,
            annotate: bool = True, fmt: str = "{:.2f}", cmap: str = "viridis", xlabel: str = "", ylabel: str = "") -> Path:
    """A labelled heatmap (values annotated in the cells when the matrix is small)."""
    plt = _pyplot()
    col_labels = list(row_labels if col_labels is None else col_labels)
    rows, cols = len(row_labels), len(col_labels)
    fig, ax = plt.subplots(figsize=(max(3.5, 0.6 * cols + 2.5), max(2.5, 0.5 * rows + 1.8)))
    data = [[float("nan") if v is None else float(v) for v in r] for r in matrix] if rows and cols else [[0.0]]
    im = ax.imshow(data, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(cols), col_labels, rotation=45 if cols > 4 else 0, ha="right" if cols > 4 else "center")
    ax.set_yticks(range(rows), row_labels)
    if annotate and rows * cols <= 400:
        finite = [v for r in data for v in r if not math.isnan(v)]
        lo, hi = (vmin if vmin is not None else min(finite, default=0)), (vmax if vmax is not None else max(finite, default=1))
        for i, r in enumerate(data):
            for j, v in enumerate(r):
                if not math.isnan(v):
                    light = (v - lo) / (hi - lo or 1) < 0.6
                    ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=8, color="white" if light else "black")
    fig.colorbar(im, ax=ax, label=cbar_label)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return _save(fig, path)


def bar_panels(path, labels: Sequence[str], panels: Sequence[dict], *, title: str = "") -> Path:
    """One bar chart per panel, side by side, over the same labels.

    panel: {"series": {name: values}, "ylabel": str, "line": {name: values} (optional, drawn over the bars)}.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(max(4.0, 0.55 * len(labels) + 2.5) * len(panels), 3.6), squeeze=False)
    x = list(range(len(labels)))
    for ax, panel in zip(axes[0], panels):
        series = panel.get("series", {})
        width = 0.8 / max(1, len(series))
        for k, (name, values) in enumerate(series.items()):
            ax.bar([i - 0.4 + width * (k + 0.5) for i in x], values, width, label=name)
        for name, values in panel.get("line", {}).items():
            ax.plot(x, values, "k.-", label=name)
        ax.set_xticks(x, labels, rotation=45 if len(labels) > 4 else 0, ha="right" if len(labels) > 4 else "center")
        ax.set_ylabel(panel.get("ylabel", ""))
        if len(series) + len(panel.get("line", {})) > 1:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def stacked_bars(path, labels: Sequence[str], stacks: dict[str, Sequence[float]], *, title: str = "",
                 xlabel: str = "", ylabel: str = "") -> Path:
    """Stacked bars: one bar per label, one coloured segment per stack entry."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * len(labels) + 2.5), 3.6))
    bottom = [0.0] * len(labels)
    for name, values in stacks.items():
        ax.bar(range(len(labels)), values, 0.8, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_xticks(range(len(labels)), labels)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if stacks:
        ax.legend(fontsize=8)
    return _save(fig, path)


def line_curves(path, x: Sequence[float], curves: dict[str, Sequence[float]], *, title: str = "", xlabel: str = "",
                ylabel: str = "", shade: tuple[float, float] | None = None, shade_label: str = "") -> Path:
    """Several curves over the same x; `shade` = (x0, x1) highlights a span (e.g. a chosen window)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    if shade is not None:
        ax.axvspan(shade[0] - 0.5, shade[1] + 0.5, color="orange", alpha=0.2, label=shade_label or None)
    for name, values in curves.items():
        ax.plot(x, values, ".-", label=name)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    return _save(fig, path)
