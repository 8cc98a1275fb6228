"""Whole columns of a `datasets.Dataset` as numpy arrays, read straight from Arrow in their own dtype.

``datasets``' "numpy" format turns float64 into float32 and goes through lists of Python objects
(~40 bytes a row for an integer column, which the allocator keeps after they are freed); these
readers do neither, so float64 scores stay float64 and memory stays a chunk of rows.
"""

from __future__ import annotations

import numpy as np

COLUMN_CHUNK_ROWS = 1 << 16  # rows per read when a column is scanned in chunks


def read_columns(dataset, names: list[str]) -> dict[str, np.ndarray]:
    """Whole numeric or bool columns of a `datasets.Dataset` as numpy arrays read from Arrow, in their
    own dtype (``datasets``' "numpy" format turns float64 into float32 and goes through lists of
    Python objects); a null becomes NaN. The arrays may be read-only views of the Arrow data."""
    table = dataset.with_format("arrow", columns=names)[:]
    return {name: table.column(name).to_numpy() for name in names}


def column_chunks(dataset, names: list[str], chunk_rows: int | None = None):
    """Yield ``(start, {name: array})`` over ``dataset``'s integer or bool columns without nulls, read
    from Arrow ``chunk_rows`` rows at a time: memory stays a chunk, whatever the dataset's size.
    (``datasets``' "numpy" format goes through a list of Python ints per whole column, ~40 bytes a
    row that the allocator keeps after they are freed.)"""
    start = 0
    for table in dataset.with_format("arrow", columns=names).iter(batch_size=chunk_rows or COLUMN_CHUNK_ROWS):
        yield start, {name: table.column(name).to_numpy() for name in names}
        start += table.num_rows


def read_int_columns(dataset, names: list[str]) -> dict[str, np.ndarray]:
    """Whole integer or bool columns without nulls as writable numpy arrays, filled chunk by chunk
    (`column_chunks`): one copy of each, no whole-column temporaries."""
    n = len(dataset)
    out = {name: np.empty(0, dtype=np.int64) for name in names} if n == 0 else {}
    for start, chunk in column_chunks(dataset, names):
        for name, values in chunk.items():
            if name not in out:
                out[name] = np.empty(n, dtype=values.dtype)
            out[name][start : start + len(values)] = values
    return out


def num_repeats(values: np.ndarray) -> int:
    """How many entries equal an earlier one (``len(values) - len(np.unique(values))``, with one sorted copy)."""
    ordered = np.sort(values)
    return int(np.count_nonzero(ordered[1:] == ordered[:-1]))
