"""Small matplotlib figures (Agg backend, PNG files): loss curves and score histograms."""

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
