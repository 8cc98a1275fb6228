"""Superfiltering's selection rule (Li et al., ACL 2024) on an IFD-scored dataset (`scores.ifd.IFDScorer`)."""

from __future__ import annotations

import numpy as np

from ..data.columns import read_columns
from .top import top_indices


def superfiltering_select(dataset, fraction: float, score_column: str = "ifd"):
    """Superfiltering's rule on an IFD-scored dataset: drop rows with IFD >= 1 (and NaN), sort the
    rest by IFD descending (ties by position), keep the top ``round(fraction * len(dataset))``.

    Returns ``(selected_dataset, stats)``, the selection in the original row order; fewer rows than
    requested when too few have IFD < 1 (``num_selected`` < ``num_requested``).
    """
    if score_column not in dataset.column_names:
        raise ValueError(f"Column {score_column!r} is not in the dataset (columns: {dataset.column_names}); "
                         "score it with IFDScorer first.")
    ifd = np.asarray(read_columns(dataset, [score_column])[score_column], dtype=np.float64)
    nan = ~np.isfinite(ifd) & ~(ifd >= 1)  # NaN (and -inf, which a PPL ratio cannot be)
    high = ifd >= 1
    if (nan | high).all():
        raise ValueError(f"No row has a finite {score_column} < 1 ({int(high.sum())} >= 1, {int(nan.sum())} NaN): "
                         "Superfiltering keeps nothing; check the scoring model.")
    chosen, stats = top_indices(np.where(high, np.nan, ifd), fraction=fraction)
    stats = {"score_column": score_column, "fraction": fraction, "rule": "superfiltering", **stats,
             "num_ifd_ge_1_dropped": int(high.sum()), "num_nan_dropped": int(nan.sum())}
    return dataset.select(np.sort(chosen)), stats
