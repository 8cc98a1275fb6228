"""Each member's data order: every row once per epoch, its own permutation, length-grouped batches."""

from __future__ import annotations

import os

import numpy as np
import pytest

from hf_gradfilter.proxy.sampler import MemberSampler


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
    keys = [k for step in sampler for k in step]
    assert len(keys) == 3 * n and all(epoch == 1 and weight == 1.0 for _, epoch, weight, _ in keys)


def test_processes_split_each_global_batch_and_pad_an_empty_slice_with_a_zero_weight_row():
    n, b = 21, 4  # global batch 8: steps of 8, 8 and 5 rows
    one = MemberSampler(n, 2, 2 * b, seed=0)
    ranks = [list(MemberSampler(n, 2, b, seed=0, num_replicas=2, rank=r)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(one) == 3
    for m in range(2):
        for step, batch in enumerate(one.batches(m, 0)):
            got = []
            for r in range(2):
                keys = ranks[r][step]
                per_member = len(keys) // 2
                got += [k[0] for k in keys[m * per_member : (m + 1) * per_member]]
                assert all(k[3] == len(batch) for k in keys)
            assert sorted(got) == sorted(batch.tolist())
    tiny = [list(MemberSampler(3, 1, 2, seed=0, num_replicas=4, rank=r)) for r in range(4)]
    weights = [k[2] for r in tiny for step in r for k in step]
    assert weights.count(1.0) == 3 and weights.count(0.0) == 1  # 3 rows over 4 processes: one stand-in


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


@pytest.mark.parametrize("grouped", [False, True])
def test_orders_kept_in_files_are_the_orders_kept_in_memory(grouped, tmp_path):
    n, b = 1003, 8
    kw = {"lengths": lengths(n)} if grouped else {}
    in_memory = MemberSampler(n, 3, b, seed=4, **kw)
    in_files = MemberSampler(n, 3, b, seed=4, directory=str(tmp_path), **kw)
    for member in range(3):
        for epoch in range(2):
            order = in_files.order(member, epoch)
            assert isinstance(order, np.memmap)
            np.testing.assert_array_equal(order, in_memory.order(member, epoch))
    assert list(in_files) == list(in_memory) and os.listdir(tmp_path) == []
