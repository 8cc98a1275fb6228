"""GradFilterTrainer behaviour: recording never changes training, members are independent, saving reloads."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from peft import PeftModel

from hf_gradfilter import GradFilterConfig, GradFilterTrainer, GradientRecord
from hf_gradfilter.demo.tiny import tiny_gpt2


def config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), num_members=2, per_device_train_batch_size=4, num_train_epochs=2,
                learning_rate=5e-3, lora_r=4, lora_alpha=8, max_length=256, disable_tqdm=True, seed=3,
                use_cpu=True)
    base.update(kw)
    return GradFilterConfig(**base)


def train(tokenizer, dataset, tmp_path, **kw):
    trainer = GradFilterTrainer(tiny_gpt2(tokenizer, n_embd=32, n_head=2), args=config(tmp_path, **kw),
                                train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    return trainer


def lora_state(trainer, member=None):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()
            if "lora_" in n and (member is None or f".{member}." in n)}


@pytest.mark.parametrize("mode", ["train", "snapshot"])
def test_recording_does_not_change_the_trained_adapters(mode, tokenizer, alpaca_small, tmp_path):
    plain = lora_state(train(tokenizer, alpaca_small, tmp_path / "a", record_mode="none"))
    recorded = lora_state(train(tokenizer, alpaca_small, tmp_path / "b", record_mode=mode))
    assert plain.keys() == recorded.keys()
    for name in plain:
        torch.testing.assert_close(recorded[name], plain[name], rtol=0, atol=0)


def test_member_trains_as_if_alone(tokenizer, alpaca_small, tmp_path):
    ensemble = train(tokenizer, alpaca_small, tmp_path / "m2", num_members=2)
    alone = train(tokenizer, alpaca_small, tmp_path / "m1", num_members=1)
    a, b = lora_state(ensemble, "member_0"), lora_state(alone, "member_0")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ensemble.record.norms[:, :1], alone.record.norms, rtol=1e-5)


def test_members_differ_in_init_and_norms(tokenizer, alpaca_small, tmp_path):
    trainer = GradFilterTrainer(tiny_gpt2(tokenizer, n_embd=32, n_head=2), args=config(tmp_path),
                                train_dataset=alpaca_small, processing_class=tokenizer)
    a0 = {n.replace("member_0", "X"): p.detach().clone()
          for n, p in trainer.model.named_parameters() if ".member_0." in n}
    a1 = {n.replace("member_1", "X"): p.detach().clone()
          for n, p in trainer.model.named_parameters() if ".member_1." in n}
    assert a0.keys() == a1.keys()
    assert any(not torch.equal(a0[k], a1[k]) for k in a0 if "lora_A" in k)
    trainer.train()
    norms = trainer.record.norms
    assert not np.allclose(norms[:, 0], norms[:, 1])


def test_backbone_stays_frozen(tokenizer, alpaca_small, tmp_path):
    model = tiny_gpt2(tokenizer, n_embd=32, n_head=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = GradFilterTrainer(model, args=config(tmp_path), train_dataset=alpaca_small, processing_class=tokenizer)
    trainer.train()
    after = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
             for n, p in trainer.model.named_parameters() if "lora_" not in n}
    for name, p in before.items():
        assert torch.equal(after[name], p), name


def test_saved_members_reload_with_peft_and_give_the_same_loss(tokenizer, alpaca_small, tmp_path):
    trainer = train(tokenizer, alpaca_small, tmp_path)
    trainer.save_model()
    batch = tokenizer(["### Instruction:\nWhat is 3 plus 4?\n\n### Response:\n3 plus 4 is 7."], return_tensors="pt")
    for m in range(2):
        path = tmp_path / f"member_{m}"
        assert (path / "adapter_config.json").exists() and (path / "adapter_model.safetensors").exists()
        trainer.model.base_model.set_adapter(f"member_{m}")
        trainer.model.eval()
        with torch.no_grad():
            expected = trainer.model(**batch, labels=batch["input_ids"]).loss
        base = tiny_gpt2(tokenizer, n_embd=32, n_head=2)
        reloaded = PeftModel.from_pretrained(base, str(path)).eval()
        with torch.no_grad():
            got = reloaded(**batch, labels=batch["input_ids"]).loss
        torch.testing.assert_close(got, expected)
    record = GradientRecord.load(str(tmp_path))
    np.testing.assert_array_equal(record.norms, trainer.record.norms)
    assert record.metadata["config"]["num_members"] == 2
    assert json.load(open(tmp_path / "gradfilter_config.json"))["record_mode"] == "train"


def test_record_holds_norms_and_losses_for_every_example_member_and_epoch(tokenizer, alpaca_small, tmp_path):
    trainer = train(tokenizer, alpaca_small, tmp_path, num_members=3, num_train_epochs=3, late_epoch=3)
    record = trainer.record
    assert record.norms.shape == record.losses.shape == (10, 3, 3)
    assert np.isfinite(record.norms).all() and (record.norms > 0).all()
    assert np.isfinite(record.losses).all()
    table = trainer.member_loss_table()
    assert table.shape == (3, 3) and (table[:, -1] < table[:, 0]).all()  # every member learned


def test_rows_without_response_tokens_get_nan_and_are_counted(tokenizer, alpaca_small, tmp_path):
    long_prompt = alpaca_small.map(lambda r, i: {"input": r["input"] + " word" * 400 if i < 2 else r["input"]},
                                   with_indices=True)
    trainer = train(tokenizer, long_prompt, tmp_path)
    assert trainer.data_stats["num_no_response"] == 2 and trainer.data_stats["num_truncated"] >= 2
    assert np.isnan(trainer.record.norms[:2]).all()
    assert np.isfinite(trainer.record.norms[2:]).all()


def test_non_finite_loss_names_the_examples_and_keeps_the_record(tokenizer, alpaca_small, tmp_path):
    trainer = GradFilterTrainer(tiny_gpt2(tokenizer, n_embd=32, n_head=2), args=config(tmp_path),
                                train_dataset=alpaca_small, processing_class=tokenizer)
    with torch.no_grad():
        trainer.model.base_model.model.transformer.wte.weight[tokenizer.eos_token_id] = float("nan")
    with pytest.raises(FloatingPointError, match="example id"):
        trainer.train()
    assert os.path.exists(tmp_path / "gradient_record.safetensors")


@pytest.mark.parametrize("bad, match", [
    (dict(late_epoch=3), "late_epoch=3 is outside the 2 epoch"),
    (dict(num_members=0), "num_members=0"),
    (dict(num_train_epochs=1.5), "num_train_epochs=1.5"),
    (dict(record_mode="sometimes"), "record_mode='sometimes'"),
])
def test_bad_config_is_refused_with_the_value_named(bad, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        config(tmp_path, **bad)


def test_head_on_response_positions_only_gives_the_full_logits_loss():
    from hf_gradfilter.proxy.model import per_example_loss, response_loss

    torch.manual_seed(0)
    hidden, head = torch.randn(3, 7, 5), torch.nn.Linear(5, 11, bias=False)
    labels = torch.randint(0, 11, (3, 7))
    labels[0, :3] = -100
    labels[2, 5:] = -100
    torch.testing.assert_close(response_loss(hidden, head, labels), per_example_loss(head(hidden), labels))


def test_processes_the_trainer_does_not_see_are_refused_naming_use_cpu(tokenizer, alpaca_small, tmp_path,
                                                                        monkeypatch):
    # torchrun on a machine without a GPU and without --use_cpu: transformers runs each process alone
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 2)
    with pytest.raises(ValueError, match=r"2 processes were launched .* world_size=1 .*--use_cpu true"):
        GradFilterTrainer(tiny_gpt2(tokenizer, n_embd=32, n_head=2), args=config(tmp_path),
                          train_dataset=alpaca_small, processing_class=tokenizer)


def _overflow_on(trainer, calls):
    """Make the recorder report an overflowed (inf) norm for its first row on the given stop() calls,
    the way an fp16 loss scale too large for a layer's output gradients shows up."""
    stop, count = trainer.recorder.stop, {"n": 0}

    def overflowing_stop(grad_scale=1.0):
        out = stop(grad_scale)
        count["n"] += 1
        if calls == "all" or count["n"] in calls:
            out = out.clone()
            out[0] = float("inf")
        return out

    trainer.recorder.stop = overflowing_stop


def _as_if_loss_scaled(trainer):
    """Pretend an fp16 loss scaler is on (there is none on CPU), with a scale of 1."""
    trainer._loss_scaled = lambda: True
    trainer._loss_scale = lambda: 1.0


def test_an_overflowed_batch_is_recorded_again_and_the_record_equals_a_clean_run(tokenizer, alpaca_small, tmp_path):
    reference = train(tokenizer, alpaca_small, tmp_path / "ref")
    trainer = GradFilterTrainer(tiny_gpt2(tokenizer, n_embd=32, n_head=2), args=config(tmp_path / "o"),
                                train_dataset=alpaca_small, processing_class=tokenizer)
    _as_if_loss_scaled(trainer)
    _overflow_on(trainer, {1, 4, 7})  # three member batches, both members, both epochs
    trainer.train()
    assert trainer.num_rerecorded_batches == 3 and trainer.record.metadata["num_rerecorded_batches"] == 3
    assert np.isfinite(trainer.record.norms).all()
    np.testing.assert_allclose(trainer.record.norms, reference.record.norms, rtol=1e-5)
    np.testing.assert_allclose(trainer.record.losses, reference.record.losses, rtol=1e-6)
    np.testing.assert_allclose(trainer.record.cosines, reference.record.cosines, rtol=1e-4, atol=1e-6)


def test_the_count_of_batches_recorded_again_survives_a_resume(tokenizer, alpaca_small, tmp_path):
    def run(resume=None):
        trainer = GradFilterTrainer(tiny_gpt2(tokenizer, n_embd=32, n_head=2),
                                    args=config(tmp_path, save_strategy="steps", save_steps=2),
                                    train_dataset=alpaca_small, processing_class=tokenizer)
        _as_if_loss_scaled(trainer)
        _overflow_on(trainer, {1, 4} if resume is None else set())  # two batches overflow before checkpoint-2
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run()
    assert full.record.metadata["num_rerecorded_batches"] == 2
    resumed = run(str(tmp_path / "checkpoint-2"))  # nothing overflows after the checkpoint
    assert resumed.num_rerecorded_batches == 2 and resumed.record.metadata["num_rerecorded_batches"] == 2


def test_a_norm_still_not_finite_in_float32_names_the_example_and_keeps_the_record(tokenizer, alpaca_small,
                                                                                     tmp_path):
    for scaled, match in ((True, r"gradient norm \(also in float32\) for example id"),
                          (False, r"gradient norm for example id\(s\) \[\d")):  # no scaler: no second try
        out = tmp_path / str(scaled)
        trainer = GradFilterTrainer(tiny_gpt2(tokenizer, n_embd=32, n_head=2), args=config(out),
                                    train_dataset=alpaca_small, processing_class=tokenizer)
        if scaled:
            _as_if_loss_scaled(trainer)
        _overflow_on(trainer, "all")
        with pytest.raises(FloatingPointError, match="Non-finite " + match):
            trainer.train()
        assert os.path.exists(out / "gradient_record.safetensors") and trainer.num_rerecorded_batches == 0


@pytest.mark.parametrize("split_head", [True, False])  # the body alone, or the model's (autocast-patched) forward
def test_the_second_recording_runs_in_float32_under_mixed_precision(split_head, tokenizer, alpaca_small, tmp_path):
    trainer = GradFilterTrainer(tiny_gpt2(tokenizer, n_embd=32, n_head=2), args=config(tmp_path, bf16=True),
                                train_dataset=alpaca_small, processing_class=tokenizer)
    trainer._split_head_ok = split_head
    _as_if_loss_scaled(trainer)
    _overflow_on(trainer, {2})
    seen, rerecording = {"first": set(), "again": set()}, []
    rerecord = trainer._rerecord

    def tracked(*args, **kwargs):
        rerecording.append(True)
        try:
            return rerecord(*args, **kwargs)
        finally:
            rerecording.pop()

    trainer._rerecord = tracked
    attention = trainer.model.get_base_model().transformer.h[0].attn.c_attn  # a frozen GPT-2 Conv1D
    attention.register_forward_hook(lambda m, i, out: seen["again" if rerecording else "first"].add(out.dtype))
    trainer.train()
    assert torch.bfloat16 in seen["first"]  # mixed precision is on in training (so the next check can fail)
    assert seen["again"] == {torch.float32} and trainer.num_rerecorded_batches == 1
