"""Select the top fraction (or top k) of a scored dataset by any score column."""

from __future__ import annotations


import numpy as np


def top_indices(scores, fraction: float | None = None, k: int | None = None) -> tuple[np.ndarray, dict]:
    """Positions of the best ``k`` (or ``round(fraction * N)``) finite scores, highest first.

    Ties are broken by position (earlier row first), so the result is deterministic. NaN and inf
    scores are never selected and are counted in the returned stats.
    """
    scores = np.asarray(scores, dtype=np.float64)
    n = len(scores)
    if n == 0:
        raise ValueError("The dataset is empty: there is nothing to select.")
    if (fraction is None) == (k is None):
        raise ValueError("Pass exactly one of fraction (e.g. 0.1) or k (a row count).")
    if fraction is not None:
        if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
            raise ValueError(f"ratio/fraction={fraction} is outside (0, 1]; use e.g. 0.1 for the top 10%.")
        k = max(1, round(fraction * n))
    elif not (isinstance(k, (int, np.integer)) and k >= 1):
        raise ValueError(f"k={k} must be a positive integer.")
    finite = np.isfinite(scores)
    valid = np.flatnonzero(finite)
    if len(valid) == 0:
        raise ValueError("Every score is NaN or inf: nothing can be selected; check the scoring run.")
    order = valid[np.lexsort((valid, -scores[valid]))]
    chosen = order[: min(k, len(valid))]
    stats = {
        "num_rows": n,
        "num_nonfinite_excluded": int(n - len(valid)),
        "num_requested": int(k),
        "num_selected": int(len(chosen)),
        "threshold": float(scores[chosen[-1]]),
    }
    return chosen, stats


def select_top(dataset, score_column: str = "gsnr", fraction: float | None = None, k: int | None = None):
    """The top rows of a scored `datasets.Dataset` by ``score_column``, in their original order.

    Returns ``(selected_dataset, stats)``; stats count the rows excluded for NaN/inf scores.
    """
    if score_column not in dataset.column_names:
        raise ValueError(
            f"Score column {score_column!r} is not in the dataset (columns: {dataset.column_names}); "
            "score it first or pick another column."
        )
    chosen, stats = top_indices(dataset[score_column], fraction=fraction, k=k)
    stats = {"score_column": score_column, "fraction": fraction, **stats}
    return dataset.select(np.sort(chosen)), stats
