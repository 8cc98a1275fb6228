"""hf-gradfilter: G-SNR (GradFiltering) data selection for instruction tuning.

The public API, re-exported from one subpackage per stage: ``data`` -> ``proxy`` -> ``scores`` ->
``selection`` -> ``target`` -> ``publish``, with ``run`` (the pipeline and its report) over them
and ``cli`` on top (README: Layout).
"""

from . import _moved
from .data.formatting import InstructionFormat, tokenize_dataset
from .proxy.config import GradFilterConfig
from .proxy.model import build_ensemble, per_example_loss
from .proxy.norms import LoraNormRecorder, sq_norms
from .proxy.record import GradientRecord
from .proxy.trainer import GradFilterTrainer
from .publish import hub
from .scores.alignment import target_alignment
from .scores.baselines import (
    HIGHER_IS_BETTER,
    SCORERS,
    IFDScorer,
    LengthScorer,
    RandomScorer,
    RecordScorer,
    superfiltering_select,
)
from .scores.duplicates import near_duplicate_ids, near_duplicates
from .scores.scorer import GSNRScorer, score_dataset
from .scores.scoring import DEFAULT_SCORE, ensemble_variance, grad_energy, gsnr, relative_drop, score_parts
from .scores.stage import score_columns
from .scores.sweep import sweep_record
from .selection.diversity import sketch_clusters
from .selection.top import group_counts, select_top, top_indices, top_indices_by_group
from .target import judge
from .target.finetune import finetune, sft_config

_moved.install()  # old flat module paths (hf_gradfilter.trainer ...) still import

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_SCORE",
    "HIGHER_IS_BETTER",
    "IFDScorer",
    "LengthScorer",
    "RandomScorer",
    "RecordScorer",
    "SCORERS",
    "judge",
    "superfiltering_select",
    "GradFilterConfig",
    "GradFilterTrainer",
    "GradientRecord",
    "GSNRScorer",
    "group_counts",
    "InstructionFormat",
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
    "select_top",
    "sketch_clusters",
    "sweep_record",
    "target_alignment",
    "sq_norms",
    "tokenize_dataset",
    "top_indices",
    "top_indices_by_group",
]
