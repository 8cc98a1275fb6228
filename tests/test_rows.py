"""The rows the proxy trains on: ids and hashes, the trainable rows and the counts of odd input."""

from __future__ import annotations

import numpy as np
import pytest
from datasets import Dataset

from hf_gradfilter.proxy.rows import select_positions, survey_rows


def tokenized(num_response_tokens, empty=None, truncated=None, hashes=None):
    n = len(num_response_tokens)
    return Dataset.from_dict({
        "example_id": list(range(n)), "row_hash": hashes or [100 + i for i in range(n)],
        "num_response_tokens": num_response_tokens, "empty_response": empty or [False] * n,
        "truncated": truncated or [False] * n})


def test_survey_counts_odd_rows_and_keeps_those_with_a_response_token(tmp_path):
    data = tokenized([3, 0, 5, 0, 2], empty=[False, True, False, False, False],
                     truncated=[False, False, False, True, True], hashes=[7, 8, 7, 9, 7])
    ids, hashes, trainable, stats = survey_rows(data, 64, str(tmp_path))
    assert ids.tolist() == [0, 1, 2, 3, 4] and hashes.tolist() == [7, 8, 7, 9, 7]
    assert trainable.tolist() == [0, 2, 4] and trainable.dtype == np.int32
    assert stats == {"num_rows": 5, "num_truncated": 2, "num_no_response": 2, "num_empty_response": 1,
                     "num_duplicate_rows": 2, "max_length": 64}


def test_no_row_with_a_response_token_is_an_error_that_says_why(tmp_path):
    with pytest.raises(ValueError, match=r"1 row\(s\) have an empty response and 1 lose their whole response"):
        survey_rows(tokenized([0, 0], empty=[True, False]), 8, str(tmp_path))


def test_select_positions_keeps_the_given_rows_and_all_rows_as_they_are():
    data = Dataset.from_dict({"a": list(range(10))})
    assert select_positions(data, np.arange(10)) is data
    assert select_positions(data, np.array([1, 4, 5, 9]))["a"] == [1, 4, 5, 9]


class NoPythonLoop(np.ndarray):
    """Positions that refuse to be walked one by one in Python (what ``Dataset.select`` does with them)."""

    def __iter__(self):
        raise AssertionError("the positions were iterated in Python")


def test_a_million_rows_are_selected_without_a_python_loop_over_the_positions():
    n = 1_000_000
    data = Dataset.from_dict({"a": np.arange(n, dtype=np.int32)})
    positions = np.delete(np.arange(n, dtype=np.int32), [5, 600_000]).view(NoPythonLoop)
    selected = select_positions(data, positions)
    assert len(selected) == n - 2 and selected[5]["a"] == 6 and selected[-1]["a"] == n - 1
    assert selected[599_998]["a"] == 599_999 and selected[599_999]["a"] == 600_001


def test_select_positions_keeps_the_format_and_a_mapped_dataset_composes():
    data = Dataset.from_dict({"a": list(range(10)), "b": list(range(10))}).with_format("numpy", columns=["a"])
    selected = select_positions(data, np.array([2, 3, 7]))
    assert selected.format["type"] == "numpy" and selected[:]["a"].tolist() == [2, 3, 7] and "b" not in selected[:]
    mapped = select_positions(Dataset.from_dict({"a": list(range(10))}).select([9, 8, 7, 6]), np.array([1, 3]))
    assert mapped["a"] == [8, 6]
