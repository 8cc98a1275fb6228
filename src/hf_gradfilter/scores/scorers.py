"""The map-callable scorers over a `GradientRecord` and the score registry, one interface::

    scored = dataset.map(scorer, batched=True, with_indices=True)

Each returns only its new columns (rows, order and the other columns untouched).

- `GSNRScorer` -> `SCORER_COLUMNS`: ``fit_rank``, then the paper's ``gsnr`` and its parts ``grad_early`` (G_s),
  ``grad_late`` (G_t), ``rel_drop``, ``ens_var_late`` (V_t);
- `RecordScorer` -> `formulas.RECORD_COLUMNS`, the paper's ablations and the low-loss baseline;
- `DynamicsScorer` (with the ``base_loss`` / ``response_length`` columns) -> `dynamics.DYNAMICS_COLUMNS`, the
  literature's keep-scores and the default ``neg_energy_token`` (docs/default_choice.md);
- `RandomScorer` -> ``random``;  `LengthScorer` -> ``response_length``.

The model-pass scorers (Superfiltering's IFD, the frozen base's loss) are in `ifd`. `SCORERS` describes every
score column; `HIGHER_IS_BETTER` says which ones are keep-scores. Formulas: `formulas`, `dynamics`.
"""

from __future__ import annotations

import numpy as np

from ..data.formatting import InstructionFormat, check_tokenizer, raw_responses, row_hashes, tokenize_batch
from ..proxy.record import GradientRecord
from .dynamics import DYNAMICS_COLUMNS, dynamics_parts
from .formulas import (
    DEFAULT_EPS,
    RECORD_COLUMNS,
    SCORE_COLUMNS,
    fit_rank,
    mean_loss,
    record_parts,
    score_parts,
    uniform_hash,
)

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


# column, scorer, higher is better (a keep-score for `select_top`), description
_SPEC = [
    ("fit_rank", "GSNRScorer", True, "(r(-G_t) + r(-L_t)) / 2 (the previous default), ranks of low late "
                                     "gradient energy and low late proxy loss (docs/remedies.md)"),
    ("gsnr", "GSNRScorer", True, "G-SNR = (G_s - G_t) / (G_s + eps) / (V_t + eps), the paper's score"),
    ("rel_drop", "GSNRScorer", True, "Alt 2: relative drop (G_s - G_t) / (G_s + eps)"),
    ("raw_drop", "RecordScorer", True, "Alt 1: raw drop G_s - G_t"),
    ("var_drop", "RecordScorer", True, "Alt 3: variance-normalised drop (G_s - G_t) / (V_t + eps)"),
    ("neg_grad_late", "RecordScorer", True, "-G_t: low late gradient energy"),
    ("neg_var_late", "RecordScorer", True, "-V_t: low late ensemble variance"),
    ("neg_loss_late", "RecordScorer", True, "-L_t: low proxy loss (members' mean at the late epoch)"),
    ("gsnr_dir", "RecordScorer", True, "direction-aware G-SNR = G-SNR * (1 + sign(G-SNR) * C_t)"),
    ("cos_late", "RecordScorer", True, "C_t: members' mean cosine of the late gradient with their mean gradient"),
    ("ambiguity", "DynamicsScorer", True, "Cartography variability std_{m,e} exp(-L): rows the ensemble is unsure "
                                          "about across members and epochs"),
    ("confidence", "DynamicsScorer", True, "Cartography confidence mean_{m,e} exp(-L): easy rows first"),
    ("mid_loss", "DynamicsScorer", True, "-|r(L_t) - 1/2|: the middle of the proxy-loss range (both tails last)"),
    ("mid_loss_energy", "DynamicsScorer", True, "(mid(L_t) + mid(G_t)) / 2: the middle of loss and gradient energy"),
    ("mid_base_loss", "DynamicsScorer", True, "-|r(L_0) - 1/2|: the middle of the frozen base's loss range"),
    ("reducible_loss", "DynamicsScorer", True, "L_0 - L_t: what the trained ensemble learned beyond the base"),
    ("least_learned", "DynamicsScorer", True, "-(P_0 - P_t) / P_0, P = exp(loss): the least-learned rows "
                                              "(learning percentage)"),
    ("neg_energy_token", "DynamicsScorer", True, "the default: -G_t * T, low late gradient energy, length-normalised "
                                                 "(docs/default_choice.md)"),
    ("base_loss", "BaseLossScorer", False, "L_0: the frozen base model's response loss, diagnostic"),
    ("ifd", "IFDScorer", True, "Superfiltering IFD = PPL(response | prompt) / PPL(response); "
                               "select with superfiltering_select (drops IFD >= 1)"),
    ("random", "RandomScorer", True, "uniform [0, 1) per (seed, example id): a random subset"),
    ("response_length", "LengthScorer", True, "response tokens (or words): the longest responses"),
    ("grad_early", "GSNRScorer", False, "G_s, diagnostic"),
    ("grad_late", "GSNRScorer", False, "G_t, diagnostic (keep-score: neg_grad_late)"),
    ("ens_var_late", "GSNRScorer", False, "V_t, diagnostic (keep-score: neg_var_late)"),
    ("loss_late", "RecordScorer", False, "L_t, diagnostic (keep-score: neg_loss_late)"),
    ("ppl_conditioned", "IFDScorer", False, "PPL(response | prompt), diagnostic"),
    ("ppl_response", "IFDScorer", False, "PPL(response alone), diagnostic"),
]
SCORERS: dict[str, str] = {c: f"{d} [{s}; {'higher' if h else 'lower'} is better]" for c, s, h, d in _SPEC}
HIGHER_IS_BETTER: dict[str, bool] = {c: h for c, _, h, _ in _SPEC}
SCORER_OF: dict[str, str] = {c: s for c, s, _, _ in _SPEC}


def batch_ids(batch: dict[str, list], indices: list[int] | None, who: str) -> list[int]:
    """Row ids of a batch: its ``example_id`` column when present, else the map's indices."""
    if "example_id" in batch:
        return batch["example_id"]
    if indices is None:
        raise ValueError(f"{who} needs row positions or an example_id column: call "
                         f"dataset.map(scorer, batched=True, with_indices=True).")
    return indices


def _positions(batch: dict[str, list], indices: list[int] | None) -> list[int]:
    """Row positions for naming rows in errors (only): the map's indices, else ``0..B-1``."""
    return list(indices) if indices is not None else list(range(len(next(iter(batch.values())))))


class RecordScorer(GSNRScorer):
    """Ablations and the low-loss baseline from a `GradientRecord` (no model pass): `RECORD_COLUMNS`.

    ``raw_drop = G_s - G_t``, ``var_drop = (G_s - G_t) / (V_t + eps)``, ``loss_late = L_t`` (members'
    mean recorded loss at the late epoch), ``neg_loss_late = -L_t``, ``neg_grad_late = -G_t``,
    ``neg_var_late = -V_t``, ``cos_late = C_t`` (members' mean late cosine with their mean gradient),
    ``gsnr_dir = G-SNR * (1 + sign(G-SNR) * C_t)`` (formulas: `formulas.record_parts`). Rows are matched
    and verified exactly as `GSNRScorer` does; ``with_gsnr=True`` also appends its columns.
    """

    def __init__(self, record, early_epoch: int | None = None, late_epoch: int | None = None,
                 eps: float = 1e-8, verify: bool = True, with_gsnr: bool = False):
        super().__init__(record, early_epoch, late_epoch, eps, verify)
        self.with_gsnr = with_gsnr
        self.extra = record_parts(self.record.norms, self.record.losses, self.early_epoch, self.late_epoch, eps,
                                  self.record.cosines)

    def __call__(self, batch: dict[str, list], indices: list[int] | None = None) -> dict[str, list]:
        gsnr_columns = super().__call__(batch, indices)  # matches ids and verifies row hashes
        rows = self._rows(batch_ids(batch, indices, type(self).__name__))
        out = {name: self.extra[name][rows].tolist() for name in RECORD_COLUMNS}
        return {**gsnr_columns, **out} if self.with_gsnr else out


class RandomScorer:
    """``random``: a uniform ``[0, 1)`` value per row from ``(seed, example_id or position)``.

    `formulas.uniform_hash`, so the same whatever the batch size; top-k of it is a random subset.
    """

    def __init__(self, seed: int = 0):
        self.seed = seed

    def __call__(self, batch: dict[str, list], indices: list[int] | None = None) -> dict[str, list]:
        return {"random": uniform_hash(batch_ids(batch, indices, "RandomScorer"), self.seed).tolist()}


class LengthScorer:
    """``response_length``: the row's response length.

    With a tokenizer, the response tokens the proxy is trained on (``num_response_tokens`` of
    `formatting.tokenize_batch`: the rendered response, eos or end-of-turn tokens included, no
    truncation unless ``max_length``); without, whitespace-separated words of the raw response
    (alpaca ``output``, ``completion``, or every assistant turn's content).
    """

    def __init__(self, tokenizer=None, fmt: InstructionFormat | None = None, max_length: int | None = None):
        self.tokenizer, self.fmt, self.max_length = tokenizer, fmt or InstructionFormat(), max_length

    def __call__(self, batch: dict[str, list], indices: list[int] | None = None) -> dict[str, list]:
        fmt = self.fmt.resolve(list(batch))
        positions = _positions(batch, indices)
        if self.tokenizer is not None or fmt.kind == "tokenized":
            if self.tokenizer is not None:
                check_tokenizer(self.tokenizer, fmt.kind)
            tok = tokenize_batch(batch, positions, fmt=fmt, tokenizer=self.tokenizer,
                                 max_length=self.max_length or 2**62, used_columns=fmt.used_columns(list(batch)))
            return {"response_length": tok["num_response_tokens"]}
        return {"response_length": [len(t.split()) for t in raw_responses(batch, fmt, positions)]}


class DynamicsScorer(GSNRScorer):
    """The literature's keep-scores over the record (`dynamics.DYNAMICS_COLUMNS`, formulas there): Cartography's
    ``ambiguity`` and ``confidence``, the middle of the loss range (``mid_loss``, ``mid_loss_energy``,
    ``mid_base_loss``), ``reducible_loss``, ``least_learned`` and ``neg_energy_token``.

    Rank-based columns are ranked over *all* rows, so the whole ``base_loss`` and ``response_length`` columns
    are given up front, in the record's row order (None: their columns are NaN)::

        cols = read_columns(scored, ["base_loss", "response_length"])
        scored = scored.map(DynamicsScorer(record, cols["base_loss"], cols["response_length"]),
                            batched=True, with_indices=True)

    Rows are matched and verified as `GSNRScorer` does.
    """

    def __init__(self, record, base_loss=None, length=None, early_epoch: int | None = None,
                 late_epoch: int | None = None, verify: bool = True):
        super().__init__(record, early_epoch, late_epoch, verify=verify)
        self.dynamics = dynamics_parts(self.record.norms, self.record.losses, self.early_epoch, self.late_epoch,
                                       base_loss=base_loss, length=length)

    def __call__(self, batch: dict[str, list], indices: list[int] | None = None) -> dict[str, list]:
        super().__call__(batch, indices)  # matches ids and verifies row hashes
        rows = self._rows(batch_ids(batch, indices, type(self).__name__))
        return {name: self.dynamics[name][rows].tolist() for name in DYNAMICS_COLUMNS}
