"""The record is kept in files, not memory: unnamed memmaps while training, mapped read-only when
loaded, and the trainer's column reads in chunks of rows give the same record as whole reads."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from datasets import Dataset
from safetensors.numpy import load_file
from safetensors.torch import save_file

from hf_gradfilter import GradFilterConfig, GradFilterTrainer, GradientRecord
from hf_gradfilter.data import columns as columns_module
from hf_gradfilter.data.columns import column_chunks, read_columns, read_int_columns
from hf_gradfilter.demo.tiny import tiny_gpt2
from hf_gradfilter.proxy.record import file_array, mmap_safetensors


def make_trainer(tokenizer, dataset, output_dir):
    config = GradFilterConfig(output_dir=str(output_dir), num_members=2, per_device_train_batch_size=4,
                              num_train_epochs=2, learning_rate=5e-3, lora_r=4, lora_alpha=8, max_length=256,
                              disable_tqdm=True, seed=3, use_cpu=True, save_strategy="no", report_to="none")
    return GradFilterTrainer(tiny_gpt2(tokenizer, n_embd=32, n_head=2), args=config, train_dataset=dataset,
                             processing_class=tokenizer)


def test_the_training_record_is_file_backed_and_leaves_no_file_behind(tokenizer, alpaca_small, tmp_path):
    trainer = make_trainer(tokenizer, alpaca_small, tmp_path / "out")
    trainer.train()
    for name in ("norms", "losses", "cosines", "example_id", "row_hash"):
        array = getattr(trainer.record, name)
        assert isinstance(array, np.memmap) and array.filename is None, name  # mapped, on an unnamed file
    assert np.isfinite(trainer.record.norms).all()
    assert not [f for f in os.listdir(tmp_path / "out") if "record" in f]  # nothing to clean up by hand
    trainer.save_model()
    saved = GradientRecord.load(str(tmp_path / "out"))
    np.testing.assert_array_equal(saved.norms, trainer.record.norms)
    np.testing.assert_array_equal(saved.row_hash, trainer.record.row_hash)


def test_file_array_is_filled_and_writable_in_memory_or_on_file(tmp_path):
    for directory in (None, str(tmp_path)):
        array = file_array((3, 2), np.float32, np.nan, directory)
        assert array.shape == (3, 2) and np.isnan(array).all()
        array[1, 1] = 5.0
        assert array[1, 1] == 5.0 and np.isnan(array).sum() == 5
    assert os.listdir(tmp_path) == []


def test_mmap_safetensors_reads_what_safetensors_reads(tmp_path):
    tensors = {"f32": torch.randn(4, 3), "f16": torch.randn(5).half(), "i64": torch.arange(7) * 2**40,
               "i32": torch.arange(6, dtype=torch.int32).reshape(2, 3), "u8": torch.arange(9, dtype=torch.uint8),
               "b": torch.tensor([True, False, True]), "empty": torch.zeros(0, 3)}
    path = str(tmp_path / "t.safetensors")
    save_file(tensors, path, metadata={"k": "v"})
    mapped, reference = mmap_safetensors(path), load_file(path)
    assert mapped.keys() == reference.keys()
    for name, array in reference.items():
        assert mapped[name].dtype == array.dtype and mapped[name].shape == array.shape, name
        np.testing.assert_array_equal(mapped[name], array)
    with pytest.raises(ValueError):  # read-only: a loaded record cannot be changed by accident
        mapped["f32"][0, 0] = 1.0


def test_a_record_loaded_with_mmap_equals_one_read_into_memory(tmp_path):
    rng = np.random.default_rng(0)
    record = GradientRecord(rng.random((6, 2, 2), dtype=np.float32), rng.random((6, 2, 2), dtype=np.float32),
                            np.arange(6), rng.integers(-2**62, 2**62, 6), {"config": {"seed": 1}},
                            rng.random((6, 2, 2), dtype=np.float32))
    record.save(str(tmp_path))
    read, mapped = GradientRecord.load(str(tmp_path)), GradientRecord.load(str(tmp_path), mmap=True)
    assert isinstance(mapped.norms, np.memmap) and not isinstance(read.norms, np.memmap)
    for name in ("norms", "losses", "cosines", "example_id", "row_hash"):
        np.testing.assert_array_equal(getattr(mapped, name), getattr(read, name))
    assert mapped.metadata == read.metadata and mapped.fingerprint == read.fingerprint == record.fingerprint


def test_column_chunks_cover_every_row_in_order_through_an_index_mapping():
    data = Dataset.from_dict({"a": list(range(23)), "flag": [i % 3 == 0 for i in range(23)]})
    for dataset in (data, data.shuffle(seed=0).select(range(17))):  # the second has an indices mapping
        starts, parts = zip(*column_chunks(dataset, ["a", "flag"], chunk_rows=5))
        assert list(starts) == list(range(0, len(dataset), 5))
        whole = read_columns(dataset, ["a", "flag"])
        for name in ("a", "flag"):
            np.testing.assert_array_equal(np.concatenate([p[name] for p in parts]), whole[name])
            np.testing.assert_array_equal(read_int_columns(dataset, [name])[name], whole[name])


def test_set_up_read_in_chunks_of_rows_gives_the_whole_read_record(tokenizer, alpaca_small, tmp_path, monkeypatch):
    # Two rows lose their response to truncation, so the trainable rows are a subset across chunks.
    data = alpaca_small.map(lambda r, i: {"input": r["input"] + " word" * 400 if i in (3, 8) else r["input"]},
                            with_indices=True)
    data = Dataset.from_dict({k: list(data[k]) + list(data[k][:2]) for k in data.column_names})  # 2 duplicate rows
    whole = make_trainer(tokenizer, data, tmp_path / "whole")
    monkeypatch.setattr(columns_module, "COLUMN_CHUNK_ROWS", 3)
    chunked = make_trainer(tokenizer, data, tmp_path / "chunked")
    assert chunked.data_stats == whole.data_stats
    assert whole.data_stats["num_no_response"] == 2 and whole.data_stats["num_duplicate_rows"] == 2
    assert len(chunked.train_dataset) == len(whole.train_dataset) == 10
    np.testing.assert_array_equal(chunked.train_dataset["example_id"], whole.train_dataset["example_id"])
    np.testing.assert_array_equal(chunked.record.example_id, np.arange(12))
    np.testing.assert_array_equal(chunked.record.row_hash, whole.record.row_hash)
    tokenized = read_columns(whole.tokenized, ["row_hash"])["row_hash"]
    np.testing.assert_array_equal(whole.record.row_hash, tokenized.astype(np.int64))


def test_no_room_for_the_record_is_an_error_naming_the_directory_and_the_fix(tmp_path, monkeypatch):
    import errno

    if not hasattr(os, "posix_fallocate"):
        pytest.skip("no posix_fallocate on this platform")

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OSError, match=rf"Cannot keep the gradient record \(0.4 MB .*{tmp_path}: No space left"):
        file_array((1000, 5, 20), np.float32, np.nan, str(tmp_path))


@pytest.mark.parametrize("damage, match", [
    (lambda b: b[:4], "not a safetensors file"),  # shorter than its header length
    (lambda b: (2**40).to_bytes(8, "little") + b[8:], "not a safetensors file"),
    (lambda b: b[:-8], "damaged"),  # the last tensor's bytes cut off
])
def test_a_damaged_record_file_is_refused_naming_the_problem(tmp_path, damage, match):
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.arange(6, dtype=torch.float32), "b": torch.arange(4)}, str(path))
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match=match):
        mmap_safetensors(str(path))
