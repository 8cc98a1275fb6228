"""hf-gradfilter: G-SNR (GradFiltering) data selection for instruction tuning."""

from . import hub, judge
from .baselines import HIGHER_IS_BETTER, SCORERS, IFDScorer, LengthScorer, RandomScorer, RecordScorer, superfiltering_select
from .config import GradFilterConfig
from .finetune import finetune, sft_config
from .formatting import InstructionFormat, tokenize_dataset
from .norms import LoraNormRecorder, sq_norms
from .record import GradientRecord
from .scorer import GSNRScorer, score_dataset
from .scoring import ensemble_variance, grad_energy, gsnr, relative_drop, score_parts
from .selection import group_counts, select_top, top_indices, top_indices_by_group
from .sweep import sweep_record
from .trainer import GradFilterTrainer, build_ensemble, per_example_loss

__version__ = "0.1.0"

__all__ = [
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
    "build_ensemble",
    "finetune",
    "hub",
    "sft_config",
    "ensemble_variance",
    "grad_energy",
    "gsnr",
    "per_example_loss",
    "relative_drop",
    "score_dataset",
    "score_parts",
    "select_top",
    "sweep_record",
    "sq_norms",
    "tokenize_dataset",
    "top_indices",
    "top_indices_by_group",
]
