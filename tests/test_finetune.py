"""Fine-tuning a tiny Llama target on a selected split with TRL's SFTTrainer (CPU, offline)."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset
from peft import PeftModel

from hf_gradfilter.demo.tiny import tiny_llama
from hf_gradfilter.finetuning.sft import finetune, sft_config, to_sft_rows


@pytest.fixture
def selected(demo_rows):
    clean = demo_rows.filter(lambda r: not r["is_corrupted"]).select(range(24))
    return clean.add_column("gsnr", [float(i) for i in range(24)])


def test_alpaca_rows_become_prompt_completion_with_the_proxy_template(selected):
    rows = to_sft_rows(selected)
    assert rows.column_names == ["prompt", "completion"]
    assert rows[0]["prompt"].endswith("### Response:\n") and rows[0]["completion"] == selected[0]["output"]


def test_finetune_lowers_the_loss_and_the_adapter_reloads_and_generates(selected, tokenizer, tmp_path):
    args = sft_config(str(tmp_path), num_train_epochs=6, per_device_train_batch_size=8, gradient_accumulation_steps=1,
                      learning_rate=2e-2, logging_steps=1, max_length=256, disable_tqdm=True, use_cpu=True)
    assert args.bf16 is False  # no GPU here: fp32 picked by itself
    trainer = finetune(tiny_llama(tokenizer, hidden_size=32), selected, args=args, processing_class=tokenizer)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < 0.8 * losses[0]
    curve = json.load(open(tmp_path / "loss_curve.json"))
    assert len(curve) == len(losses) and (tmp_path / "loss_curve.png").stat().st_size > 1000
    assert (tmp_path / "loss_curve.csv").read_text().startswith("step,loss")
    reloaded = PeftModel.from_pretrained(tiny_llama(tokenizer, hidden_size=32), str(tmp_path)).eval()
    prompt = tokenizer(to_sft_rows(selected)[0]["prompt"], return_tensors="pt")
    out = reloaded.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > prompt["input_ids"].shape[1]


def test_bf16_config_on_cpu_is_switched_to_fp32(selected, tokenizer, tmp_path):
    args = sft_config(str(tmp_path), bf16=True, max_steps=1, per_device_train_batch_size=2,
                      gradient_accumulation_steps=1, disable_tqdm=True, use_cpu=True, max_length=256)
    trainer = finetune(tiny_llama(tokenizer, hidden_size=32), selected, args=args, processing_class=tokenizer)
    assert trainer.args.bf16 is False
    assert next(trainer.model.parameters()).dtype == torch.float32


def test_empty_selected_split_is_refused_before_training(selected, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="selected split is empty"):
        finetune(tiny_llama(tokenizer, hidden_size=32), selected.select([]), processing_class=tokenizer,
                 output_dir=str(tmp_path))


def test_tokenizer_without_chat_template_is_refused_for_conversations(tokenizer, tmp_path):
    bare = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, eos_token=tokenizer.eos_token,
                               pad_token=tokenizer.pad_token)
    bare.chat_template = None
    convo = Dataset.from_dict({"messages": [[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]]})
    with pytest.raises(ValueError, match="chat_template"):
        finetune(tiny_llama(tokenizer, hidden_size=32), convo, processing_class=bare, output_dir=str(tmp_path))


@pytest.fixture
def sft_warnings():
    """The warnings `to_sft_rows` logs."""
    import logging

    logger, records = logging.getLogger("hf_gradfilter.finetuning.sft"), []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


ODD_ROWS = {
    "alpaca": Dataset.from_dict({"instruction": ["Add", "Sort", None, "Spell"], "input": [None, "3 1", "", "cat"],
                                 "output": ["5", "   ", "12", None]}),
    "prompt_completion": Dataset.from_dict({"prompt": ["Say hi", "Say no", "Count", None],
                                            "completion": ["hi", "", None, "3"]}),
    "messages": Dataset.from_dict({"messages": [
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}],
        None,
        [{"role": "user", "content": None}, {"role": "assistant", "content": "7"}]]}),
}
KEPT = {"alpaca": [("Add", "5"), (None, "12")], "prompt_completion": [("Say hi", "hi"), ("", "3")],
        "messages": [("hi", "hello"), ("", "7")]}


@pytest.mark.parametrize("kind", list(ODD_ROWS))
def test_rows_with_an_empty_response_are_not_trained_on_and_are_counted(kind, sft_warnings):
    rows = to_sft_rows(ODD_ROWS[kind])
    assert len(rows) == 2  # the scoring policies: an empty response is never trained on
    for row, (prompt, response) in zip(rows, KEPT[kind]):
        if kind == "messages":
            assert [m["content"] for m in row["messages"]] == [prompt, response]  # null content read as ""
        else:
            assert row["completion"] == response and (prompt is None or prompt in row["prompt"])
    assert any("2 row(s) have an empty response and are not trained on" in r.getMessage() for r in sft_warnings)


def test_no_row_with_a_response_is_an_error_and_a_list_in_a_text_column_names_the_row():
    with pytest.raises(ValueError, match="No row has a response to fine-tune on: all 2 are empty"):
        to_sft_rows(Dataset.from_dict({"prompt": ["a", "b"], "completion": ["", None]}))
    with pytest.raises(ValueError, match="Column 'completion' of example id 1 holds a list"):
        to_sft_rows(Dataset.from_dict({"prompt": ["a", "b"], "completion": [None, ["y"]]}))
