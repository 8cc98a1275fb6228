"""Select the top fraction (or top k) of a scored dataset by any score column, globally or per group.

Per-group selection (a ``task`` or ``source`` column of a mixture), `top_indices_by_group`:

- ``global``:    the top ``round(fraction * N)`` rows overall, exactly as `top_indices`; the groups are
  only counted, so the table shows what a global cut did to each of them.
- ``per_group``: the top ``round(fraction * n_g)`` rows of every group g of ``n_g`` rows, at least 1
  (``k`` instead: ``min(k, n_g)`` rows of every group), so no group is wiped out.
- ``quota``:     ``quotas[g]`` rows of group g: an ``int`` is a row count (0 drops the group; more
  than ``n_g`` is an error), a ``float`` in ``[0, 1]`` a fraction, counted like ``per_group``
  (``round(q * n_g)``, at least 1 when ``q > 0``). Groups without a quota follow the ``per_group`` rule
  with ``fraction`` / ``k`` when one is given, else keep nothing.

``round`` is Python's (half to even, e.g. ``round(2.5) == 2``), the rule `top_indices` uses, so a
single group gives the same rows in every mode. Group values are compared as strings (``None``
becomes ``"None"``). NaN/inf scores are never selected: a group keeps fewer rows than requested
when it has too few finite scores (``requested`` > ``kept`` in its row of the table).
"""

from __future__ import annotations

import numpy as np

from ..data.columns import read_columns
from ..scores.formulas import DEFAULT_SCORE

GROUP_MODES = ("global", "per_group", "quota")


def _check_fraction(fraction) -> None:
    if isinstance(fraction, bool) or not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
        raise ValueError(f"ratio/fraction={fraction} is outside (0, 1]; use e.g. 0.1 for the top 10%.")


def _count(fraction: float, n: int) -> int:
    """Rows a fraction keeps of ``n``: ``round(fraction * n)`` (half to even), at least 1 when ``fraction > 0``."""
    return max(1, round(fraction * n)) if fraction > 0 else 0


def top_indices(scores, fraction: float | None = None, k: int | None = None) -> tuple[np.ndarray, dict]:
    """Positions of the best ``k`` (or ``round(fraction * N)``) finite scores, highest first.

    Ties are broken by position (earlier row first), so the result is deterministic. NaN and inf
    scores are never selected and are counted in the returned stats.
    """
    scores = np.asarray(scores, dtype=np.float64)
    n = len(scores)
    if n == 0:
        raise ValueError("The dataset is empty: there is nothing to select.")
    if (fraction is None) == (k is None):
        raise ValueError("Pass exactly one of fraction (e.g. 0.1) or k (a row count).")
    if fraction is not None:
        _check_fraction(fraction)
        k = _count(fraction, n)
    elif not (isinstance(k, (int, np.integer)) and k >= 1):
        raise ValueError(f"k={k} must be a positive integer.")
    finite = np.isfinite(scores)
    valid = np.flatnonzero(finite)
    if len(valid) == 0:
        raise ValueError("Every score is NaN or inf: nothing can be selected; check the scoring run.")
    order = valid[np.lexsort((valid, -scores[valid]))]
    chosen = order[: min(k, len(valid))]
    stats = {
        "num_rows": n,
        "num_nonfinite_excluded": int(n - len(valid)),
        "num_requested": int(k),
        "num_selected": len(chosen),
        "threshold": float(scores[chosen[-1]]),
    }
    return chosen, stats


def _quota_count(group: str, quota, n_g: int) -> int:
    if isinstance(quota, bool) or not isinstance(quota, (int, float, np.integer, np.floating)):
        raise TypeError(f"Quota {quota!r} for group {group!r} is neither a row count (int) nor a fraction (float).")
    if isinstance(quota, (float, np.floating)):
        if not 0 <= quota <= 1:
            raise ValueError(f"Quota {quota} for group {group!r} is a fraction outside [0, 1]; "
                             "write a row count as an integer (e.g. 50).")
        return _count(float(quota), n_g)
    if quota < 0:
        raise ValueError(f"Quota {quota} for group {group!r} is negative; use 0 to drop the group.")
    if quota > n_g:
        raise ValueError(f"Quota {quota} for group {group!r} exceeds its {n_g} rows; "
                         f"use at most {n_g} or a fraction such as 0.5.")
    return int(quota)


def top_indices_by_group(scores, groups, fraction: float | None = None, k: int | None = None,
                         mode: str = "global", quotas: dict | None = None) -> tuple[np.ndarray, dict]:
    """Positions of the rows kept by a per-group rule (module docstring: ``global``, ``per_group``, ``quota``).

    Within a group, the best finite scores are kept, ties broken by position. Returns ``(positions, stats)``:
    positions highest score first within each group, groups in sorted order; ``stats`` as `top_indices`
    (``threshold`` = the lowest score kept) plus ``mode``, ``quotas`` and ``groups``: the `group_counts`
    table, each row with the group's ``requested`` count.
    """
    scores = np.asarray(scores, dtype=np.float64)
    groups = np.asarray([str(g) for g in groups], dtype=object)
    n = len(scores)
    if len(groups) != n:
        raise ValueError(f"{len(groups)} group values for {n} scores: pass one group per row.")
    if mode not in GROUP_MODES:
        raise ValueError(f"Unknown group mode {mode!r}; use one of {', '.join(GROUP_MODES)}.")
    if quotas and mode != "quota":
        raise ValueError(f"Quotas are only used with mode='quota' (got mode={mode!r}).")
    if mode == "global":
        chosen, stats = top_indices(scores, fraction=fraction, k=k)
        requested = None
    else:
        if n == 0:
            raise ValueError("The dataset is empty: there is nothing to select.")
        if fraction is not None and k is not None:
            raise ValueError("Pass at most one of fraction (e.g. 0.1) or k (rows per group).")
        if fraction is not None:
            _check_fraction(fraction)
        elif k is not None and not (isinstance(k, (int, np.integer)) and k >= 1):
            raise ValueError(f"k={k} must be a positive integer.")
        if mode == "per_group" and fraction is None and k is None:
            raise ValueError("mode='per_group' needs fraction (e.g. 0.1 of every group) or k (rows per group).")
        if mode == "quota" and not quotas:
            raise ValueError("mode='quota' needs quotas, e.g. {'code': 500, 'math': 0.2}.")
        names, sizes = np.unique(groups, return_counts=True)
        size_of = dict(zip(names.tolist(), sizes.tolist()))
        unknown = [g for g in (quotas or {}) if str(g) not in size_of]
        if unknown:
            raise ValueError(f"Quota for unknown group {str(unknown[0])!r}; the groups are {sorted(size_of)}.")
        quotas = {str(g): q for g, q in (quotas or {}).items()}
        finite = np.isfinite(scores)
        if not finite.any():
            raise ValueError("Every score is NaN or inf: nothing can be selected; check the scoring run.")
        requested, parts = {}, []
        for g, n_g in size_of.items():
            if g in quotas:
                want = _quota_count(g, quotas[g], n_g)
            elif fraction is not None:
                want = _count(fraction, n_g)
            else:
                want = min(k, n_g) if k is not None else 0
            requested[g] = want
            valid = np.flatnonzero((groups == g) & finite)
            parts.append(valid[np.lexsort((valid, -scores[valid]))][:want])
        chosen = np.concatenate(parts).astype(np.int64)
        stats = {"num_rows": n, "num_nonfinite_excluded": int(n - finite.sum()),
                 "num_requested": int(sum(requested.values())), "num_selected": len(chosen),
                 "threshold": float(scores[chosen].min()) if len(chosen) else float("nan")}
    table = group_counts(groups, groups[chosen])
    for row in table:
        row["requested"] = requested[row["group"]] if requested is not None else None
    return chosen, {**stats, "mode": mode, "quotas": quotas or None, "groups": table}


def group_counts(groups, kept_groups) -> list[dict]:
    """What a selection kept of each group: one dict per group, in sorted order, with ``group``,
    ``rows`` (in ``groups``), ``kept`` (in ``kept_groups``), ``share`` (kept / rows) and
    ``selection_share`` (kept / all kept rows).

    ``groups`` is the group column of the whole dataset and ``kept_groups`` that of the selected
    rows, e.g. ``group_counts(scored["task"], selected["task"])``; values are compared as strings.
    """
    rows = dict(zip(*np.unique(np.asarray([str(g) for g in groups], dtype=object), return_counts=True)))
    kept_list = [str(g) for g in kept_groups]
    stray = sorted(set(kept_list) - set(rows))
    if stray:
        raise ValueError(f"Selected rows have group {stray[0]!r}, which the dataset does not; "
                         "pass the group column of the dataset the rows were selected from.")
    kept = dict(zip(*np.unique(np.asarray(kept_list, dtype=object), return_counts=True))) if kept_list else {}
    total = max(len(kept_list), 1)
    return [{"group": g, "rows": int(n_g), "kept": int(kept.get(g, 0)), "share": kept.get(g, 0) / n_g,
             "selection_share": kept.get(g, 0) / total} for g, n_g in rows.items()]


def format_group_table(table: list[dict], group_column: str = "group") -> str:
    """`group_counts` (or ``stats["groups"]``) as an aligned text table: group, rows, kept, share, of selection."""
    width = max([len(group_column), *(len(r["group"]) for r in table)])
    lines = [f"  {group_column:<{width}}  {'rows':>8}  {'kept':>8}  {'share':>7}  {'of selection':>12}"]
    lines += [f"  {r['group']:<{width}}  {r['rows']:>8}  {r['kept']:>8}  {r['share']:>7.1%}  "
              f"{r['selection_share']:>12.1%}" for r in table]
    return "\n".join(lines)


def check_columns(dataset, score_column: str, group_column: str | None = None) -> None:
    """Refuse a score or group column the dataset lacks, naming its columns and the fix."""
    if score_column not in dataset.column_names:
        fix = ("score it with `hf-gradfilter score --extra_scores ifd` first" if score_column == "ifd"
               else "score it first or pick another column")
        raise ValueError(f"Score column {score_column!r} is not in the dataset (columns: {dataset.column_names}); "
                         f"{fix}.")
    if group_column is not None and group_column not in dataset.column_names:
        raise ValueError(f"Group column {group_column!r} is not in the dataset (columns: "
                         f"{dataset.column_names}); pick the column that names each row's task or source.")


def select_top(dataset, score_column: str = DEFAULT_SCORE, fraction: float | None = None, k: int | None = None,
               group_column: str | None = None, group_mode: str = "global", quotas: dict | None = None):
    """The top rows of a scored `datasets.Dataset` by ``score_column``, in their original order.

    With ``group_column`` (e.g. ``"task"``), rows are kept by `top_indices_by_group` with ``group_mode``
    (``global``, ``per_group`` or ``quota`` with ``quotas``), and ``stats["groups"]`` holds the
    per-group table (`group_counts`). Returns ``(selected_dataset, stats)``; stats count the rows
    excluded for NaN/inf scores.
    """
    check_columns(dataset, score_column, group_column)
    scores = read_columns(dataset, [score_column])[score_column]  # as stored: float64 stays float64
    feature = dataset.features[score_column]
    kind = getattr(feature, "dtype", type(feature).__name__)
    if scores.dtype.kind not in "biuf" and kind != "null":  # all null (NaN saved to JSON): refused below as NaN
        raise ValueError(f"Score column {score_column!r} holds {kind} values, not numbers; rank by a numeric column "
                         f"such as {DEFAULT_SCORE}.")
    if group_column is None:
        if group_mode != "global" or quotas:
            raise ValueError(f"group_mode={group_mode!r} and quotas need a group_column (e.g. 'task' or 'source').")
        chosen, stats = top_indices(scores, fraction=fraction, k=k)
    else:
        chosen, stats = top_indices_by_group(scores, dataset[group_column], fraction=fraction, k=k,
                                             mode=group_mode, quotas=quotas)
        stats = {"group_column": group_column, **stats}
    stats = {"score_column": score_column, "fraction": fraction, **stats}
    return dataset.select(np.sort(chosen)), stats
