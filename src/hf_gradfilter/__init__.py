"""hf-gradfilter: G-SNR (GradFiltering) data selection for instruction tuning.

The public API, re-exported from one subpackage ("room") per stage, each importing only rooms below it:
``data`` -> ``proxy`` -> ``scores`` -> ``selection`` -> ``finetuning`` (train and judge the target), ``publish``
(the Hub) -> ``run`` (the pipeline and its report) -> ``cli`` (README: Layout; enforced by tests/test_layout.py).
"""

from .data.formatting import InstructionFormat, tokenize_dataset
from .finetuning import pairwise as judge
from .finetuning.sft import finetune, sft_config
from .lora import LoraArguments
from .proxy.config import GradFilterConfig
from .proxy.model import build_ensemble, per_example_loss
from .proxy.norms import LoraNormRecorder, sq_norms
from .proxy.record import GradientRecord
from .proxy.trainer import GradFilterTrainer
from .publish import hub
from .scores.alignment import target_alignment
from .scores.clusters import sketch_clusters
from .scores.duplicates import near_duplicate_ids, near_duplicates
from .scores.formulas import DEFAULT_SCORE, ensemble_variance, grad_energy, gsnr, relative_drop, score_parts
from .scores.ifd import IFDScorer
from .scores.score import score_columns
from .scores.scorers import (
    HIGHER_IS_BETTER,
    SCORERS,
    GSNRScorer,
    LengthScorer,
    RandomScorer,
    RecordScorer,
    score_dataset,
)
from .scores.sweep_grid import sweep_record
from .scores.text_duplicates import add_text_duplicate_columns, text_duplicates
from .selection.select import Selection, pick_rows
from .selection.superfiltering import superfiltering_select
from .selection.top import group_counts, select_top, top_indices, top_indices_by_group

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_SCORE",
    "HIGHER_IS_BETTER",
    "IFDScorer",
    "LengthScorer",
    "RandomScorer",
    "RecordScorer",
    "add_text_duplicate_columns",
    "SCORERS",
    "judge",
    "superfiltering_select",
    "GradFilterConfig",
    "GradFilterTrainer",
    "GradientRecord",
    "GSNRScorer",
    "group_counts",
    "InstructionFormat",
    "LoraArguments",
    "LoraNormRecorder",
    "near_duplicate_ids",
    "near_duplicates",
    "build_ensemble",
    "finetune",
    "hub",
    "sft_config",
    "ensemble_variance",
    "grad_energy",
    "gsnr",
    "per_example_loss",
    "relative_drop",
    "score_columns",
    "score_dataset",
    "score_parts",
    "Selection",
    "pick_rows",
    "select_top",
    "sketch_clusters",
    "sweep_record",
    "target_alignment",
    "text_duplicates",
    "sq_norms",
    "tokenize_dataset",
    "top_indices",
    "top_indices_by_group",
]
