"""The snapshot pass's batches: rows of similar length together, each member in its own seeded order."""

from __future__ import annotations

import numpy as np
from datasets import Dataset

from hf_gradfilter.proxy.snapshot import length_order, snapshot_batches


def test_length_order_is_longest_first_stable_and_int32():
    order = length_order(Dataset.from_dict({"length": [3, 9, 3, 7, 9]}))
    assert order.tolist() == [1, 4, 3, 0, 2] and order.dtype == np.int32


def test_every_row_once_in_batches_of_similar_length():
    lengths = np.random.default_rng(0).integers(5, 500, size=53)
    by_length = np.argsort(-lengths, kind="stable")
    batches = snapshot_batches(by_length, 8, seed=1, member=0, epoch=0)
    assert sorted(np.concatenate(batches).tolist()) == list(range(53))
    assert sorted(len(b) for b in batches) == [5] + [8] * 6
    cuts = [by_length[i : i + 8].tolist() for i in range(0, 53, 8)]  # the length-sorted cut, in some order
    assert sorted(b.tolist() for b in batches) == sorted(cuts)


def test_the_order_of_batches_is_seeded_per_member_and_epoch():
    by_length = np.arange(64)
    first = [b[0] for b in snapshot_batches(by_length, 4, seed=3, member=0, epoch=1)]
    assert first == [b[0] for b in snapshot_batches(by_length, 4, seed=3, member=0, epoch=1)]  # reproducible
    expected = np.random.default_rng([3, 0, 1, 1]).permutation(16) * 4
    assert first == expected.tolist()
    assert first != [b[0] for b in snapshot_batches(by_length, 4, seed=3, member=1, epoch=1)]
    assert first != [b[0] for b in snapshot_batches(by_length, 4, seed=3, member=0, epoch=0)]
