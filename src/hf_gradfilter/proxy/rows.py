"""The rows the proxy trains on.

`survey_rows` makes one pass over a tokenized dataset's columns, in chunks of rows: each row's id
and hash go straight into files (the record's), and it finds the trainable rows (a response token
left after truncation) and counts the odd input (the "Odd input" section of `data.formatting`),
which it logs and which the record keeps. `select_positions` then keeps the trainable rows.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
from datasets import Dataset
from transformers.utils import logging

from ..data.columns import column_chunks, num_repeats
from .record import file_array

logger = logging.get_logger(__name__)


def survey_rows(tokenized, max_length: int, directory: str | None = None):
    """``(ids, hashes, trainable, data_stats)`` of a tokenized dataset (`data.formatting.TOKENIZED_COLUMNS`).

    ``ids`` and ``hashes``: int64 arrays in unnamed files in ``directory`` (`record.file_array`);
    ``trainable``: the positions of rows with a response token, ascending; ``data_stats``: the counts.
    Raises ValueError when no row has a response token.
    """
    # One pass over the columns in chunks of rows: counts, the trainable rows, and each row's id and
    # hash, written straight into files (the record's; see `GradientRecord.empty`).
    n = len(tokenized)
    index_dtype = np.int32 if n < 2**31 else np.int64
    ids, hashes = (file_array((n,), np.int64, 0, directory) for _ in range(2))
    keep, num_empty, num_truncated = [], 0, 0
    names = ["example_id", "row_hash", "num_response_tokens", "empty_response", "truncated"]
    for start, chunk in column_chunks(tokenized, names):
        stop = start + len(chunk["example_id"])
        ids[start:stop], hashes[start:stop] = chunk["example_id"], chunk["row_hash"]
        keep.append(np.flatnonzero(chunk["num_response_tokens"] > 0).astype(index_dtype) + index_dtype(start))
        num_empty += int(np.count_nonzero(chunk["empty_response"]))
        num_truncated += int(np.count_nonzero(chunk["truncated"]))
    trainable = np.concatenate(keep) if keep else np.empty(0, dtype=index_dtype)
    del keep
    # Policies and how the counts relate: the "Odd input" section of `formatting`'s docstring.
    data_stats = {
        "num_rows": n,
        "num_truncated": num_truncated,
        "num_no_response": int(n - len(trainable)),  # includes the empty-response rows
        "num_empty_response": num_empty,
        "num_duplicate_rows": num_repeats(hashes),  # rows whose row_hash came earlier
        "max_length": max_length,
    }
    num_cut = data_stats["num_no_response"] - num_empty
    if len(trainable) == 0:
        raise ValueError(
            f"No row has a response token: {num_empty} row(s) have an empty response and {num_cut} lose "
            f"their whole response to truncation at max_length={max_length}; fill in the responses "
            "or raise max_length."
        )
    if data_stats["num_no_response"]:
        logger.warning(
            f"{data_stats['num_no_response']} row(s) have no response token and get NaN scores: "
            f"{num_empty} with an empty response, {num_cut} whose response is cut off by "
            f"max_length={max_length}."
        )
    if data_stats["num_duplicate_rows"]:
        logger.warning(
            f"{data_stats['num_duplicate_rows']} row(s) repeat an earlier row's content (same row_hash); "
            "each copy is trained on and scored independently. Deduplicate the dataset first if that is not "
            "what you want."
        )
    return ids, hashes, trainable, data_stats


def select_positions(dataset: Dataset, positions: np.ndarray) -> Dataset:
    """``dataset.select(positions)`` for ascending int ``positions``, without a Python loop over them.

    All rows: the dataset itself (no index map). Otherwise the index map is built from the array
    in one Arrow call (``Dataset.select`` checks contiguity and builds its map through a list of
    Python ints: seconds and ~40 bytes a row at a million rows).
    """
    positions = np.asarray(positions)
    if len(positions) == len(dataset):
        return dataset
    if dataset._indices is not None or len(positions) == 0:  # already mapped: datasets composes the maps
        return dataset.select(positions)
    indices = pa.table({"indices": pa.array(positions.astype(np.uint64, copy=False))})
    fingerprint = hashlib.sha256(f"{dataset._fingerprint}-select-".encode() + positions.tobytes()).hexdigest()[:16]
    out = Dataset(dataset.data, info=dataset.info.copy(), split=dataset.split, indices_table=indices,
                  fingerprint=fingerprint)
    fmt = dataset.format
    out.set_format(fmt["type"], columns=fmt["columns"], output_all_columns=fmt["output_all_columns"],
                   **fmt["format_kwargs"])
    return out
