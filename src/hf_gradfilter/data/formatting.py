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
``num_response_tokens``, ``truncated`` and ``empty_response``. Rows are cut to ``max_length``
tokens; a row left with no response token keeps ``num_response_tokens == 0`` and later gets NaN
scores: it is counted, never dropped.

Odd input
---------
Every row of the source gets a row in the output, in order; each odd case below has one outcome,
either a `ValueError` before any training or a policy whose rows are counted in
``GradFilterTrainer.data_stats`` (and so in the record's metadata).

- **Nulls.** A null ``instruction``/``input``/``output``/``prompt``/``completion`` is read as ``""``;
  a null ``messages`` value as a conversation with no turns, a null ``content`` as ``""``.
- **Empty response.** An ``output``/``completion`` that is empty or whitespace only, or a
  conversation whose assistant turns are all empty (or that has none), gives the row no response
  token (all labels -100): it is not trained on, gets NaN scores, and has ``empty_response``
  set; the trainer counts it in ``num_empty_response``. A pre-tokenized row whose labels are all
  -100 counts the same way. In a conversation with some non-empty assistant turns, an empty turn's
  end-of-turn tokens are still trained on. An empty *prompt* (instruction) is fine: the row is
  scored normally.
- **No response token after truncation.** ``num_no_response`` counts every row with
  ``num_response_tokens == 0``, so it *includes* the empty-response rows:
  ``num_no_response - num_empty_response`` rows lost their whole response to ``max_length``.
- **Rows far over max_length.** Cut to ``max_length`` tokens (``truncated``, counted in
  ``num_truncated``) and scored on the response tokens that remain.
- **Non-string fields.** ``int``/``float``/``bool`` values in text columns (and message
  ``content``) are converted with ``str()``. A list, dict or bytes value in an alpaca or
  prompt/completion text column raises a `ValueError` naming the column, the example id (row
  position) and the type. A ``messages`` value that is not a list of dicts each with a string
  ``role`` and a ``content`` key raises a `ValueError` naming the example id.
- **Duplicate rows** (same formatted content, so the same ``row_hash``) are each trained on and
  scored independently; the trainer counts the repeats (rows whose hash appeared earlier) in
  ``num_duplicate_rows`` and logs a warning. The scorer matches rows by position/``example_id``,
  so each copy gets its own scores.
- **Invalid UTF-8** in a JSON/JSONL/CSV file is refused by `data.io.load_rows` with a one-line error
  naming the file and the fix (re-encode it, e.g. ``iconv -f latin1 -t utf-8``).
- **A non-finite loss** stops training with a `FloatingPointError` naming the example ids, the
  member and the global step; the partial record is saved first.
- **Fine-tuning the target** (`target.finetune.to_sft_rows`) reads the rows with the same policies;
  a row with an empty response is dropped there (not trained on) and the dropped rows are counted
  in a warning.
- **A dataset changed between scoring and selecting** is refused by `GSNRScorer` (row hash or row
  count mismatch), never silently mis-scored.
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

TOKENIZED_COLUMNS = ("example_id", "row_hash", "input_ids", "labels", "length", "num_response_tokens", "truncated",
                     "empty_response")


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


_NOT_TEXT = (list, tuple, dict, bytes, bytearray)


def _text(value: Any, column: str | None = None, example_id: int | None = None) -> str:
    """A text field as ``str``: null -> ``""``, numbers and bools -> ``str()``; lists, dicts and bytes
    are refused (naming the column and example id when given)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, _NOT_TEXT):
        where = f"Column {column!r}" if column is not None else "A text field"
        row = f" of example id {example_id}" if example_id is not None else ""
        raise ValueError(
            f"{where}{row} holds a {type(value).__name__}, not text; text columns must hold strings "
            "(or numbers). Convert the column to strings or point the format at another column."
        )
    return str(value)


def _is_empty(text: str) -> bool:
    return not text.strip()


def row_hashes(batch: dict[str, list], columns: list[str]) -> list[int]:
    """A signed 64-bit hash per row of the given columns' content (JSON-encoded, blake2b)."""
    n = len(batch[columns[0]])
    out = []
    for i in range(n):
        payload = json.dumps([batch[c][i] for c in columns], ensure_ascii=False, default=str, sort_keys=True)
        digest = hashlib.blake2b(payload.encode("utf-8", "surrogatepass"), digest_size=8).digest()
        out.append(int.from_bytes(digest, "little", signed=True))
    return out


def render(row: dict[str, Any], fmt: InstructionFormat, tokenizer,
           example_id: int | None = None) -> tuple[str, list[tuple[int, int]]]:
    """Render one row to ``(text, response_spans)``; spans are ``[start, end)`` character ranges.

    An empty (or whitespace-only) response gives no span: the row has no response token.
    ``example_id`` only names the row in errors.
    """
    if fmt.kind == "alpaca":
        instruction = _text(row.get(fmt.instruction_column), fmt.instruction_column, example_id)
        inp = _text(row.get(fmt.input_column), fmt.input_column, example_id)
        output = _text(row.get(fmt.output_column), fmt.output_column, example_id)
        template = ALPACA_PROMPT_WITH_INPUT if inp.strip() else ALPACA_PROMPT
        prompt = template.format(instruction=instruction, input=inp)
        return _with_response(prompt, output, tokenizer)
    if fmt.kind == "prompt_completion":
        prompt = _text(row.get(fmt.prompt_column), fmt.prompt_column, example_id)
        completion = _text(row.get(fmt.completion_column), fmt.completion_column, example_id)
        return _with_response(prompt, completion, tokenizer)
    return _render_messages(_messages(row.get(fmt.messages_column), fmt.messages_column, example_id), tokenizer)


def _with_response(prompt: str, response: str, tokenizer) -> tuple[str, list[tuple[int, int]]]:
    text = prompt + response + tokenizer.eos_token
    return text, [] if _is_empty(response) else [(len(prompt), len(text))]


def _messages(value: Any, column: str, example_id: int | None) -> list[dict]:
    """Check a conversation (list of ``{"role", "content"}`` dicts); null -> no turns, null content -> ``""``."""
    if value is None:
        return []
    row = f"example id {example_id}" if example_id is not None else "a row"
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"Column {column!r} of {row} holds a {type(value).__name__}; a conversation must be "
                         "a list of {'role': ..., 'content': ...} dicts.")
    out = []
    for turn, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or "content" not in message:
            raise ValueError(f"Column {column!r} of {row}, turn {turn}: expected a dict with a string 'role' and "
                             f"a 'content', got {message!r:.80}.")
        content = message["content"]
        if content is None or isinstance(content, (int, float, bool)):
            message = {**message, "content": _text(content)}
        out.append(message)
    return out


def _content_is_empty(content: Any) -> bool:
    return _is_empty(content) if isinstance(content, str) else not content


def _render_messages(messages: list[dict], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    def chat(msgs, add_generation_prompt=False):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)

    if not messages:
        return "", []  # a null or empty conversation (some chat templates fail on it)
    full = chat(messages)
    if all(_content_is_empty(m.get("content")) for m in messages if m.get("role") == "assistant"):
        return full, []  # no assistant turn with text: no response token
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
    for ids, labels, empty in _token_rows(batch, indices, fmt, tokenizer):
        if len(ids) != len(labels):
            raise ValueError(f"input_ids ({len(ids)}) and labels ({len(labels)}) differ in length in a tokenized row.")
        out["truncated"].append(len(ids) > max_length)
        out["empty_response"].append(empty)
        ids, labels = ids[:max_length], labels[:max_length]
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["length"].append(len(ids))
        # labels are shifted inside the loss: the first token is never a target.
        out["num_response_tokens"].append(sum(1 for lab in labels[1:] if lab != -100))
    out["example_id"] = list(indices)
    out["row_hash"] = row_hashes(batch, used_columns)
    return out


def _token_rows(batch, indices, fmt, tokenizer):
    """``(input_ids, labels, empty_response)`` per row, labels -100 outside the response spans."""
    if fmt.kind == "tokenized":
        for ids, labels in zip(batch["input_ids"], batch["labels"]):
            yield ids, labels, all(lab == -100 for lab in labels)
        return
    rendered = [render({c: batch[c][i] for c in batch}, fmt, tokenizer, example_id=indices[i])
                for i in range(len(indices))]
    enc = tokenizer(
        [text for text, _ in rendered],
        return_offsets_mapping=True,
        add_special_tokens=fmt.kind != "messages",  # chat templates write their own special tokens
    )
    for i, (_, spans) in enumerate(rendered):
        ids, offsets = enc["input_ids"][i], enc["offset_mapping"][i]
        yield ids, [tok if e > s and any(s < end and e > start for start, end in spans) else -100
                    for tok, (s, e) in zip(ids, offsets)], not spans


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


def raw_responses(batch, fmt: InstructionFormat, positions) -> list[str]:
    """The untemplated response text of each row (assistant turns joined by newlines)."""
    if fmt.kind in ("alpaca", "prompt_completion"):
        col = fmt.output_column if fmt.kind == "alpaca" else fmt.completion_column
        return [_text(v, col, i) for v, i in zip(batch[col], positions)]
    return ["\n".join(_text(m["content"]) for m in _messages(v, fmt.messages_column, i) if m["role"] == "assistant")
            for v, i in zip(batch[fmt.messages_column], positions)]
