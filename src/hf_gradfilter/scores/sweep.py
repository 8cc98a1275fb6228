"""The sweep verb (``hf-gradfilter sweep``): re-score a gradient record on a grid of (s, t, M') with
`sweep.sweep_record`, against labels when given, with no training (``--demo`` trains the demo ensemble first)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np

from ..data.io import load_rows
from ..proxy.config import GradFilterConfig
from ..proxy.record import GradientRecord
from .formulas import DEFAULT_SCORE
from .score import ScoreArguments, score
from .sweep_grid import format_pair_matrix, format_table, sweep_record


@dataclass
class SweepArguments:
    """Which record to re-score, on which grid of (s, t, M'), and against which labels."""

    record: str | None = field(default=None, metadata={
        "help": "The gradient record: a `score` output dir or a gradient_record.safetensors file."})
    scored: str | None = field(default=None, metadata={
        "help": "Scored dataset holding --label_column (default: the record dir's scored/ folder)."})
    label_column: str | None = field(default=None, metadata={
        "help": "Boolean column, True = a bad row (e.g. is_corrupted): adds the AUROC of each setting."})
    score: list[str] = field(default_factory=lambda: [DEFAULT_SCORE, "gsnr"], metadata={
        "help": "Scores to sweep: neg_energy_token (needs the scored dataset's response_length), fit_rank, gsnr, "
                "rel_drop, raw_drop, var_drop, neg_grad_late, neg_var_late, "
                "neg_loss_late..."})
    epochs: list[int] = field(default_factory=list, metadata={
        "help": "Epochs to pair as (s, t), s < t (default: every recorded epoch)."})
    members: list[int] = field(default_factory=list, metadata={
        "help": "Sub-ensemble sizes M' (default: 2..M). All subsets of a size when at most --max_subsets, else a "
                "seeded sample of --max_subsets."})
    max_subsets: int = field(default=10, metadata={"help": "Most member subsets per size M'."})
    subset_seed: int = field(default=0, metadata={"help": "Seed of the member-subset sample."})
    reference_epochs: list[int] = field(default_factory=lambda: [1, 2], metadata={
        "help": "The reference (s, t), with all members, that every setting is rank-correlated with."})
    demo: bool = field(default=False, metadata={
        "help": "Train the demo proxy ensemble on the embedded demo dataset first (into --output_dir; 4 epochs "
                "unless --num_train_epochs), then sweep its record with labels from is_corrupted."})
    demo_rows: int = field(default=3000, metadata={"help": "Rows of the demo dataset."})
    demo_pretrain_rows: int = field(default=3000, metadata={"help": "Clean rows that pre-train the demo backbone."})
    demo_pretrain_epochs: int = field(default=4, metadata={"help": "Pre-training epochs of the demo backbone."})


def _aligned(scored, column: str, record, what: str = "Label column") -> np.ndarray:
    """``column`` of ``scored`` in the record's row order."""
    if column not in scored.column_names:
        raise ValueError(f"{what} {column!r} is not in the scored dataset (columns: {scored.column_names}).")
    values = np.asarray(scored[column])
    if len(values) != record.num_examples:
        raise ValueError(f"The scored dataset has {len(values)} rows but the record {record.num_examples}: pass the "
                         "dataset this record was scored on.")
    return values[record.example_id]


def _labels(scored, column: str, record) -> np.ndarray:
    """The boolean ``column`` of ``scored`` in the record's row order."""
    values = _aligned(scored, column, record)
    if values.dtype != bool and not (values.dtype.kind in "iu" and set(np.unique(values)) <= {0, 1}):
        raise ValueError(f"Label column {column!r} must be boolean (True = a bad row), got {values.dtype} values "
                         f"such as {values[:3].tolist()}.")
    return values.astype(bool)


def sweep(args: SweepArguments, config: GradFilterConfig):
    """Re-score the record on a grid of (s, t, M'); print, and write sweep.csv / sweep.json / sweep_<score>.png."""
    if len(args.reference_epochs) != 2:
        raise ValueError(f"--reference_epochs takes two epochs, s and t (got {args.reference_epochs}).")
    label_column, scored = args.label_column, None
    if args.demo:
        if args.record:
            raise ValueError("Pass either --record (an existing run) or --demo (train the demo ensemble), not both.")
        trainer = score(ScoreArguments(demo=True, demo_rows=args.demo_rows, demo_pretrain_rows=args.demo_pretrain_rows,
                                       demo_pretrain_epochs=args.demo_pretrain_epochs), config)
        record, scored, label_column = trainer.record, trainer.scored, label_column or "is_corrupted"
    else:
        if not args.record:
            raise ValueError("Pass --record (a `score` output dir or its gradient_record.safetensors), or --demo.")
        record = GradientRecord.load(args.record)
        if label_column or "neg_energy_token" in args.score:
            where = args.scored or os.path.join(args.record if os.path.isdir(args.record)
                                                else os.path.dirname(args.record), "scored")
            if not os.path.exists(where):
                raise FileNotFoundError(f"No scored dataset at {where} for --label_column or neg_energy_token (it "
                                        "needs response_length); pass --scored, or --score fit_rank gsnr.")
            scored = load_rows(where)
    labels = _labels(scored, label_column, record) if label_column else None
    length = (_aligned(scored, "response_length", record, "neg_energy_token needs the column").astype(np.float64)
              if "neg_energy_token" in args.score else None)
    start = time.perf_counter()
    result = sweep_record(record, config.output_dir, labels=labels, scores=tuple(args.score),
                          epochs=args.epochs or None,
                          member_counts=args.members or None, max_subsets=args.max_subsets, seed=args.subset_seed,
                          reference=tuple(args.reference_epochs), label_column=label_column, length=length)
    s0, t0 = args.reference_epochs
    print(f"\nSweep of {record.num_examples} rows, {record.num_members} members, {record.num_epochs} epochs: "
          f"{len(result['rows'])} (score, setting) pairs in {time.perf_counter() - start:.1f} s")
    print(f"Spearman with the reference (s={s0}, t={t0}, all {record.num_members} members), mean [min] over the "
          "member subsets of each size M'" + (f"; AUROC of each score as a keep-score against {label_column!r}"
                                              if labels is not None else ""))
    print(format_table(result["summary"]))
    for name, matrix in result["pair_spearman"].items():
        print(f"\nSpearman of {name} between epoch pairs (s-t), all members:")
        print(format_pair_matrix(matrix, result["pairs"]))
    print(f"\nWrote {', '.join(result['paths'].values())}")
    return result
