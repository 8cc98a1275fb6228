"""Approximate nearest earlier row, for near-duplicate flags at the size of real datasets.

The exact search of `duplicates.nearest_earlier` compares every pair: ``N^2 d / 2`` multiply-adds, 31 s at 52k
rows and about 3 hours at 1M on one CPU thread (d = 1024). From `APPROX_FROM_ROWS` rows (the measured crossover,
docs/ann_search.md) ``search="auto"`` uses an inverted-file index instead (faiss ``IndexIVFScalarQuantizer``,
inner product on unit vectors, i.e. cosine): the rows are split into ``nlist = 4 sqrt(N)`` k-means cells, and
each row is compared only with the rows of the ``nprobe = 16`` cells nearest to it. The index keeps the unit
vectors in float16 (2 GB at 1M rows, d = 1024), which halves the memory traffic that bounds this search; its
cosines are off by at most ``2^-12`` (each stored coordinate rounded to 11 significant bits), so each found
pair's cosine is computed again from the float32 unit vectors. Measured on one thread (docs/ann_search.md):
16 s at 52k rows, about 15 min at 1M; recall@1 against the exact search 0.996 and 0.971 on synthetic sketches,
0.989 on the demo proxy's; the misses were rows with no close earlier row, and the same rows were flagged at
0.9, 0.95 and 0.98.

Why faiss: it is maintained (Meta's library, several releases a year, faiss-cpu wheels on PyPI for the usual
platforms), its IVF index takes rows in order and can be searched between additions, and its search runs in
native code over many threads. hnswlib and annoy have had few releases lately, annoy cannot add rows to a built
index, and an HNSW graph built by several threads depends on their timing (not deterministic); scikit-learn's
``NearestNeighbors`` has no approximate index (its trees fall back to brute force at d = 1024).

*Earlier rows only.* Row i may only point to a row j < i. The rows are taken in blocks of ``block`` in order;
each block is searched against the index, which holds exactly the rows of the earlier blocks, and within itself by
exact blocked products; then it is added. So every pointer goes to an earlier row by construction, no row needs
a fallback, and a set of at most ``block`` rows is searched exactly. The only approximation: the most similar
earlier row may lie in a cell that was not probed; then a less similar earlier row (or none) is returned.

*Deterministic.* The training sample is drawn with ``numpy.random.default_rng(seed)`` and k-means is seeded
with ``seed``; rows are added in a fixed order. The same rows give the same answer on the same machine and
thread count.

Needs the optional extra ``pip install "hf-gradfilter[ann]"`` (faiss-cpu), imported only when used.
"""

from __future__ import annotations

import logging
import math

import numpy as np

logger = logging.getLogger(__name__)

SEARCHES = ("auto", "exact", "approx")
APPROX_FROM_ROWS = 20_000  # "auto": approximate search from this many rows (the crossover, docs/ann_search.md)
NPROBE = 16  # cells searched per row
LISTS_PER_SQRT_ROWS = 4  # nlist = 4 sqrt(N)
TRAIN_ROWS_PER_LIST = 40  # k-means training sample: 40 rows per cell (faiss warns below 39)
KMEANS_ITERATIONS = 10


def require_faiss(why: str):
    """The ``faiss`` module, or ImportError naming the extra to install."""
    try:
        import faiss
    except ImportError:
        raise ImportError(f"{why} needs faiss: pip install 'hf-gradfilter[ann]' (faiss-cpu), or use "
                          "search='exact'.") from None
    return faiss


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_search(num_rows: int, search: str = "auto") -> str:
    """``"exact"`` or ``"approx"``: ``search`` itself, or for ``"auto"`` approximate from `APPROX_FROM_ROWS` rows
    when faiss is installed (else exact, with a warning naming the extra)."""
    if search not in SEARCHES:
        raise ValueError(f"search={search!r}: choose one of {', '.join(SEARCHES)}.")
    if search != "auto":
        return search
    if num_rows < APPROX_FROM_ROWS:
        return "exact"
    if faiss_available():
        return "approx"
    logger.warning(f"Nearest earlier rows of {num_rows} rows by exact search (O(N^2): about {num_rows / 52_000:.1f}^2 "
                   "x 40 s on one core); pip install 'hf-gradfilter[ann]' (faiss-cpu) for the approximate index.")
    return "exact"


def ivf_index(sketches, unit_rows, seed: int = 0, nlist: int | None = None, nprobe: int = NPROBE):
    """An empty faiss IVF index (module docstring) whose ``nlist`` cells (default ``4 sqrt(N)``) are k-means
    centroids of a seeded sample of the rows' unit vectors (`TRAIN_ROWS_PER_LIST` rows a cell)."""
    faiss = require_faiss("search='approx'")
    n, d = len(sketches), int(np.shape(sketches)[-1])
    nlist = nlist or max(1, round(LISTS_PER_SQRT_ROWS * math.sqrt(n)))
    sample = np.sort(np.random.default_rng(seed).choice(n, size=min(n, TRAIN_ROWS_PER_LIST * nlist), replace=False))
    train = unit_rows(sketches, sample)
    train = np.ascontiguousarray(train[train.any(axis=1)])
    nlist = max(1, min(nlist, len(train)))
    index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(d), d, nlist, faiss.ScalarQuantizer.QT_fp16,
                                          faiss.METRIC_INNER_PRODUCT, False)  # the vectors, not residuals
    index.cp.seed, index.cp.niter = seed, KMEANS_ITERATIONS
    index.cp.max_points_per_centroid, index.cp.min_points_per_centroid = TRAIN_ROWS_PER_LIST, 1  # no stderr note
    if len(train):
        index.train(train)
    index.nprobe = min(nprobe, nlist)
    return index


def search_block(index, sketches, unit_rows, i0: int, i1: int):
    """Rows ``i0:i1`` against ``index`` (which holds rows before ``i0`` only; None: no earlier rows) and against
    each other, exactly.

    Returns their unit vectors ``(b, d)``, the mask of rows with a sketch, each row's nearest earlier row
    (-1: none) and its cosine (-inf: none); the cosine of a pair the index found is computed again from the
    float32 unit vectors, so every returned cosine is the exact one of its pair.
    """
    rows = unit_rows(sketches, np.arange(i0, i1))
    ok = rows.any(axis=1)
    cos = rows @ rows.T  # within the block, exactly
    cos[np.arange(i1 - i0)[None, :] >= np.arange(i1 - i0)[:, None]] = -np.inf
    cos[:, ~ok] = -np.inf
    j = cos.argmax(axis=1)
    best, nearest = cos[np.arange(len(j)), j], i0 + j
    if index is not None and index.ntotal and ok.any():
        found = np.full(len(rows), -1, dtype=np.int64)
        found[ok] = index.search(np.ascontiguousarray(rows[ok]), 1)[1][:, 0]
        earlier = np.full(len(rows), -np.inf, dtype=np.float32)
        hit = found >= 0
        if hit.any():
            at, back = np.unique(found[hit], return_inverse=True)
            earlier[hit] = np.einsum("nd,nd->n", rows[hit], unit_rows(sketches, at)[back])
        inside = best > earlier  # a tie goes to the earlier block's row, the smaller index
        best, nearest = np.where(inside, best, earlier), np.where(inside, nearest, found)
    best[~ok], nearest[~ok] = -np.inf, -1
    nearest[~(best > -np.inf)] = -1
    return rows, ok, nearest, best


def approx_nearest_earlier(sketches, unit_rows, block: int = 2048, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`duplicates.nearest_earlier` by an IVF index (module docstring): ``(N,)`` int64 earlier row (-1: none) and
    ``(N,)`` float32 cosine (NaN: none). Rows go in blocks of ``block``, each searched (`search_block`) and then
    added to the index (`ivf_index`), so a set of at most ``block`` rows gets the exact answer.

    ``unit_rows(sketches, positions)``: the float32 unit vectors of those rows (zero for rows without a sketch).
    """
    require_faiss("search='approx'")
    n = len(sketches)
    nearest, best = np.full(n, -1, dtype=np.int64), np.full(n, -np.inf, dtype=np.float32)
    index = ivf_index(sketches, unit_rows, seed) if n > block else None  # one block: exact, no index
    for i0 in range(0, n, block):
        i1 = min(n, i0 + block)
        rows, ok, nearest[i0:i1], best[i0:i1] = search_block(index, sketches, unit_rows, i0, i1)
        if index is not None and i1 < n:
            index.add_with_ids(np.ascontiguousarray(rows[ok]), np.arange(i0, i1)[ok])
    return nearest, np.where(nearest >= 0, best, np.nan).astype(np.float32)
