"""The demo verb (``hf-gradfilter demo``): score the embedded demo dataset with the demo proxy, keep
its top rows, and show how many corrupted rows they hold against a random selection."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..data.columns import read_columns
from ..demo.backbone import DEMO_LEARNING_RATE
from ..proxy.config import GradFilterConfig
from ..scores.formulas import DEFAULT_SCORE
from ..scores.metrics import auroc
from ..scores.score import ScoreArguments, score
from ..selection.select import SelectArguments, select


@dataclass
class DemoArguments:
    """The embedded default."""

    demo_rows: int = field(default=3000, metadata={"help": "Rows of the demo dataset (20% corrupted)."})
    ratio: float = field(default=0.1, metadata={"help": "Fraction of rows to select."})
    demo_pretrain_rows: int = field(default=3000, metadata={"help": "Clean rows that pre-train the demo backbone."})
    demo_pretrain_epochs: int = field(default=4, metadata={"help": "Pre-training epochs of the demo backbone."})


def run_demo(args: DemoArguments, config: GradFilterConfig):
    """The embedded default end to end: score the demo set, select the top rows, compare with random."""
    if not 0 < args.ratio <= 1:
        raise ValueError(f"ratio={args.ratio} is outside (0, 1]; use e.g. 0.1 for the top 10%.")
    trainer = score(ScoreArguments(demo=True, demo_rows=args.demo_rows, demo_pretrain_rows=args.demo_pretrain_rows,
                                   demo_pretrain_epochs=args.demo_pretrain_epochs), config)
    selected, stats, output = select(SelectArguments(scored=trainer.scored_path, ratio=args.ratio))
    scored = trainer.scored
    rate = float(np.mean(scored["is_corrupted"]))
    kept = int(np.sum(selected["is_corrupted"]))
    n = len(selected)
    print(f"\nCorrupted rows in the top {args.ratio:.0%} by {DEFAULT_SCORE}: {kept} of {n} ({kept / n:.1%}); "
          f"a random selection of {n} keeps {rate * n:.1f} on average ({rate:.0%}).")
    for kind in ("swapped", "truncated", "shuffled"):
        print(f"  {kind:<10} kept {int(np.sum(np.asarray(selected['corruption']) == kind))}")
    clean = ~np.asarray(scored["is_corrupted"])
    print("AUROC for ranking clean rows above corrupted ones over the whole set (random: 0.5):")
    for column, what in ((DEFAULT_SCORE, "the default"), ("gsnr", "the paper's G-SNR")):
        scores = np.asarray(read_columns(scored, [column])[column], dtype=np.float64)
        print(f"  {column:<9} {auroc(scores, clean):.3f}  ({what})")
    if config.learning_rate == DEMO_LEARNING_RATE:
        print(f"(demo proxy LoRA learning rate {DEMO_LEARNING_RATE}; the paper's 5e-5 is meant for GPT-2)")
    return trainer, selected
