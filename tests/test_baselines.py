"""Baseline scorers: IFD against a one-example-at-a-time reference, Superfiltering's rule, random,
length and record-based scores against hand-computed values; every scorer keeps rows and columns."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from datasets import Dataset, concatenate_datasets

from hf_gradfilter.data.formatting import ALPACA_PROMPT, ALPACA_PROMPT_WITH_INPUT, InstructionFormat, row_hashes
from hf_gradfilter.demo.tiny import tiny_gpt2
from hf_gradfilter.proxy.record import GradientRecord
from hf_gradfilter.scores.dynamics import DYNAMICS_COLUMNS
from hf_gradfilter.scores.formulas import RECORD_COLUMNS, SCORE_COLUMNS
from hf_gradfilter.scores.ifd import BaseLossScorer, IFDScorer
from hf_gradfilter.scores.scorers import (
    HIGHER_IS_BETTER,
    SCORER_OF,
    SCORERS,
    LengthScorer,
    RandomScorer,
    RecordScorer,
)
from hf_gradfilter.selection.superfiltering import superfiltering_select


@pytest.fixture(scope="module")
def model(tokenizer):
    """A tiny GPT-2 with large random weights, so its predictions are far from uniform (a wrong target
    position would change the perplexities)."""
    m = tiny_gpt2(tokenizer, n_embd=32, n_head=2)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m


@pytest.fixture
def rows(alpaca_small):
    """10 demo rows of varied lengths (with and without input) + one empty response, plus a passive column."""
    empty = Dataset.from_dict({"instruction": ["Say nothing."], "input": [""], "output": ["  "]})
    ds = concatenate_datasets([alpaca_small, empty])
    return ds.add_column("keep", list(range(100, 100 + len(ds))))


def reference_ppl(model, tokenizer, row) -> tuple[float, float]:
    """(PPL(response | prompt), PPL(response alone)) for one row: plain forwards, hand-written NLL."""
    template = ALPACA_PROMPT_WITH_INPUT if row["input"].strip() else ALPACA_PROMPT
    prompt = template.format(instruction=row["instruction"], input=row["input"])
    response = row["output"] + tokenizer.eos_token
    p_ids, r_ids = tokenizer(prompt)["input_ids"], tokenizer(response)["input_ids"]
    assert tokenizer(prompt + response)["input_ids"] == p_ids + r_ids  # the boundary is a token boundary

    def ppl(ids, first_target):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
        nll = [-logp[t - 1, ids[t]].item() for t in range(first_target, len(ids))]
        return math.exp(sum(nll) / len(nll))

    return ppl(p_ids + r_ids, len(p_ids)), ppl(r_ids, 1)


def test_ifd_matches_a_one_by_one_reference_with_padding(model, tokenizer, rows):
    model.train()
    scorer = IFDScorer(model, tokenizer, batch_size=3, max_length=512)
    scored = rows.map(scorer, batched=True, with_indices=True, batch_size=5)
    assert model.training  # the mode is restored
    cond, alone = zip(*(reference_ppl(model, tokenizer, r) for r in rows.select(range(10))))
    np.testing.assert_allclose(scored["ppl_conditioned"][:10], cond, rtol=1e-4)
    np.testing.assert_allclose(scored["ppl_response"][:10], alone, rtol=1e-4)
    np.testing.assert_allclose(scored["ifd"][:10], np.divide(cond, alone), rtol=1e-4)
    assert np.std(np.log(cond)) > 0.1  # the model is far from uniform: the check has teeth
    assert all(math.isnan(scored[c][10]) for c in ("ifd", "ppl_conditioned", "ppl_response"))  # empty response
    assert scored["keep"] == rows["keep"] and scored["output"] == rows["output"]


def test_ifd_runs_on_conversations(model, tokenizer):
    rows = Dataset.from_dict({"messages": [
        [{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "2 plus 2 is 4."}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "hello"},
         {"role": "user", "content": "Sort 3 1 2."}, {"role": "assistant", "content": "1 2 3"}],
    ]})
    scored = rows.map(IFDScorer(model, tokenizer, batch_size=2), batched=True, with_indices=True)
    assert np.isfinite(scored["ifd"]).all() and np.all(np.array(scored["ppl_response"]) > 1)


def test_superfiltering_drops_ifd_at_least_one_and_nan_and_keeps_the_highest():
    ifd = [0.5, 1.0, float("nan"), 0.9, 1.5, 0.7, 0.9, 0.2]
    ds = Dataset.from_dict({"ifd": ifd, "row": list(range(8))})
    selected, stats = superfiltering_select(ds, 0.5)  # k = 4 of the 5 rows with IFD < 1
    assert selected["row"] == [0, 3, 5, 6]  # 0.9, 0.9 (ties by position), 0.7, 0.5; original order
    assert stats["num_ifd_ge_1_dropped"] == 2 and stats["num_nan_dropped"] == 1
    assert stats["num_requested"] == 4 and stats["num_selected"] == 4
    selected, stats = superfiltering_select(ds, 1.0)
    assert selected["row"] == [0, 3, 5, 6, 7] and stats["num_selected"] == 5 < stats["num_requested"]
    with pytest.raises(ValueError, match="keeps nothing"):
        superfiltering_select(Dataset.from_dict({"ifd": [1.0, 2.0, float("nan")]}), 0.5)


def test_random_scorer_is_reproducible_across_batching_and_follows_example_ids():
    ds = Dataset.from_dict({"x": list(range(50))})
    runs = [ds.map(RandomScorer(seed=3), batched=True, with_indices=True, batch_size=b)["random"] for b in (1, 7, 50)]
    assert runs[0] == runs[1] == runs[2]
    values = np.array(runs[0])
    assert ((values >= 0) & (values < 1)).all() and len(set(values)) == 50
    other = np.array(ds.map(RandomScorer(seed=4), batched=True, with_indices=True)["random"])
    assert not np.allclose(values, other)
    shuffled = ds.add_column("example_id", list(range(50))).select(range(49, -1, -1))
    assert shuffled.map(RandomScorer(seed=3), batched=True)["random"] == runs[0][::-1]


def test_length_scorer_counts_response_tokens_or_words(tokenizer, rows):
    with_tok = rows.map(LengthScorer(tokenizer), batched=True, with_indices=True, batch_size=4)["response_length"]
    expected = [len(tokenizer(o + tokenizer.eos_token)["input_ids"]) for o in rows["output"][:10]]
    assert with_tok == expected + [0]  # the empty response has no token
    words = rows.map(LengthScorer(), batched=True, with_indices=True)["response_length"]
    assert words == [len(o.split()) for o in rows["output"]]
    turns = [{"role": "user", "content": "a b"}, {"role": "assistant", "content": "c d e"},
             {"role": "user", "content": "f"}, {"role": "assistant", "content": "g"}]
    convo = Dataset.from_dict({"messages": [turns]})
    assert convo.map(LengthScorer(), batched=True)["response_length"] == [4]


# 3 examples, M=3 members, E=2 epochs; example 2 was never trained (NaN)
NORMS = np.array([
    [[2.0, 1.0], [2.0, 1.0], [2.0, 1.0]],
    [[1.0, 1.0], [3.0, 2.0], [1.0, 3.0]],
    [[np.nan, np.nan]] * 3,
])
LOSSES = np.array([
    [[3.0, 2.0], [3.0, 1.0], [3.0, 3.0]],
    [[5.0, 4.0], [5.0, 5.0], [5.0, 6.5]],
    [[np.nan, np.nan]] * 3,
])


@pytest.fixture
def record_rows():
    return Dataset.from_dict({"instruction": ["a", "b", "c"], "input": ["", "x", ""], "output": ["1", "2", ""],
                              "keep": [7, 8, 9]})


def make_record(dataset):
    fmt = InstructionFormat(kind="alpaca")
    hashes = row_hashes(dataset[:], fmt.used_columns(dataset.column_names))
    return GradientRecord(norms=NORMS, losses=LOSSES, example_id=np.arange(len(dataset)),
                          row_hash=np.array(hashes), metadata={"format": fmt.__dict__})


def test_record_scorer_columns_match_hand_computed_values(record_rows):
    eps = 1e-3
    scored = record_rows.map(RecordScorer(make_record(record_rows), eps=eps), batched=True, with_indices=True,
                             batch_size=2)
    assert scored.column_names == record_rows.column_names + list(RECORD_COLUMNS)
    g_s, g_t = np.array([4.0, 11 / 3]), np.array([1.0, 14 / 3])
    v_t = np.array([0.0, np.var([1.0, 4.0, 9.0])])
    l_t = np.array([2.0, 15.5 / 3])
    expected = {"raw_drop": g_s - g_t, "var_drop": (g_s - g_t) / (v_t + eps), "loss_late": l_t,
                "neg_loss_late": -l_t, "neg_grad_late": -g_t, "neg_var_late": -v_t}
    for name, value in expected.items():
        np.testing.assert_allclose(scored[name][:2], value, err_msg=name)
        assert math.isnan(scored[name][2]), name
    assert scored["keep"] == [7, 8, 9]


def test_record_scorer_matches_rows_like_gsnr_scorer(record_rows):
    record = make_record(record_rows)
    plain = record_rows.map(RecordScorer(record, with_gsnr=True), batched=True, with_indices=True)
    assert set(SCORE_COLUMNS) <= set(plain.column_names)
    shuffled = record_rows.add_column("example_id", [0, 1, 2]).select([1, 0])
    scored = shuffled.map(RecordScorer(record), batched=True)
    assert scored["raw_drop"] == [plain["raw_drop"][1], plain["raw_drop"][0]]
    changed = record_rows.map(lambda r: {"output": r["output"] + "!"})
    with pytest.raises(ValueError, match="content hash mismatch"):
        changed.map(RecordScorer(record), batched=True, with_indices=True)


def test_every_scorer_keeps_rows_and_columns_and_is_registered(model, tokenizer, rows):
    scorers = {("ifd", "ppl_conditioned", "ppl_response"): IFDScorer(model, tokenizer, batch_size=4),
               ("base_loss",): BaseLossScorer(model, tokenizer, batch_size=4),
               ("random",): RandomScorer(), ("response_length",): LengthScorer(tokenizer)}
    for columns, scorer in scorers.items():
        scored = rows.map(scorer, batched=True, with_indices=True, batch_size=4)
        assert scored.column_names == rows.column_names + list(columns)
        assert scored.select_columns(rows.column_names).to_dict() == rows.to_dict()
        assert all(SCORER_OF[c] == type(scorer).__name__ for c in columns)
    produced = {"fit_rank", *SCORE_COLUMNS, *RECORD_COLUMNS, *DYNAMICS_COLUMNS, "ifd", "ppl_conditioned",
                "ppl_response", "base_loss", "random", "response_length"}
    assert set(SCORERS) == produced == set(HIGHER_IS_BETTER)
    assert not HIGHER_IS_BETTER["loss_late"] and HIGHER_IS_BETTER["neg_loss_late"]
