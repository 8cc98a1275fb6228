"""G-SNR and its parts against hand-computed arrays; the scorer and selection on datasets."""

from __future__ import annotations

import numpy as np
import pytest
from datasets import Dataset

from hf_gradfilter import GradientRecord, GSNRScorer, score_dataset, score_parts, select_top, top_indices
from hf_gradfilter.data.formatting import InstructionFormat, row_hashes

# 2 examples, M=3 members, E=2 epochs
NORMS = np.array([
    [[2.0, 1.0], [2.0, 1.0], [2.0, 1.0]],   # example 0: G_s = 4, G_t = 1, V_t = 0
    [[1.0, 1.0], [3.0, 2.0], [1.0, 3.0]],   # example 1: G_s = (1+9+1)/3, G_t = (1+4+9)/3
])


def test_parts_match_hand_computed_values():
    eps = 1e-3
    parts = score_parts(NORMS, 1, 2, eps=eps)
    g_s = np.array([4.0, 11 / 3])
    g_t = np.array([1.0, 14 / 3])
    v_t = np.array([0.0, np.var([1.0, 4.0, 9.0])])  # population variance of the squared late norms
    np.testing.assert_allclose(parts["grad_early"], g_s)
    np.testing.assert_allclose(parts["grad_late"], g_t)
    np.testing.assert_allclose(parts["ens_var_late"], v_t)
    np.testing.assert_allclose(parts["rel_drop"], (g_s - g_t) / (g_s + eps))
    np.testing.assert_allclose(parts["gsnr"], (g_s - g_t) / (g_s + eps) / (v_t + eps))
    assert parts["gsnr"][0] == pytest.approx(0.75 / 1.001 / 1e-3 * 1.0, rel=1e-3)


def test_nan_norms_give_nan_scores_and_bad_epochs_are_refused():
    norms = NORMS.copy()
    norms[1, 0, 1] = np.nan
    assert np.isnan(score_parts(norms)["gsnr"][1])
    with pytest.raises(ValueError, match="late_epoch=3 is outside the 2 recorded"):
        score_parts(NORMS, 1, 3)
    with pytest.raises(ValueError, match="early_epoch=2 comes after late_epoch=1"):
        score_parts(NORMS, 2, 1)


def make_record(dataset, norms):
    fmt = InstructionFormat(kind="alpaca")
    hashes = row_hashes(dataset[:], fmt.used_columns(dataset.column_names))
    return GradientRecord(norms=norms, losses=np.ones_like(norms), example_id=np.arange(len(dataset)),
                          row_hash=np.array(hashes), metadata={"format": fmt.__dict__})


@pytest.fixture
def rows():
    return Dataset.from_dict({"instruction": ["a", "b"], "input": ["", "x"], "output": ["1", "2"], "keep": [7, 8]})


def test_scorer_appends_columns_and_keeps_rows(rows, tmp_path):
    record = make_record(rows, NORMS)
    record.save(str(tmp_path))
    scored = rows.map(GSNRScorer(str(tmp_path)), batched=True, with_indices=True, batch_size=1)
    assert scored.column_names == rows.column_names + ["fit_rank", "gsnr", "grad_early", "grad_late", "rel_drop",
                                                        "ens_var_late"]
    assert scored["keep"] == [7, 8] and scored["instruction"] == ["a", "b"]
    np.testing.assert_allclose(scored["gsnr"], score_parts(NORMS)["gsnr"])


def test_scorer_follows_the_example_id_column_after_a_shuffle(rows):
    record = make_record(rows, NORMS)
    shuffled = rows.add_column("example_id", [0, 1]).select([1, 0])
    scored = shuffled.map(GSNRScorer(record), batched=True)
    np.testing.assert_allclose(scored["gsnr"], score_parts(NORMS)["gsnr"][[1, 0]])


def test_scorer_refuses_a_record_from_another_dataset(rows):
    record = make_record(rows, NORMS)
    changed = rows.map(lambda r: {"output": r["output"] + "!"})
    with pytest.raises(ValueError, match="content hash mismatch"):
        changed.map(GSNRScorer(record), batched=True, with_indices=True)
    with pytest.raises(ValueError, match="has 3 rows but the gradient record has 2"):
        score_dataset(Dataset.from_dict({k: v + v[:1] for k, v in rows[:].items()}), record)
    with pytest.raises(ValueError, match="with_indices=True"):
        rows.map(GSNRScorer(record), batched=True)


def test_record_roundtrips_through_safetensors(rows, tmp_path):
    record = make_record(rows, NORMS)
    path = record.save(str(tmp_path / "rec"))
    loaded = GradientRecord.load(path)
    np.testing.assert_array_equal(loaded.norms, record.norms)
    np.testing.assert_array_equal(loaded.row_hash, record.row_hash)
    assert loaded.metadata["fingerprint"] == record.fingerprint


def test_top_fraction_excludes_nan_and_breaks_ties_by_position():
    scores = [0.5, np.nan, 0.9, 0.5, np.inf, 0.1]
    chosen, stats = top_indices(scores, fraction=0.5)
    assert chosen.tolist() == [2, 0, 3]  # 0.9, then the tie 0.5/0.5 in row order
    assert stats["num_nonfinite_excluded"] == 2 and stats["num_selected"] == 3
    assert top_indices(scores, k=10)[0].tolist() == [2, 0, 3, 5]


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5])
def test_ratio_outside_zero_one_is_refused(fraction):
    with pytest.raises(ValueError, match=r"outside \(0, 1\]"):
        top_indices([1.0, 2.0], fraction=fraction)


def test_select_top_keeps_original_order_and_reports_counts():
    ds = Dataset.from_dict({"text": list("abcdef"), "score": [3.0, 1.0, 5.0, np.nan, 4.0, 2.0]})
    selected, stats = select_top(ds, "score", fraction=0.5)
    assert selected["text"] == ["a", "c", "e"]
    assert stats["num_nonfinite_excluded"] == 1
    with pytest.raises(ValueError, match="'nope' is not in the dataset"):
        select_top(ds, "nope", fraction=0.5)
