"""`GradientRecord`: every example's gradient norm and loss, per member and epoch.

Saved as one safetensors file (no pickle): tensors ``norms``, ``losses`` and ``cosines`` of shape
``(N, M, E)`` (float32, NaN where an example has no value), ``example_id`` and ``row_hash`` of
shape ``(N,)`` (int64), and JSON metadata (the config, the data format, the dataset fingerprint).
Records written before ``cosines`` existed load with an all-NaN ``cosines``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file
from safetensors import safe_open

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
    """

    norms: np.ndarray
    losses: np.ndarray
    example_id: np.ndarray
    row_hash: np.ndarray
    metadata: dict[str, Any] = field(default_factory=dict)
    cosines: np.ndarray | None = None

    def __post_init__(self):
        if self.norms.ndim != 3 or self.norms.shape != self.losses.shape:
            raise ValueError(f"norms {self.norms.shape} and losses {self.losses.shape} must both be (N, M, E).")
        if self.cosines is None:
            self.cosines = np.full(self.norms.shape, np.nan, dtype=np.float32)
        if self.cosines.shape != self.norms.shape:
            raise ValueError(f"cosines {self.cosines.shape} must have the shape of norms {self.norms.shape}.")
        n = self.norms.shape[0]
        if self.example_id.shape != (n,) or self.row_hash.shape != (n,):
            raise ValueError(f"example_id {self.example_id.shape} and row_hash {self.row_hash.shape} must be ({n},).")

    @classmethod
    def empty(cls, example_id, row_hash, num_members: int, num_epochs: int, metadata=None) -> GradientRecord:
        n = len(example_id)
        return cls(
            norms=np.full((n, num_members, num_epochs), np.nan, dtype=np.float32),
            losses=np.full((n, num_members, num_epochs), np.nan, dtype=np.float32),
            example_id=np.asarray(example_id, dtype=np.int64),
            row_hash=np.asarray(row_hash, dtype=np.int64),
            metadata=dict(metadata or {}),
        )

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
        return hashlib.sha256(np.ascontiguousarray(self.row_hash).tobytes()).hexdigest()[:16]

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
        meta = {**self.metadata, "fingerprint": self.fingerprint}
        tmp = path + ".tmp"
        save_file(tensors, tmp, metadata={"hf_gradfilter": json.dumps(meta, default=str)})
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str) -> GradientRecord:
        path = _record_file(path)
        tensors = load_file(path)
        with safe_open(path, framework="numpy") as f:
            meta = json.loads((f.metadata() or {}).get("hf_gradfilter", "{}"))
        return cls(tensors["norms"], tensors["losses"], tensors["example_id"], tensors["row_hash"], meta,
                   tensors.get("cosines"))


def _record_file(path: str) -> str:
    if os.path.isdir(path):
        path = os.path.join(path, RECORD_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"No gradient record at {path}; run `hf-gradfilter score` first.")
    return path


def read_record_arrays(path: str, names):
    """Yield ``(name, array)`` for each of ``names`` that the record at ``path`` holds, one array at
    a time, so a caller copying them into place never holds a second whole record."""
    with safe_open(_record_file(path), framework="numpy") as f:
        stored = set(f.keys())
        for name in names:
            if name in stored:
                yield name, f.get_tensor(name)
