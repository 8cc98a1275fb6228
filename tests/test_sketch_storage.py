"""Smaller sketches (``sketch_storage="mean"``, ``sketch_dtype="float16"``): what the recording keeps, and that every
reader of sketches takes them.

The member mean equals the mean of the per-member sketches of the same run (to float32 rounding: it is summed as
the members visit the row); float16 is the float32 sketch rounded to 11 significant bits (relative error at most
2^-11 from 2^-14 up; below, an absolute error of at most 2^-25). docs/ann_search.md measures what either changes
downstream.
"""

from __future__ import annotations

import numpy as np
import pytest
from datasets import Dataset
from test_norms_exact import config, make_model

from hf_gradfilter import GradFilterConfig, GradFilterTrainer, GradientRecord, sketch_clusters, target_alignment
from hf_gradfilter.scores.duplicates import near_duplicates, nearest_earlier, nearest_earlier_ids, record_sketches

DIM = 64


def record(tokenizer, rows, tmp_path, **kw) -> GradientRecord:
    args = config(tmp_path, sketch_dim=DIM, sketch_epochs=[1, 2], **kw)
    trainer = GradFilterTrainer(make_model("gpt2", tokenizer), args=args, train_dataset=rows,
                                processing_class=tokenizer)
    trainer.train()
    trainer.save_model()
    return trainer.record


@pytest.fixture(scope="module")
def runs(tokenizer, demo_rows, tmp_path_factory):
    """The same run (seed, rows, settings) with each storage option, on the rows of `alpaca_small`."""
    first = demo_rows.select(range(10))
    rows = Dataset.from_dict({k: first[k] for k in ("instruction", "input", "output")})
    return {(storage, dtype): record(tokenizer, rows, tmp_path_factory.mktemp(f"{storage}_{dtype}"),
                                     sketch_storage=storage, sketch_dtype=dtype)
            for storage in ("members", "mean") for dtype in ("float32", "float16")}


def test_the_mean_option_keeps_the_mean_of_the_per_member_sketches_of_the_same_run(runs):
    members, mean = runs["members", "float32"].sketches, runs["mean", "float32"].sketches
    assert members.shape == (10, 2, 2, DIM) and mean.shape == (10, 1, 2, DIM) and mean.dtype == np.float32
    np.testing.assert_allclose(mean[:, 0], members.mean(axis=1), rtol=1e-5, atol=1e-6 * np.abs(members).max())
    np.testing.assert_array_equal(runs["mean", "float32"].norms, runs["members", "float32"].norms)  # nothing else


@pytest.mark.parametrize("storage", ["members", "mean"])
def test_float16_is_the_float32_sketch_rounded_to_11_bits(runs, storage):
    full, half = runs[storage, "float32"].sketches, runs[storage, "float16"].sketches
    assert half.dtype == np.float16 and half.shape == full.shape
    # 11 significant bits in float16's normal range (from 2^-14); below it, steps of 2^-24
    np.testing.assert_allclose(half.astype(np.float32), full, rtol=2.0 ** -11, atol=2.0 ** -25)


@pytest.mark.parametrize("storage, dtype", [("mean", "float32"), ("members", "float16"), ("mean", "float16")])
def test_the_saved_record_keeps_the_option_and_says_so(runs, storage, dtype, tmp_path):
    rec = runs[storage, dtype]
    rec.save(str(tmp_path))
    for loaded in (GradientRecord.load(str(tmp_path)), GradientRecord.load(str(tmp_path), mmap=True)):
        assert loaded.sketches.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(loaded.sketches, rec.sketches)
        assert loaded.metadata["sketch"]["storage"] == storage and loaded.metadata["sketch"]["dtype"] == dtype
    file_bytes = (tmp_path / "gradient_record.safetensors").stat().st_size
    assert rec.sketches.nbytes == 10 * (2 if storage == "members" else 1) * 2 * DIM * (4 if dtype == "float32" else 2)
    assert file_bytes > rec.sketches.nbytes


def test_every_sketch_reader_takes_the_mean_and_float16(runs):
    full = runs["members", "float32"]
    reference_ids, reference_cos = nearest_earlier_ids(full)
    for rec in runs.values():
        ids, cos = nearest_earlier_ids(rec)  # the near-duplicate columns of `score`
        np.testing.assert_array_equal(ids, reference_ids)  # here: the same pairs with every option
        np.testing.assert_allclose(cos, reference_cos, atol=2e-3)
        labels = sketch_clusters(record_sketches(rec), 3, seed=0)
        assert labels.shape == (10,) and set(labels) == {0, 1, 2}
        target = np.random.default_rng(0).standard_normal((4, 2, DIM)).astype(np.float32)  # (J, M, d) per member
        align = target_alignment(record_sketches(rec), target)
        assert align.shape == (10,) and np.isfinite(align).all()


def test_alignment_of_a_member_mean_is_the_mean_cosine_with_the_target_rows_member_means():
    rng = np.random.default_rng(1)
    rows, target = rng.standard_normal((6, 3, 8)), rng.standard_normal((5, 3, 8))
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    want = (unit(rows.mean(1)) @ unit(target.mean(1)).T).mean(axis=1)
    np.testing.assert_allclose(target_alignment(rows.mean(1, keepdims=True).astype(np.float16), target), want,
                               atol=2e-3)  # float16 rows, computed in float64
    np.testing.assert_allclose(target_alignment(rows.mean(1, keepdims=True), target), want, rtol=1e-12)


def test_float16_sketches_give_the_float32_answer_of_the_same_values():
    x = np.random.default_rng(2).standard_normal((50, 4, 16)).astype(np.float16)
    for got, want in zip(nearest_earlier(x), nearest_earlier(x.astype(np.float32))):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(near_duplicates(x, 0.5), near_duplicates(x.astype(np.float32), 0.5))


def test_a_resumed_run_keeps_the_uninterrupted_member_mean(tokenizer, alpaca_small, tmp_path):
    def run(resume=None):
        args = config(tmp_path, sketch_dim=DIM, sketch_epochs=[1, 2], sketch_storage="mean", save_strategy="steps",
                      save_steps=2)
        trainer = GradFilterTrainer(make_model("gpt2", tokenizer), args=args, train_dataset=alpaca_small,
                                    processing_class=tokenizer)
        trainer.train(resume_from_checkpoint=resume)
        return trainer.record

    full = run()
    resumed = run(str(tmp_path / "checkpoint-4"))  # mid epoch 2: the partial sums come back from the checkpoint
    np.testing.assert_allclose(resumed.sketches, full.sketches, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kw, match", [(dict(sketch_storage="median"), "sketch_storage='median': choose one of"),
                                       (dict(sketch_dtype="bfloat16"), "sketch_dtype='bfloat16': choose one of")])
def test_an_unknown_storage_option_is_refused(kw, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        GradFilterConfig(output_dir=str(tmp_path), use_cpu=True, sketch_dim=256, **kw)


def test_runs_fingerprinted_before_the_options_keep_their_score_stage(tmp_path):
    from hf_gradfilter.run.pipeline import proxy_inputs

    default = proxy_inputs(GradFilterConfig(output_dir=str(tmp_path), use_cpu=True, sketch_dim=256))
    assert "sketch_storage" not in default and "sketch_dtype" not in default  # as before the options existed
    mean = proxy_inputs(GradFilterConfig(output_dir=str(tmp_path), use_cpu=True, sketch_dim=256, sketch_storage="mean"))
    assert mean["sketch_storage"] == "mean"  # another storage is another record: the score stage runs again
