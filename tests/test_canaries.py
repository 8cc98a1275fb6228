"""Canaries: damaged copies of the user's own rows, scored with the rest and never in an output."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from datasets import Dataset, load_from_disk

from hf_gradfilter.cli import main
from hf_gradfilter.data.canaries import DAMAGE_KINDS, REFUSALS, canary_table, damage_text, make_canaries
from hf_gradfilter.data.formatting import InstructionFormat

pytestmark = pytest.mark.slow  # trains the proxy with canaries: `pytest -m 'not slow'` skips it


def test_each_damage_kind_changes_the_response_as_documented():
    rng = random.Random(0)
    text = 'The answer is "yes". It - really - is. Another sentence follows here for length.'
    out = {k: damage_text(text, k, prompt="Say yes.", donor="Other answer.", rng=rng) for k in DAMAGE_KINDS}
    assert len(out["truncated"].split()) < len(text.split()) and text.startswith(out["truncated"])
    assert out["off_topic"] == "Other answer."
    assert "â€" in out["mojibake"]
    assert out["html_residue"].startswith("<div") and "Share this" in out["html_residue"]
    assert out["repetition"] == " ".join(['The answer is "yes".'] * 6)
    assert out["prompt_echo"] == "Say yes."
    assert out["refusal"] in REFUSALS
    with pytest.raises(ValueError, match="unknown damage kind 'typo'"):
        damage_text(text, "typo", prompt="", donor="", rng=rng)


@pytest.mark.parametrize("kind", ["alpaca", "prompt_completion", "messages"])
def test_copies_change_only_the_response_and_name_their_original(kind):
    n = 40
    answers = [f"Answer number {i} is a sentence. It has a second sentence - with 'quotes'." for i in range(n)]
    if kind == "alpaca":
        rows = Dataset.from_dict({"instruction": [f"Q{i}" for i in range(n)], "input": [""] * n, "output": answers})
        response = lambda r: r["output"]  # noqa: E731
        rest = lambda r: (r["instruction"], r["input"])  # noqa: E731
    elif kind == "prompt_completion":
        rows = Dataset.from_dict({"prompt": [f"Q{i}" for i in range(n)], "completion": answers})
        response = lambda r: r["completion"]  # noqa: E731
        rest = lambda r: r["prompt"]  # noqa: E731
    else:
        rows = Dataset.from_dict({"messages": [[{"role": "user", "content": f"Q{i}"},
                                                {"role": "assistant", "content": a}] for i, a in enumerate(answers)]})
        response = lambda r: r["messages"][-1]["content"]  # noqa: E731
        rest = lambda r: r["messages"][0]  # noqa: E731
    fmt = InstructionFormat().resolve(rows.column_names)
    copies, sources, kinds = make_canaries(rows, fmt, share=0.25, seed=1)
    assert len(copies) == len(sources) == len(kinds) == 10 and copies.column_names == rows.column_names
    assert kinds[:7] == list(DAMAGE_KINDS)
    for j, i in enumerate(sources):
        original, copy = rows[int(i)], copies[j]
        assert rest(copy) == rest(original) and response(copy) != response(original)


def test_bad_share_and_tokenized_rows_are_refused_naming_the_value():
    rows = Dataset.from_dict({"instruction": ["a", "b"], "input": ["", ""], "output": ["x y z w", "p q r s"]})
    with pytest.raises(ValueError, match="canaries=1.5"):
        make_canaries(rows, InstructionFormat().resolve(rows.column_names), share=1.5)
    tok = Dataset.from_dict({"input_ids": [[1, 2]], "labels": [[1, 2]]})
    with pytest.raises(ValueError, match="not 'tokenized'"):
        make_canaries(tok, InstructionFormat().resolve(tok.column_names), share=0.5)


def test_canary_table_against_hand_counts():
    originals = {"s": np.array([3.0, 1.0, 2.0, np.nan])}
    copies = {"s": np.array([1.0, 2.0, 2.0, 0.0])}
    table = canary_table(originals, copies, ["a", "a", "b", "b"])
    # pairs: win, loss, tie (0.5); the NaN pair is left out
    assert table["s"]["all"] == pytest.approx(0.5) and table["s"]["pairs"] == 3
    assert table["s"]["a"] == pytest.approx(0.5) and table["s"]["b"] == pytest.approx(0.5)


TINY = ["--num_members", "2", "--per_device_train_batch_size", "8", "--max_length", "256", "--lora_r", "4",
        "--learning_rate", "5e-3", "--disable_tqdm", "true", "--use_cpu", "true"]


def test_score_with_canaries_reports_them_and_never_outputs_them(tmp_path, tokenizer, demo_rows, capsys):
    from hf_gradfilter.demo.tiny import tiny_gpt2
    from hf_gradfilter.proxy.record import GradientRecord

    proxy = tmp_path / "proxy"
    tiny_gpt2(tokenizer, n_embd=32, n_head=2).save_pretrained(proxy)
    tokenizer.save_pretrained(proxy)
    rows = [{k: demo_rows[i][k] for k in ("instruction", "input", "output")} for i in range(60)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert main(["score", "--dataset_name", str(data), "--model_name_or_path", str(proxy), "--output_dir", str(out),
                 "--canaries", "0.2"] + TINY) == 0
    printed = capsys.readouterr().out
    assert "Canaries: share of (original, damaged copy) pairs" in printed
    scored = load_from_disk(str(out / "scored"))
    record = GradientRecord.load(str(out))
    count = record.metadata["canaries"]["rows"]  # 12 picked; a copy equal to its original is dropped
    assert len(scored) == 60 and record.num_examples == 60 and 10 <= count <= 12
    assert [r["output"] for r in scored] == [r["output"] for r in rows]  # the real rows, in order, nothing else
    copies = load_from_disk(str(out / "canaries"))
    pairs = lambda d: set(zip(d["instruction"], d["input"], d["output"]))  # noqa: E731
    assert len(copies) == count and not pairs(copies) & pairs(Dataset.from_list(rows))
    report = json.loads((out / "canaries.json").read_text())
    assert report["rows"] == count and 0 < report["table"]["fit_rank"]["pairs"] <= count
    assert set(report["table"]) >= {"fit_rank", "gsnr", "mid_loss", "ambiguity"}
    # a selection from the scored rows holds no canary
    assert main(["select", "--scored", str(out / "scored"), "--ratio", "0.5", "--output",
                 str(tmp_path / "sel.jsonl")]) == 0
    selected = [json.loads(line) for line in open(tmp_path / "sel.jsonl")]
    assert len(selected) == 30 and not pairs(Dataset.from_list(selected)) & pairs(copies)
