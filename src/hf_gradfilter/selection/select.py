"""The select stage (``hf-gradfilter select``): keep the top rows of a scored dataset by a score
column, globally, per group or by quota, and write them."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from ..data.columns import read_columns
from ..data.io import load_rows, save_rows
from ..proxy.probe import recorded_format
from ..scores.formulas import DEFAULT_SCORE
from ..scores.sketched import sketch_options
from ..scores.text_duplicates import (
    JACCARD_COLUMN,
    NGRAM,
    add_text_duplicate_columns,
    check_text_duplicates,
    check_threshold,
)
from ..selection.superfiltering import superfiltering_select
from .top import check_columns, format_group_table, select_top


def select_rows(dataset, score_column: str, fraction: float | None = None, k: int | None = None,
                group_column: str | None = None, group_mode: str = "global", quotas: dict | None = None):
    """`select_top`, except that ``ifd`` follows Superfiltering's rule: `superfiltering_select` without
    groups, and within groups rows with IFD >= 1 (or NaN) are never kept. Returns ``(selected, stats)``."""
    group = {"group_column": group_column, "group_mode": group_mode, "quotas": quotas}
    if score_column != "ifd":
        return select_top(dataset, score_column, fraction=fraction, k=k, **group)
    if group_column is None:
        if k is not None:
            raise ValueError("--score_column ifd selects by --ratio (Superfiltering's rule), not --top_k.")
        return superfiltering_select(dataset, fraction)
    if "ifd" not in dataset.column_names:
        raise ValueError(f"Column 'ifd' is not in the dataset (columns: {dataset.column_names}); score it with "
                         "`hf-gradfilter score --extra_scores ifd` first.")
    ifd = np.asarray(read_columns(dataset, ["ifd"])["ifd"], dtype=np.float64)
    masked = dataset.add_column("ifd_below_1", np.where(ifd >= 1, np.nan, ifd))
    selected, stats = select_top(masked, "ifd_below_1", fraction=fraction, k=k, **group)
    return selected.remove_columns("ifd_below_1"), {**stats, "score_column": "ifd"}


def _set_aside(dataset, flagged: np.ndarray, score_column: str):
    """``dataset`` with ``score_column`` set to NaN on the ``flagged`` rows (a boolean mask)."""
    if score_column not in dataset.column_names:
        raise ValueError(f"Column {score_column!r} is not in the dataset (columns: {dataset.column_names}).")
    if flagged.any():
        scores = np.array(read_columns(dataset, [score_column])[score_column], dtype=np.float64)  # a writable copy
        scores[flagged] = np.nan
        order = dataset.column_names
        dataset = dataset.remove_columns(score_column).add_column(score_column, scores).select_columns(order)
    return dataset, int(flagged.sum())


def drop_near_duplicates(dataset, threshold: float, score_column: str = DEFAULT_SCORE):
    """``dataset`` with ``score_column`` set to NaN on the rows whose ``sketch_nearest_cos`` is ``>= threshold`` (a
    cosine in ``(0, 1]``), and how many rows that is.

    NaN rows are never selected, while ``--ratio``, per-group counts and quotas still count every row, so a
    deduplicated top 10% has the size of any other top 10% (a random baseline included). A row is flagged
    against its most similar earlier row, whether or not that row is itself flagged (a chain of near-copies
    keeps its first row only)."""
    if not 0 < threshold <= 1:
        raise ValueError(f"--drop_near_duplicates {threshold}: give a cosine in (0, 1], e.g. 0.98.")
    if "sketch_nearest_cos" not in dataset.column_names:
        raise ValueError("--drop_near_duplicates needs the column sketch_nearest_cos: score with gradient sketches "
                         "(`hf-gradfilter score --sketch_dim 1024 ...`).")
    cos = np.asarray(read_columns(dataset, ["sketch_nearest_cos"])["sketch_nearest_cos"], dtype=np.float64)
    return _set_aside(dataset, cos >= threshold, score_column)


def drop_text_duplicates(dataset, threshold: float, score_column: str = DEFAULT_SCORE):
    """`drop_near_duplicates` for the text near-duplicates: ``score_column`` set to NaN on the rows whose
    ``text_duplicate_jaccard`` (the column `scores.text_duplicates.add_text_duplicate_columns` adds; it must have
    been made at a threshold no higher than this one) is ``>= threshold``, and how many rows that is."""
    check_threshold(threshold, "--drop_text_duplicates")
    if JACCARD_COLUMN not in dataset.column_names:
        raise ValueError(f"--drop_text_duplicates needs the column {JACCARD_COLUMN}: add it with "
                         "hf_gradfilter.scores.text_duplicates.add_text_duplicate_columns (the select verb and run "
                         "do).")
    jaccard = np.asarray(read_columns(dataset, [JACCARD_COLUMN])[JACCARD_COLUMN], dtype=np.float64)
    return _set_aside(dataset, jaccard >= threshold, score_column)


class Selection(NamedTuple):
    """What the select stage returns (`pick_rows`): the kept rows' ``positions`` in the scored dataset, ascending
    ``(n_kept,)`` int64, and the selection's ``stats`` (counts, thresholds, the rule used, what was set aside)."""

    positions: np.ndarray
    stats: dict


def pick_rows(scored, score_column: str, *, fraction: float | None = None, k: int | None = None,
              group_column: str | None = None, group_mode: str = "global", quotas: dict | None = None,
              near_duplicates: float | None = None, text_duplicates: float | None = None,
              sketch_stats: dict | None = None):
    """The select stage's one rule, used by the `select` verb and by `run`: set near-duplicates aside
    (``near_duplicates``: a sketch cosine, `drop_near_duplicates`; ``text_duplicates``: a word-n-gram Jaccard
    similarity, `drop_text_duplicates`), then keep the top ``fraction`` (or ``k``) by
    ``score_column`` (`select_rows`: globally, per group or by quota; ``ifd`` by Superfiltering's rule). With
    ``sketch_stats`` from `scores.sketched.sketch_options` that name a cluster column (``--diversity_clusters``),
    the top of every cluster (or group x cluster cell) is kept instead.

    Returns a `Selection` ``(positions, stats)``: the kept rows' positions in ``scored``, ascending, and the
    selection's stats (with the sketch stats, ``num_near_duplicates_dropped`` and ``num_text_duplicates_dropped``
    when asked)."""
    sketch_stats = dict(sketch_stats or {})
    clusters = sketch_stats.pop("group_column", None)
    if clusters is not None:
        group_column, group_mode = clusters, "per_group"
    check_columns(scored, score_column, group_column)  # before the helper column, which errors would list
    rows = scored.add_column("_position", np.arange(len(scored)))
    dropped = {}
    if near_duplicates is not None:
        rows, dropped["num_near_duplicates_dropped"] = drop_near_duplicates(rows, near_duplicates, score_column)
    if text_duplicates is not None:
        rows, dropped["num_text_duplicates_dropped"] = drop_text_duplicates(rows, text_duplicates, score_column)
    selected, stats = select_rows(rows, score_column, fraction=fraction, k=k, group_column=group_column,
                                  group_mode=group_mode, quotas=quotas)
    stats.update({**sketch_stats, "group_column": group_column, **dropped})
    return Selection(np.sort(read_columns(selected, ["_position"])["_position"]), stats)


@dataclass
class SelectArguments:
    """Which rows to keep."""

    scored: str = field(metadata={"help": "Scored dataset: the `scored` folder written by `score`, or a file."})
    score_column: str | None = field(default=None, metadata={
        "help": "Column to rank by, higher kept: neg_energy_token (default: low late gradient energy times response "
                "length, docs/default_choice.md; with --target_dataset: target_alignment), fit_rank (the previous "
                "default), gsnr (the paper's formula), mid_loss, cos_late, gsnr_dir, rel_drop, raw_drop, var_drop, "
                "neg_grad_late, neg_var_late, neg_loss_late, or a "
                "baseline added with --extra_scores "
                "(ifd uses Superfiltering's rule), or any numeric column."})
    ratio: float | None = field(default=None, metadata={"help": "Fraction to keep, in (0, 1] (default 0.1)."})
    top_k: int | None = field(default=None, metadata={"help": "Number of rows to keep (instead of --ratio)."})
    output: str | None = field(
        default=None,
        metadata={"help": "Where to write the selection: a folder (save_to_disk) or a .jsonl/.json/.parquet file. "
                          "Default: next to the scored data, named after the column and ratio."},
    )
    group_column: str | None = field(default=None, metadata={
        "help": "Column naming each row's group in a mixture (e.g. task or source): print what each group kept "
                "and allow --group_mode per_group / quota."})
    group_mode: str = field(default="global", metadata={
        "help": "global: the top --ratio overall; per_group: the top --ratio of every group (round(ratio * n_g), "
                "at least 1; --top_k: k rows per group); quota: the --quota of each group.",
        "choices": ["global", "per_group", "quota"]})
    quota: list[str] = field(default_factory=list, metadata={
        "help": "With --group_mode quota: GROUP=N (rows) or GROUP=0.25 (a fraction, with a decimal point), one per "
                "group; groups without a quota follow --ratio / --top_k per group, or keep nothing."})
    drop_near_duplicates: float | None = field(default=None, metadata={
        "help": "Never select rows whose gradient sketch has cosine >= this (e.g. 0.98) with an earlier row's (the "
                "column sketch_nearest_cos, written by `score --sketch_dim 1024`); --ratio and quotas still count "
                "every row, so the subset keeps its size."})
    drop_text_duplicates: float | None = field(default=None, metadata={
        "help": "Never select rows whose text (the columns the score run read, e.g. instruction, input and output; "
                "lower-cased, punctuation dropped) "
                f"has word {NGRAM}-gram Jaccard similarity >= this (e.g. 0.7) with an earlier row's: MinHash LSH, each "
                "match confirmed exactly (columns text_duplicate_of and text_duplicate_jaccard; needs "
                "`pip install 'hf-gradfilter[dedup]'`); --ratio and quotas still count every row."})
    target_dataset: str | None = field(default=None, metadata={
        "help": "Rows of the task you care about (a few dozen to a few hundred; a file, saved dataset or Hub id, any "
                "supported format): adds the column target_alignment, each row's mean cosine with the target rows' "
                "gradient sketches (LESS's rule; needs `score --sketch_dim`), and ranks by it unless --score_column "
                "says otherwise."})
    target_split: str = field(default="train", metadata={"help": "Split of --target_dataset (a Hub id)."})
    diversity_clusters: int | None = field(default=None, metadata={
        "help": "Cluster the rows' gradient sketches into this many k-means clusters (column sketch_cluster) and keep "
                "the top --ratio of every cluster (the per_group rule; with --group_mode per_group, of every "
                "group's part of every cluster), so no gradient direction is left out; needs `score --sketch_dim`."})
    proxy_dir: str | None = field(default=None, metadata={
        "help": "The `score` run's output_dir, holding the record and members (default: the folder of --scored)."})
    proxy_model: str | None = field(default=None, metadata={
        "help": "The proxy's base model for --target_dataset (default: the one the score run recorded)."})
    seed: int = field(default=0, metadata={"help": "Seed of the k-means clustering (--diversity_clusters)."})
    features: str = field(default="sketch", metadata={
        "help": "What --target_dataset and --diversity_clusters compare: 'sketch' (the rows' gradient sketches; "
                "needs `score --sketch_dim`) or 'embedding' (the rows' mean hidden state over their response under "
                "the proxy's frozen backbone, RDS+; a forward pass at select time, no sketches needed)."})


def parse_quotas(items: list[str]) -> dict[str, int | float]:
    """``["code=500", "math=0.2"]`` -> ``{"code": 500, "math": 0.2}``: an integer is a row count, a number with a
    decimal point (or an exponent) a fraction of the group."""
    quotas = {}
    for item in items:
        group, sep, value = item.rpartition("=")
        try:
            if not (sep and group):
                raise ValueError
            quotas[group] = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            raise ValueError(f"Bad quota {item!r}: write GROUP=N (a row count, e.g. code=500) or GROUP=FRACTION "
                             "(e.g. math=0.2).") from None
    return quotas


def select(args: SelectArguments):
    quotas = parse_quotas(args.quota)
    if quotas and args.group_mode != "quota":
        raise ValueError(f"--quota is used with --group_mode quota (got --group_mode {args.group_mode}).")
    if args.group_mode != "global" and args.group_column is None:
        raise ValueError(f"--group_mode {args.group_mode} needs --group_column (e.g. task or source).")
    if args.ratio is None and args.top_k is None and args.group_mode != "quota":
        args.ratio = 0.1
    if args.ratio is not None and args.top_k is not None:
        raise ValueError("Pass either --ratio or --top_k, not both.")
    if args.score_column is None:
        args.score_column = "target_alignment" if args.target_dataset else DEFAULT_SCORE
    if args.diversity_clusters is not None and args.group_mode == "quota":
        raise ValueError("--diversity_clusters keeps the top --ratio of every cluster; it takes no quotas.")
    if args.drop_text_duplicates is not None:
        check_text_duplicates(args.drop_text_duplicates, "--drop_text_duplicates")
    scored = load_rows(args.scored)
    scored, sketch_stats = sketch_options(
        scored, args.scored, target_dataset=args.target_dataset, target_split=args.target_split,
        diversity_clusters=args.diversity_clusters, proxy_dir=args.proxy_dir, proxy_model=args.proxy_model,
        seed=args.seed, group_column=args.group_column if args.group_mode == "per_group" else None,
        features=args.features)
    if args.drop_text_duplicates is not None:  # the text of the columns the score run read
        folder = args.proxy_dir or os.path.dirname(os.path.abspath(os.path.normpath(args.scored)))
        fmt = recorded_format(folder)
        try:
            scored, text_stats = add_text_duplicate_columns(scored, args.drop_text_duplicates, fmt)
        except ValueError as err:
            if fmt is not None:
                raise
            raise ValueError(f"{err} (No gradfilter_config.json in {folder} to read the score run's column names "
                             "from: pass --proxy_dir, the score run's output_dir.)") from None
        sketch_stats.update(text_stats)
    positions, stats = pick_rows(scored, args.score_column, fraction=args.ratio, k=args.top_k,
                                 group_column=args.group_column, group_mode=args.group_mode, quotas=quotas or None,
                                 near_duplicates=args.drop_near_duplicates, text_duplicates=args.drop_text_duplicates,
                                 sketch_stats=sketch_stats)
    selected = scored.select(positions)
    args.group_column = stats["group_column"]
    if args.diversity_clusters is not None:
        args.group_mode = "per_group"
    if args.group_mode == "quota":
        tag = f"quota_{args.group_column}_top{stats['num_selected']}"
    else:
        tag = f"top{round(args.ratio * 100)}pct" if args.ratio is not None else f"top{args.top_k}"
        tag = f"per_{args.group_column}_{tag}" if args.group_mode == "per_group" else tag
    if args.drop_near_duplicates is not None:
        tag += f"_nodup{args.drop_near_duplicates:g}"
    if args.features == "embedding" and (args.target_dataset or args.diversity_clusters is not None):
        tag += "_emb"
    if args.drop_text_duplicates is not None:
        tag += f"_notextdup{args.drop_text_duplicates:g}"
    output = args.output or os.path.join(os.path.dirname(os.path.abspath(args.scored)),
                                         f"selected_{args.score_column}_{tag}")
    save_rows(selected, output)
    print(f"Selected {stats['num_selected']} of {stats['num_rows']} rows by {args.score_column!r} "
          f"(threshold {stats['threshold']:.6g}; {stats['num_nonfinite_excluded']} NaN/inf rows excluded) -> {output}")
    if args.drop_near_duplicates is not None:
        print(f"Dropped {stats['num_near_duplicates_dropped']} near-duplicate rows first (gradient-sketch cosine >= "
              f"{args.drop_near_duplicates:g} with an earlier row; never selected, still counted in --ratio).")
    if args.drop_text_duplicates is not None:
        print(f"Dropped {stats['num_text_duplicates_dropped']} text near-duplicate rows first (word {NGRAM}-gram "
              f"Jaccard >= {args.drop_text_duplicates:g} with an earlier row; never selected, still counted in "
              "--ratio).")
    if "target" in stats:
        t = stats["target"]
        used = t.get("target_rows_sketched", t.get("target_rows_embedded"))
        how = " (embeddings)" if args.features == "embedding" else ""
        print(f"Target alignment{how} against {used} of {t['target_rows']} target rows "
              f"(mean {t['alignment_mean']:.4f}) -> column target_alignment.")
    if args.group_column is not None:
        print(f"Rows kept per {args.group_column!r} ({args.group_mode}):")
        print(format_group_table(stats["groups"], args.group_column))
    return selected, stats, output
