"""`GSNRScorer`: appends G-SNR columns to a dataset with ``dataset.map(scorer, batched=True)``.

The columns (`SCORER_COLUMNS`): ``fit_rank`` (`scoring.fit_rank`: low late gradient energy and low late
proxy loss, by rank; the default until docs/default_choice.md replaced it on real data with
``neg_energy_token``, which needs each row's response length: `dynamics.DynamicsScorer`), then the paper's
``gsnr`` and its parts ``grad_early`` (G_s), ``grad_late`` (G_t), ``rel_drop``
and ``ens_var_late`` (V_t).
"""

from __future__ import annotations

import numpy as np

from ..data.formatting import InstructionFormat, row_hashes
from ..proxy.record import GradientRecord
from .scoring import DEFAULT_EPS, SCORE_COLUMNS, fit_rank, mean_loss, score_parts

SCORER_COLUMNS = ("fit_rank", *SCORE_COLUMNS)


class GSNRScorer:
    """A batched `Dataset.map` function that appends `SCORER_COLUMNS` from a `GradientRecord`.

    Rows are matched to the record by their ``example_id`` column when present, else by position
    (``with_indices=True``). Each row's content is hashed and compared with the record, so a record
    made from another (or a changed) dataset is refused instead of silently mis-scoring rows::

        scorer = GSNRScorer("outputs/proxy")            # a record file or the trainer's output dir
        scored = dataset.map(scorer, batched=True, with_indices=True)

    Args:
        record: a `GradientRecord` or a path to one.
        early_epoch, late_epoch: the s and t of G-SNR (default: the ones the record was made with).
        eps: the epsilon of both denominators.
        verify: compare row hashes (on by default).
    """

    def __init__(self, record: GradientRecord | str, early_epoch: int | None = None, late_epoch: int | None = None,
                 eps: float = DEFAULT_EPS, verify: bool = True):
        self.record = GradientRecord.load(record) if isinstance(record, str) else record
        config = self.record.metadata.get("config", {})
        self.early_epoch = early_epoch or int(config.get("early_epoch", 1))
        self.late_epoch = late_epoch or int(config.get("late_epoch", 2))
        self.eps = eps
        self.verify = verify
        self.parts = score_parts(self.record.norms, self.early_epoch, self.late_epoch, eps)
        self.parts["fit_rank"] = fit_rank(self.parts["grad_late"], mean_loss(self.record.losses, self.late_epoch))
        self.format = InstructionFormat(**self.record.metadata["format"]) if "format" in self.record.metadata else None
        ids = self.record.example_id
        self._position = None if np.array_equal(ids, np.arange(len(ids))) else {int(e): i for i, e in enumerate(ids)}

    def _rows(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        n = self.record.num_examples
        if self._position is None:
            bad = ids[(ids < 0) | (ids >= n)]
        else:
            bad = np.array([i for i in ids if int(i) not in self._position], dtype=np.int64)
        if len(bad):
            raise ValueError(
                f"Example id(s) {bad[:10].tolist()} are not in the gradient record ({n} rows); "
                "the dataset is not the one that was scored."
            )
        return ids if self._position is None else np.array([self._position[int(i)] for i in ids], dtype=np.int64)

    def __call__(self, batch: dict[str, list], indices: list[int] | None = None) -> dict[str, list]:
        if "example_id" in batch:
            ids = batch["example_id"]
        elif indices is not None:
            ids = indices
        else:
            raise ValueError(
                "GSNRScorer needs row positions or an example_id column: call "
                "dataset.map(scorer, batched=True, with_indices=True)."
            )
        rows = self._rows(ids)
        if self.verify and self.format is not None:
            columns = self.format.used_columns(list(batch))
            missing = [c for c in columns if c not in batch]
            if missing:
                raise ValueError(f"Cannot verify rows against the record: column(s) {missing} are missing.")
            mismatch = np.flatnonzero(np.asarray(row_hashes(batch, columns)) != self.record.row_hash[rows])
            if len(mismatch):
                raise ValueError(
                    f"Row(s) with example id {np.asarray(ids)[mismatch][:10].tolist()} differ from the rows the "
                    "gradient record was made from (content hash mismatch): the dataset changed after "
                    "scoring, or this record belongs to another dataset. Re-run scoring on this dataset."
                )
        return {name: self.parts[name][rows].tolist() for name in SCORER_COLUMNS}

    def check_dataset(self, dataset) -> None:
        """Refuse a dataset whose size differs from the record's."""
        if len(dataset) != self.record.num_examples:
            raise ValueError(
                f"The dataset has {len(dataset)} rows but the gradient record has {self.record.num_examples} "
                f"(fingerprint {self.record.fingerprint}); score this dataset first."
            )


def score_dataset(dataset, record: GradientRecord | str, **kwargs):
    """Append G-SNR columns to ``dataset`` (the one the record was made from), keeping rows and order."""
    scorer = GSNRScorer(record, **kwargs)
    if "example_id" not in dataset.column_names:
        scorer.check_dataset(dataset)
    return dataset.map(scorer, batched=True, with_indices=True, desc="Scoring")
