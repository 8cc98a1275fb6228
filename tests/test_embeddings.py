"""Representation features (`proxy.embeddings`): each row's mean hidden state over its response tokens under
the frozen backbone, batched with padding, against a batch-size-1 forward of the plain model."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from datasets import Dataset
from test_norms_exact import config, make_model

from hf_gradfilter import GradFilterTrainer
from hf_gradfilter.data.formatting import tokenize_dataset
from hf_gradfilter.proxy.embeddings import embed_rows


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_embeddings_equal_a_batch_size_1_forward_of_the_base_model_with_the_members_off(
        arch, tokenizer, demo_rows, tmp_path):
    rows = Dataset.from_dict({k: demo_rows.select(range(9))[k] for k in ("instruction", "input", "output")})
    torch.manual_seed(0)
    base = make_model(arch, tokenizer)
    reference = copy.deepcopy(base).eval()  # the plain backbone: no LoRA at all
    # members with non-zero B (init "false"), so switching them off matters
    trainer = GradFilterTrainer(base, args=config(tmp_path), train_dataset=rows, processing_class=tokenizer)
    got = embed_rows(trainer, rows, batch_size=4)  # 9 rows of mixed lengths: padded batches
    assert got.shape == (9, reference.config.get_text_config().hidden_size) and got.dtype == np.float32

    tokenized, _ = tokenize_dataset(rows, tokenizer, trainer.args.instruction_format, trainer.args.max_length)
    with torch.no_grad():
        for n in range(9):
            ids = torch.tensor([tokenized[n]["input_ids"]])
            labels = torch.tensor(tokenized[n]["labels"])
            hidden = reference.base_model(input_ids=ids)[0][0]  # (T, d), one row alone
            want = hidden[labels != -100].mean(dim=0).numpy()
            np.testing.assert_allclose(got[n], want, rtol=1e-4, atol=1e-5)
    # the members are on again afterwards, and they do change the hidden states
    model = trainer.accelerator.unwrap_model(trainer.model)
    batch = {"input_ids": torch.tensor([tokenized[0]["input_ids"]])}
    with torch.no_grad():
        on = model.get_base_model().base_model(**batch)[0]
        off = reference.base_model(**batch)[0]
    assert not torch.allclose(on, off)


def test_a_row_without_a_response_token_gets_nan(tokenizer, tmp_path):
    rows = Dataset.from_dict({"prompt": ["Say hi.", "Count to three."], "completion": ["hi there", ""]})
    trainer = GradFilterTrainer(make_model("llama", tokenizer), args=config(tmp_path), train_dataset=rows,
                                processing_class=tokenizer)
    got = embed_rows(trainer, rows)
    assert np.isfinite(got[0]).all() and np.isnan(got[1]).all()
