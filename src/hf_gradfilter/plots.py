"""Small matplotlib figures (Agg backend, PNG files): loss curves, score histograms and heatmaps."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def line_plot(series: dict[str, list[tuple[float, float]]], path: str, xlabel: str = "step", ylabel: str = "loss",
              title: str = "") -> str:
    """One line per series of ``(x, y)`` points; saved to ``path`` (PNG)."""
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for label, points in series.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o" if len(points) < 30 else None, markersize=3, label=label)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    if sum(bool(points) for points in series.values()) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def histogram(values, path: str, cut: float | None = None, xlabel: str = "score", title: str = "",
              bins: int = 50) -> str:
    """Histogram of the finite ``values`` with an optional vertical line at the selection cut."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.hist(values, bins=bins, color="#4C72B0")
    if cut is not None:
        ax.axvline(cut, color="#C44E52", linestyle="--", label="selection cut")
        ax.legend()
    ax.set(xlabel=xlabel, ylabel="rows", title=title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def heatmaps(panels: list[tuple], path: str) -> str:
    """Annotated heatmaps side by side, one per ``(matrix, row_labels, column_labels, title[, (vmin, vmax)])``
    panel (default range -1..1, for correlations); NaN cells are left blank."""
    widths = [max(3.0, 0.7 * len(p[2]) + 2.0) for p in panels]
    height = max(3.0, 0.45 * max(len(p[1]) for p in panels) + 1.5)
    fig, axes = plt.subplots(1, len(panels), figsize=(sum(widths), height), dpi=100,
                             gridspec_kw={"width_ratios": widths}, squeeze=False)
    for ax, (matrix, rows, cols, title, *limits) in zip(axes[0], panels):
        vmin, vmax = limits[0] if limits else (-1.0, 1.0)
        matrix = np.asarray(matrix, dtype=float)
        image = ax.imshow(np.ma.masked_invalid(matrix), cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
        ax.set_xticks(range(len(cols)), cols, rotation=45 if len(cols) > 4 else 0)
        ax.set_yticks(range(len(rows)), rows)
        ax.set_title(title, fontsize=8)
        for (i, j), value in np.ndenumerate(matrix):
            if np.isfinite(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if value < (vmin + vmax) / 2 else "black")
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
