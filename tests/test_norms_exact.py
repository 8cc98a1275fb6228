"""Per-example gradient norms from the trainer equal a batch-size-1 autograd reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import TrainerCallback

from hf_gradfilter import GradFilterConfig, GradFilterTrainer, sq_norms
from hf_gradfilter.demo.tiny import tiny_gpt2, tiny_llama

TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"],
           "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def make_model(arch, tokenizer):
    return tiny_gpt2(tokenizer, n_embd=32, n_head=2) if arch == "gpt2" else tiny_llama(tokenizer, hidden_size=32)


def config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), num_members=2, per_device_train_batch_size=4, per_device_eval_batch_size=3,
                num_train_epochs=2, learning_rate=5e-3, lora_r=4, lora_alpha=8, init_lora_weights="false",
                max_length=256, disable_tqdm=True, seed=3, use_cpu=True)
    base.update(kw)
    return GradFilterConfig(**base)


class CaptureLora(TrainerCallback):
    """Copies every LoRA parameter before each optimizer step and at each epoch end."""

    def __init__(self):
        self.steps, self.epoch_ends = [], []

    @staticmethod
    def _lora(model):
        return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}

    def on_step_begin(self, args, state, control, model=None, **kw):
        self.steps.append(self._lora(model))

    def on_epoch_end(self, args, state, control, model=None, **kw):
        self.epoch_ends.append(self._lora(model))


def reference_norms(trainer, weights, member, example_ids):
    """||grad of example i's own mean response loss|| over member's LoRA params, one example at a time."""
    return np.linalg.norm(reference_grads(trainer, weights, member, example_ids), axis=1)


def reference_grads(trainer, weights, member, example_ids):
    """``(len(example_ids), P)`` float64: example i's gradient over member's P LoRA params, one at a time."""
    model = trainer.model
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in weights:
                p.copy_(weights[n])
    model.base_model.set_adapter(f"member_{member}")
    model.eval()
    params = [p for n, p in model.named_parameters() if f".member_{member}." in n]
    rows = {e: i for i, e in enumerate(trainer.tokenized["example_id"])}
    out = []
    for ex in example_ids:
        row = trainer.tokenized[rows[int(ex)]]
        ids = torch.tensor([row["input_ids"]])
        labels = torch.tensor(row["labels"][1:])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
        mask = labels != -100
        loss = -logp[mask.nonzero()[:, 0], labels[mask]].mean()
        grads = torch.autograd.grad(loss, params)
        out.append(torch.cat([g.double().reshape(-1) for g in grads]).numpy())
    return np.stack(out)


def test_sq_norms_kernel_matches_explicit_outer_products():
    torch.manual_seed(0)
    a, g = torch.randn(3, 5, 7), torch.randn(3, 5, 4)
    explicit = torch.stack([sum(torch.outer(g[b, t], a[b, t]) for t in range(5)).pow(2).sum() for b in range(3)])
    torch.testing.assert_close(sq_norms(a, g), explicit, rtol=1e-5, atol=1e-6)
    # the Gram branch (taken when T is small against d_in * d_out) agrees as well
    a2, g2 = torch.randn(2, 2, 64), torch.randn(2, 2, 64)
    explicit2 = torch.stack([(g2[b].T @ a2[b]).pow(2).sum() for b in range(2)])
    torch.testing.assert_close(sq_norms(a2, g2), explicit2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch, batching", [("gpt2", "random"), ("gpt2", "group_by_length"),
                                            ("llama", "random"), ("llama", "group_by_length")])
def test_train_mode_norms_equal_batch_size_one_reference(arch, batching, tokenizer, alpaca_small, tmp_path):
    capture = CaptureLora()
    args = config(tmp_path, lora_target_modules=TARGETS[arch], train_sampling_strategy=batching)
    trainer = GradFilterTrainer(make_model(arch, tokenizer), args=args, train_dataset=alpaca_small,
                                processing_class=tokenizer, callbacks=[capture])
    trainer.train()
    record = trainer.record
    assert not np.isnan(record.norms).any()
    steps_per_epoch = -(-len(alpaca_small) // args.per_device_train_batch_size)
    for epoch in range(2):
        for m in range(2):
            for k, ids in enumerate(trainer.sampler.batches(m, epoch)):  # the rows member m saw at step k
                weights = capture.steps[epoch * steps_per_epoch + k]
                ref = reference_norms(trainer, weights, m, ids)
                np.testing.assert_allclose(record.norms[ids, m, epoch], ref, rtol=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_snapshot_mode_norms_equal_batch_size_one_reference(arch, tokenizer, alpaca_small, tmp_path):
    capture = CaptureLora()
    args = config(tmp_path, lora_target_modules=TARGETS[arch], record_mode="snapshot")
    trainer = GradFilterTrainer(make_model(arch, tokenizer), args=args, train_dataset=alpaca_small,
                                processing_class=tokenizer, callbacks=[capture])
    trainer.train()
    ids = np.arange(len(alpaca_small))
    for epoch in range(2):
        for m in range(2):
            ref = reference_norms(trainer, capture.epoch_ends[epoch], m, ids)
            np.testing.assert_allclose(trainer.record.norms[ids, m, epoch], ref, rtol=1e-4)


def test_gradient_accumulation_keeps_norms_exact(tokenizer, alpaca_small, tmp_path):
    args = config(tmp_path, learning_rate=0.0, gradient_accumulation_steps=2, per_device_train_batch_size=3)
    trainer = GradFilterTrainer(make_model("gpt2", tokenizer), args=args, train_dataset=alpaca_small,
                                processing_class=tokenizer)
    initial = CaptureLora._lora(trainer.model)
    trainer.train()
    ids = np.arange(len(alpaca_small))
    for m in range(2):
        ref = reference_norms(trainer, initial, m, ids)
        for epoch in range(2):
            np.testing.assert_allclose(trainer.record.norms[ids, m, epoch], ref, rtol=1e-4)


def test_models_that_post_process_logits_take_the_full_forward_and_stay_exact(tokenizer, alpaca_small, tmp_path):
    from transformers import GPT2LMHeadModel

    class Scaled(GPT2LMHeadModel):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 3.0
            return out

    base = make_model("gpt2", tokenizer)
    scaled = Scaled(base.config)
    scaled.load_state_dict(base.state_dict())
    args = config(tmp_path, learning_rate=0.0, lora_target_modules=TARGETS["gpt2"])
    trainer = GradFilterTrainer(scaled, args=args, train_dataset=alpaca_small, processing_class=tokenizer)
    initial = CaptureLora._lora(trainer.model)
    trainer.train()
    assert trainer._split_head() is False
    plain = GradFilterTrainer(make_model("gpt2", tokenizer), args=config(tmp_path / "p"), train_dataset=alpaca_small,
                              processing_class=tokenizer)
    assert plain._split_head() is True
    ids = np.arange(len(alpaca_small))
    ref = reference_norms(trainer, initial, 0, ids)  # the reference runs the scaled model's own forward
    np.testing.assert_allclose(trainer.record.norms[ids, 0, 0], ref, rtol=1e-4)
