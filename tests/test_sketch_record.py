"""Sketches in the recording pass equal a batch-size-1 reference: each example's full LoRA gradient built
by autograd, one example at a time, then projected with the same seeded matrices (`proxy.sketch`)."""

from __future__ import annotations

import numpy as np
import pytest
from test_norms_exact import TARGETS, CaptureLora, config, make_model, reference_grads

from hf_gradfilter import GradFilterConfig, GradFilterTrainer, GradientRecord
from hf_gradfilter.proxy.sketch import projections

DIM = 64


def reference_sketches(trainer, weights, member, example_ids) -> np.ndarray:
    """``(len(example_ids), d)`` float64: ``sum_k vec(P_k^T G_k Q_k)`` of each example's gradient, built in full."""
    grads = reference_grads(trainer, weights, member, example_ids)  # (n, P), P in the recorder's matrix order
    shapes = [tuple(m.weight.shape) for m in trainer.recorder.modules[f"member_{member}"]]
    assert grads.shape[1] == sum(o * i for o, i in shapes)
    meta = trainer.record.metadata["sketch"]
    out, start = np.zeros((len(example_ids), meta["dim"])), 0
    for (d_out, d_in), (p, q) in zip(shapes, projections(shapes, meta["dim"], meta["seed"])):
        g = grads[:, start : start + d_out * d_in].reshape(-1, d_out, d_in)
        out += (p.double().numpy().T @ g @ q.double().numpy()).reshape(len(example_ids), -1)
        start += d_out * d_in
    return out


def assert_sketches(got, want):
    """Tight: rtol 1e-4 on each coordinate, with coordinates near 0 held to 1e-5 of the sketch's largest."""
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def run(arch, tokenizer, rows, tmp_path, **kw):
    capture = CaptureLora()
    args = config(tmp_path, lora_target_modules=TARGETS[arch], sketch_dim=DIM, **kw)
    trainer = GradFilterTrainer(make_model(arch, tokenizer), args=args, train_dataset=rows,
                                processing_class=tokenizer, callbacks=[capture])
    trainer.train()
    return trainer, capture


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_train_mode_sketches_equal_batch_size_one_reference(arch, tokenizer, alpaca_small, tmp_path):
    trainer, capture = run(arch, tokenizer, alpaca_small, tmp_path, train_sampling_strategy="random",
                           sketch_epochs=[1, 2])  # random batches: rows of different lengths, padded
    sketches = trainer.record.sketches
    assert sketches.shape == (10, 2, 2, DIM) and np.isfinite(sketches).all()
    steps_per_epoch = len(trainer.sampler)
    for epoch in range(2):
        for m in range(2):
            for k, ids in enumerate(trainer.sampler.batches(m, epoch)):  # the rows member m saw at step k
                weights = capture.steps[epoch * steps_per_epoch + k]
                assert_sketches(sketches[ids, m, epoch], reference_sketches(trainer, weights, m, ids))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_snapshot_mode_sketches_the_late_epoch_by_default_and_equals_the_reference(arch, tokenizer, alpaca_small,
                                                                                   tmp_path):
    trainer, capture = run(arch, tokenizer, alpaca_small, tmp_path, record_mode="snapshot")
    assert trainer.record.metadata["sketch"]["epochs"] == [2]
    ids = np.arange(len(alpaca_small))
    for m in range(2):
        want = reference_sketches(trainer, capture.epoch_ends[1], m, ids)
        assert_sketches(trainer.record.sketches[ids, m, 0], want)
    # squared sketch norms estimate the squared gradient norms (unbiased; d = 64 is noisy)
    ratio = (trainer.record.sketches[:, :, 0] ** 2).sum(-1) / trainer.record.norms[:, :, 1] ** 2
    assert 0.3 < np.median(ratio) < 3


def test_gradient_accumulation_keeps_sketches_exact(tokenizer, alpaca_small, tmp_path):
    trainer, capture = run("gpt2", tokenizer, alpaca_small, tmp_path, learning_rate=0.0,
                           gradient_accumulation_steps=2, per_device_train_batch_size=3)
    ids = np.arange(len(alpaca_small))
    for m in range(2):
        assert_sketches(trainer.record.sketches[ids, m, 0], reference_sketches(trainer, capture.steps[0], m, ids))


def test_sketches_are_saved_and_loaded_with_their_projection_in_the_metadata(tokenizer, alpaca_small, tmp_path):
    trainer, _ = run("gpt2", tokenizer, alpaca_small, tmp_path, sketch_seed=7)
    trainer.save_model()
    loaded = GradientRecord.load(str(tmp_path))
    np.testing.assert_array_equal(loaded.sketches, trainer.record.sketches)
    assert loaded.metadata["sketch"] == {"dim": DIM, "seed": 7, "projection": "gaussian_rank_side_exact",
                                         "epochs": [2], "matrices": len(trainer.recorder.modules["member_0"]),
                                         "storage": "members", "dtype": "float32"}
    mapped = GradientRecord.load(str(tmp_path), mmap=True)
    np.testing.assert_array_equal(mapped.sketches, trainer.record.sketches)


def test_sketches_are_off_by_default_and_the_record_has_none(tokenizer, alpaca_small, tmp_path):
    trainer = GradFilterTrainer(make_model("gpt2", tokenizer), args=config(tmp_path), train_dataset=alpaca_small,
                                processing_class=tokenizer)
    trainer.train()
    trainer.save_model()
    assert trainer.record.sketches is None and trainer.recorder.sketcher is None
    assert GradientRecord.load(str(tmp_path)).sketches is None and "sketch" not in trainer.record.metadata


@pytest.mark.parametrize("kw, match", [
    (dict(stack_members=True), "stack_members"),
    (dict(record_mode="none"), "record_mode"),
    (dict(sketch_epochs=[3]), "sketch_epochs"),
    (dict(sketch_dim=100 * 3 + 1), "power of 2"),
])
def test_unsupported_sketch_settings_are_refused(kw, match, tmp_path):
    args = dict(output_dir=str(tmp_path), use_cpu=True, sketch_dim=256)
    with pytest.raises(ValueError, match=match):
        GradFilterConfig(**{**args, **kw})


@pytest.mark.slow
@pytest.mark.parametrize("mode, storage", [("train", "members"), ("snapshot", "members"), ("train", "mean")])
def test_two_processes_give_the_single_process_sketches(mode, storage, tmp_path):
    from test_distributed_and_resume import score

    flags = ["--record_mode", mode, "--sketch_dim", str(DIM), "--sketch_storage", storage]
    single = score(tmp_path / "one", "--batch", "4", *flags)
    # 64 values per all-reduce: one row of sketches (2 members x 1 epoch x 64) at a time; with the member mean,
    # each process adds its members' parts of a row, and the merge sums them
    double = score(tmp_path / "two", "--batch", "2", *flags, "--gather_chunk", "64", processes=2)
    assert np.isfinite(double.sketches).all()  # every row recorded, exactly once (else the merge raises)
    assert_sketches(double.sketches, single.sketches)
    assert double.metadata["sketch"] == single.metadata["sketch"]


def test_a_run_resumed_mid_epoch_records_the_uninterrupted_sketches(tokenizer, alpaca_small, tmp_path):
    def record(resume=None):
        args = config(tmp_path, sketch_dim=DIM, sketch_epochs=[1, 2], save_strategy="steps", save_steps=2)
        trainer = GradFilterTrainer(make_model("gpt2", tokenizer), args=args, train_dataset=alpaca_small,
                                    processing_class=tokenizer)
        trainer.train(resume_from_checkpoint=resume)
        return trainer.record

    full = record()
    resumed = record(str(tmp_path / "checkpoint-4"))  # 3 steps per epoch: mid epoch 2
    np.testing.assert_allclose(resumed.sketches, full.sketches, rtol=1e-6, atol=1e-7)


def test_the_float32_rerecord_of_an_overflowed_batch_sketches_each_rows_true_gradient(tokenizer, alpaca_small,
                                                                                       tmp_path):
    import torch
    from test_rerecord import batch_of, one_at_a_time

    from hf_gradfilter.demo.tiny import tiny_gpt2
    from hf_gradfilter.proxy.rerecord import rerecord

    args = GradFilterConfig(output_dir=str(tmp_path), num_members=2, lora_r=4, lora_alpha=8, max_length=256,
                            disable_tqdm=True, seed=3, use_cpu=True, init_lora_weights="gaussian", sketch_dim=DIM)
    trainer = GradFilterTrainer(tiny_gpt2(tokenizer, n_embd=32, n_head=2), args=args, train_dataset=alpaca_small,
                                processing_class=tokenizer)
    trainer._activate("member_1")
    trainer._sketch_epoch(1)  # the late epoch (0-based 1) is sketched
    batch = batch_of(trainer, [0, 3, 5])
    modules = trainer.recorder.modules["member_1"]
    rerecord(trainer, trainer.model, batch, "member_1", batch["weight"], 0.25, directions=False)
    grads = one_at_a_time(trainer, batch, [m.weight for m in modules])
    shapes = [tuple(m.weight.shape) for m in modules]
    want = [sum((p.T @ g @ q).reshape(-1) for (p, q), g in zip(projections(shapes, DIM, 0), row))
            for row in grads]
    assert_sketches(trainer.recorder.sketches.detach().numpy(), torch.stack(want).detach().numpy())
