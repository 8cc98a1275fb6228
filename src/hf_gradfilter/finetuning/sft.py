"""Fine-tune the target model on a selected split with TRL's `SFTTrainer` and a PEFT LoRA adapter.

Alpaca rows are turned into TRL prompt/completion rows with the same Alpaca template the proxy
saw (`formatting.render`), so the loss is on the completion only (TRL's default for that format)
and TRL appends the eos token. Prompt/completion and conversational (``messages``) rows keep their
format. Odd rows get scoring's policies (`to_sft_rows`): an empty response is never trained on.
The paper's targets are ``meta-llama/Llama-2-7b-hf`` and ``-13b-hf``; offline,
the same code trains a tiny ``LlamaConfig`` model.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import fields, replace
from typing import TYPE_CHECKING

import torch
from peft import LoraConfig
from transformers.utils import logging

from ..data.formatting import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_WITH_INPUT,
    InstructionFormat,
    _content_is_empty,
    _is_empty,
    _messages,
    _text,
    check_tokenizer,
)
from ..lora import LoraArguments

logger = logging.get_logger(__name__)

if TYPE_CHECKING:  # TRL is imported when a fine-tune starts, not with the package
    from trl import SFTConfig


def to_sft_rows(dataset, fmt: InstructionFormat | None = None):
    """Rows TRL's SFTTrainer understands: ``prompt``/``completion`` (from Alpaca or prompt/completion) or ``messages``.

    The odd-input policies of scoring hold here too (`data.formatting`, "Odd input"): a null text reads
    as ``""`` and a number as its text, a list, dict or bytes in a text column is refused naming the
    row, and a row whose response is empty (or a conversation with no non-empty assistant turn) is not
    trained on: it is dropped, and the dropped rows are counted in a warning. No row left is an error.
    """
    fmt = (fmt or InstructionFormat()).resolve(dataset.column_names)
    has_input = fmt.kind == "alpaca" and fmt.input_column in dataset.column_names

    def convert(row, i):
        if fmt.kind == "messages":
            messages = _messages(row.get(fmt.messages_column), fmt.messages_column, i)
            empty = all(_content_is_empty(m.get("content")) for m in messages if m.get("role") == "assistant")
            return {"messages": messages, "_empty": empty}
        if fmt.kind == "prompt_completion":
            prompt = _text(row.get(fmt.prompt_column), fmt.prompt_column, i)
            completion = _text(row.get(fmt.completion_column), fmt.completion_column, i)
        else:
            inp = _text(row.get(fmt.input_column), fmt.input_column, i) if has_input else ""
            template = ALPACA_PROMPT_WITH_INPUT if inp.strip() else ALPACA_PROMPT
            prompt = template.format(instruction=_text(row.get(fmt.instruction_column), fmt.instruction_column, i),
                                     input=inp)
            completion = _text(row.get(fmt.output_column), fmt.output_column, i)
        return {"prompt": prompt, "completion": completion, "_empty": _is_empty(completion)}

    rows = dataset.map(convert, with_indices=True, remove_columns=dataset.column_names, desc="Formatting for SFT")
    empty = int(sum(rows["_empty"]))
    if empty == len(rows):
        raise ValueError(f"No row has a response to fine-tune on: all {empty} are empty; fill in the responses.")
    if empty:
        logger.warning(f"{empty} row(s) have an empty response and are not trained on (as in scoring).")
        rows = rows.filter(lambda flag: not flag, input_columns="_empty")
    return rows.remove_columns("_empty")


def default_lora_config() -> LoraConfig:
    """The target's LoRA: `LoraArguments`' defaults, rank 16 on every linear layer (a common 7B recipe)."""
    return LoraArguments().to_peft_config()


def sft_defaults(gpu: bool | None = None) -> dict:
    """Our `SFTConfig` defaults: a 7B LoRA run on one GPU; fp32 without gradient checkpointing on CPU.

    GPU: bf16, gradient checkpointing, batch 4 x 8 accumulation, lr 2e-4, 3 epochs, cosine schedule.
    CPU: the same in fp32 (bf16 is ~20x slower on CPU), no checkpointing.
    """
    gpu = torch.cuda.is_available() if gpu is None else gpu
    from trl import SFTConfig

    names = {f.name for f in fields(SFTConfig)}  # transformers 5 renamed gradient -> activation checkpointing
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return dict(
        num_train_epochs=3, learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=0.03,
        per_device_train_batch_size=4, gradient_accumulation_steps=8, logging_steps=10, max_length=1024,
        bf16=gpu, save_strategy="no", report_to="none", **{checkpointing: gpu},
    )


def sft_config(output_dir: str, **overrides) -> SFTConfig:
    """`SFTConfig` with `sft_defaults`, updated by ``overrides``."""
    from trl import SFTConfig

    return SFTConfig(output_dir=output_dir, **{**sft_defaults(), **overrides})


def finetune(model, train_dataset, args: SFTConfig | None = None, peft_config: LoraConfig | None = None,
             processing_class=None, fmt: InstructionFormat | None = None, output_dir: str = "gradfilter_target",
             eval_dataset=None):
    """Train a LoRA adapter for ``model`` on ``train_dataset``; save it with its loss curve. Returns the trainer.

    Args:
        model: a causal LM or its Hub id / local path (e.g. ``meta-llama/Llama-2-7b-hf``).
        train_dataset: the selected rows (alpaca, prompt_completion or messages format).
        args: an `SFTConfig`; default `sft_config(output_dir)`. A bf16 config on a machine without a
            GPU is switched to fp32, with a warning.
        peft_config: default `default_lora_config()`.
        processing_class: the target's tokenizer (loaded from ``model`` when it is a string).
        eval_dataset: optional held-out rows (any supported format), evaluated as ``args.eval_strategy`` says.
    """
    if len(train_dataset) == 0:
        raise ValueError("The selected split is empty: there is nothing to fine-tune on; select a larger ratio.")
    args = args or sft_config(output_dir)
    if not torch.cuda.is_available() and (args.bf16 or args.fp16):
        logger.warning("No GPU: fine-tuning in fp32 (bf16/fp16 on CPU is slow or unsupported).")
        args = replace(args, bf16=False, fp16=False)
    if processing_class is None:
        from transformers import AutoTokenizer

        if not isinstance(model, str):
            raise ValueError("Pass processing_class=tokenizer together with a model object.")
        processing_class = AutoTokenizer.from_pretrained(model)
    rows = to_sft_rows(train_dataset, fmt)
    check_tokenizer(processing_class, "messages" if "messages" in rows.column_names else "prompt_completion")
    if processing_class.pad_token is None:
        processing_class.pad_token = processing_class.eos_token
    eval_rows = to_sft_rows(eval_dataset, fmt) if eval_dataset is not None else None
    from trl import SFTTrainer

    trainer = SFTTrainer(model=model, args=args, train_dataset=rows, eval_dataset=eval_rows,
                         processing_class=processing_class, peft_config=peft_config or default_lora_config())
    trainer.train()
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():
        save_loss_curve(trainer.state.log_history, args.output_dir)
    return trainer


def save_loss_curve(log_history: list[dict], output_dir: str) -> dict[str, str]:
    """Write the training loss as ``loss_curve.json``, ``loss_curve.csv`` and ``loss_curve.png``."""
    points = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    os.makedirs(output_dir, exist_ok=True)
    paths = {ext: os.path.join(output_dir, f"loss_curve.{ext}") for ext in ("json", "csv", "png")}
    with open(paths["json"], "w") as f:
        json.dump([{"step": s, "loss": v} for s, v in points], f, indent=1)
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "loss"])
        writer.writerows(points)
    from ..plots import line_plot

    line_plot({"training loss": points}, paths["png"], xlabel="optimizer step", ylabel="loss",
              title="Target fine-tuning loss")
    return paths
