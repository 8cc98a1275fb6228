"""Columns from the score run's gradient sketches that a selection ranks or groups by: each row's
alignment with a target dataset (``target_alignment``, `scores.alignment`) and its sketch cluster
(``sketch_cluster``, `diversity`).

Both read the record (``gradient_record.safetensors``, memory-mapped) in the ``score`` run's folder
(``proxy_dir``: by default the folder holding the ``scored`` data); the target's sketches come from
that run's members, loaded back (`proxy.probe`).
"""

from __future__ import annotations

import os

import numpy as np

from ..proxy.record import RECORD_NAME, GradientRecord, record_rows
from ..scores.alignment import target_alignment
from ..scores.duplicates import record_sketches
from .diversity import sketch_clusters

TARGET_COLUMN = "target_alignment"
CLUSTER_COLUMN = "sketch_cluster"
CELL_COLUMN = "sketch_group_cluster"  # "<group>|<cluster>", when clusters and a group column are both used


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
    (`diversity.sketch_clusters`; -1: no sketch). Returns ``(scored, stats)``."""
    record = _sketched_record(folder)
    labels = sketch_clusters(record_sketches(record), num_clusters, seed=seed)[record_rows(record, scored)]
    sizes = np.bincount(labels[labels >= 0], minlength=num_clusters)
    stats = {"num_clusters": num_clusters, "cluster_seed": seed, "smallest_cluster": int(sizes.min()),
             "largest_cluster": int(sizes.max())}
    return put_column(scored, CLUSTER_COLUMN, labels.tolist()), stats
