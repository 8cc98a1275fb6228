"""Hostile and odd input: each case has one tested outcome, a clear error or a counted policy.

The policies are documented in the "Odd input" section of `hf_gradfilter.data.formatting`'s docstring.
Existing tests cover three more cases: a non-finite loss (tests/test_trainer.py, extended here),
rows with no response token after truncation (tests/test_trainer.py) and a dataset changed between
scoring and selecting (tests/test_scoring.py::test_scorer_refuses_a_record_from_another_dataset).
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from datasets import Dataset

from hf_gradfilter import (
    GradFilterConfig,
    GradFilterTrainer,
    GradientRecord,
    score_dataset,
    select_top,
    tokenize_dataset,
)
from hf_gradfilter.cli import main
from hf_gradfilter.data.formatting import InstructionFormat
from hf_gradfilter.data.io import load_rows
from hf_gradfilter.demo.tiny import tiny_gpt2
from hf_gradfilter.scores.formulas import score_parts

MAX_LENGTH = 256
LONG_OUTPUT = "word " * 40_000  # 200,000 characters


def config(output_dir, **kw):
    base = dict(output_dir=str(output_dir), num_members=2, per_device_train_batch_size=4, num_train_epochs=2,
                learning_rate=5e-3, lora_r=4, lora_alpha=8, max_length=MAX_LENGTH, disable_tqdm=True, seed=3,
                use_cpu=True)
    base.update(kw)
    return GradFilterConfig(**base)


def make_trainer(tokenizer, dataset, output_dir, **kw):
    return GradFilterTrainer(tiny_gpt2(tokenizer, n_embd=32, n_head=2), args=config(output_dir, **kw),
                             train_dataset=dataset, processing_class=tokenizer)


def response_text(tokenizer, row):
    return tokenizer.decode([t for t in row["labels"] if t != -100])


# Rows of the hostile alpaca set after the 10 clean demo rows, by position.
NULL_PROMPT, EMPTY, BLANK, NULL_OUTPUT, DUP_OF_0, DUP_OF_1, LONG, CUT = range(10, 18)


@pytest.fixture(scope="module")
def hostile(demo_rows):
    clean = demo_rows.select(range(10))
    rows = {k: list(clean[k]) for k in ("instruction", "input", "output")}
    extra = [
        (None, None, "ok yes"),                        # NULL_PROMPT: null instruction and input, scored normally
        ("Say nothing.", "", ""),                      # EMPTY: empty response
        ("Say nothing.", "", "  \n\t "),               # BLANK: whitespace-only response
        ("Say nothing at all.", "", None),             # NULL_OUTPUT: null response
        (rows["instruction"][0], rows["input"][0], rows["output"][0]),  # DUP_OF_0
        (rows["instruction"][1], rows["input"][1], rows["output"][1]),  # DUP_OF_1
        ("Repeat the word.", "", LONG_OUTPUT),          # LONG: far over max_length, response kept
        ("Say yes.", "word " * 400, "yes"),             # CUT: response cut away by truncation
    ]
    for instruction, inp, output in extra:
        rows["instruction"].append(instruction)
        rows["input"].append(inp)
        rows["output"].append(output)
    return Dataset.from_dict(rows)


@pytest.fixture(scope="module")
def trained(hostile, tokenizer, tmp_path_factory):
    """The hostile set through the trainer and the scorer, once for the module."""
    logger = logging.getLogger("hf_gradfilter.proxy.rows")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        trainer = make_trainer(tokenizer, hostile, tmp_path_factory.mktemp("hostile"))
    finally:
        logger.removeHandler(handler)
    trainer.train()
    scored = score_dataset(hostile, trainer.record)
    return trainer, scored, [r.getMessage() for r in records if r.levelno >= logging.WARNING]


# ---- nulls and empty fields ------------------------------------------------------------------


def test_null_text_fields_are_read_as_empty_strings(tokenizer):
    ds = Dataset.from_dict({"prompt": [None, "Say hi:"], "completion": ["hi", None]})
    tok, _ = tokenize_dataset(ds, tokenizer)
    assert response_text(tokenizer, tok[0]) == "hi" + tokenizer.eos_token
    assert tokenizer.decode(tok[1]["input_ids"]) == "Say hi:" + tokenizer.eos_token
    assert tok["empty_response"] == [False, True]


def test_empty_instruction_with_an_output_is_scored_normally(trained):
    trainer, scored, _ = trained
    assert trainer.tokenized[NULL_PROMPT]["num_response_tokens"] > 0
    assert not trainer.tokenized[NULL_PROMPT]["empty_response"]
    assert np.isfinite(trainer.record.norms[NULL_PROMPT]).all()
    assert np.isfinite(scored[NULL_PROMPT]["gsnr"])


@pytest.mark.parametrize("row", [EMPTY, BLANK, NULL_OUTPUT])
def test_empty_whitespace_or_null_response_gets_no_response_token_and_nan_scores(trained, row):
    trainer, scored, _ = trained
    tok = trainer.tokenized[row]
    assert tok["empty_response"] and tok["num_response_tokens"] == 0
    assert all(t == -100 for t in tok["labels"])
    assert np.isnan(trainer.record.norms[row]).all() and np.isnan(trainer.record.losses[row]).all()
    assert np.isnan(scored[row]["gsnr"])


def test_empty_responses_are_counted_apart_from_truncated_ones(trained):
    trainer, scored, warnings = trained
    stats = trainer.data_stats
    assert stats["num_rows"] == 18
    assert stats["num_empty_response"] == 3
    # num_no_response includes the empty-response rows; the rest lost their response to max_length
    assert stats["num_no_response"] == 4
    assert sum(trainer.tokenized["empty_response"]) == 3 and not trainer.tokenized[CUT]["empty_response"]
    assert trainer.record.metadata["data_stats"]["num_empty_response"] == 3
    assert any("3 with an empty response, 1 whose response is cut off" in w for w in warnings)
    # nothing is dropped: every row is in the scored set, the NaN ones are excluded from selection and counted
    assert len(scored) == 18
    _, selection = select_top(scored, "gsnr", fraction=0.5)
    assert selection["num_nonfinite_excluded"] == 4


def test_a_dataset_whose_every_response_is_empty_is_refused(tokenizer, tmp_path):
    ds = Dataset.from_dict({"instruction": ["a", "b"], "output": ["", None]})
    with pytest.raises(ValueError, match="No row has a response token: 2 row.s. have an empty response"):
        make_trainer(tokenizer, ds, tmp_path)


def test_messages_with_only_empty_assistant_turns_or_null_count_as_empty_response(tokenizer):
    empty = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]
    user_only = [{"role": "user", "content": "hi"}]
    mixed = [{"role": "user", "content": None}, {"role": "assistant", "content": ""},
             {"role": "user", "content": "again"}, {"role": "assistant", "content": "an answer"}]
    tok, _ = tokenize_dataset(Dataset.from_dict({"messages": [empty, user_only, None, mixed]}), tokenizer)
    assert tok["empty_response"] == [True, True, True, False]
    assert tok["num_response_tokens"][:3] == [0, 0, 0] and tok["length"][2] == 0
    assert "an answer" in response_text(tokenizer, tok[3])


# ---- non-string fields -----------------------------------------------------------------------


@pytest.mark.parametrize("values, expected", [([4, 12], ["4", "12"]), ([2.5, -1.0], ["2.5", "-1.0"]),
                                              ([True, False], ["True", "False"])])
def test_number_and_bool_fields_are_converted_with_str(tokenizer, values, expected):
    ds = Dataset.from_dict({"instruction": ["What is it?", "And this?"], "output": values})
    tok, _ = tokenize_dataset(ds, tokenizer)
    assert [response_text(tokenizer, r) for r in tok] == [e + tokenizer.eos_token for e in expected]
    assert tok["empty_response"] == [False, False]


@pytest.mark.parametrize("columns, column, type_name", [
    ({"instruction": ["a", "b"], "output": [None, {"text": "x"}]}, "output", "dict"),
    ({"instruction": [["a"], ["b", "c"]], "output": ["x", "y"]}, "instruction", "list"),
    ({"prompt": ["p", "q"], "completion": [None, ["x"]]}, "completion", "list"),
])
def test_list_or_dict_in_a_text_column_is_refused_naming_column_row_and_type(tokenizer, tmp_path, columns, column,
                                                                              type_name):
    ds = Dataset.from_dict(columns)
    bad_id = 1 if columns[column][0] is None else 0
    pattern = rf"Column '{column}' of example id {bad_id} holds a {type_name}, not text"
    with pytest.raises(ValueError, match=pattern):
        tokenize_dataset(ds, tokenizer)
    with pytest.raises(ValueError, match=pattern):  # raised by the trainer's constructor: before any training
        make_trainer(tokenizer, ds, tmp_path)
    assert not (tmp_path / "gradient_record.safetensors").exists()


@pytest.mark.parametrize("messages, bad_id", [
    (["just a string", "another"], 0),
    ([[{"role": "user", "content": "a"}], [{"content": "b"}]], 1),   # no role in row 1
    ([[{"role": "user"}], [{"role": "assistant"}]], 0),                # no content key
])
def test_malformed_messages_are_refused_naming_the_example(tokenizer, messages, bad_id):
    with pytest.raises(ValueError, match=rf"Column 'messages' of example id {bad_id}"):
        tokenize_dataset(Dataset.from_dict({"messages": messages}), tokenizer,
                         InstructionFormat(kind="messages"))


# ---- invalid UTF-8 ---------------------------------------------------------------------------


@pytest.mark.parametrize("ext", ["jsonl", "json", "csv"])
def test_invalid_utf8_file_is_refused_naming_the_file_and_the_fix(tmp_path, ext):
    good = {"instruction": "Name a drink.", "output": "tea"}
    if ext == "csv":
        payload = b"instruction,output\nName a drink.,tea\nName a drink.,caf\xe9\n"
    else:
        payload = (json.dumps(good) + "\n").encode() + b'{"instruction": "Name a drink.", "output": "caf\xe9"}\n'
    path = tmp_path / f"latin1.{ext}"
    path.write_bytes(payload)
    with pytest.raises(ValueError) as info:
        load_rows(str(path))
    message = str(info.value)
    assert str(path) in message and "not valid UTF-8" in message and "iconv -f latin1 -t utf-8" in message
    assert f"line {2 if ext != 'csv' else 3}" in message and "\n" not in message
    fixed = tmp_path / f"fixed.{ext}"
    fixed.write_bytes(payload.decode("latin1").encode("utf-8"))
    assert load_rows(str(fixed))["output"][-1] == "café"


def test_invalid_utf8_gets_a_one_line_cli_error(tmp_path, capsys):
    path = tmp_path / "scored.jsonl"
    path.write_bytes(b'{"gsnr": 1.0, "output": "caf\xe9"}\n')
    assert main(["select", "--scored", str(path), "--ratio", "0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "not valid UTF-8" in err[-1] and "iconv" in err[-1]


@pytest.mark.parametrize("line, words", [
    ('{"instruction": "Name a drink.", "output": "tea"', "line 2 is not valid JSON"),
    ('["Name a drink.", "tea"]', "line 2 is a JSON list")])
def test_malformed_json_line_gets_a_one_line_cli_error_naming_the_line(tmp_path, capsys, line, words):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"instruction": "Name a drink.", "output": "tea"}) + "\n" + line + "\n")
    assert main(["select", "--scored", str(path), "--ratio", "0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert str(path) in err[-1] and words in err[-1] and "Traceback" not in "".join(err)


def test_score_with_both_demo_and_a_file_is_refused(tmp_path, capsys):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"instruction": "Name a drink.", "output": "tea"}) + "\n")
    assert main(["score", "--demo", "--dataset_name", str(path), "--output_dir", str(tmp_path / "o")]) == 2
    assert "either --demo or --dataset_name" in capsys.readouterr().err


# ---- rows far over max_length ----------------------------------------------------------------


def test_row_far_over_max_length_is_truncated_counted_and_scored(trained):
    trainer, scored, _ = trained
    tok = trainer.tokenized[LONG]
    assert len(tok["input_ids"]) == MAX_LENGTH == tok["length"] and tok["truncated"]
    assert tok["num_response_tokens"] > 0
    assert trainer.data_stats["num_truncated"] == 2  # LONG and CUT
    assert np.isfinite(trainer.record.norms[LONG]).all()
    assert np.isfinite(scored[LONG]["gsnr"])


# ---- duplicate rows --------------------------------------------------------------------------


def test_duplicate_rows_are_counted_and_each_scored_at_its_own_position(trained, hostile):
    trainer, scored, warnings = trained
    assert trainer.data_stats["num_duplicate_rows"] == 2
    assert any("2 row(s) repeat an earlier row's content" in w for w in warnings)
    hashes = trainer.tokenized["row_hash"]
    assert hashes[DUP_OF_0] == hashes[0] and hashes[DUP_OF_1] == hashes[1]
    # the scorer did not refuse the duplicates and gave each copy the score recorded for its own position
    parts = score_parts(trainer.record.norms)
    for row in (0, DUP_OF_0, 1, DUP_OF_1):
        assert np.isfinite(trainer.record.norms[row]).all()
        for name in ("gsnr", "grad_early", "grad_late"):
            np.testing.assert_allclose(scored[row][name], parts[name][row], rtol=1e-6)
    assert list(scored["output"]) == list(hostile["output"])


# ---- a loss that becomes NaN -----------------------------------------------------------------


def test_nan_loss_names_the_example_and_step_and_the_partial_record_keeps_earlier_norms(
        tokenizer, demo_rows, tmp_path):
    rows = demo_rows.select(range(10))
    rows = Dataset.from_dict({k: rows[k] for k in ("instruction", "input", "output")})
    probe = make_trainer(tokenizer, rows, tmp_path / "probe").get_train_dataloader().batch_sampler
    steps = [probe.batches(m, 0) for m in range(2)]

    def first_visit(row):  # (step, member) of the first batch that holds the row
        return min((s, m) for m in range(2) for s, batch in enumerate(steps[m]) if row in batch)

    poisoned = max(range(10), key=first_visit)  # a row visited as late as possible (never in step 0)
    step, member = first_visit(poisoned)
    assert step >= 1
    bad = rows.map(lambda r, i: {"output": r["output"] + " \u2603" if i == poisoned else r["output"]},
                   with_indices=True)
    trainer = make_trainer(tokenizer, bad, tmp_path / "run")
    sampler = trainer.get_train_dataloader().batch_sampler
    assert all(np.array_equal(a, b) for m in range(2) for a, b in zip(sampler.batches(m, 0), steps[m]))
    others = {t for i, r in enumerate(trainer.tokenized) if i != poisoned for t in r["input_ids"]}
    snowman = [t for t in trainer.tokenized[poisoned]["input_ids"] if t not in others]
    assert snowman
    # NaN embeddings for a token only the poisoned row has (a hook: the input embedding is tied to lm_head)
    wte = trainer.model.base_model.model.transformer.wte
    poison = torch.tensor(snowman)
    wte.register_forward_hook(lambda mod, inp, out: out.masked_fill(torch.isin(inp[0], poison)[..., None], torch.nan))
    expected = rf"example id\(s\) \[{poisoned}\] \(member_{member}, global step {step}\)"
    with pytest.raises(FloatingPointError, match=expected):
        trainer.train()
    partial = GradientRecord.load(str(tmp_path / "run"))
    visited = np.zeros((10, 2), dtype=bool)  # (row, member) recorded before the failing batch
    for m in range(2):
        for s in range(step + (m < member)):
            visited[steps[m][s], m] = True
    assert visited.any()
    np.testing.assert_array_equal(np.isfinite(partial.norms[:, :, 0]), visited)
    np.testing.assert_array_equal(np.isfinite(partial.losses[:, :, 0]), visited)
    assert np.isnan(partial.norms[:, :, 1]).all() and np.isnan(partial.norms[poisoned]).all()
