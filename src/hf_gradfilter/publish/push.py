"""The push verb (``hf-gradfilter push``): what to publish and where, from a run's folders, through `hub`."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from ..data.io import load_rows
from ..scores.formulas import DEFAULT_SCORE
from . import hub


@dataclass
class PushArguments:
    """What to publish, and where (the token comes from `hf auth login` or HF_TOKEN; it is never printed)."""

    what: str = field(metadata={"help": "dataset (scored + selected splits), proxy (the ensemble and its record) "
                                        "or adapter (a fine-tuned target adapter).",
                                "choices": ["dataset", "proxy", "adapter"]})
    repo_id: str = field(metadata={"help": "Target repo, namespace/name."})
    path: str = field(metadata={"help": "dataset: the scoring output dir (holding scored/ and the record); "
                                        "proxy: the scoring output dir; adapter: the fine-tuning output dir."})
    selected: list[str] = field(default_factory=list, metadata={
        "help": "dataset: selected splits written by `select` (split name from the folder: top_10pct, ...)."})
    score_column: str = field(default=DEFAULT_SCORE, metadata={"help": "dataset: the column the selection used."})
    group_column: str | None = field(default=None, metadata={
        "help": "dataset: the --group_column of `select` (task, source...): the card shows what each group kept."})
    base_model: str | None = field(default=None, metadata={"help": "adapter: the target's Hub id."})
    datasets: list[str] = field(default_factory=list, metadata={"help": "Hub dataset ids for the card metadata."})
    license: str | None = field(default=None, metadata={"help": "License for the card metadata (e.g. apache-2.0)."})
    private: bool = field(default=False, metadata={"help": "Create the repo as private."})
    revision: str | None = field(default=None, metadata={"help": "Branch to push to (created if missing)."})


def split_name(path: str) -> str:
    """``selected_gsnr_top10pct`` -> ``top_10pct``; ``selected_gsnr_top500`` -> ``top_500``."""
    match = re.search(r"top(\d+)(pct)?$", os.path.basename(os.path.normpath(path)))
    if not match:
        raise ValueError(f"Cannot name the split of {path!r}; use folders written by `hf-gradfilter select`.")
    return f"top_{match.group(1)}{match.group(2) or ''}"


def push(args: PushArguments):
    common = dict(private=args.private, revision=args.revision, license=args.license)
    if args.what == "dataset":
        if not args.selected:
            raise ValueError("Pass --selected with at least one folder written by `hf-gradfilter select`.")
        scored = load_rows(os.path.join(args.path, "scored"))
        selected = {split_name(p): load_rows(p) for p in args.selected}
        ratio = len(next(iter(selected.values()))) / len(scored)
        settings = hub.selection_settings(args.path, score_column=args.score_column, ratio=round(ratio, 4),
                                          group_column=args.group_column)
        info = hub.push_dataset_repo(args.repo_id, scored, selected, settings=settings,
                                     source_dataset=(args.datasets or [None])[0], **common)
    elif args.what == "proxy":
        info = hub.push_proxy_repo(args.repo_id, args.path, datasets=args.datasets or None, **common)
    else:
        info = hub.push_adapter_repo(args.repo_id, args.path, base_model=args.base_model,
                                     datasets=args.datasets or None, **common)
    print(f"Pushed {args.what} to {args.repo_id}: {getattr(info, 'commit_url', info)}")
    return info
