"""Each member's data order: every row once per epoch, its own permutation, length-grouped batches."""

from __future__ import annotations

import numpy as np
import pytest

from hf_gradfilter.trainer import MemberSampler


def lengths(n, seed=0):
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(4.5, 0.7, size=n).astype(int), 8, 1024)  # Alpaca-like: short mostly, long tail


@pytest.mark.parametrize("grouped", [False, True])
def test_every_member_sees_every_row_once_per_epoch(grouped):
    n, b = 103, 8
    sampler = MemberSampler(n, 3, b, seed=0, lengths=lengths(n) if grouped else None)
    for epoch in range(2):
        for m in range(3):
            batches = sampler.batches(m, epoch)
            assert sorted(np.concatenate(batches).tolist()) == list(range(n))
            assert [len(x) for x in batches] == [b] * (n // b) + [n % b]  # the short batch last
    sampler.set_epoch(1)
    flat = list(sampler)
    assert len(flat) == 3 * n and all(n <= i < 2 * n for i in flat)


def test_members_and_epochs_get_different_orders_and_the_same_seed_repeats():
    sampler = MemberSampler(50, 2, 5, seed=0)
    a, b = np.concatenate(sampler.batches(0, 0)), np.concatenate(sampler.batches(1, 0))
    c = np.concatenate(sampler.batches(0, 1))
    assert not np.array_equal(a, b) and not np.array_equal(a, c)
    np.testing.assert_array_equal(a, np.concatenate(MemberSampler(50, 5, 5, seed=0).batches(0, 0)))


def test_length_grouping_cuts_padding_on_alpaca_like_lengths():
    n, b = 5000, 16
    ls = lengths(n)
    grouped = MemberSampler(n, 2, b, seed=0, lengths=ls).padding_ratio()
    computed = sum(len(x) * ls[x].max() for x in MemberSampler(n, 2, b, seed=0).batches(0, 0))
    random_ratio = computed / ls.sum()
    assert grouped <= 1.10 < random_ratio
