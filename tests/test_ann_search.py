"""Approximate nearest earlier rows (`scores.search`, faiss IVF): the exact search is the reference.

A set no larger than one block is answered exactly. On clustered sketches with planted near-copies (d = 64,
harder for an index than the demo's or the benchmark's sketches: docs/ann_search.md) the index finds the exact
answer for at least 95% of rows, flags the same rows at 0.98, and every cosine it returns is its pair's exact one.
Every pointer goes to an earlier row; the answer is the same every time; without faiss, ``search="approx"`` names
the extra and ``search="auto"`` stays exact.
"""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest

from hf_gradfilter import near_duplicates
from hf_gradfilter.scores import search as search_module
from hf_gradfilter.scores.duplicates import nearest_earlier


def clustered(n: int, d: int = 64, clusters: int = 40, copies: float = 0.05, seed: int = 0):
    """Unit-free rows around ``clusters`` centres, a low-rank part and noise, with ``copies`` of the rows a
    near-copy (cosine ~0.999) of an earlier row; returns the rows and the positions of the copies."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d))
    basis = rng.standard_normal((8, d))
    x = (centres[rng.integers(clusters, size=n)] + rng.standard_normal((n, 8)) @ basis * 0.5
         + rng.standard_normal((n, d)) * rng.uniform(0.2, 0.8, size=(n, 1)))
    planted = np.sort(rng.choice(np.arange(1, n), size=int(copies * n), replace=False))
    for i in planted:
        x[i] = x[rng.integers(i)] + 0.02 * rng.standard_normal(d)
    return x.astype(np.float32), planted


def test_a_set_no_larger_than_a_block_is_answered_exactly():
    pytest.importorskip("faiss")
    x, _ = clustered(300)
    x[[7, 100]] = np.nan  # rows without a sketch
    exact = nearest_earlier(x, search="exact")
    approx = nearest_earlier(x, search="approx")
    np.testing.assert_array_equal(approx[0], exact[0])
    np.testing.assert_array_equal(approx[1], exact[1])


def test_auto_below_the_crossover_is_exact_and_needs_no_faiss(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` fails
    x, _ = clustered(500)
    assert search_module.resolve_search(len(x), "auto") == "exact" and len(x) < search_module.APPROX_FROM_ROWS
    for got, want in zip(nearest_earlier(x), nearest_earlier(x, search="exact")):
        np.testing.assert_array_equal(got, want)


@pytest.fixture(scope="module")
def searched():
    pytest.importorskip("faiss")
    x, planted = clustered(6000)
    exact = nearest_earlier(x, search="exact")
    return x, planted, exact, nearest_earlier(x, block=256, search="approx")  # 23 blocks through the index


def test_the_index_finds_the_exact_nearest_earlier_row_for_almost_every_row(searched):
    x, planted, (want, want_cos), (got, got_cos) = searched
    assert np.mean(got[1:] == want[1:]) >= 0.95  # recall@1 against the exact search
    same = got == want
    np.testing.assert_allclose(got_cos[same & (got >= 0)], want_cos[same & (want >= 0)], rtol=1e-5, atol=1e-6)
    miss = ~same & (got >= 0)  # a miss points to a less similar earlier row
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    assert (np.einsum("nd,nd->n", u[miss], u[got[miss]]) <= want_cos[miss] + 1e-6).all()
    assert (got_cos[planted] >= 0.98).all()  # every planted near-copy is flagged (perhaps via another copy)
    np.testing.assert_array_equal(got_cos >= 0.98, want_cos >= 0.98)  # the same rows are flagged at 0.98


def test_every_row_points_only_to_an_earlier_row(searched):
    _, _, _, (got, got_cos) = searched
    assert (got < np.arange(len(got))).all() and got[0] == -1 and np.isnan(got_cos[0])
    assert np.isnan(got_cos[got < 0]).all() and np.isfinite(got_cos[got >= 0]).all()


def test_the_approximate_search_is_deterministic_and_reads_members_and_float16():
    pytest.importorskip("faiss")
    x, _ = clustered(3000, seed=1)
    members = np.stack([x, x + 0.01, x - 0.01], axis=1).astype(np.float16)  # (N, M, d) in float16
    first = nearest_earlier(members, block=256, search="approx")
    again = nearest_earlier(members, block=256, search="approx")
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    exact = nearest_earlier(members, search="exact")
    assert np.mean(first[0][1:] == exact[0][1:]) >= 0.95


def test_rows_without_a_sketch_are_never_matched_by_the_index():
    pytest.importorskip("faiss")
    x, _ = clustered(2000, seed=2)
    x[::50] = np.nan
    x[1::50] = 0
    index, cos = nearest_earlier(x, block=128, search="approx")
    empty = np.zeros(len(x), bool)
    empty[::50] = empty[1::50] = True
    assert (index[empty] == -1).all() and np.isnan(cos[empty]).all() and not np.isin(index, np.flatnonzero(empty)).any()


def test_without_faiss_approx_names_the_extra_and_auto_stays_exact(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "faiss", None)
    x, _ = clustered(400)
    with pytest.raises(ImportError, match=r"pip install 'hf-gradfilter\[ann\]'"):
        near_duplicates(x, 0.98, search="approx")
    monkeypatch.setattr(search_module, "APPROX_FROM_ROWS", 100)
    with caplog.at_level(logging.WARNING, logger=search_module.__name__):
        got = near_duplicates(x, 0.98)  # auto, above the (lowered) crossover
    np.testing.assert_array_equal(got, near_duplicates(x, 0.98, search="exact"))
    assert "hf-gradfilter[ann]" in caplog.text


def test_an_unknown_search_is_refused():
    with pytest.raises(ValueError, match="search='fast': choose one of auto, exact, approx"):
        near_duplicates(np.ones((3, 2)), 0.98, search="fast")
