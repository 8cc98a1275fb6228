"""Shared fixtures: a locally trained tokenizer, tiny models and small instruction datasets (no network)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
from datasets import Dataset

from hf_gradfilter.data.formatting import ALPACA_PROMPT_WITH_INPUT
from hf_gradfilter.demo.data import make_demo_dataset
from hf_gradfilter.demo.tiny import train_tokenizer


@pytest.fixture(scope="session")
def demo_rows():
    return make_demo_dataset(num_rows=400, seed=1)


@pytest.fixture(scope="session")
def tokenizer(demo_rows):
    texts = [ALPACA_PROMPT_WITH_INPUT] + [r["instruction"] + " " + r["input"] + " " + r["output"] for r in demo_rows]
    return train_tokenizer(texts, vocab_size=400)


@pytest.fixture
def alpaca_small(demo_rows):
    """10 Alpaca rows of varied lengths (so batches carry padding)."""
    rows = demo_rows.select(range(10))
    return Dataset.from_dict({k: rows[k] for k in ("instruction", "input", "output")})
