"""Sensitivity of the scores to the snapshot epochs ``(s, t)`` and to the ensemble size ``M'``, from one record.

The `GradientRecord` keeps every member's norm at every epoch, so scoring with another early/late
pair, or with a sub-ensemble of ``M' < M`` members, is a slice of the ``(N, M, E)`` array and costs
no training. A setting is ``(s, t, members)``; its scores are `score_parts` / `record_parts` of
``norms[:, members, :]`` at epochs ``s`` and ``t``.

The grid (`sweep_settings`):

- epoch pairs: every ``(s, t)`` with ``s < t``, both from ``epochs`` (default ``1..E``);
- member subsets, for each size ``M'`` in ``member_counts`` (default ``2..M``): all ``C(M, M')``
  subsets when there are at most ``max_subsets`` of them, else ``max_subsets`` distinct subsets
  drawn with ``numpy.random.default_rng(seed)`` (each uniform among the M'-subsets), in sorted order.

For every score and setting, `sweep` reports Spearman's rank correlation with the same score at the
reference setting (default ``s=1, t=2``, all members) and, given a boolean label per row (True = a
bad row, e.g. ``is_corrupted``), the AUROC of the score as a keep-score: the probability that a row
without the label outranks one with it (1.0 = every labelled row ranked below every other row;
0.5 = chance). `summarize` averages over the subsets of one ``(s, t, M')``.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import warnings
from dataclasses import dataclass
from math import comb

import numpy as np

from .dynamics import energy_per_token
from .formulas import (
    DEFAULT_EPS,
    RECORD_COLUMNS,
    SCORE_COLUMNS,
    record_parts,
    score_parts,
)
from .metrics import auroc, spearman

SWEEP_SCORES = tuple(dict.fromkeys(("neg_energy_token", "fit_rank") + SCORE_COLUMNS + RECORD_COLUMNS))
"""What a record gives; ``neg_energy_token`` (the default keep-score, ``-G_t * T``) also needs each row's
response length ``T`` (``length=``), the ``response_length`` column of the scored dataset."""


@dataclass(frozen=True)
class Setting:
    """One scoring setting: early epoch ``s``, late epoch ``t`` (1-based) and the members used (0-based)."""

    early_epoch: int
    late_epoch: int
    members: tuple[int, ...]

    @property
    def label(self) -> str:
        return f"s={self.early_epoch} t={self.late_epoch} members={{{','.join(map(str, self.members))}}}"


def epoch_pairs(num_epochs: int, epochs=None) -> list[tuple[int, int]]:
    """Every ``(s, t)`` with ``s < t`` from ``epochs`` (default ``1..num_epochs``), in order."""
    epochs = sorted(set(epochs or range(1, num_epochs + 1)))
    bad = [e for e in epochs if not 1 <= e <= num_epochs]
    if bad:
        raise ValueError(f"Epoch {bad[0]} is outside the {num_epochs} recorded epoch(s); use 1..{num_epochs} "
                         "or train the proxy for more epochs (--num_train_epochs).")
    if len(epochs) < 2:
        raise ValueError(f"epochs={epochs}: an (s, t) pair needs at least two epochs; the record has {num_epochs}.")
    return list(itertools.combinations(epochs, 2))


def member_subsets(num_members: int, sizes=None, max_subsets: int = 10, seed: int = 0) -> list[tuple[int, ...]]:
    """Member subsets for each size ``M'`` in ``sizes`` (default ``2..num_members``; see the module docstring)."""
    sizes = sorted(set(sizes or range(min(2, num_members), num_members + 1)))
    bad = [m for m in sizes if not 1 <= m <= num_members]
    if bad:
        raise ValueError(f"Sub-ensemble size {bad[0]} is outside 1..{num_members} (the record's members).")
    if max_subsets < 1:
        raise ValueError(f"max_subsets={max_subsets} must be >= 1.")
    rng = np.random.default_rng(seed)
    out = []
    for size in sizes:
        if comb(num_members, size) <= max_subsets:
            out += list(itertools.combinations(range(num_members), size))
            continue
        drawn: set[tuple[int, ...]] = set()
        while len(drawn) < max_subsets:
            drawn.add(tuple(sorted(int(m) for m in rng.choice(num_members, size, replace=False))))
        out += sorted(drawn)
    return out


def sweep_settings(num_epochs: int, num_members: int, epochs=None, member_counts=None, max_subsets: int = 10,
                   seed: int = 0) -> list[Setting]:
    """The grid: every epoch pair (`epoch_pairs`) with every member subset (`member_subsets`)."""
    subsets = member_subsets(num_members, member_counts, max_subsets, seed)
    return [Setting(s, t, members) for s, t in epoch_pairs(num_epochs, epochs) for members in subsets]


def setting_scores(norms: np.ndarray, losses: np.ndarray | None, setting: Setting, scores=("gsnr",),
                   eps: float = DEFAULT_EPS, cosines: np.ndarray | None = None,
                   length: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The named scores of one setting, ``(N,)`` each: `score_parts` / `record_parts` of the sliced record
    (``norms``, ``losses`` and, for the direction scores, ``cosines``, all ``(N, M, E)``), and
    ``neg_energy_token = -G_t * T`` from ``length`` ``(N,)``."""
    unknown = [name for name in scores if name not in SWEEP_SCORES]
    if unknown:
        raise ValueError(f"Unknown score {unknown[0]!r}; the record gives {', '.join(SWEEP_SCORES)}.")
    members = list(setting.members)
    parts = score_parts(norms[:, members, :], setting.early_epoch, setting.late_epoch, eps)
    if "neg_energy_token" in scores:
        if length is None:
            raise ValueError("neg_energy_token needs each row's response length (the scored dataset's "
                             "response_length column); pass it, or sweep other scores (e.g. --score fit_rank gsnr).")
        parts["neg_energy_token"] = -energy_per_token(parts["grad_late"], length)
    if any(name not in parts for name in scores):
        if losses is None:
            raise ValueError(f"Scores {[n for n in scores if n not in parts]} need the record's losses.")
        directions = {} if cosines is None else {"cosines": cosines[:, members, :]}
        parts.update(record_parts(norms[:, members, :], losses[:, members, :], setting.early_epoch,
                                  setting.late_epoch, eps, **directions))
    return {name: parts[name] for name in scores}


def sweep(norms: np.ndarray, losses: np.ndarray | None, settings: list[Setting], scores=("gsnr",),
          reference: tuple[int, int] = (1, 2), labels: np.ndarray | None = None,
          eps: float = DEFAULT_EPS, cosines: np.ndarray | None = None,
          length: np.ndarray | None = None) -> list[dict]:
    """One row per (score, setting): ``score, early_epoch, late_epoch, num_members, members, spearman``
    (with the reference setting's score: epochs ``reference``, all members) and ``auroc`` (NaN without
    ``labels``; see the module docstring)."""
    norms = np.asarray(norms, dtype=np.float64)
    if labels is not None:
        labels = np.asarray(labels)
        if labels.dtype != bool or labels.shape != (norms.shape[0],):
            raise ValueError(f"labels must be a boolean array of shape ({norms.shape[0]},), got {labels.dtype} "
                             f"{labels.shape}.")
        if labels.all() or not labels.any():
            raise ValueError("labels are all True or all False: AUROC needs rows of both kinds.")
    s0, t0 = reference
    if not s0 < t0:
        raise ValueError(f"reference=({s0}, {t0}): the early epoch must come before the late one.")
    ref = setting_scores(norms, losses, Setting(s0, t0, tuple(range(norms.shape[1]))), scores, eps, cosines, length)
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # NaN rows (never trained) stay NaN
        for setting in settings:
            values = setting_scores(norms, losses, setting, scores, eps, cosines, length)
            for name in scores:
                rows.append({
                    "score": name, "early_epoch": setting.early_epoch, "late_epoch": setting.late_epoch,
                    "num_members": len(setting.members), "members": " ".join(map(str, setting.members)),
                    "spearman": spearman(values[name], ref[name]),
                    "auroc": auroc(values[name], ~labels) if labels is not None else math.nan,
                })
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """`sweep` rows averaged over the subsets of each ``(score, s, t, M')``: ``subsets``, ``spearman_mean``,
    ``spearman_min``, ``auroc_mean``, ``auroc_sd`` (population sd over the subsets)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["score"], row["early_epoch"], row["late_epoch"], row["num_members"]), []).append(row)
    out = []
    for (name, s, t, m), group in groups.items():
        rho = np.array([r["spearman"] for r in group])
        auc = np.array([r["auroc"] for r in group])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            out.append({"score": name, "early_epoch": s, "late_epoch": t, "num_members": m, "subsets": len(group),
                        "spearman_mean": float(np.nanmean(rho)), "spearman_min": float(np.nanmin(rho)),
                        "auroc_mean": float(np.nanmean(auc)), "auroc_sd": float(np.nanstd(auc))})
    order = {name: i for i, name in enumerate(dict.fromkeys(r["score"] for r in rows))}
    return sorted(out, key=lambda r: (order[r["score"]], r["early_epoch"], r["late_epoch"], r["num_members"]))


def pair_correlations(norms: np.ndarray, losses: np.ndarray | None, pairs: list[tuple[int, int]],
                      score: str = "gsnr", eps: float = DEFAULT_EPS, cosines: np.ndarray | None = None,
                      length: np.ndarray | None = None) -> np.ndarray:
    """``(P, P)`` Spearman matrix of ``score`` between the epoch ``pairs``, all members."""
    members = tuple(range(norms.shape[1]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        values = [setting_scores(norms, losses, Setting(s, t, members), (score,), eps, cosines, length)[score]
                  for s, t in pairs]
    return np.array([[spearman(a, b) for b in values] for a in values])


def format_table(summary: list[dict]) -> str:
    """`summarize` rows as aligned text: score, s, t, M', subsets, Spearman vs the reference, AUROC."""
    has_auroc = any(math.isfinite(r["auroc_mean"]) for r in summary)
    head = f"  {'score':<14} {'s':>2} {'t':>2} {'M_':>3} {'subsets':>7}  {'spearman mean [min]':>19}"
    lines = [head + (f"  {'AUROC mean ± sd':>15}" if has_auroc else "")]
    for r in summary:
        line = (f"  {r['score']:<14} {r['early_epoch']:>2} {r['late_epoch']:>2} {r['num_members']:>3} "
                f"{r['subsets']:>7}  {r['spearman_mean']:>11.3f} [{r['spearman_min']:.3f}]")
        lines.append(line + (f"  {r['auroc_mean']:>8.3f} ± {r['auroc_sd']:.3f}" if has_auroc else ""))
    return "\n".join(lines).replace("M_", "M'")


def format_pair_matrix(matrix: np.ndarray, pairs: list[tuple[int, int]]) -> str:
    """The `pair_correlations` matrix as text, rows and columns labelled ``s-t``."""
    names = [f"{s}-{t}" for s, t in pairs]
    lines = ["  s-t   " + " ".join(f"{n:>6}" for n in names)]
    lines += [f"  {n:<5} " + " ".join(f"{v:6.3f}" for v in row) for n, row in zip(names, matrix)]
    return "\n".join(lines)


def _json_safe(value):
    """NaN/inf -> None (JSON has no NaN)."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _by_pair_and_size(summary: list[dict], pairs, sizes, key: str) -> np.ndarray:
    """``(len(pairs), len(sizes))`` array of ``summary[key]`` by epoch pair (rows) and ``M'`` (columns)."""
    grid = {(r["early_epoch"], r["late_epoch"], r["num_members"]): r[key] for r in summary}
    return np.array([[grid.get((s, t, m), math.nan) for m in sizes] for s, t in pairs])


def write_outputs(output_dir: str, rows: list[dict], summary: list[dict], matrices: dict[str, np.ndarray],
                  pairs: list[tuple[int, int]], meta: dict) -> dict[str, str]:
    """``sweep.csv`` (one row per score and setting), ``sweep.json`` (meta, summary, rows, pair matrices)
    and one ``sweep_<score>.png`` heatmap per score. Returns the paths by kind."""
    from ..plots import heatmaps

    os.makedirs(output_dir, exist_ok=True)
    paths = {"csv": os.path.join(output_dir, "sweep.csv"), "json": os.path.join(output_dir, "sweep.json")}
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    payload = {"meta": meta, "summary": [{k: _json_safe(v) for k, v in r.items()} for r in summary],
               "rows": [{k: _json_safe(v) for k, v in r.items()} for r in rows],
               "pair_spearman": {name: {"pairs": pairs, "matrix": [[_json_safe(float(v)) for v in row] for row in m]}
                                 for name, m in matrices.items()}}
    with open(paths["json"], "w") as f:
        json.dump(payload, f, indent=1)
    pair_names = [f"{s}-{t}" for s, t in pairs]
    for name, matrix in matrices.items():
        mine = [r for r in summary if r["score"] == name]
        sizes = sorted({r["num_members"] for r in mine})
        cols = [f"M'={m}" for m in sizes]
        s0, t0 = meta["reference"]
        title = f"{name}: Spearman with s={s0}, t={t0}, all members"
        panels = [(_by_pair_and_size(mine, pairs, sizes, "spearman_mean"), pair_names, cols, title)]
        if any(math.isfinite(r["auroc_mean"]) for r in mine):
            title = f"{name}: AUROC (label {meta.get('label_column')})"
            panels.append((_by_pair_and_size(mine, pairs, sizes, "auroc_mean"), pair_names, cols, title, (0, 1)))
        panels.append((matrix, pair_names, pair_names, f"{name}: Spearman between (s, t), all members"))
        paths[f"png_{name}"] = heatmaps(panels, os.path.join(output_dir, f"sweep_{name}.png"))
    return paths


def sweep_record(record, output_dir: str | None = None, labels: np.ndarray | None = None, scores=("gsnr",),
                 epochs=None, member_counts=None, max_subsets: int = 10, seed: int = 0,
                 reference: tuple[int, int] = (1, 2), label_column: str | None = None,
                 eps: float = DEFAULT_EPS, length: np.ndarray | None = None) -> dict:
    """The whole sweep of a `GradientRecord`: ``{"rows", "summary", "pairs", "pair_spearman", "paths"}``
    (``paths`` only with ``output_dir``). ``labels`` and ``length`` are in the record's row order."""
    settings = sweep_settings(record.num_epochs, record.num_members, epochs, member_counts, max_subsets, seed)
    norms, losses = record.norms.astype(np.float64), record.losses.astype(np.float64)
    cosines = getattr(record, "cosines", None)  # direction scores, in records that carry them
    rows = sweep(norms, losses, settings, scores, reference, labels, eps, cosines, length)
    summary = summarize(rows)
    pairs = epoch_pairs(record.num_epochs, epochs)
    matrices = {name: pair_correlations(norms, losses, pairs, name, eps, cosines, length) for name in scores}
    result = {"rows": rows, "summary": summary, "pairs": pairs, "pair_spearman": matrices}
    if output_dir is not None:
        meta = {"num_examples": record.num_examples, "num_members": record.num_members,
                "num_epochs": record.num_epochs, "reference": list(reference), "scores": list(scores),
                "max_subsets": max_subsets, "seed": seed, "label_column": label_column,
                "num_settings": len(settings), "eps": eps}
        result["paths"] = write_outputs(output_dir, rows, summary, matrices, pairs, meta)
    return result
