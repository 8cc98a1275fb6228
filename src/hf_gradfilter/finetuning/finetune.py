"""The fine-tune verb (``hf-gradfilter finetune``): the target model, its LoRA and the selected split,
trained with `finetune` (TRL's SFTTrainer)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from ..data.formatting import DataFormatArguments
from ..data.io import load_rows
from ..lora import LoraArguments
from ..proxy.model import load_causal_lm
from .sft import finetune


@dataclass
class FinetuneArguments(LoraArguments, DataFormatArguments):
    """The target model, its LoRA (`LoraArguments`), and the selected split to train on."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "The selected split: a folder written by `select`, a file, or a Hub id."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_split: str = field(default="train", metadata={"help": "Split to train on (Hub / DatasetDict)."})
    model_name_or_path: str = field(default="meta-llama/Llama-2-7b-hf",
                                    metadata={"help": "Target causal LM: Hub id or local path."})


def finetune_target(args: FinetuneArguments, config, eval_rows=None):
    """The fine-tune stage, one function for the `finetune` verb and `run`: the selected split ``args.dataset_name``
    trained into a LoRA adapter of ``args.model_name_or_path`` with TRL's SFTTrainer (`sft.finetune`, settings
    ``config``: an `SFTConfig`), evaluated on ``eval_rows`` when given. Writes into ``config.output_dir`` the adapter,
    its loss curve, ``log_history.json`` and ``eval_metrics.json`` (rows, final train loss, final and best held-out
    loss). Returns the trainer."""
    import torch

    if not args.dataset_name:
        raise ValueError("Pass --dataset_name: the selected split written by `hf-gradfilter select`.")
    rows = load_rows(args.dataset_name, args.dataset_config, args.dataset_split)
    if len(rows) == 0:
        raise ValueError(f"The selected split {args.dataset_name!r} is empty: select a larger ratio.")
    torch.manual_seed(config.seed)  # the adapter's initialisation
    model, tokenizer = load_causal_lm(args.model_name_or_path, trust_remote_code=bool(config.trust_remote_code),
                                      dtype="auto")
    lora = LoraArguments.from_fields(args).to_peft_config()
    trainer = finetune(model, rows, args=config, peft_config=lora, processing_class=tokenizer,
                       fmt=args.instruction_format, eval_dataset=eval_rows)
    if trainer.is_world_process_zero():
        write_metrics(trainer.state.log_history, config.output_dir, len(rows))
        print(f"Target adapter: {config.output_dir} (loss curve: {config.output_dir}/loss_curve.png)")
    return trainer


def write_metrics(history: list[dict], output_dir: str, train_rows: int) -> dict:
    """``log_history.json`` and ``eval_metrics.json`` of a fine-tune: rows trained on, the final training loss and,
    when it was evaluated, the final and best held-out loss."""
    with open(os.path.join(output_dir, "log_history.json"), "w") as f:
        json.dump(history, f, indent=1)
    metrics = {"train_rows": train_rows,
               "final_train_loss": next((h["loss"] for h in reversed(history) if "loss" in h), None)}
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    if evals:
        metrics.update(final_eval_loss=evals[-1], best_eval_loss=min(evals))
    with open(os.path.join(output_dir, "eval_metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    return metrics
