"""Representation features: each row's mean-pooled hidden state under the proxy's frozen backbone.

For row n with response positions ``R_n`` (the tokens its loss is taken on: ``labels != -100``) and the
backbone's last hidden layer after its final norm, ``h_t`` (``d``: the hidden size):

    e_n = (1 / |R_n|) sum_{t in R_n} h_t            (d,)

The LoRA members are switched off (`PeftModel.disable_adapter`), so ``e_n`` is the *base* model's
representation, as in RDS+ (Ivison et al. 2025, arXiv 2503.01807: mean-pooled final hidden states of the
selecting model, cosine to the target rows), and one forward a row whatever M is; members' gradients stay
the sketches' business. Rows are batched with right padding (the mask keeps padding out of every position
that counts), in length order so that a batch wastes little on padding; rows with no response token
left after truncation get NaN. Forward only, no gradient, eval mode: the same numbers as a batch-size-1
forward of the row to float rounding (tests/test_embeddings.py).

Computed at select time (the ``columns`` stage of `run`) from the ``score`` run's proxy, not in the
recording pass: a second, forward-only pass over the rows (on the demo, 2-3 s for 1,500 rows against 30 s of
proxy training, docs/sketch_selection_demo.md; on SmolLM2-135M, 54 s for 302 rows against 937 s,
docs/embedding_selection.md). The recording pass's hidden states are not the backbone's (a LoRA member is
active in each) and come once per epoch and member; a separate pass also lets features change without
training the proxy again.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from .probe import tokenize_probe_rows
from .sampler import pad_rows


def response_mean_hidden(body, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``(B, d)`` float32: the mean of ``body``'s last hidden state over each row's response positions
    (``batch["labels"] != -100``); NaN for a row without one. ``body``: a transformer body (``lm.base_model``),
    whose first output is the last hidden state ``(B, T, d)``."""
    hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0].float()
    response = (batch["labels"] != -100).to(hidden.dtype)  # (B, T)
    count = response.sum(dim=1, keepdim=True)  # (B, 1)
    summed = torch.einsum("bt,btd->bd", response, hidden)
    return torch.where(count > 0, summed / count.clamp(min=1), torch.full_like(summed, float("nan")))


def embed_rows(trainer, rows, batch_size: int | None = None) -> np.ndarray:
    """``(N, d)`` float32 `response_mean_hidden` of each row of ``rows`` (raw instruction rows in any supported
    format, tokenized as the scored rows: the trainer's format resolved on their own columns, its
    ``max_length``), under the backbone of ``trainer`` (a `GradFilterTrainer`) with every member switched off."""
    args = trainer.args
    tokenized, usable = tokenize_probe_rows(trainer, rows)
    if len(usable) == 0:
        raise ValueError("No row has a response token left after truncation: nothing to embed (raise --max_length).")
    size = batch_size or args.per_device_eval_batch_size
    model = trainer.accelerator.unwrap_model(trainer.model)
    body = model.get_base_model().base_model
    out = np.full((len(rows), model.config.get_text_config().hidden_size), np.nan, dtype=np.float32)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), model.disable_adapter():
            for start in tqdm(range(0, len(usable), size), desc="Embedding rows", disable=args.disable_tqdm):
                idx = usable[start:start + size]
                batch = trainer._prepare_inputs(pad_rows(tokenized[idx.tolist()], trainer.pad_token_id))
                out[idx] = response_mean_hidden(body, batch).cpu().numpy()
    finally:
        model.train(was_training)
    return out
