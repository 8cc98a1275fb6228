"""`run`'s gradient-sketch flags (``--target_dataset``, ``--diversity_clusters``, ``--drop_near_duplicates``):
checked before anything runs, and their columns computed once per run for every ratio and the published
splits (`scores.sketched.sketch_options`)."""

from __future__ import annotations

import copy
import os

from ..scores.sketched import sketch_options


def check_sketch_flags(args, config) -> None:
    """Refuse, before anything runs, sketch flags that the score stage's settings cannot serve."""
    from ..scores.clusters import check_clusters

    uses = [f for f in ("target_dataset", "diversity_clusters", "drop_near_duplicates") if getattr(args, f) is not None]
    if uses and not config.sketch_dim:
        raise ValueError(f"--{uses[0]} needs gradient sketches: add --sketch_dim 1024.")
    if args.diversity_clusters is not None:
        check_clusters(args.diversity_clusters)
    last = int(config.num_train_epochs)
    if args.target_dataset is not None and last not in (config.sketch_epochs or [config.late_epoch]):
        raise ValueError(f"--target_dataset compares the last epoch's sketches (epoch {last}) with the target's at the "
                         f"final weights: add --sketch_epochs {last}.")


_CACHE: dict = {}  # (scored_path, flags) -> (scored with the sketch columns, stats), once per process


def sketch_columns(args, scored, scored_path: str, seed: int):
    """`scores.sketched.sketch_options` with the run's flags: ``(scored, stats)``, computed once per scored set and
    flags (every ratio's selection and the published splits share the same columns)."""
    if args.target_dataset is None and args.diversity_clusters is None:
        return scored, {}
    group = args.group_column if args.group_mode == "per_group" else None
    key = (os.path.abspath(scored_path), args.target_dataset, args.target_split, args.diversity_clusters, seed, group,
           os.path.getmtime(os.path.join(os.path.dirname(os.path.abspath(scored_path)), "gradient_record.safetensors")))
    if key not in _CACHE:
        _CACHE.clear()  # one at a time: it holds a dataset
        _CACHE[key] = sketch_options(
            scored, scored_path, target_dataset=args.target_dataset, target_split=args.target_split,
            diversity_clusters=args.diversity_clusters, seed=seed, group_column=group)
    scored, stats = _CACHE[key]
    return scored, copy.deepcopy(stats)
