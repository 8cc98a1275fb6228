"""The float32 re-record of an overflowed batch: each row's true norm, the member's reference moved by
the batch's true gradient sum, and the parameters' gradients left as they were."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_gradfilter import GradFilterConfig, GradFilterTrainer
from hf_gradfilter.demo.tiny import tiny_gpt2
from hf_gradfilter.proxy.model import per_example_loss
from hf_gradfilter.proxy.rerecord import rerecord
from hf_gradfilter.proxy.sampler import pad_batch


@pytest.fixture
def trainer(tokenizer, alpaca_small, tmp_path):
    args = GradFilterConfig(output_dir=str(tmp_path), num_members=2, lora_r=4, lora_alpha=8, max_length=256,
                            disable_tqdm=True, seed=3, use_cpu=True, init_lora_weights="gaussian")
    trainer = GradFilterTrainer(tiny_gpt2(tokenizer, n_embd=32, n_head=2), args=args, train_dataset=alpaca_small,
                                processing_class=tokenizer)
    trainer._activate("member_1")
    return trainer


def batch_of(trainer, rows):
    data = trainer.train_dataset[rows]
    rows = zip(data["input_ids"], data["labels"], data["example_id"])
    return pad_batch([{"input_ids": i, "labels": label, "example_id": e} for i, label, e in rows], trainer.pad_token_id)


def one_at_a_time(trainer, batch, params):
    """Each row's gradient over the member's LoRA parameters, from its own unpadded forward and backward."""
    grads = []
    for i in range(len(batch["input_ids"])):
        k = int(batch["attention_mask"][i].sum())
        logits = trainer.model(input_ids=batch["input_ids"][i : i + 1, :k]).logits
        loss = per_example_loss(logits, batch["labels"][i : i + 1, :k])[0]
        grads.append(torch.autograd.grad(loss, params))
    return grads


def test_rerecord_gives_each_rows_norm_and_moves_the_reference_by_the_true_batch_sum(trainer):
    batch = batch_of(trainer, [0, 3, 5])
    modules = trainer.recorder.modules["member_1"]
    params = [m.weight for m in modules]
    for p in params:
        p.grad = torch.full_like(p, 7.0)  # what the overflowed backward left: the loss scaler still sees it
    norms = rerecord(trainer, trainer.model, batch, "member_1", batch["weight"], 0.25, directions=True)
    grads = one_at_a_time(trainer, batch, params)
    expected = torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in row)) for row in grads])
    torch.testing.assert_close(norms, expected, rtol=1e-4, atol=1e-7)
    assert all(bool((p.grad == 7.0).all()) for p in params) and trainer.num_rerecorded_batches == 1
    trainer.recorder.commit("member_1")
    for k, reference in enumerate(trainer.recorder.reference["member_1"]):
        torch.testing.assert_close(reference, sum(row[k] for row in grads), rtol=1e-4, atol=1e-7)


def test_a_norm_still_not_finite_names_the_row_and_saves_the_partial_record(trainer, monkeypatch, tmp_path):
    batch = batch_of(trainer, [2, 4])
    monkeypatch.setattr(trainer.recorder, "stop", lambda grad_scale=1.0: torch.tensor([1.0, float("inf")]))
    with pytest.raises(FloatingPointError, match=r"gradient norm \(also in float32\) for example id\(s\) \[4\]"):
        rerecord(trainer, trainer.model, batch, "member_1", batch["weight"], 1.0, directions=False)
    assert (tmp_path / "gradient_record.safetensors").exists() and trainer.num_rerecorded_batches == 0
    assert np.isnan(trainer._local.norms).all()
