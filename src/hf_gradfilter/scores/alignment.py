"""Target alignment: how much a row's gradient points the way the target task's gradients point
(LESS, Xia et al. 2024, from the same sketches the record holds).

For row n, member m, the row's sketch ``s_{n,m}`` (`proxy.sketch`) and the target rows' sketches
``t_{j,m}`` at the same weights (`proxy.probe.sketch_rows`):

    align_n = (1/M') sum_m (1/J) sum_j cos(s_{n,m}, t_{j,m}) = (1/M') sum_m <s_{n,m}/|s_{n,m}|, tbar_m>,
    tbar_m = (1/J) sum_j t_{j,m}/|t_{j,m}|

over the M' members where both are finite. LESS scores a row by this mean cosine with the target's
gradients at each checkpoint (summed over checkpoints with the learning rate as weight; here one
checkpoint: the end of training) and takes the maximum over target subtasks (here one target set).
Unlike LESS, the gradients are plain SGD gradients, not Adam-preconditioned ones. Higher is kept. In
[-1, 1]; NaN where a row has no finite sketch.

A record that keeps only each row's member mean (``sketch_storage="mean"``: ``sketches`` ``(N, 1, d)``) is
compared with the member mean of each target row's sketch: ``align_n = (1/J) sum_j cos(s_n, t_j)``, both
averaged over the members first (the cosine of the mean gradients, not the mean of the members' cosines;
docs/ann_search.md measures the difference).
"""

from __future__ import annotations

import warnings

import numpy as np


def _unit(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norms > 0, x / norms, np.nan)


def target_direction(target_sketches) -> np.ndarray:
    """``(M, d)``: ``tbar_m``, the mean of the target rows' unit sketches per member (rows with a NaN or
    zero sketch for a member left out). ``target_sketches``: ``(J, M, d)``."""
    t = np.asarray(target_sketches, dtype=np.float64)
    if t.ndim != 3 or len(t) == 0:
        raise ValueError(f"target sketches must be (J, M, d) with J >= 1 rows, got shape {t.shape}.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(_unit(t), axis=0)
    if np.isnan(mean).all():
        raise ValueError("No target row has a usable gradient sketch (no response token left after truncation?).")
    return mean


def target_alignment(sketches, target_sketches, block: int = 8192) -> np.ndarray:
    """``(N,)`` float64 ``align_n`` (module docstring) of rows ``sketches`` ``(N, M, d)`` or ``(N, 1, d)`` (the member
    mean; float32 or float16, computed in float64; a memory-mapped array is read ``block`` rows at a time) against
    ``target_sketches`` ``(J, M, d)``."""
    target = np.asarray(target_sketches, dtype=np.float64)
    if len(np.shape(sketches)) == 3 and np.shape(sketches)[1] == 1 and target.ndim == 3 and target.shape[1] > 1:
        with warnings.catch_warnings():  # the rows keep only their member mean: compare the target's
            warnings.simplefilter("ignore", RuntimeWarning)
            target = np.nanmean(target, axis=1, keepdims=True)
    tbar = target_direction(target)
    if np.shape(sketches)[1:] != tbar.shape:
        raise ValueError(f"Sketch shapes differ: rows {np.shape(sketches)[1:]} vs target {tbar.shape} (M, d); "
                         "sketch both with the same proxy.")
    out = np.empty(len(sketches), dtype=np.float64)
    for i in range(0, len(sketches), block):
        s = _unit(np.asarray(sketches[i:i + block], dtype=np.float64))  # (b, M, d)
        cos = np.einsum("bmd,md->bm", np.nan_to_num(s), np.nan_to_num(tbar))
        cos[np.isnan(s).any(axis=2) | np.isnan(tbar).any(axis=1)[None]] = np.nan
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            out[i:i + block] = np.nanmean(cos, axis=1)
    return out
