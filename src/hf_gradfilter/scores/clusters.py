"""Diversity: clusters of gradient sketches, so that a selection takes the best rows of every cluster
instead of the best rows overall (which may all pull the proxy the same way).

Each row's sketch is averaged over the members, scaled to unit length, and the rows are clustered
by k-means from scikit-learn (`sklearn.cluster.KMeans`; `MiniBatchKMeans` above
`MINIBATCH_ROWS` rows): on unit vectors, squared Euclidean distance is ``2 - 2 cos``, so the
clusters group rows whose gradients point the same way. The select stage then keeps the top
``round(ratio * n_c)`` rows (at least 1) of every cluster c by the keep-score: the ``per_group``
rule of `selection.top`, with the cluster as the group.
"""

from __future__ import annotations

import warnings

import numpy as np

MINIBATCH_ROWS = 100_000


def unit_member_mean(sketches, block: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """``(N, d)`` float32 unit vectors of the member-averaged sketches ``(N, M, d)`` (NaN members left out)
    and the ``(N,)`` bool mask of rows that have one (finite, non-zero)."""
    n, d = len(sketches), np.shape(sketches)[-1]
    out, ok = np.zeros((n, d), dtype=np.float32), np.zeros(n, dtype=bool)
    for i in range(0, n, block):
        s = np.asarray(sketches[i:i + block], dtype=np.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            s = np.nanmean(s, axis=1) if s.ndim == 3 else s
        norms = np.linalg.norm(s, axis=1)
        good = np.isfinite(norms) & (norms > 0)
        out[i:i + block][good] = s[good] / norms[good, None]
        ok[i:i + block] = good
    return out, ok


def check_clusters(num_clusters) -> None:
    """Refuse a cluster count that is not an integer >= 2."""
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, (int, np.integer)) or num_clusters < 2:
        raise ValueError(f"num_clusters={num_clusters}: give an integer >= 2 (e.g. 20).")


def sketch_clusters(sketches, num_clusters: int, seed: int = 0) -> np.ndarray:
    """``(N,)`` int64 cluster of each row (``0 .. num_clusters - 1``; -1 for rows without a sketch) by k-means
    over the unit member-mean sketches ``(N, M, d)`` or ``(N, d)`` (module docstring), seeded by ``seed``."""
    from sklearn.cluster import KMeans, MiniBatchKMeans

    check_clusters(num_clusters)
    unit, ok = unit_member_mean(sketches)
    if ok.sum() < num_clusters:
        raise ValueError(f"num_clusters={num_clusters} is more than the {int(ok.sum())} rows with a gradient sketch; "
                         "use fewer clusters.")
    algo = (MiniBatchKMeans(num_clusters, random_state=seed, n_init=3, batch_size=4096)
            if ok.sum() > MINIBATCH_ROWS else KMeans(num_clusters, random_state=seed, n_init=3))
    labels = np.full(len(unit), -1, dtype=np.int64)
    labels[ok] = algo.fit_predict(unit[ok])
    return labels
