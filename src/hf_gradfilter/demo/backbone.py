"""The embedded default: a demo dataset with known corrupted rows and a tiny, warmed-up GPT-2 proxy.

Everything is built offline and deterministically:

1. `make_demo_dataset` draws the instruction rows to score (20% corrupted, marked in
   ``corruption`` / ``is_corrupted``).
2. The proxy's backbone must not be random (LoRA on random weights says little), so it is
   *pre-trained*: a byte-level BPE tokenizer and a 2-layer GPT-2 are trained, all parameters, on an
   independent **clean** draw of the same task families (another seed, no corruption), the way a
   real proxy (GPT-2) is pre-trained on general text it was never asked to score. The backbone is
   then frozen and the LoRA ensemble trains on the rows to score.
3. The warmed-up backbone is cached (``$HF_GRADFILTER_CACHE`` or ``~/.cache/hf_gradfilter``), so
   later runs skip step 2.

A tiny proxy learns little at the paper's LoRA rate (5e-5, meant for GPT-2 on Alpaca), so the
demo trains its members at `DEMO_LEARNING_RATE`.
"""

from __future__ import annotations

import os

import torch
from datasets import Dataset
from transformers import (
    AutoModelForCausalLM,
    DataCollatorForLanguageModeling,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
)

from ..data.formatting import InstructionFormat, render
from ..dist import barrier, is_main_process, main_decides
from .data import make_demo_dataset
from .tiny import tiny_gpt2, train_tokenizer

DEMO_VERSION = "v1"
DEMO_LEARNING_RATE = 1e-3
PRETRAIN_ROWS = 3000


def cache_root() -> str:
    return os.environ.get("HF_GRADFILTER_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "hf_gradfilter"))


def _texts(dataset: Dataset, eos: str) -> list[str]:
    class _Eos:
        eos_token = eos

    fmt = InstructionFormat(kind="alpaca")
    return [render(row, fmt, _Eos)[0] for row in dataset]


def pretrain_proxy(rows: Dataset, output_dir: str, seed: int = 0, epochs: int = 4, vocab_size: int = 1024,
                   use_cpu: bool | None = None):
    """Train a BPE tokenizer and a 2-layer GPT-2 (all parameters) on Alpaca-format ``rows``; save both."""
    tokenizer = train_tokenizer(_texts(rows, "<|endoftext|>"), vocab_size=vocab_size)
    model = tiny_gpt2(tokenizer, n_layer=2, n_embd=128, n_head=4, seed=seed)
    texts = Dataset.from_dict({"text": _texts(rows, tokenizer.eos_token)})
    tokens = texts.map(lambda b: tokenizer(b["text"], truncation=True, max_length=256), batched=True,
                       remove_columns=["text"], desc="Tokenizing pre-training text")
    args = TrainingArguments(
        output_dir=os.path.join(output_dir, "_pretrain"), num_train_epochs=epochs, learning_rate=2e-3,
        per_device_train_batch_size=32, warmup_steps=20, lr_scheduler_type="cosine", weight_decay=0.01,
        logging_steps=50, save_strategy="no", report_to="none", seed=seed, bf16=False,
        # default: the CPU when there is no GPU (also what makes several processes train together there)
        use_cpu=bool(use_cpu) if use_cpu is not None else not torch.cuda.is_available(),
    )
    Trainer(model=model, args=args, train_dataset=tokens,
            data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False)).train()
    if is_main_process():
        model.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
    return model, tokenizer


def pretrain_demo_proxy(output_dir: str, seed: int = 0, num_rows: int = PRETRAIN_ROWS, epochs: int = 4,
                        use_cpu: bool | None = None):
    """The demo backbone: `pretrain_proxy` on a clean draw of the demo tasks (another seed)."""
    clean = make_demo_dataset(num_rows=num_rows, corruption_rate=0.0, seed=seed + 10_000)
    return pretrain_proxy(clean, output_dir, seed=seed, epochs=epochs, use_cpu=use_cpu)


def demo_proxy_dir(seed: int = 0, num_rows: int = PRETRAIN_ROWS, epochs: int = 4) -> str:
    """Where the demo backbone with these settings is cached."""
    return os.path.join(cache_root(), f"demo_proxy_{DEMO_VERSION}_seed{seed}_rows{num_rows}_ep{epochs}")


def demo_proxy(seed: int = 0, cache_dir: str | None = None, num_rows: int = PRETRAIN_ROWS, epochs: int = 4):
    """The warmed-up demo backbone and its tokenizer, from the cache or freshly pre-trained."""
    path = cache_dir or demo_proxy_dir(seed, num_rows, epochs)
    # under several processes: rank 0 decides whether it is cached; all pre-train it; rank 0 saves it
    if main_decides(lambda: not os.path.exists(os.path.join(path, "model.safetensors"))):
        print(f"Pre-training the demo proxy backbone (once; cached in {path}) ...")
        pretrain_demo_proxy(path, seed=seed, num_rows=num_rows, epochs=epochs)
        barrier()
    return AutoModelForCausalLM.from_pretrained(path), PreTrainedTokenizerFast.from_pretrained(path)
