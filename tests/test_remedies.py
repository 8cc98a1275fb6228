"""The remedy keep-score of docs/remedies.md against hand-computed arrays."""

from __future__ import annotations

import numpy as np
import pytest

from hf_gradfilter.scores.formulas import average_rank, fit_rank


def test_average_rank_by_hand():
    # sorted: 1 (idx 3), 2 and 2 (idx 0, 2: ranks 1 and 2 share 1.5), 5 (idx 1); K - 1 = 3
    np.testing.assert_allclose(average_rank(np.array([2.0, 5.0, 2.0, 1.0])), [0.5, 1.0, 0.5, 0.0])
    np.testing.assert_allclose(average_rank(np.array([np.nan, 3.0])), [np.nan, 0.5])
    assert np.isnan(average_rank(np.array([np.nan, np.nan]))).all()


def test_fit_rank_by_hand():
    g = np.array([1.0, 4.0, 2.0, 3.0])
    loss = np.array([2.0, 1.0, 4.0, 3.0])
    # r(-G) = [1, 0, 2/3, 1/3];  r(-L) = [2/3, 1, 0, 1/3];  mean:
    np.testing.assert_allclose(fit_rank(g, loss), [5 / 6, 1 / 2, 1 / 3, 1 / 3])


def test_fit_rank_ties_and_nan_by_hand():
    g = np.array([1.0, np.nan, 1.0, 2.0])
    loss = np.array([1.0, 1.0, 2.0, 0.0])
    # finite rows 0, 2, 3: r(-G) = [0.75, 0.75, 0] (tie), r(-L) = [0.5, 0, 1]
    np.testing.assert_allclose(fit_rank(g, loss), [0.625, np.nan, 0.375, 0.5])


def test_fit_rank_matches_record_quantities():
    rng = np.random.default_rng(0)
    norms, losses = rng.random((6, 3, 2)) + 0.1, rng.random((6, 3, 2)) + 0.1
    from hf_gradfilter.scores.formulas import grad_energy, mean_loss

    score = fit_rank(grad_energy(norms, 2), mean_loss(losses, 2))
    best = np.argmax(score)
    g, l_t = grad_energy(norms, 2), mean_loss(losses, 2)
    assert not ((g < g[best]) & (l_t < l_t[best])).any()  # nothing dominates the top row


def test_fit_rank_shape_check():
    with pytest.raises(ValueError, match="same"):
        fit_rank(np.ones(3), np.ones(4))
