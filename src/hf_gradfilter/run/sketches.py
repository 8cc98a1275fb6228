"""`run`'s gradient-sketch flags (``--target_dataset``, ``--diversity_clusters``, ``--drop_near_duplicates``),
checked before anything runs; their columns are `run`'s ``columns`` stage (`pipeline._columns`)."""

from __future__ import annotations


def check_sketch_flags(args, config) -> None:
    """Refuse, before anything runs, sketch flags that the score stage's settings cannot serve."""
    from ..scores.clusters import check_clusters
    from ..scores.sketched import FEATURES

    if args.features not in FEATURES:
        raise ValueError(f"--features {args.features}: use one of {', '.join(FEATURES)}.")
    flags = ("target_dataset", "diversity_clusters") if args.features == "sketch" else ()
    uses = [f for f in (*flags, "drop_near_duplicates") if getattr(args, f) is not None]
    if uses and not config.sketch_dim:
        raise ValueError(f"--{uses[0]} needs gradient sketches: add --sketch_dim 1024"
                         + (" (or --features embedding)." if uses[0] != "drop_near_duplicates" else "."))
    if args.diversity_clusters is not None:
        check_clusters(args.diversity_clusters)
    last = int(config.num_train_epochs)
    sketched = config.sketch_epochs or [config.late_epoch]
    if args.features == "sketch" and args.target_dataset is not None and last not in sketched:
        raise ValueError(f"--target_dataset compares the last epoch's sketches (epoch {last}) with the target's at the "
                         f"final weights: add --sketch_epochs {last}.")
