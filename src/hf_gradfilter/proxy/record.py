"""`GradientRecord`: every example's gradient norm and loss, per member and epoch.

Saved as one safetensors file (no pickle): tensors ``norms``, ``losses`` and ``cosines`` of shape
``(N, M, E)`` (float32, NaN where an example has no value), ``example_id`` and ``row_hash`` of
shape ``(N,)`` (int64), and JSON metadata (the config, the data format, the dataset fingerprint).
Records written before ``cosines`` existed load with an all-NaN ``cosines``. With sketches on
(``GradFilterConfig.sketch_dim``), also ``sketches`` ``(N, M, E_s, d)`` (``(N, 1, E_s, d)``: the member mean, with
``sketch_storage="mean"``; float32 or float16) and ``metadata["sketch"]`` (the projection, its seed and ``d``, the
1-based epochs of the E_s slots, the storage and dtype; `proxy.sketch`).

Large records need not live in anonymous memory: `GradientRecord.empty` can put the arrays in
unnamed temporary files (``np.memmap``; the trainer does, in its output directory), and
``GradientRecord.load(path, mmap=True)`` maps a saved record read-only instead of reading it.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

RECORD_NAME = "gradient_record.safetensors"


@dataclass
class GradientRecord:
    """Per-example gradient statistics of a proxy ensemble.

    Attributes:
        norms: ``(N, M, E)`` ``n_i^(m,e) = ||grad_{LoRA of m} loss_i||_2`` at epoch e (0-based axis).
        losses: ``(N, M, E)`` the example's mean response-token loss at the same moment.
        cosines: ``(N, M, E)`` ``cos(g_i^(m,e), S^(m,e))``: the cosine between the same gradient and
            member m's reference direction, the sum of the per-example gradients of the batches m
            visited earlier in epoch e (see `GradFilterTrainer`). NaN where not recorded (first
            batch of an epoch, zero norm, ``record_directions=False``, records from older versions);
            ``None`` in the constructor means all NaN.
        example_id: ``(N,)`` position of each row in the scored dataset.
        row_hash: ``(N,)`` 64-bit hash of each row's formatted fields.
        metadata: JSON-serialisable info (``config``, ``format``, ``fingerprint``, ``record_mode``...).
        sketches: ``(N, M, E_s, d)`` or None: each example's gradient sketch (`proxy.sketch`) per member, in the
            sketched epochs ``metadata["sketch"]["epochs"]`` (1-based); NaN where not recorded. ``(N, 1, E_s, d)``:
            the member mean only (``sketch_storage="mean"``). float32, or float16 (``sketch_dtype``).
    """

    norms: np.ndarray
    losses: np.ndarray
    example_id: np.ndarray
    row_hash: np.ndarray
    metadata: dict[str, Any] = field(default_factory=dict)
    cosines: np.ndarray | None = None
    sketches: np.ndarray | None = None

    def __post_init__(self):
        if self.norms.ndim != 3 or self.norms.shape != self.losses.shape:
            raise ValueError(f"norms {self.norms.shape} and losses {self.losses.shape} must both be (N, M, E).")
        if self.cosines is None:
            self.cosines = np.full(self.norms.shape, np.nan, dtype=np.float32)
        if self.cosines.shape != self.norms.shape:
            raise ValueError(f"cosines {self.cosines.shape} must have the shape of norms {self.norms.shape}.")
        n = self.norms.shape[0]
        sketches = self.sketches
        if sketches is not None and (sketches.ndim != 4 or sketches.shape[0] != n
                                     or sketches.shape[1] not in (self.norms.shape[1], 1)):
            raise ValueError(f"sketches {sketches.shape} must be (N, M, E_s, d) or (N, 1, E_s, d) (the member mean) "
                             f"with (N, M) = {self.norms.shape[:2]}.")
        if self.example_id.shape != (n,) or self.row_hash.shape != (n,):
            raise ValueError(f"example_id {self.example_id.shape} and row_hash {self.row_hash.shape} must be ({n},).")

    @classmethod
    def empty(cls, example_id, row_hash, num_members: int, num_epochs: int, metadata=None,
              directory: str | None = None, copy: bool = True,
              sketch_shape: tuple[int, int] | None = None, sketch_members: int | None = None,
              sketch_dtype=np.float32) -> GradientRecord:
        """An all-NaN record for the rows ``example_id`` / ``row_hash`` (copied in; with ``copy=False``
        the given int64 arrays are used as they are, e.g. shared with another record). ``sketch_shape``: ``(E_s, d)``
        of the sketches, if any, with ``sketch_members`` on the member axis (default ``num_members``; 1: the mean)
        and ``sketch_dtype``.

        With ``directory``, every new array is an ``np.memmap`` on an unnamed temporary file there
        (see `file_array`): the record is written to disk as it fills, its pages are the kernel's to
        write back and drop, and nothing is left behind when the process ends, killed or not.
        """
        n, shape = len(example_id), (len(example_id), num_members, num_epochs)
        arrays = [file_array(shape, np.float32, np.nan, directory) for _ in range(3)]
        if copy:
            ids = [file_array((n,), np.int64, 0, directory) for _ in range(2)]
            ids[0][:], ids[1][:] = example_id, row_hash
            example_id, row_hash = ids
        members = num_members if sketch_members is None else sketch_members
        sketches = None if sketch_shape is None else file_array((n, members, *sketch_shape), sketch_dtype, np.nan,
                                                                directory)
        return cls(arrays[0], arrays[1], example_id, row_hash, dict(metadata or {}), arrays[2], sketches)

    @property
    def num_examples(self) -> int:
        return self.norms.shape[0]

    @property
    def num_members(self) -> int:
        return self.norms.shape[1]

    @property
    def num_epochs(self) -> int:
        return self.norms.shape[2]

    @property
    def fingerprint(self) -> str:
        """Content fingerprint of the scored rows: a hash of all row hashes, in order."""
        return hashlib.sha256(np.ascontiguousarray(self.row_hash, dtype=np.int64).view(np.uint8)).hexdigest()[:16]

    def head(self, n: int) -> GradientRecord:
        """The first ``n`` rows as a new record whose arrays are views of this one's (nothing copied, file-backed
        arrays stay on disk); metadata copied."""
        cut = lambda a: None if a is None else a[:n]  # noqa: E731
        return GradientRecord(cut(self.norms), cut(self.losses), cut(self.example_id), cut(self.row_hash),
                              metadata=dict(self.metadata), cosines=cut(self.cosines), sketches=cut(self.sketches))

    def save(self, path: str) -> str:
        """Write to ``path`` (a directory gets `RECORD_NAME`); atomically, so a crash leaves the old file."""
        if os.path.isdir(path) or not path.endswith(".safetensors"):
            os.makedirs(path, exist_ok=True)
            path = os.path.join(path, RECORD_NAME)
        tensors = {
            "norms": np.ascontiguousarray(self.norms, dtype=np.float32),
            "losses": np.ascontiguousarray(self.losses, dtype=np.float32),
            "cosines": np.ascontiguousarray(self.cosines, dtype=np.float32),
            "example_id": np.ascontiguousarray(self.example_id, dtype=np.int64),
            "row_hash": np.ascontiguousarray(self.row_hash, dtype=np.int64),
        }
        if self.sketches is not None:
            half = self.sketches.dtype == np.float16  # kept in float16 when recorded so (sketch_dtype)
            tensors["sketches"] = np.ascontiguousarray(self.sketches, dtype=np.float16 if half else np.float32)
        meta = {**self.metadata, "fingerprint": self.fingerprint}
        tmp = path + ".tmp"
        save_file(tensors, tmp, metadata={"hf_gradfilter": json.dumps(meta, default=str)})
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str, mmap: bool = False) -> GradientRecord:
        """Read the record at ``path`` (a directory or a ``.safetensors`` file); with ``mmap``, map its
        arrays read-only from the file instead (`mmap_safetensors`)."""
        path = _record_file(path)
        try:
            tensors = mmap_safetensors(path) if mmap else load_file(path)
            meta = read_record_metadata(path)
        except SafetensorError as err:
            raise ValueError(f"{path} is not a readable gradient record ({err}): pass the file a `hf-gradfilter "
                             "score` run wrote, or run it again.") from None
        return cls(tensors["norms"], tensors["losses"], tensors["example_id"], tensors["row_hash"], meta,
                   tensors.get("cosines"), tensors.get("sketches"))


def file_array(shape: tuple[int, ...], dtype, fill, directory: str | None = None) -> np.ndarray:
    """A ``shape`` array filled with ``fill``: in memory, or with ``directory`` an ``np.memmap`` on an
    unnamed temporary file in it (``tempfile.TemporaryFile``: unlinked at once on POSIX, so the space
    comes back when the process ends however it ends; nothing to clean up, nothing to resume from)."""
    if directory is None or int(np.prod(shape)) == 0:
        return np.full(shape, fill, dtype=dtype)
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory, prefix="hf_gradfilter_record_") as f:
            if hasattr(os, "posix_fallocate"):  # claim the blocks now: a full disk is an OSError here, not a
                os.posix_fallocate(f.fileno(), 0, nbytes)  # SIGBUS when a page is first written
            array = np.memmap(f, dtype=dtype, mode="w+", shape=shape)  # keeps its own mapping after f closes
    except OSError as err:
        raise OSError(err.errno, f"Cannot keep the gradient record ({nbytes / 2**20:.1f} MB for this array) in "
                                 f"{directory}: {err.strerror}. Use an output_dir on a writable disk with room for "
                                 "it.") from err
    array.fill(fill)
    return array


_SAFETENSORS_DTYPES = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "I64": np.int64, "I32": np.int32,
                       "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def mmap_safetensors(path: str) -> dict[str, np.ndarray]:
    """Every tensor of the safetensors file ``path`` as a read-only ``np.memmap`` (no copy, no pickle).

    The format: an 8-byte little-endian header length, a JSON header giving each tensor's dtype,
    shape and byte range ``data_offsets`` relative to the end of the header, then the data.
    (safetensors' own ``safe_open(...).get_tensor`` copies each tensor into memory.)
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8)) if size >= 8 else (size,)
        if header_len > size - 8:
            raise ValueError(f"{path} is not a safetensors file (header length {header_len}, file size {size}).")
        header = json.loads(f.read(header_len))
    out = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        if spec["dtype"] not in _SAFETENSORS_DTYPES:
            raise ValueError(f"Tensor {name!r} in {path} has dtype {spec['dtype']}, which numpy cannot map.")
        dtype = np.dtype(_SAFETENSORS_DTYPES[spec["dtype"]]).newbyteorder("<")
        start, end = spec["data_offsets"]
        shape = tuple(spec["shape"])
        if end - start != int(np.prod(shape)) * dtype.itemsize or end > size - 8 - header_len:
            raise ValueError(f"Tensor {name!r} in {path}: bytes {start}..{end} do not hold shape {shape} of "
                             f"{spec['dtype']}; the file is damaged.")
        if end == start:
            array = np.zeros(shape, dtype=dtype)
            array.flags.writeable = False
        else:
            array = np.memmap(path, dtype=dtype, mode="r", offset=8 + header_len + start, shape=shape)
        out[name] = array
    return out


def _record_file(path: str) -> str:
    if os.path.isdir(path):
        path = os.path.join(path, RECORD_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"No gradient record at {path}; run `hf-gradfilter score` first.")
    return path


def read_record_arrays(path: str, names):
    """Yield ``(name, array)`` for each of ``names`` that the record at ``path`` holds, mapped
    read-only from the file, so a caller copying them into place never holds a second record."""
    arrays = mmap_safetensors(_record_file(path))
    for name in names:
        if name in arrays:
            yield name, arrays[name]


def read_record_metadata(path: str) -> dict:
    """The metadata of the record at ``path`` (a directory or a ``.safetensors`` file), without its arrays."""
    with safe_open(_record_file(path), framework="numpy") as f:
        return json.loads((f.metadata() or {}).get("hf_gradfilter", "{}"))


def record_rows(record: GradientRecord, scored) -> np.ndarray:
    """``(len(scored),)`` int64: for each row of ``scored`` (the rows ``record`` was made from), its row in
    ``record``: matched by the ``example_id`` column, or by position without one. Each row's content hash is
    compared with the record's (as `GSNRScorer` does), so a subset, a reordered or a changed file is refused
    instead of getting another row's values."""
    from ..data.columns import read_int_columns
    from ..data.formatting import InstructionFormat, row_hashes

    ids = np.asarray(record.example_id)
    lookup = np.full(int(np.max(ids, initial=-1)) + 1, -1, dtype=np.int64)
    lookup[ids] = np.arange(len(ids))
    if "example_id" in scored.column_names:
        rows = read_int_columns(scored, ["example_id"])["example_id"]
    elif len(scored) == len(ids):
        rows = np.arange(len(scored))
    else:
        raise ValueError(f"The scored rows ({len(scored)}) are not the {len(ids)} rows of the gradient record and have "
                         "no example_id column to match them by: give the `scored` data of the same `score` run.")
    if len(rows) and (rows.max() >= len(lookup) or (lookup[rows] < 0).any()):
        raise ValueError(f"The scored rows do not match the record ({len(ids)} rows): some example_id is not in "
                         "it. Give the scored data and the proxy folder of the same `score` run.")
    at = lookup[rows]
    fmt = InstructionFormat(**record.metadata["format"]) if "format" in record.metadata else None
    columns = fmt.used_columns(scored.column_names) if fmt is not None else []
    if columns and all(c in scored.column_names for c in columns):
        start = 0
        for batch in scored.select_columns(columns).iter(batch_size=1 << 14):
            n = len(batch[columns[0]])
            if (np.asarray(row_hashes(batch, columns)) != np.asarray(record.row_hash)[at[start:start + n]]).any():
                raise ValueError("The scored rows differ from the rows the gradient record was made from (content "
                                 "hash mismatch): give the `scored` data and the proxy folder of the same `score` run.")
            start += n
    return at
