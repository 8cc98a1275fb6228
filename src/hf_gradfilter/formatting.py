"""Instruction data -> token ids with the loss on the response only.

Three row formats are understood (column names configurable through `InstructionFormat`):

- ``alpaca``: ``instruction``, ``input`` (optional), ``output``; rendered with the Stanford Alpaca
  prompt template, the response is ``output + eos``.
- ``prompt_completion`` (TRL): ``prompt``, ``completion``; the response is ``completion + eos``.
- ``messages`` (TRL conversational): a list of ``{"role", "content"}`` dicts rendered with the
  tokenizer's chat template; every assistant turn is response.
- ``tokenized``: ``input_ids`` and ``labels`` (-100 on prompt tokens) made elsewhere; used as is.

Each row becomes ``input_ids`` and ``labels`` (-100 on prompt tokens), plus bookkeeping columns:
``example_id`` (the row's position in the source dataset, stable across runs), ``row_hash`` (a
64-bit hash of the fields that were formatted, so a record can be matched to its dataset),
``num_response_tokens`` and ``truncated``. Rows are cut to ``max_length`` tokens; a row left with
no response token keeps ``num_response_tokens == 0`` and later gets NaN scores: it is counted,
never dropped.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

FORMATS = ("auto", "alpaca", "prompt_completion", "messages", "tokenized")

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)

TOKENIZED_COLUMNS = ("example_id", "row_hash", "input_ids", "labels", "length", "num_response_tokens", "truncated")


@dataclass(frozen=True)
class InstructionFormat:
    """Which columns hold the instruction data, and how to read them.

    ``kind="auto"`` picks ``messages`` if that column exists, else ``prompt_completion``, else
    ``alpaca``; `resolve` turns it into a concrete kind and checks the columns exist.
    """

    kind: str = "auto"
    instruction_column: str = "instruction"
    input_column: str = "input"
    output_column: str = "output"
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    messages_column: str = "messages"

    def resolve(self, column_names: list[str]) -> InstructionFormat:
        cols = set(column_names)
        kind = self.kind
        if kind not in FORMATS:
            raise ValueError(f"Unknown dataset format {kind!r}; choose one of {', '.join(FORMATS)}.")
        if kind == "auto":
            if {"input_ids", "labels"} <= cols:
                kind = "tokenized"
            elif self.messages_column in cols:
                kind = "messages"
            elif self.prompt_column in cols and self.completion_column in cols:
                kind = "prompt_completion"
            elif self.instruction_column in cols and self.output_column in cols:
                kind = "alpaca"
            else:
                raise ValueError(
                    f"Cannot tell the dataset format from its columns {sorted(cols)}: expected "
                    f"{self.instruction_column!r}+{self.output_column!r} (alpaca), "
                    f"{self.prompt_column!r}+{self.completion_column!r} (prompt_completion) or "
                    f"{self.messages_column!r} (messages). Rename the columns or pass the column names."
                )
        needed = self.required_columns(kind)
        missing = [c for c in needed if c not in cols]
        if missing:
            raise ValueError(
                f"Dataset format {kind!r} needs column(s) {missing}, but the dataset has {sorted(cols)}. "
                "Rename them or pass the matching --*_column option."
            )
        return InstructionFormat(**{**asdict(self), "kind": kind})

    def required_columns(self, kind: str | None = None) -> list[str]:
        kind = kind or self.kind
        if kind == "alpaca":
            return [self.instruction_column, self.output_column]
        if kind == "prompt_completion":
            return [self.prompt_column, self.completion_column]
        if kind == "messages":
            return [self.messages_column]
        if kind == "tokenized":
            return ["input_ids", "labels"]
        raise ValueError(f"Format {kind!r} is not resolved; call resolve(column_names) first.")

    def used_columns(self, column_names: list[str]) -> list[str]:
        """The columns whose content goes into the text (and so into the row hash)."""
        cols = self.required_columns()
        if self.kind == "alpaca" and self.input_column in column_names:
            cols = [self.instruction_column, self.input_column, self.output_column]
        return cols


@dataclass
class DataFormatArguments:
    """The data-format fields shared by `GradFilterConfig` and the fine-tuning arguments (CLI flags)."""

    dataset_format: str = field(default="auto", metadata={"help": "Row format.", "choices": list(FORMATS)})
    instruction_column: str = field(default="instruction", metadata={"help": "Alpaca instruction column."})
    input_column: str = field(default="input", metadata={"help": "Alpaca input column (optional)."})
    output_column: str = field(default="output", metadata={"help": "Alpaca output column."})
    prompt_column: str = field(default="prompt", metadata={"help": "Prompt column (prompt_completion)."})
    completion_column: str = field(default="completion", metadata={"help": "Completion column."})
    messages_column: str = field(default="messages", metadata={"help": "Conversation column (messages)."})

    @property
    def instruction_format(self) -> InstructionFormat:
        return InstructionFormat(
            kind=self.dataset_format,
            instruction_column=self.instruction_column,
            input_column=self.input_column,
            output_column=self.output_column,
            prompt_column=self.prompt_column,
            completion_column=self.completion_column,
            messages_column=self.messages_column,
        )


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else str(value)


def row_hashes(batch: dict[str, list], columns: list[str]) -> list[int]:
    """A signed 64-bit hash per row of the given columns' content (JSON-encoded, blake2b)."""
    n = len(batch[columns[0]])
    out = []
    for i in range(n):
        payload = json.dumps([batch[c][i] for c in columns], ensure_ascii=False, default=str, sort_keys=True)
        digest = hashlib.blake2b(payload.encode("utf-8", "surrogatepass"), digest_size=8).digest()
        out.append(int.from_bytes(digest, "little", signed=True))
    return out


def render(row: dict[str, Any], fmt: InstructionFormat, tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """Render one row to ``(text, response_spans)``; spans are ``[start, end)`` character ranges."""
    if fmt.kind == "alpaca":
        instruction, inp = _text(row.get(fmt.instruction_column)), _text(row.get(fmt.input_column))
        template = ALPACA_PROMPT_WITH_INPUT if inp.strip() else ALPACA_PROMPT
        prompt = template.format(instruction=instruction, input=inp)
        response = _text(row.get(fmt.output_column)) + tokenizer.eos_token
        return prompt + response, [(len(prompt), len(prompt) + len(response))]
    if fmt.kind == "prompt_completion":
        prompt = _text(row.get(fmt.prompt_column))
        response = _text(row.get(fmt.completion_column)) + tokenizer.eos_token
        return prompt + response, [(len(prompt), len(prompt) + len(response))]
    return _render_messages(row.get(fmt.messages_column) or [], tokenizer)


def _render_messages(messages: list[dict], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    def chat(msgs, add_generation_prompt=False):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)

    full = chat(messages)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        start = len(chat(messages[:i], add_generation_prompt=True)) if i else 0
        end = len(chat(messages[: i + 1]))
        if not (0 <= start <= end <= len(full)):
            raise ValueError(
                "The tokenizer's chat template does not render conversations prefix by prefix, so assistant "
                "turns cannot be located; use a prompt/completion dataset or another chat template."
            )
        spans.append((start, end))
    return full, spans


def check_tokenizer(tokenizer, kind: str) -> None:
    """Fail early, naming what the tokenizer lacks for this format."""
    if kind == "tokenized":
        return
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{type(tokenizer).__name__} is a slow tokenizer; hf-gradfilter needs a fast tokenizer "
            "(character offsets locate the response). Load it with use_fast=True."
        )
    if kind in ("alpaca", "prompt_completion") and tokenizer.eos_token is None:
        raise ValueError("The tokenizer has no eos_token, which ends every response; set tokenizer.eos_token.")
    if kind == "messages" and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "The dataset is conversational (messages) but the tokenizer has no chat_template; "
            "set tokenizer.chat_template or use an instruct model's tokenizer."
        )


def tokenize_batch(batch: dict[str, list], indices: list[int], *, fmt: InstructionFormat, tokenizer,
                   max_length: int, used_columns: list[str]) -> dict[str, list]:
    """`Dataset.map(batched=True, with_indices=True)` function producing `TOKENIZED_COLUMNS`."""
    out = {k: [] for k in TOKENIZED_COLUMNS}
    for ids, labels in _token_rows(batch, len(indices), fmt, tokenizer):
        if len(ids) != len(labels):
            raise ValueError(f"input_ids ({len(ids)}) and labels ({len(labels)}) differ in length in a tokenized row.")
        out["truncated"].append(len(ids) > max_length)
        ids, labels = ids[:max_length], labels[:max_length]
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["length"].append(len(ids))
        # labels are shifted inside the loss: the first token is never a target.
        out["num_response_tokens"].append(sum(1 for lab in labels[1:] if lab != -100))
    out["example_id"] = list(indices)
    out["row_hash"] = row_hashes(batch, used_columns)
    return out


def _token_rows(batch, n, fmt, tokenizer):
    """``(input_ids, labels)`` per row, labels -100 outside the response spans."""
    if fmt.kind == "tokenized":
        yield from zip(batch["input_ids"], batch["labels"])
        return
    rendered = [render({c: batch[c][i] for c in batch}, fmt, tokenizer) for i in range(n)]
    enc = tokenizer(
        [text for text, _ in rendered],
        return_offsets_mapping=True,
        add_special_tokens=fmt.kind != "messages",  # chat templates write their own special tokens
    )
    for i, (_, spans) in enumerate(rendered):
        ids, offsets = enc["input_ids"][i], enc["offset_mapping"][i]
        yield ids, [tok if e > s and any(s < end and e > start for start, end in spans) else -100
                    for tok, (s, e) in zip(ids, offsets)]


def tokenize_dataset(dataset, tokenizer, fmt: InstructionFormat | None = None, max_length: int = 512,
                     num_proc: int | None = None):
    """Tokenize a `datasets.Dataset` of instruction rows; returns ``(tokenized, resolved_format)``.

    The tokenized dataset has exactly `TOKENIZED_COLUMNS`, one row per source row, in order.
    """
    if len(dataset) == 0:
        raise ValueError("The dataset is empty: there is nothing to score.")
    if max_length < 2:
        raise ValueError(f"max_length={max_length} leaves no room for a response; use at least 2.")
    fmt = (fmt or InstructionFormat()).resolve(dataset.column_names)
    check_tokenizer(tokenizer, fmt.kind)
    used = fmt.used_columns(dataset.column_names)
    tokenized = dataset.map(
        tokenize_batch,
        batched=True,
        with_indices=True,
        remove_columns=dataset.column_names,
        fn_kwargs=dict(fmt=fmt, tokenizer=tokenizer, max_length=max_length, used_columns=used),
        num_proc=num_proc,
        desc="Tokenizing",
    )
    return tokenized, fmt
