"""Other scorers, one interface: the paper's baselines and ablations beside `GSNRScorer`.

Each scorer is a batched `Dataset.map` function that returns only its new columns (rows, order
and the other columns untouched)::

    scored = dataset.map(scorer, batched=True, with_indices=True)

- `IFDScorer` (model pass): Superfiltering's IFD with a small LM -> ``ifd``, ``ppl_conditioned``, ``ppl_response``;
  `superfiltering_select` applies its rule (drop IFD >= 1, keep the highest).
- `RandomScorer` -> ``random``;  `LengthScorer` -> ``response_length``.
- `RecordScorer` (from a `GradientRecord`, no model pass) -> `scoring.RECORD_COLUMNS`.
- `BaseLossScorer` (model pass: the frozen base) -> ``base_loss``.
- `DynamicsScorer` (from a `GradientRecord` and the ``base_loss`` / ``response_length`` columns) ->
  `dynamics.DYNAMICS_COLUMNS`, the literature's keep-scores.

`SCORERS` describes every score column; `HIGHER_IS_BETTER` says which ones are keep-scores.
"""

from __future__ import annotations

import numpy as np
import torch

from ..data.columns import read_columns
from ..data.formatting import InstructionFormat, _messages, _text, check_tokenizer, render, tokenize_batch
from ..proxy.model import head_splits, per_example_loss, response_loss
from ..selection.top import top_indices
from .dynamics import DYNAMICS_COLUMNS, dynamics_parts
from .scorer import GSNRScorer
from .scoring import RECORD_COLUMNS, record_parts, uniform_hash

# column, scorer, higher is better (a keep-score for `select_top`), description
_SPEC = [
    ("fit_rank", "GSNRScorer", True, "(r(-G_t) + r(-L_t)) / 2 (the previous default), ranks of low late "
                                     "gradient energy and low late proxy loss (docs/remedies.md)"),
    ("gsnr", "GSNRScorer", True, "G-SNR = (G_s - G_t) / (G_s + eps) / (V_t + eps), the paper's score"),
    ("rel_drop", "GSNRScorer", True, "Alt 2: relative drop (G_s - G_t) / (G_s + eps)"),
    ("raw_drop", "RecordScorer", True, "Alt 1: raw drop G_s - G_t"),
    ("var_drop", "RecordScorer", True, "Alt 3: variance-normalised drop (G_s - G_t) / (V_t + eps)"),
    ("neg_grad_late", "RecordScorer", True, "-G_t: low late gradient energy"),
    ("neg_var_late", "RecordScorer", True, "-V_t: low late ensemble variance"),
    ("neg_loss_late", "RecordScorer", True, "-L_t: low proxy loss (members' mean at the late epoch)"),
    ("gsnr_dir", "RecordScorer", True, "direction-aware G-SNR = G-SNR * (1 + sign(G-SNR) * C_t)"),
    ("cos_late", "RecordScorer", True, "C_t: members' mean cosine of the late gradient with their mean gradient"),
    ("ambiguity", "DynamicsScorer", True, "Cartography variability std_{m,e} exp(-L): rows the ensemble is unsure "
                                          "about across members and epochs"),
    ("confidence", "DynamicsScorer", True, "Cartography confidence mean_{m,e} exp(-L): easy rows first"),
    ("mid_loss", "DynamicsScorer", True, "-|r(L_t) - 1/2|: the middle of the proxy-loss range (both tails last)"),
    ("mid_loss_energy", "DynamicsScorer", True, "(mid(L_t) + mid(G_t)) / 2: the middle of loss and gradient energy"),
    ("mid_base_loss", "DynamicsScorer", True, "-|r(L_0) - 1/2|: the middle of the frozen base's loss range"),
    ("reducible_loss", "DynamicsScorer", True, "L_0 - L_t: what the trained ensemble learned beyond the base"),
    ("least_learned", "DynamicsScorer", True, "-(P_0 - P_t) / P_0, P = exp(loss): the least-learned rows "
                                              "(learning percentage)"),
    ("neg_energy_token", "DynamicsScorer", True, "the default: -G_t * T, low late gradient energy, length-normalised "
                                                 "(docs/default_choice.md)"),
    ("base_loss", "BaseLossScorer", False, "L_0: the frozen base model's response loss, diagnostic"),
    ("ifd", "IFDScorer", True, "Superfiltering IFD = PPL(response | prompt) / PPL(response); "
                               "select with superfiltering_select (drops IFD >= 1)"),
    ("random", "RandomScorer", True, "uniform [0, 1) per (seed, example id): a random subset"),
    ("response_length", "LengthScorer", True, "response tokens (or words): the longest responses"),
    ("grad_early", "GSNRScorer", False, "G_s, diagnostic"),
    ("grad_late", "GSNRScorer", False, "G_t, diagnostic (keep-score: neg_grad_late)"),
    ("ens_var_late", "GSNRScorer", False, "V_t, diagnostic (keep-score: neg_var_late)"),
    ("loss_late", "RecordScorer", False, "L_t, diagnostic (keep-score: neg_loss_late)"),
    ("ppl_conditioned", "IFDScorer", False, "PPL(response | prompt), diagnostic"),
    ("ppl_response", "IFDScorer", False, "PPL(response alone), diagnostic"),
]
SCORERS: dict[str, str] = {c: f"{d} [{s}; {'higher' if h else 'lower'} is better]" for c, s, h, d in _SPEC}
HIGHER_IS_BETTER: dict[str, bool] = {c: h for c, _, h, _ in _SPEC}
SCORER_OF: dict[str, str] = {c: s for c, s, _, _ in _SPEC}


def batch_ids(batch: dict[str, list], indices: list[int] | None, who: str) -> list[int]:
    """Row ids of a batch: its ``example_id`` column when present, else the map's indices."""
    if "example_id" in batch:
        return batch["example_id"]
    if indices is None:
        raise ValueError(f"{who} needs row positions or an example_id column: call "
                         f"dataset.map(scorer, batched=True, with_indices=True).")
    return indices


def _positions(batch: dict[str, list], indices: list[int] | None) -> list[int]:
    """Row positions for naming rows in errors (only): the map's indices, else ``0..B-1``."""
    return list(indices) if indices is not None else list(range(len(next(iter(batch.values())))))


class RecordScorer(GSNRScorer):
    """Ablations and the low-loss baseline from a `GradientRecord` (no model pass): `RECORD_COLUMNS`.

    ``raw_drop = G_s - G_t``, ``var_drop = (G_s - G_t) / (V_t + eps)``, ``loss_late = L_t`` (members'
    mean recorded loss at the late epoch), ``neg_loss_late = -L_t``, ``neg_grad_late = -G_t``,
    ``neg_var_late = -V_t``, ``cos_late = C_t`` (members' mean late cosine with their mean gradient),
    ``gsnr_dir = G-SNR * (1 + sign(G-SNR) * C_t)`` (formulas: `scoring.record_parts`). Rows are matched
    and verified exactly as `GSNRScorer` does; ``with_gsnr=True`` also appends its columns.
    """

    def __init__(self, record, early_epoch: int | None = None, late_epoch: int | None = None,
                 eps: float = 1e-8, verify: bool = True, with_gsnr: bool = False):
        super().__init__(record, early_epoch, late_epoch, eps, verify)
        self.with_gsnr = with_gsnr
        self.extra = record_parts(self.record.norms, self.record.losses, self.early_epoch, self.late_epoch, eps,
                                  self.record.cosines)

    def __call__(self, batch: dict[str, list], indices: list[int] | None = None) -> dict[str, list]:
        gsnr_columns = super().__call__(batch, indices)  # matches ids and verifies row hashes
        rows = self._rows(batch_ids(batch, indices, type(self).__name__))
        out = {name: self.extra[name][rows].tolist() for name in RECORD_COLUMNS}
        return {**gsnr_columns, **out} if self.with_gsnr else out


class RandomScorer:
    """``random``: a uniform ``[0, 1)`` value per row from ``(seed, example_id or position)``.

    `scoring.uniform_hash`, so the same whatever the batch size; top-k of it is a random subset.
    """

    def __init__(self, seed: int = 0):
        self.seed = seed

    def __call__(self, batch: dict[str, list], indices: list[int] | None = None) -> dict[str, list]:
        return {"random": uniform_hash(batch_ids(batch, indices, "RandomScorer"), self.seed).tolist()}


class LengthScorer:
    """``response_length``: the row's response length.

    With a tokenizer, the response tokens the proxy is trained on (``num_response_tokens`` of
    `formatting.tokenize_batch`: the rendered response, eos or end-of-turn tokens included, no
    truncation unless ``max_length``); without, whitespace-separated words of the raw response
    (alpaca ``output``, ``completion``, or every assistant turn's content).
    """

    def __init__(self, tokenizer=None, fmt: InstructionFormat | None = None, max_length: int | None = None):
        self.tokenizer, self.fmt, self.max_length = tokenizer, fmt or InstructionFormat(), max_length

    def __call__(self, batch: dict[str, list], indices: list[int] | None = None) -> dict[str, list]:
        fmt = self.fmt.resolve(list(batch))
        positions = _positions(batch, indices)
        if self.tokenizer is not None or fmt.kind == "tokenized":
            if self.tokenizer is not None:
                check_tokenizer(self.tokenizer, fmt.kind)
            tok = tokenize_batch(batch, positions, fmt=fmt, tokenizer=self.tokenizer,
                                 max_length=self.max_length or 2**62, used_columns=fmt.used_columns(list(batch)))
            return {"response_length": tok["num_response_tokens"]}
        return {"response_length": [len(t.split()) for t in _raw_responses(batch, fmt, positions)]}


def _raw_responses(batch, fmt: InstructionFormat, positions) -> list[str]:
    """The untemplated response text of each row (assistant turns joined by newlines)."""
    if fmt.kind in ("alpaca", "prompt_completion"):
        col = fmt.output_column if fmt.kind == "alpaca" else fmt.completion_column
        return [_text(v, col, i) for v, i in zip(batch[col], positions)]
    return ["\n".join(_text(m["content"]) for m in _messages(v, fmt.messages_column, i) if m["role"] == "assistant")
            for v, i in zip(batch[fmt.messages_column], positions)]


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


class DynamicsScorer(GSNRScorer):
    """The literature's keep-scores over the record (`dynamics.DYNAMICS_COLUMNS`, formulas there): Cartography's
    ``ambiguity`` and ``confidence``, the middle of the loss range (``mid_loss``, ``mid_loss_energy``,
    ``mid_base_loss``), ``reducible_loss``, ``least_learned`` and ``neg_energy_token``.

    Rank-based columns are ranked over *all* rows, so the whole ``base_loss`` and ``response_length`` columns
    are given up front, in the record's row order (None: their columns are NaN)::

        cols = read_columns(scored, ["base_loss", "response_length"])
        scored = scored.map(DynamicsScorer(record, cols["base_loss"], cols["response_length"]),
                            batched=True, with_indices=True)

    Rows are matched and verified as `GSNRScorer` does.
    """

    def __init__(self, record, base_loss=None, length=None, early_epoch: int | None = None,
                 late_epoch: int | None = None, verify: bool = True):
        super().__init__(record, early_epoch, late_epoch, verify=verify)
        self.dynamics = dynamics_parts(self.record.norms, self.record.losses, self.early_epoch, self.late_epoch,
                                       base_loss=base_loss, length=length)

    def __call__(self, batch: dict[str, list], indices: list[int] | None = None) -> dict[str, list]:
        super().__call__(batch, indices)  # matches ids and verifies row hashes
        rows = self._rows(batch_ids(batch, indices, type(self).__name__))
        return {name: self.dynamics[name][rows].tolist() for name in DYNAMICS_COLUMNS}


def superfiltering_select(dataset, fraction: float, score_column: str = "ifd"):
    """Superfiltering's rule on an IFD-scored dataset: drop rows with IFD >= 1 (and NaN), sort the
    rest by IFD descending (ties by position), keep the top ``round(fraction * len(dataset))``.

    Returns ``(selected_dataset, stats)``, the selection in the original row order; fewer rows than
    requested when too few have IFD < 1 (``num_selected`` < ``num_requested``).
    """
    if score_column not in dataset.column_names:
        raise ValueError(f"Column {score_column!r} is not in the dataset (columns: {dataset.column_names}); "
                         "score it with IFDScorer first.")
    ifd = np.asarray(read_columns(dataset, [score_column])[score_column], dtype=np.float64)
    nan = ~np.isfinite(ifd) & ~(ifd >= 1)  # NaN (and -inf, which a PPL ratio cannot be)
    high = ifd >= 1
    if (nan | high).all():
        raise ValueError(f"No row has a finite {score_column} < 1 ({int(high.sum())} >= 1, {int(nan.sum())} NaN): "
                         "Superfiltering keeps nothing; check the scoring model.")
    chosen, stats = top_indices(np.where(high, np.nan, ifd), fraction=fraction)
    stats = {"score_column": score_column, "fraction": fraction, "rule": "superfiltering", **stats,
             "num_ifd_ge_1_dropped": int(high.sum()), "num_nan_dropped": int(nan.sum())}
    return dataset.select(np.sort(chosen)), stats


