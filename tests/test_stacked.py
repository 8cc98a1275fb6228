"""Stacked members (``stack_members``): the members' batches as one batch give the same record and the
same members' weights as the per-member path, and the stacked LoRA forward equals each member's own."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from test_norms_exact import TARGETS, CaptureLora, config, make_model, reference_norms

from hf_gradfilter import GradFilterConfig, GradFilterTrainer
from hf_gradfilter.demo.tiny import tiny_gpt2
from hf_gradfilter.proxy.model import build_ensemble, member_name, per_example_loss
from hf_gradfilter.proxy.norms import LoraNormRecorder
from hf_gradfilter.proxy.stacked import stack_batches, stacked_lora

NAMES = [member_name(m) for m in range(3)]


def ensemble(tokenizer, arch="gpt2", **kw):
    args = config("/tmp/unused", num_members=3, lora_target_modules=TARGETS[arch], **kw)
    return build_ensemble(make_model(arch, tokenizer), args), args


def random_batch(vocab, widths, seed=0):
    """Right-padded rows of the given lengths, every token labelled."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (len(widths), max(widths)), generator=g)
    mask = (torch.arange(max(widths))[None] < torch.tensor(widths)[:, None]).long()
    return ids, mask, torch.where(mask.bool(), ids, -100)


def lora_grads(model, names):
    return {n: p.grad.clone() for n, p in model.named_parameters() if any(f".{m}." in n for m in names)}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_stacked_forward_equals_each_members_forward_and_gradient(arch, tokenizer):
    model, _ = ensemble(tokenizer, arch)
    ids, mask, labels = random_batch(len(tokenizer), [7, 5, 9, 3, 6, 8])
    rows = torch.tensor([0, 0, 1, 1, 2, 2])
    losses = []
    for m, name in enumerate(NAMES):
        model.base_model.set_adapter(name)
        sel = rows == m
        loss = per_example_loss(model(input_ids=ids[sel], attention_mask=mask[sel]).logits, labels[sel])
        loss.sum().backward()
        losses.append(loss.detach())
    expected_grads = lora_grads(model, NAMES)
    model.zero_grad()
    model.base_model.set_adapter(NAMES)  # PEFT would add every member to every row: the stacked forward routes
    with stacked_lora(model, NAMES, rows):
        stacked = per_example_loss(model(input_ids=ids, attention_mask=mask).logits, labels)
        stacked.sum().backward()
    torch.testing.assert_close(stacked.detach(), torch.cat(losses), rtol=1e-5, atol=1e-6)
    for n, grad in lora_grads(model, NAMES).items():
        torch.testing.assert_close(grad, expected_grads[n], rtol=1e-5, atol=1e-7)


def test_stacked_forward_is_undone_after_the_block(tokenizer):
    model, _ = ensemble(tokenizer)
    ids, mask, _ = random_batch(len(tokenizer), [5, 4])
    model.base_model.set_adapter(NAMES[1])
    before = model(input_ids=ids, attention_mask=mask).logits
    with stacked_lora(model, NAMES, torch.tensor([0, 2])):
        model(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, before)


def test_stacked_recorder_gives_each_rows_norm_cosine_and_member_sums(tokenizer):
    """The recorder's stacked batch equals three per-member batches: norms, cosines against each member's
    reference (made non-zero first), and the sums each member's reference grows by."""
    model, _ = ensemble(tokenizer)
    widths, rows = [6, 4, 9, 5, 7, 3], torch.tensor([2, 2, 0, 0, 1, 1])
    ids, mask, labels = random_batch(len(tokenizer), widths, seed=1)
    recorders = {}
    for stacked in (False, True):
        recorder = LoraNormRecorder(model, NAMES, directions=True)
        g = torch.Generator().manual_seed(5)
        for refs in recorder.reference.values():
            for ref in refs:
                ref.copy_(torch.randn(ref.shape, generator=g))
        norms, cosines = torch.zeros(6), torch.zeros(6)
        if stacked:
            model.base_model.set_adapter(NAMES)
            with stacked_lora(model, NAMES, rows, recorder):
                recorder.start(6, "cpu", stacked=(NAMES, rows))
                (per_example_loss(model(input_ids=ids, attention_mask=mask).logits, labels).sum() * 3).backward()
            norms, cosines = recorder.stop(grad_scale=3.0), recorder.cosines
            for name in NAMES:
                recorder.commit(name)
        else:
            for m, name in enumerate(NAMES):
                sel = rows == m
                model.base_model.set_adapter(name)
                recorder.start(int(sel.sum()), "cpu", member=name)
                loss = per_example_loss(model(input_ids=ids[sel], attention_mask=mask[sel]).logits, labels[sel])
                (loss.sum() * 3).backward()
                norms[sel], cosines[sel] = recorder.stop(grad_scale=3.0), recorder.cosines
                recorder.commit(name)
        model.zero_grad()
        recorders[stacked] = (norms, cosines, recorder.direction_state())
    torch.testing.assert_close(recorders[True][0], recorders[False][0], rtol=1e-5, atol=0)
    torch.testing.assert_close(recorders[True][1], recorders[False][1], rtol=0, atol=1e-6)
    for key, ref in recorders[False][2].items():
        torch.testing.assert_close(recorders[True][2][key], ref, rtol=1e-5, atol=1e-6)


def test_stack_batches_pads_to_the_widest_and_marks_each_rows_member():
    from hf_gradfilter.proxy.sampler import pad_batch

    a = pad_batch([{"input_ids": [5, 6], "labels": [-100, 6], "example_id": 0}], pad_token_id=1)
    b = pad_batch([{"input_ids": [7, 8, 9], "labels": [7, 8, 9], "example_id": 4},
                   {"input_ids": [3], "labels": [3], "example_id": 2}], pad_token_id=1)
    out = stack_batches([a, b], pad_token_id=1)
    assert out["input_ids"].tolist() == [[5, 6, 1], [7, 8, 9], [3, 1, 1]]
    assert out["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, -100], [7, 8, 9], [3, -100, -100]]
    assert out["rows"].tolist() == [0, 1, 1] and out["example_id"].tolist() == [0, 4, 2]


def train_both(arch, tokenizer, rows, tmp_path, **kw):
    """(record, final LoRA weights) of the per-member path and of the stacked path, same settings."""
    out = {}
    for stack in (False, True):
        args = config(tmp_path / str(stack), num_members=3, lora_target_modules=TARGETS[arch], stack_members=stack,
                      **kw)
        trainer = GradFilterTrainer(make_model(arch, tokenizer), args=args, train_dataset=rows,
                                    processing_class=tokenizer)
        trainer.train()
        out[stack] = trainer.record, CaptureLora._lora(trainer.model)
    return out


def assert_same(out):
    (rec, weights), (stacked_rec, stacked_weights) = out[False], out[True]
    assert not np.isnan(rec.norms).any()
    np.testing.assert_allclose(stacked_rec.norms, rec.norms, rtol=1e-5)
    np.testing.assert_allclose(stacked_rec.losses, rec.losses, rtol=1e-5)
    np.testing.assert_allclose(stacked_rec.cosines, rec.cosines, rtol=0, atol=1e-5)  # NaN where rec has NaN
    assert weights.keys() == stacked_weights.keys()
    for name, value in weights.items():  # Adam's g / sqrt(v) can turn the float rounding of a gradient entry near
        # zero into a visible share of one step (lr 5e-3): 1e-4 is 2% of a step; a wrong gradient moves weights by steps
        torch.testing.assert_close(stacked_weights[name], value, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("arch, mode, batching", [("gpt2", "train", "group_by_length"), ("llama", "train", "random"),
                                                  ("gpt2", "snapshot", "group_by_length"),
                                                  ("llama", "snapshot", "group_by_length")])
def test_stacked_members_give_the_per_member_record_and_weights(arch, mode, batching, tokenizer, alpaca_small,
                                                                tmp_path):
    assert_same(train_both(arch, tokenizer, alpaca_small, tmp_path, record_mode=mode,
                           train_sampling_strategy=batching))


def test_stacked_members_with_gradient_accumulation_and_clipping(tokenizer, alpaca_small, tmp_path):
    assert_same(train_both("gpt2", tokenizer, alpaca_small, tmp_path, gradient_accumulation_steps=2,
                           per_device_train_batch_size=3, max_grad_norm=0.05))


def test_stacked_train_mode_norms_equal_batch_size_one_reference(tokenizer, alpaca_small, tmp_path):
    capture = CaptureLora()
    args = config(tmp_path, lora_target_modules=TARGETS["llama"], stack_members=True)
    trainer = GradFilterTrainer(make_model("llama", tokenizer), args=args, train_dataset=alpaca_small,
                                processing_class=tokenizer, callbacks=[capture])
    trainer.train()
    steps = -(-len(alpaca_small) // args.per_device_train_batch_size)
    for epoch in range(2):
        for m in range(2):
            for k, ids in enumerate(trainer.sampler.batches(m, epoch)):
                ref = reference_norms(trainer, capture.steps[epoch * steps + k], m, ids)
                np.testing.assert_allclose(trainer.record.norms[ids, m, epoch], ref, rtol=1e-4)


@pytest.mark.parametrize("setting", [dict(fp16=True), dict(gradient_checkpointing=True), dict(lora_dropout=0.1)])
def test_stack_members_refuses_what_it_does_not_support(setting, tmp_path):
    with pytest.raises(ValueError, match="stack_members=True does not support"):
        GradFilterConfig(output_dir=str(tmp_path), stack_members=True, use_cpu=True, **setting)


def test_stack_members_refuses_members_of_different_ranks(tokenizer):
    from peft import LoraConfig

    model, _ = ensemble(tokenizer)
    model.add_adapter("member_3", LoraConfig(r=2, target_modules=TARGETS["gpt2"], fan_in_fan_out=True))
    with pytest.raises(ValueError, match="shape differs"):
        with stacked_lora(model, NAMES + ["member_3"], torch.tensor([0])):
            pass


def test_base_model_dropout_is_warned_about(tokenizer):
    from hf_gradfilter.proxy.stacked import warn_base_dropout

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_base_dropout(tiny_gpt2(tokenizer, n_embd=32, n_head=2))  # the tiny models have no dropout
    model = tiny_gpt2(tokenizer, n_embd=32, n_head=2)
    model.config.resid_pdrop = 0.1
    with pytest.warns(UserWarning, match="resid_pdrop"):
        warn_base_dropout(model)
