"""The literature's keep-scores (`scores.dynamics`) against hand-computed arrays, and `DynamicsScorer` through
`Dataset.map` equal to the pure functions over the whole record."""

from __future__ import annotations

import numpy as np
import pytest
from datasets import Dataset

from hf_gradfilter.proxy.record import GradientRecord
from hf_gradfilter.scores.dynamics import DYNAMICS_COLUMNS, dynamics_parts
from hf_gradfilter.scores.scorers import DynamicsScorer


def test_every_column_matches_a_hand_computed_value():
    # 3 rows, 2 members, 2 epochs
    losses = np.array([[[1.0, 0.5], [1.0, 0.5]],
                       [[2.0, 2.0], [3.0, 1.0]],
                       [[4.0, 3.0], [4.0, 3.0]]])
    norms = np.array([[[1.0, 1.0], [1.0, 1.0]],      # G_t = 1
                      [[1.0, 2.0], [1.0, 2.0]],      # G_t = 4
                      [[1.0, 3.0], [1.0, 3.0]]])     # G_t = 9
    base = np.array([1.0, 2.5, 5.0])
    length = np.array([10.0, 2.0, 0.0])
    parts = dynamics_parts(norms, losses, 1, 2, base_loss=base, length=length)
    p = np.exp(-losses).reshape(3, -1)
    np.testing.assert_allclose(parts["confidence"], p.mean(axis=1))
    np.testing.assert_allclose(parts["ambiguity"], p.std(axis=1))
    l_t = np.array([0.5, 1.5, 3.0])  # members' mean at epoch 2
    # ranks in [0, 1]: 0, 0.5, 1 -> -|r - 1/2| = -0.5, 0, -0.5 (the middle row first)
    np.testing.assert_allclose(parts["mid_loss"], [-0.5, 0.0, -0.5])
    np.testing.assert_allclose(parts["mid_loss_energy"], [-0.5, 0.0, -0.5])
    np.testing.assert_allclose(parts["mid_base_loss"], [-0.5, 0.0, -0.5])
    np.testing.assert_allclose(parts["reducible_loss"], base - l_t)
    np.testing.assert_allclose(parts["least_learned"], -(np.exp(base) - np.exp(l_t)) / np.exp(base))
    np.testing.assert_allclose(parts["neg_energy_token"], [-10.0, -8.0, np.nan])  # T = 0: NaN


def test_columns_needing_base_loss_or_length_are_nan_without_them():
    rng = np.random.default_rng(0)
    parts = dynamics_parts(rng.uniform(1, 2, (5, 2, 2)), rng.uniform(1, 2, (5, 2, 2)))
    for name in ("mid_base_loss", "reducible_loss", "least_learned", "neg_energy_token"):
        assert np.isnan(parts[name]).all(), name
    for name in ("ambiguity", "confidence", "mid_loss", "mid_loss_energy"):
        assert np.isfinite(parts[name]).all(), name


def test_an_epoch_never_recorded_is_left_out_of_ambiguity():
    losses = np.full((2, 2, 3), np.nan)
    losses[:, :, 1:] = [[[1.0, 2.0], [1.0, 2.0]], [[1.0, 1.0], [1.0, 1.0]]]
    parts = dynamics_parts(np.ones((2, 2, 3)), losses, 2, 3)
    assert parts["ambiguity"][1] == 0.0 and parts["ambiguity"][0] > 0


def test_a_base_loss_of_the_wrong_length_is_refused():
    with pytest.raises(ValueError, match="base_loss has shape"):
        dynamics_parts(np.ones((4, 2, 2)), np.ones((4, 2, 2)), base_loss=np.ones(3))


def test_the_scorer_through_map_equals_the_functions_over_the_whole_record():
    rng = np.random.default_rng(1)
    n = 23
    norms, losses = rng.uniform(0.5, 2, (n, 3, 2)), rng.uniform(0.5, 3, (n, 3, 2))
    base, length = rng.uniform(1, 3, n), rng.integers(1, 50, n).astype(float)
    record = GradientRecord(norms.astype(np.float32), losses.astype(np.float32), np.arange(n), np.arange(n))
    rows = Dataset.from_dict({"text": [f"row {i}" for i in range(n)]})
    scored = rows.map(DynamicsScorer(record, base, length, verify=False), batched=True, batch_size=5,
                      with_indices=True)
    want = dynamics_parts(record.norms, record.losses, base_loss=base, length=length)
    for name in DYNAMICS_COLUMNS:
        np.testing.assert_allclose(np.asarray(scored[name], dtype=float), want[name], err_msg=name)


def test_score_columns_gives_the_default_score_and_select_top_uses_it(tokenizer, demo_rows, tmp_path):
    """The Python path of the README: a trained trainer -> `score_columns` -> `select_top` by the default."""
    from hf_gradfilter import (
        DEFAULT_SCORE,
        GradFilterConfig,
        GradFilterTrainer,
        LengthScorer,
        score_columns,
        select_top,
    )
    from hf_gradfilter.demo.tiny import tiny_gpt2
    from hf_gradfilter.scores.formulas import grad_energy

    rows = Dataset.from_dict({k: demo_rows[k][:16] for k in ("instruction", "input", "output")})
    args = GradFilterConfig(output_dir=str(tmp_path), num_members=2, per_device_train_batch_size=4,
                            num_train_epochs=2, learning_rate=5e-3, lora_r=4, lora_alpha=8, max_length=512,
                            disable_tqdm=True, seed=0, use_cpu=True)
    trainer = GradFilterTrainer(tiny_gpt2(tokenizer, n_embd=32, n_head=2), args=args, train_dataset=rows,
                                processing_class=tokenizer)
    trainer.train()
    scored = score_columns(rows, trainer)
    assert DEFAULT_SCORE == "neg_energy_token"
    assert {"fit_rank", "gsnr", "neg_grad_late", "response_length", "base_loss", *DYNAMICS_COLUMNS} <= set(
        scored.column_names)
    # independently: response tokens by LengthScorer, G_t from the record's norms (rows in record order)
    length = np.asarray(rows.map(LengthScorer(tokenizer, max_length=512), batched=True,
                                 with_indices=True)["response_length"], dtype=float)
    g_t = grad_energy(trainer.record.norms.astype(np.float64), 2)
    np.testing.assert_allclose(scored["neg_energy_token"], -g_t * length, rtol=1e-6)
    want = -g_t * length
    assert np.isfinite(want).sum() >= 8  # rows without response tokens are never trained: NaN, never selected
    top, stats = select_top(scored, fraction=0.25)  # the default column
    assert stats["score_column"] == DEFAULT_SCORE
    assert sorted(top["neg_energy_token"]) == sorted(np.sort(want[np.isfinite(want)])[-4:].tolist())
