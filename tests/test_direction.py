"""Direction statistics: each gradient's cosine with its member's running mean gradient of the epoch.

The recorded cosines equal a batch-size-1 autograd loop that keeps the same reference by hand:
``S`` = the sum of the per-example gradients of the batches the member visited earlier in the epoch.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from datasets import Dataset
from safetensors.numpy import save_file
from test_norms_exact import TARGETS, CaptureLora, config, make_model, reference_grads

from hf_gradfilter import (
    GradFilterConfig,
    GradFilterTrainer,
    GradientRecord,
    RecordScorer,
    select_top,
)
from hf_gradfilter.proxy.checkpoint import DIRECTIONS_NAME
from hf_gradfilter.proxy.model import build_ensemble
from hf_gradfilter.proxy.norms import LoraNormRecorder, grad_dots
from hf_gradfilter.scores.formulas import gsnr_direction, mean_cosine, record_parts, score_parts

RTOL, ATOL = 1e-4, 1e-6  # cosines near 0 are held to ATOL: float32 rounding of a dot of two gradients


def running_cosines(visits) -> dict[int, float]:
    """``[(example ids, (B, P) gradients)]`` in visit order -> ``{id: cos(g_i, sum of earlier batches' g)}``."""
    total, out = None, {}
    for ids, grads in visits:
        for i, g in zip(ids, grads):
            if total is None:
                out[int(i)] = math.nan
            else:
                out[int(i)] = float(g @ total / (np.linalg.norm(g) * np.linalg.norm(total)))
        total = grads.sum(axis=0) if total is None else total + grads.sum(axis=0)
    return out


def assert_cosines(recorded: np.ndarray, expected: dict[int, float]) -> float:
    """Recorded ``(N,)`` cosines equal ``expected`` (NaN where it is NaN); returns the max relative error."""
    ids = np.array(sorted(expected))
    want = np.array([expected[i] for i in ids])
    got = recorded[ids]
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    np.testing.assert_allclose(got[ok], want[ok], rtol=RTOL, atol=ATOL)
    return float(np.max(np.abs(got[ok] - want[ok]) / np.abs(want[ok])))


def train(arch, tokenizer, rows, tmp_path, **kw):
    capture = CaptureLora()
    trainer = GradFilterTrainer(make_model(arch, tokenizer),
                                args=config(tmp_path, lora_target_modules=TARGETS[arch], **kw),
                                train_dataset=rows, processing_class=tokenizer, callbacks=[capture])
    trainer.train()
    return trainer, capture


def test_grad_dots_kernel_matches_explicit_per_example_gradients():
    torch.manual_seed(0)
    a, g, v = torch.randn(3, 5, 7), torch.randn(3, 5, 4), torch.randn(4, 7)
    per_example = torch.stack([sum(torch.outer(g[b, t], a[b, t]) for t in range(5)) for b in range(3)])  # (B, 4, 7)
    dots, total = grad_dots(a, g, v)
    torch.testing.assert_close(dots, (per_example * v).sum(dim=(1, 2)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(total, per_example.sum(dim=0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_train_mode_cosines_equal_batch_size_one_reference(arch, tokenizer, alpaca_small, tmp_path):
    trainer, capture = train(arch, tokenizer, alpaca_small, tmp_path)  # lr 5e-3, clipping at 1.0, padded batches
    steps_per_epoch = len(trainer.sampler)
    for epoch in range(2):
        for m in range(2):
            visits = [(ids, reference_grads(trainer, capture.steps[epoch * steps_per_epoch + k], m, ids))
                      for k, ids in enumerate(trainer.sampler.batches(m, epoch))]  # the weights at each step
            assert_cosines(trainer.record.cosines[:, m, epoch], running_cosines(visits))
    assert np.isfinite(trainer.record.cosines).mean() > 0.5  # only each member's first batch per epoch is NaN


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_snapshot_mode_cosines_equal_batch_size_one_reference(arch, tokenizer, alpaca_small, tmp_path):
    trainer, capture = train(arch, tokenizer, alpaca_small, tmp_path, record_mode="snapshot")
    for epoch in range(2):
        for m in range(2):
            visits = [(ids, reference_grads(trainer, capture.epoch_ends[epoch], m, ids))
                      for ids in trainer.snapshot_batches(m, epoch)]  # all at the end-of-epoch weights
            assert_cosines(trainer.record.cosines[:, m, epoch], running_cosines(visits))
    first = [trainer.snapshot_batches(m, 0)[0].tolist() for m in range(2)]
    assert first[0] != first[1]  # members start from different batches: few rows lack every member's cosine


def test_gradient_accumulation_keeps_cosines_exact(tokenizer, alpaca_small, tmp_path):
    trainer, capture = train("gpt2", tokenizer, alpaca_small, tmp_path, learning_rate=0.0,
                             gradient_accumulation_steps=2, per_device_train_batch_size=3)
    for m in range(2):
        visits = [(ids, reference_grads(trainer, capture.steps[0], m, ids)) for ids in trainer.sampler.batches(m, 1)]
        assert_cosines(trainer.record.cosines[:, m, 1], running_cosines(visits))


def test_recorder_cosines_do_not_depend_on_earlier_batches_loss_scale(tokenizer, tmp_path):
    args = GradFilterConfig(output_dir=str(tmp_path), num_members=1, init_lora_weights="false", lora_r=4,
                            lora_target_modules=TARGETS["gpt2"], use_cpu=True)
    model = build_ensemble(make_model("gpt2", tokenizer), args)
    ids = torch.randint(0, 300, (3, 2, 7), generator=torch.Generator().manual_seed(0))

    def last_cosines(scales):
        recorder = LoraNormRecorder(model, ["member_0"], directions=True)
        for batch, scale in zip(ids, scales):
            recorder.start(2, "cpu", member="member_0")
            per_example = model(input_ids=batch).logits.float().logsumexp(-1).mean(-1)  # (2,)
            (scale * per_example.sum()).backward()
            recorder.stop(grad_scale=scale)
            recorder.commit("member_0")
        recorder.remove()
        return recorder.cosines

    torch.testing.assert_close(last_cosines([1.0, 1.0, 1.0]), last_cosines([0.5, 4.0, 2.0]), rtol=1e-4, atol=1e-6)


def test_a_run_resumed_mid_epoch_records_the_uninterrupted_cosines(tokenizer, alpaca_small, tmp_path):
    def run(resume=None):
        args = config(tmp_path, save_strategy="steps", save_steps=2)  # 3 steps per epoch: checkpoint-4 is mid epoch 2
        trainer = GradFilterTrainer(make_model("gpt2", tokenizer), args=args, train_dataset=alpaca_small,
                                    processing_class=tokenizer)
        trainer.train(resume_from_checkpoint=resume)
        return trainer.record

    full = run()
    assert (tmp_path / "checkpoint-4" / DIRECTIONS_NAME).exists()
    resumed = run(str(tmp_path / "checkpoint-4"))
    assert np.isfinite(resumed.cosines[:, :, 1]).sum() >= 10  # epoch 2's later batches need the restored reference
    np.testing.assert_allclose(resumed.cosines, full.cosines, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(resumed.norms, full.norms, rtol=1e-6)


def test_cosines_round_trip_and_records_without_them_load_as_nan(tmp_path):
    rng = np.random.default_rng(0)
    norms, cosines = rng.random((4, 2, 2)).astype(np.float32), rng.uniform(-1, 1, (4, 2, 2)).astype(np.float32)
    cosines[0, 0, 0] = np.nan
    record = GradientRecord(norms, norms.copy(), np.arange(4), np.arange(4) * 7, {"record_mode": "train"}, cosines)
    np.testing.assert_array_equal(GradientRecord.load(record.save(str(tmp_path / "new"))).cosines, cosines)
    old = str(tmp_path / "old.safetensors")  # a record written before cosines existed
    save_file({"norms": norms, "losses": norms, "example_id": np.arange(4), "row_hash": np.arange(4) * 7}, old)
    loaded = GradientRecord.load(old)
    assert loaded.cosines.shape == norms.shape and np.isnan(loaded.cosines).all()
    assert np.isnan(record_parts(loaded.norms, loaded.losses, cosines=loaded.cosines)["gsnr_dir"]).all()


def test_direction_scores_match_hand_computed_values():
    g = np.array([2.0, -2.0, 0.0, 3.0, np.nan])
    c = np.array([0.5, 0.5, 0.9, np.nan, 0.1])
    np.testing.assert_array_equal(gsnr_direction(g, c), [3.0, -1.0, 0.0, np.nan, np.nan])
    cos = np.full((3, 2, 2), np.nan)
    cos[:, :, 1] = [[0.2, 0.4], [np.nan, -0.6], [np.nan, np.nan]]
    np.testing.assert_allclose(mean_cosine(cos, 2), [0.3, -0.6, np.nan])


def test_record_scorer_appends_direction_columns_and_selects_by_them():
    norms = np.array([[[2.0, 1.0], [2.0, 1.0]], [[1.0, 2.0], [1.0, 3.0]], [[2.0, 1.0], [3.0, 1.0]]])
    cos = np.full(norms.shape, np.nan)
    cos[:, :, 1] = [[0.5, 0.7], [0.1, np.nan], [-0.2, -0.4]]
    record = GradientRecord(norms, norms, np.arange(3), np.arange(3), {}, cos)
    rows = Dataset.from_dict({"instruction": ["a", "b", "c"], "output": ["1", "2", "3"]})
    scored = rows.map(RecordScorer(record), batched=True, with_indices=True)
    c_t = np.array([0.6, 0.1, -0.3])
    gsnr = score_parts(norms)["gsnr"]
    np.testing.assert_allclose(scored["cos_late"], c_t)
    np.testing.assert_allclose(scored["gsnr_dir"], gsnr * (1 + np.sign(gsnr) * c_t))
    selected, _ = select_top(scored, "gsnr_dir", k=1)
    assert selected["instruction"] == [rows["instruction"][int(np.argmax(scored["gsnr_dir"]))]]


def test_an_overflowed_batch_never_reaches_the_reference_direction(tokenizer):
    # An fp16 overflow shows up as inf in a layer's output gradient: the batch's gradient sum is then not
    # finite, and adding it would make every later cosine of the member NaN for the rest of the epoch.
    model = build_ensemble(make_model("gpt2", tokenizer), config("unused"))
    recorder = LoraNormRecorder(model, ["member_0"], directions=True)
    model.base_model.set_adapter("member_0")
    ids = torch.tensor([[5, 6, 7, 8]])

    def backward(overflow: bool):
        recorder.start(1, "cpu", member="member_0")
        out = model(input_ids=ids).logits
        if overflow:
            out.register_hook(lambda g: torch.full_like(g, float("inf")))
        out.sum().backward()
        recorder.stop()

    backward(False)
    recorder.commit("member_0")
    before = [r.clone() for r in recorder.reference["member_0"]]
    backward(True)
    with pytest.warns(RuntimeWarning, match="member_0's gradient sum is not finite"):
        assert recorder.commit("member_0") is False
    for ref, old in zip(recorder.reference["member_0"], before):
        torch.testing.assert_close(ref, old)
    backward(True)  # a re-record starts afresh: the overflowed sum is dropped, the new one committed
    backward(False)
    assert recorder.commit("member_0") is True
    assert all(bool(torch.isfinite(r).all()) for r in recorder.reference["member_0"])
