"""Instruction rows -> token ids with the loss on the response only, in all three formats."""

from __future__ import annotations

import pytest
from datasets import Dataset

from hf_gradfilter import InstructionFormat, tokenize_dataset


def response_text(tokenizer, row):
    return tokenizer.decode([t for t in row["labels"] if t != -100])


def test_alpaca_rows_train_on_output_and_eos_only(tokenizer):
    ds = Dataset.from_dict({"instruction": ["Reverse the words.", "What is 2 plus 2?"],
                            "input": ["red blue", ""], "output": ["blue red", "2 plus 2 is 4."]})
    tok, fmt = tokenize_dataset(ds, tokenizer)
    assert fmt.kind == "alpaca"
    assert response_text(tokenizer, tok[0]) == "blue red" + tokenizer.eos_token
    assert response_text(tokenizer, tok[1]) == "2 plus 2 is 4." + tokenizer.eos_token
    assert "### Input:" in tokenizer.decode(tok[0]["input_ids"])
    assert "### Input:" not in tokenizer.decode(tok[1]["input_ids"])
    assert tok["example_id"] == [0, 1]
    assert tok[0]["num_response_tokens"] == sum(t != -100 for t in tok[0]["labels"])


def test_prompt_completion_rows_train_on_completion(tokenizer):
    ds = Dataset.from_dict({"prompt": ["Say hi:"], "completion": [" hi there"]})
    tok, fmt = tokenize_dataset(ds, tokenizer)
    assert fmt.kind == "prompt_completion"
    assert response_text(tokenizer, tok[0]) == " hi there" + tokenizer.eos_token


def test_messages_rows_train_on_every_assistant_turn(tokenizer):
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "first answer"},
            {"role": "user", "content": "b"}, {"role": "assistant", "content": "second answer"}]
    tok, fmt = tokenize_dataset(Dataset.from_dict({"messages": [msgs]}), tokenizer)
    assert fmt.kind == "messages"
    text = response_text(tokenizer, tok[0])
    assert "first answer" in text and "second answer" in text
    assert "<|user|>" not in text and "a" + tokenizer.eos_token not in text


def test_custom_column_names(tokenizer):
    ds = Dataset.from_dict({"q": ["Say yes."], "a": ["yes"]})
    fmt = InstructionFormat(kind="alpaca", instruction_column="q", output_column="a")
    tok, _ = tokenize_dataset(ds, tokenizer, fmt)
    assert response_text(tokenizer, tok[0]) == "yes" + tokenizer.eos_token


def test_truncation_is_counted_and_rows_without_response_are_kept(tokenizer):
    ds = Dataset.from_dict({"instruction": ["word " * 300, "Say yes."], "output": ["yes", "yes " * 300]})
    tok, _ = tokenize_dataset(ds, tokenizer, max_length=200)
    assert len(tok) == 2 and tok["truncated"] == [True, True]
    assert tok[0]["num_response_tokens"] == 0
    assert tok[1]["num_response_tokens"] > 0 and len(tok[1]["input_ids"]) == 200


def test_row_hash_changes_with_content_and_ignores_other_columns(tokenizer):
    a = Dataset.from_dict({"instruction": ["x"], "output": ["y"], "extra": [1]})
    b = Dataset.from_dict({"instruction": ["x"], "output": ["y"], "extra": [2]})
    c = Dataset.from_dict({"instruction": ["x"], "output": ["z"], "extra": [1]})
    ha, hb, hc = (tokenize_dataset(d, tokenizer)[0]["row_hash"][0] for d in (a, b, c))
    assert ha == hb != hc


@pytest.mark.parametrize("columns, match", [
    ({"question": ["q"], "answer": ["a"]}, "Cannot tell the dataset format"),
    ({"instruction": ["q"]}, "Cannot tell the dataset format"),
])
def test_missing_columns_are_named(tokenizer, columns, match):
    with pytest.raises(ValueError, match=match):
        tokenize_dataset(Dataset.from_dict(columns), tokenizer)


def test_explicit_format_with_missing_column_names_it(tokenizer):
    with pytest.raises(ValueError, match=r"needs column\(s\) \['completion'\]"):
        tokenize_dataset(Dataset.from_dict({"prompt": ["p"]}), tokenizer, InstructionFormat(kind="prompt_completion"))


def test_empty_dataset_is_refused(tokenizer):
    with pytest.raises(ValueError, match="empty"):
        tokenize_dataset(Dataset.from_dict({"instruction": [], "output": []}), tokenizer)


def test_messages_need_a_chat_template(tokenizer):
    bare = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, eos_token=tokenizer.eos_token)
    bare.chat_template = None
    with pytest.raises(ValueError, match="chat_template"):
        tokenize_dataset(Dataset.from_dict({"messages": [[{"role": "user", "content": "a"}]]}), bare)


def test_pre_tokenized_rows_are_used_as_is(tokenizer):
    ds = Dataset.from_dict({"input_ids": [[5, 6, 7, 8], [9, 10]], "labels": [[-100, -100, 7, 8], [-100, 10]]})
    tok, fmt = tokenize_dataset(ds, tokenizer, max_length=3)
    assert fmt.kind == "tokenized"
    assert tok["input_ids"] == [[5, 6, 7], [9, 10]] and tok["labels"] == [[-100, -100, 7], [-100, 10]]
    assert tok["num_response_tokens"] == [1, 1] and tok["truncated"] == [True, False] and tok["length"] == [3, 2]
