"""Columns from the score run's gradient sketches that a selection ranks or groups by: each row's
alignment with a target dataset (``target_alignment``, `scores.alignment`) and its sketch cluster
(``sketch_cluster``, `diversity`). With ``features="embedding"`` both come from the rows' mean-pooled hidden
states under the proxy's frozen backbone instead (`proxy.embeddings`; RDS+, Ivison et al. 2025): the same
formulas with one "member", no sketches needed.

Both read the record (``gradient_record.safetensors``, memory-mapped) in the ``score`` run's folder
(``proxy_dir``: by default the folder holding the ``scored`` data); the target's sketches come from
that run's members, loaded back (`proxy.probe`). `sketch_options` adds the columns a selection asks for.
"""

from __future__ import annotations

import os

import numpy as np

from ..data.io import load_rows
from ..proxy.record import RECORD_NAME, GradientRecord, record_rows
from .alignment import target_alignment
from .clusters import check_clusters, sketch_clusters
from .duplicates import record_sketches

TARGET_COLUMN = "target_alignment"
CLUSTER_COLUMN = "sketch_cluster"
CELL_COLUMN = "sketch_group_cluster"  # "<group>|<cluster>", when clusters and a group column are both used
FEATURES = ("sketch", "embedding")


def proxy_folder(scored_path: str, proxy_dir: str | None = None) -> str:
    """The ``score`` run's folder: ``proxy_dir``, or the folder holding the ``scored`` data; it must hold the record."""
    folder = proxy_dir or os.path.dirname(os.path.abspath(os.path.normpath(scored_path)))
    if not os.path.exists(os.path.join(folder, RECORD_NAME)):
        raise FileNotFoundError(f"No {RECORD_NAME} in {folder}: pass --proxy_dir, the output_dir of the "
                                "`hf-gradfilter score` run that wrote this scored data.")
    return folder


def _sketched_record(folder: str) -> GradientRecord:
    record = GradientRecord.load(folder, mmap=True)
    if record.sketches is None:
        raise ValueError(f"The record in {folder} has no gradient sketches: score with --sketch_dim (e.g. 1024).")
    return record


def put_column(dataset, name: str, values):
    """``dataset`` with column ``name`` set to ``values`` (replaced if it is there)."""
    if name in dataset.column_names:
        dataset = dataset.remove_columns(name)
    return dataset.add_column(name, values)


def add_target_alignment(scored, folder: str, target_rows, proxy_model: str | None = None):
    """``scored`` with ``target_alignment``: each row's mean cosine with the target rows' gradients over the
    members (`scores.alignment.target_alignment`), the rows' last-epoch sketches against the target's at the
    members' final weights (`proxy.probe`). Returns ``(scored, stats)``."""
    from ..proxy.probe import load_proxy, sketch_rows

    record = _sketched_record(folder)
    last = record.num_epochs
    if last not in record.metadata["sketch"]["epochs"]:
        raise ValueError(f"Target alignment compares the last epoch's sketches (epoch {last}) with the target's at "
                         f"the final weights; this record sketched epochs {record.metadata['sketch']['epochs']}. "
                         f"Score with --sketch_epochs {last}.")
    trainer = load_proxy(folder, target_rows, base_model=proxy_model)
    target = sketch_rows(trainer, target_rows)
    align = target_alignment(record_sketches(record, last), target)
    values = align[record_rows(record, scored)]
    stats = {"target_rows": len(target_rows), "target_rows_sketched": int(np.isfinite(target[:, 0, 0]).sum()),
             "alignment_mean": float(np.nanmean(values))}
    return put_column(scored, TARGET_COLUMN, values.tolist()), stats


def add_sketch_clusters(scored, folder: str, num_clusters: int, seed: int = 0):
    """``scored`` with ``sketch_cluster``: k-means clusters of the rows' member-averaged late-epoch sketches
    (`clusters.sketch_clusters`; -1: no sketch). Returns ``(scored, stats)``."""
    record = _sketched_record(folder)
    labels = sketch_clusters(record_sketches(record), num_clusters, seed=seed)[record_rows(record, scored)]
    return put_column(scored, CLUSTER_COLUMN, labels.tolist()), _cluster_stats(labels, num_clusters, seed)


def _cluster_stats(labels: np.ndarray, num_clusters: int, seed: int) -> dict:
    sizes = np.bincount(labels[labels >= 0], minlength=num_clusters)
    return {"num_clusters": num_clusters, "cluster_seed": seed, "smallest_cluster": int(sizes.min()),
            "largest_cluster": int(sizes.max())}


def add_embedding_columns(scored, folder: str, *, target_rows=None, num_clusters: int | None = None, seed: int = 0,
                          proxy_model: str | None = None):
    """``scored`` with ``target_alignment`` (each row's cosine with the mean unit embedding of ``target_rows``) and/or
    ``sketch_cluster`` (k-means of the unit embeddings), from `proxy.embeddings.embed_rows` under the frozen backbone
    of the ``score`` run in ``folder``. Returns ``(scored, stats)`` with ``stats["target"]`` / ``["diversity"]``."""
    from ..proxy.embeddings import embed_rows
    from ..proxy.probe import load_proxy

    trainer = load_proxy(folder, scored, base_model=proxy_model, need_sketches=False)
    rows = embed_rows(trainer, scored)
    stats = {}
    if target_rows is not None:
        target = embed_rows(trainer, target_rows)
        values = target_alignment(rows[:, None], target[:, None])
        stats["target"] = {"target_rows": len(target_rows), "features": "embedding",
                           "target_rows_embedded": int(np.isfinite(target[:, 0]).sum()),
                           "alignment_mean": float(np.nanmean(values))}
        scored = put_column(scored, TARGET_COLUMN, values.tolist())
    if num_clusters is not None:
        labels = sketch_clusters(rows, num_clusters, seed=seed)
        stats["diversity"] = {**_cluster_stats(labels, num_clusters, seed), "features": "embedding"}
        scored = put_column(scored, CLUSTER_COLUMN, labels.tolist())
    return scored, stats


def sketch_options(scored, scored_path: str, *, target_dataset=None, target_split: str = "train",
                   diversity_clusters: int | None = None, proxy_dir: str | None = None, proxy_model: str | None = None,
                   seed: int = 0, group_column: str | None = None, features: str = "sketch"):
    """The columns the sketch options add to ``scored``: ``target_alignment`` for a
    ``target_dataset`` (a path or Hub id, or a `datasets.Dataset`), ``sketch_cluster`` for ``diversity_clusters``.
    Returns ``(scored, stats)``; ``stats["group_column"]`` is what to select ``per_group`` by when clustering:
    ``sketch_cluster``, or with a ``group_column`` too, ``sketch_group_cluster`` (``"<group>|<cluster>"``: the
    top of every group's share of every cluster). ``features``: ``"sketch"`` (gradient sketches) or ``"embedding"``
    (`add_embedding_columns`)."""
    stats = {}
    if features not in FEATURES:
        raise ValueError(f"features={features!r}: use one of {', '.join(FEATURES)}.")
    if target_dataset is None and diversity_clusters is None:
        return scored, stats
    if diversity_clusters is not None:
        check_clusters(diversity_clusters)
    rows = None
    if target_dataset is not None:
        rows = load_rows(target_dataset, None, target_split) if isinstance(target_dataset, str) else target_dataset
    if features == "embedding":
        folder = proxy_dir or os.path.dirname(os.path.abspath(os.path.normpath(scored_path)))
        scored, stats = add_embedding_columns(scored, folder, target_rows=rows, num_clusters=diversity_clusters,
                                              seed=seed, proxy_model=proxy_model)
    else:
        folder = proxy_folder(scored_path, proxy_dir)
        if rows is not None:
            scored, stats["target"] = add_target_alignment(scored, folder, rows, proxy_model)
        if diversity_clusters is not None:
            scored, stats["diversity"] = add_sketch_clusters(scored, folder, diversity_clusters, seed)
    if rows is not None:
        stats["target"]["target_dataset"] = target_dataset if isinstance(target_dataset, str) else "(rows)"
    if diversity_clusters is not None:
        stats["group_column"] = CLUSTER_COLUMN
        if group_column is not None:  # both: the top of every (group, cluster) cell
            if group_column not in scored.column_names:
                raise ValueError(f"Group column {group_column!r} is not in the dataset (columns: "
                                 f"{scored.column_names}).")
            cells = [f"{g}|{c}" for g, c in zip(scored[group_column], scored[CLUSTER_COLUMN])]
            scored = put_column(scored, CELL_COLUMN, cells)
            stats["group_column"] = CELL_COLUMN
    return scored, stats
