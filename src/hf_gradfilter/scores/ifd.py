"""Model-pass scorers of a frozen small LM, as batched `Dataset.map` functions.

- `IFDScorer`: Superfiltering's Instruction-Following Difficulty -> ``ifd``, ``ppl_conditioned``,
  ``ppl_response`` (its selection rule: `selection.superfiltering.superfiltering_select`);
- `BaseLossScorer`: the frozen base model's response loss -> ``base_loss``.
"""

from __future__ import annotations

import numpy as np
import torch

from ..data.formatting import InstructionFormat, check_tokenizer, render, tokenize_batch
from ..proxy.model import head_splits, per_example_loss, response_loss
from .scorers import _positions


class IFDScorer:
    """Superfiltering's Instruction-Following Difficulty with a small causal LM (Li et al., ACL 2024).

    ``IFD = PPL(response | prompt) / PPL(response)``, ``PPL = exp(mean NLL over the target tokens)``:

    - conditioned (``ppl_conditioned``): the row rendered as the proxy sees it (`formatting.render`,
      `tokenize_batch`, cut to ``max_length``): targets are the response tokens (``output + eos``;
      every assistant turn for ``messages``), prompt tokens masked;
    - unconditioned (``ppl_response``): the response text alone (the rendered response spans,
      joined), tokenized as plain text (``add_special_tokens=True``: a BOS where the tokenizer adds
      one), cut to ``max_length``; every token but the first is a target, predicted from the
      preceding ones only, as Superfiltering does. ``tokenized`` rows use their labelled ids.

    Rows are sorted by length within a map batch and run ``batch_size`` at a time, right-padded,
    under ``torch.no_grad`` in eval mode (the mode is restored). A row with no target in either pass
    gets NaN in ``ifd`` and that pass's column. Default model in the docs: ``gpt2``::

        scorer = IFDScorer(AutoModelForCausalLM.from_pretrained("gpt2"), AutoTokenizer.from_pretrained("gpt2"))
        scored = rows.map(scorer, batched=True, with_indices=True)
        selected, stats = superfiltering_select(scored, 0.10)
    """

    def __init__(self, model, tokenizer, *, fmt: InstructionFormat | None = None, batch_size: int = 8,
                 max_length: int = 512):
        if batch_size < 1 or max_length < 2:
            raise ValueError(f"batch_size={batch_size} must be >= 1 and max_length={max_length} >= 2.")
        self.model, self.tokenizer, self.fmt = model, tokenizer, fmt or InstructionFormat()
        self.batch_size, self.max_length = batch_size, max_length
        self.pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
        self._split = None

    def _tokenized(self, batch: dict[str, list], indices: list[int] | None):
        fmt = self.fmt.resolve(list(batch))
        check_tokenizer(self.tokenizer, fmt.kind)
        positions = _positions(batch, indices)
        tok = tokenize_batch(batch, positions, fmt=fmt, tokenizer=self.tokenizer, max_length=self.max_length,
                             used_columns=fmt.used_columns(list(batch)))
        return fmt, positions, tok

    def __call__(self, batch: dict[str, list], indices: list[int] | None = None) -> dict[str, list]:
        fmt, positions, tok = self._tokenized(batch, indices)
        if fmt.kind == "tokenized":
            alone = [[lab for lab in labels if lab != -100] for labels in batch["labels"]]
        else:
            texts = [render({c: batch[c][i] for c in batch}, fmt, self.tokenizer, example_id=positions[i])
                     for i in range(len(positions))]
            responses = ["".join(text[s:e] for s, e in spans) for text, spans in texts]
            alone = self.tokenizer(responses, add_special_tokens=True, truncation=True,
                                   max_length=self.max_length)["input_ids"]
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                ppl_cond = np.exp(self._mean_nll(tok["input_ids"], tok["labels"]))
                ppl_resp = np.exp(self._mean_nll(alone, alone))
        finally:
            self.model.train(was_training)
        return {"ifd": (ppl_cond / ppl_resp).tolist(), "ppl_conditioned": ppl_cond.tolist(),
                "ppl_response": ppl_resp.tolist()}

    def _mean_nll(self, ids: list[list[int]], labels: list[list[int]]) -> np.ndarray:
        """Mean next-token NLL over each row's labelled tokens (the first token is never a target): ``(B,)``, NaN
        for rows without a target. Rows run ``batch_size`` at a time in length order, right-padded."""
        out = np.full(len(ids), np.nan)
        todo = sorted((i for i in range(len(ids)) if any(lab != -100 for lab in labels[i][1:])),
                      key=lambda i: len(ids[i]))
        device = next(self.model.parameters()).device
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start: start + self.batch_size]
            width = max(len(ids[i]) for i in chunk)
            pad = [width - len(ids[i]) for i in chunk]
            input_ids = torch.tensor([ids[i] + [self.pad_id] * p for i, p in zip(chunk, pad)], device=device)
            target = torch.tensor([labels[i] + [-100] * p for i, p in zip(chunk, pad)], device=device)
            mask = torch.tensor([[1] * len(ids[i]) + [0] * p for i, p in zip(chunk, pad)], device=device)
            out[chunk] = self._loss(input_ids, mask, target).cpu().double().numpy()
        return out

    def _loss(self, input_ids, attention_mask, labels) -> torch.Tensor:
        model = self.model
        if self._split is None:
            self._split = head_splits(model)
        if self._split:
            hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask)[0]
            return response_loss(hidden, model.get_output_embeddings(), labels)
        return per_example_loss(model(input_ids=input_ids, attention_mask=attention_mask).logits, labels)


class BaseLossScorer(IFDScorer):
    """``base_loss``: the frozen base model's mean response loss ``L_0`` (IFD's conditioned pass alone: the row as
    the proxy sees it, prompt tokens masked; ``log ppl_conditioned``). Pass the proxy's backbone with its members
    switched off (``with trainer.model.disable_adapter():``) or any small LM; NaN for a row with no target.
    Read by `DynamicsScorer` (``mid_base_loss``, ``reducible_loss``, ``least_learned``)."""

    def __call__(self, batch: dict[str, list], indices: list[int] | None = None) -> dict[str, list]:
        _, _, tok = self._tokenized(batch, indices)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                return {"base_loss": self._mean_nll(tok["input_ids"], tok["labels"]).tolist()}
        finally:
            self.model.train(was_training)
