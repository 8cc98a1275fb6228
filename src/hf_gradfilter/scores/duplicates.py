"""Near-duplicates from gradient sketches: a row whose sketch (`proxy.sketch`, averaged over members) has
cosine at least ``threshold`` with an earlier row's is flagged with the index of the most similar earlier row.

Exact repeats of a row get the same gradient at the same weights (snapshot mode), so their sketches
agree to float rounding; rows that say the same thing in other words pull the LoRA weights the same
way and land near each other. Pure numpy over arrays (memory-mapped ones welcome): rows are compared
in blocks of ``block`` by matrix products, so memory is ``O(block * (block + d))``, never ``O(N^2)``;
time is ``O(N^2 d / 2)`` multiply-adds: on one CPU thread (d = 1024) 31 s at Alpaca's 52k rows and about
3 hours at 1M rows (docs/ann_search.md). From `search.APPROX_FROM_ROWS` rows
``search="auto"`` uses an approximate index instead (`search`: faiss IVF, the optional extra ``[ann]``), with
the same rule that a row points only to an earlier one; docs/ann_search.md has its times and recall.
"""

from __future__ import annotations

import warnings

import numpy as np

from .search import approx_nearest_earlier, resolve_search


def _unit_rows(sketches, start, stop: int | None = None) -> np.ndarray:
    """Rows ``start:stop`` (or the positions ``start``, an index array) as float32 unit vectors (members averaged
    when 3-D; float16 sketches are read as float32); rows without a finite, non-zero sketch become zero vectors,
    which match nothing."""
    block = np.asarray(sketches[start:stop] if stop is not None else sketches[start], dtype=np.float32)
    if block.ndim == 3:  # (rows, M, d): the member mean, over the members that recorded the row
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            block = np.nanmean(block, axis=1)
    norms = np.linalg.norm(block, axis=1, keepdims=True)
    ok = np.isfinite(norms) & (norms > 0)
    return np.where(ok, block / np.where(ok, norms, 1), 0).astype(np.float32)


def nearest_earlier(sketches, block: int = 2048, search: str = "auto", seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """For each row, the earlier row whose sketch is most like its own, and their cosine.

    Args:
        sketches: ``(N, d)``, or ``(N, M, d)`` (averaged over the M members, NaN members left out),
            e.g. ``record.sketches[:, :, slot]`` (`record_sketches`); float16 is read as float32.
        block: rows compared at a time.
        search: ``"exact"``; ``"approx"`` (an IVF index, `search.approx_nearest_earlier`: needs the extra
            ``[ann]``; a row still points only to an earlier row, but not always to the most similar one); or
            ``"auto"``: approximate from `search.APPROX_FROM_ROWS` rows when faiss is installed, else exact.
        seed: the approximate index's seed (training sample and k-means).

    Returns:
        ``(N,)`` int64 ``argmax_{j < i} cos(s_i, s_j)`` (the smallest such j on ties; -1 for the first
        row and rows without a finite, non-zero sketch) and the ``(N,)`` float32 cosine (NaN where -1).
    """
    n = len(sketches)
    if resolve_search(n, search) == "approx":
        return approx_nearest_earlier(sketches, _unit_rows, block=block, seed=seed)
    index = np.full(n, -1, dtype=np.int64)
    best = np.full(n, -np.inf, dtype=np.float32)
    for i0 in range(0, n, block):
        i1 = min(n, i0 + block)
        rows = _unit_rows(sketches, i0, i1)
        for j0 in range(0, i1, block):
            j1 = min(i1, j0 + block)
            cols = _unit_rows(sketches, j0, j1)
            cos = rows @ cols.T  # (bi, bj)
            cos[np.arange(j0, j1)[None, :] >= np.arange(i0, i1)[:, None]] = -np.inf  # earlier rows only
            cos[:, ~cols.any(axis=1)] = -np.inf  # rows without a sketch match nothing
            j = cos.argmax(axis=1)  # the first of equal maxima
            top = cos[np.arange(len(j)), j]
            better = top > best[i0:i1]  # strictly: an earlier block keeps a tie
            best[i0:i1][better], index[i0:i1][better] = top[better], j0 + j[better]
        index[i0:i1][~rows.any(axis=1)] = -1  # and are matched to nothing
    index[~(best > -np.inf)] = -1
    return index, np.where(index >= 0, best, np.nan).astype(np.float32)


def near_duplicates(sketches, threshold: float = 0.98, block: int = 2048, search: str = "auto") -> np.ndarray:
    """For each row, the earlier row whose sketch is most like its own if their cosine is ``>= threshold``,
    else -1 (`nearest_earlier`, with its ``search``; ``threshold`` in ``(0, 1]``). A row whose sketch is missing
    (NaN) or zero is never flagged nor matched."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold={threshold}: a cosine in (0, 1], e.g. 0.98.")
    index, cos = nearest_earlier(sketches, block, search)
    return np.where(cos >= threshold, index, -1)


def record_sketches(record, epoch: int | None = None):
    """``(N, M, d)`` sketches of ``record`` (a `GradientRecord`) at ``epoch`` (1-based; default: the config's
    late epoch when it was sketched, else the last sketched epoch), a view of the record's arrays."""
    meta = record.metadata.get("sketch")
    if record.sketches is None or not meta:
        raise ValueError("This record has no gradient sketches; score with --sketch_dim (e.g. 1024).")
    epochs = list(meta["epochs"])
    if epoch is None:
        late = record.metadata.get("config", {}).get("late_epoch")
        epoch = late if late in epochs else epochs[-1]
    if epoch not in epochs:
        raise ValueError(f"Epoch {epoch} was not sketched; this record has sketches for epochs {epochs}.")
    return record.sketches[:, :, epochs.index(epoch)]


def nearest_earlier_ids(record, epoch: int | None = None, search: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """`nearest_earlier` (with its ``search``) over ``record``'s member-averaged sketches at ``epoch``, rows in
    ``example_id`` order: ``(N,)`` int64 example id of each row's most similar earlier row (-1: none) and ``(N,)``
    cosine, both aligned with ``record.example_id``."""
    order = np.argsort(record.example_id, kind="stable")
    sketches = record_sketches(record, epoch)
    if not np.array_equal(order, np.arange(len(order))):
        sketches = sketches[order]
    earlier, cos = nearest_earlier(sketches, search=search)
    ids = np.asarray(record.example_id)[order]
    out_ids, out_cos = np.full(len(order), -1, dtype=np.int64), np.empty(len(order), dtype=np.float32)
    out_ids[order] = np.where(earlier >= 0, ids[np.maximum(earlier, 0)], -1)
    out_cos[order] = cos
    return out_ids, out_cos


def near_duplicate_ids(record, threshold: float = 0.98, epoch: int | None = None, search: str = "auto") -> np.ndarray:
    """``(N,)`` int64: for each row of ``record``, the ``example_id`` of the earlier row (by example id) whose
    member-averaged sketch at ``epoch`` is most like its own if their cosine is ``>= threshold``, else -1
    (`nearest_earlier_ids`, with its ``search``)."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold={threshold}: a cosine in (0, 1], e.g. 0.98.")
    ids, cos = nearest_earlier_ids(record, epoch, search)
    return np.where(cos >= threshold, ids, -1)
