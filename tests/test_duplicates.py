"""Near-duplicates from gradient sketches: the blocked search equals a brute-force one, and on the demo set
it flags every exact repeat and matches most constructed paraphrases to their original (snapshot mode,
a tiny GPT-2 proxy).

The tiny proxy barely learns the demo in 2 epochs, so its gradients are dominated by the response:
at cosine 0.9 it also flags 67 of the 373 distinct demo rows (42 of them repeat an earlier row's exact
response, e.g. "There are 5 words."), at 0.98 30 (29). These are gradient near-duplicates, not text ones.
"""

from __future__ import annotations

import numpy as np
import pytest
from datasets import Dataset

from hf_gradfilter import GradFilterConfig, GradFilterTrainer, near_duplicate_ids, near_duplicates
from hf_gradfilter.demo.tiny import tiny_gpt2
from hf_gradfilter.scores.duplicates import nearest_earlier, record_sketches


def brute_force(x: np.ndarray, threshold: float) -> np.ndarray:
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    out = np.full(len(x), -1)
    for i in range(1, len(x)):
        cos = u[:i] @ u[i]
        if cos.max() >= threshold:
            out[i] = int(np.argmax(cos))
    return out


def test_blocked_search_equals_brute_force_across_block_boundaries():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((23, 8)).astype(np.float32)
    for i, j in [(5, 2), (11, 2), (20, 11)]:  # scaled copies with a little noise; 20 copies a copy
        x[i] = 3 * x[j] + 0.01 * rng.standard_normal(8).astype(np.float32)
    want = brute_force(x, 0.99)
    assert want[5] == 2 and want[11] in (2, 5) and want[20] == 11  # the most similar earlier row
    for block in (1, 4, 7, 100):
        np.testing.assert_array_equal(near_duplicates(x, 0.99, block=block), want)


def test_missing_or_zero_sketches_are_never_flagged_nor_matched():
    x = np.array([[1.0, 0.0], [np.nan, np.nan], [0.0, 0.0], [1.0, 0.0], [2.0, 1e-4]])
    np.testing.assert_array_equal(near_duplicates(x, 0.99), [-1, -1, -1, 0, 0])  # row 4: rows 0 and 3 tie


def test_nearest_earlier_gives_the_most_similar_earlier_row_and_its_cosine():
    x = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0], [-1.0, -0.1], [1.0, 1.0]])
    index, cos = nearest_earlier(x)
    np.testing.assert_array_equal(index, [-1, -1, 0, 2, 0])  # rows 2, 3: never the zero row 1; row 4: a tie
    np.testing.assert_allclose(cos, [np.nan, np.nan, 0.0, -0.1 / np.sqrt(1.01), 1 / np.sqrt(2)], rtol=1e-6)


def test_members_are_averaged_over_those_that_recorded_the_row():
    x = np.array([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [np.nan, np.nan]], [[0.0, 1.0], [1.0, 0.0]]])
    np.testing.assert_array_equal(near_duplicates(x, 0.999), [-1, 0, 0])


@pytest.mark.parametrize("threshold", [0.0, -0.5, 1.5])
def test_a_threshold_outside_the_cosine_range_is_refused(threshold):
    with pytest.raises(ValueError, match="threshold"):
        near_duplicates(np.ones((2, 2)), threshold)


@pytest.fixture(scope="module")
def demo_with_paraphrases(demo_rows, tokenizer, tmp_path_factory):
    """The 400 demo rows, then a paraphrase of every 10th of the first 200 (same input and response, the
    instruction reworded); scored in snapshot mode with 256-dim sketches."""
    rows = [{k: r[k] for k in ("instruction", "input", "output")} for r in demo_rows]
    paraphrases = {len(rows) + n: i for n, i in enumerate(range(0, 200, 10))}
    rows += [dict(rows[i], instruction="Please answer this: " + rows[i]["instruction"]) for i in paraphrases.values()]
    args = GradFilterConfig(output_dir=str(tmp_path_factory.mktemp("dup")), num_members=2, num_train_epochs=2,
                            per_device_train_batch_size=8, per_device_eval_batch_size=8, learning_rate=5e-3,
                            lora_r=4, lora_alpha=8, max_length=256, disable_tqdm=True, seed=3, use_cpu=True,
                            record_mode="snapshot", sketch_dim=256)
    trainer = GradFilterTrainer(tiny_gpt2(tokenizer, n_embd=32, n_head=2), args=args,
                                train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    trainer.train()
    return rows, paraphrases, trainer.record


@pytest.mark.slow
def test_every_exact_repeat_of_the_demo_set_is_flagged(demo_with_paraphrases):
    rows, _, record = demo_with_paraphrases
    first, repeats = {}, []
    for i, row in enumerate(rows):
        key = tuple(row.values())
        (repeats.append(i) if key in first else first.setdefault(key, i))
    assert len(repeats) >= 20  # the demo's small vocabularies repeat rows
    flags = near_duplicate_ids(record, threshold=0.98)
    assert (flags[repeats] >= 0).all()
    assert all(rows[flags[i]] == rows[i] for i in repeats)  # matched to a copy
    u = record_sketches(record).mean(axis=1)
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    assert min(u[i] @ u[first[tuple(rows[i].values())]] for i in repeats) > 0.9999  # same weights, same gradient


@pytest.mark.slow
def test_most_paraphrases_are_matched_to_their_original(demo_with_paraphrases):
    rows, paraphrases, record = demo_with_paraphrases
    nearest = near_duplicate_ids(record, threshold=1e-6)  # the most similar earlier row, whatever its cosine
    assert sum(nearest[p] == i for p, i in paraphrases.items()) >= 0.75 * len(paraphrases)  # 17 of 20 here
    flags = near_duplicate_ids(record, threshold=0.9)
    assert sum(flags[p] == i for p, i in paraphrases.items()) >= 0.5 * len(paraphrases)  # 13 of 20 here


@pytest.mark.slow
def test_score_with_sketches_then_select_drops_the_demo_repeats(tmp_path, capsys):
    from datasets import load_from_disk
    from test_cli import TINY

    from hf_gradfilter.cli import main
    from hf_gradfilter.demo.data import make_demo_dataset

    out = tmp_path / "s"
    demo = ["--demo_rows", "300", "--demo_pretrain_rows", "200", "--demo_pretrain_epochs", "1"]
    assert main(["score", "--demo", "--output_dir", str(out), "--record_mode", "snapshot", "--sketch_dim", "256"]
                + demo + TINY) == 0
    scored = load_from_disk(str(out / "scored"))
    rows = [tuple(r[k] for k in ("instruction", "input", "output")) for r in make_demo_dataset(num_rows=300)]
    repeats = [i for i, r in enumerate(rows) if r in rows[:i]]
    assert repeats  # the demo's small vocabularies repeat rows
    cos = np.array(scored["sketch_nearest_cos"], dtype=float)
    nearest = np.array(scored["sketch_nearest_id"])
    assert (cos[repeats] >= 0.98).all() and all(rows[nearest[i]] == rows[i] for i in repeats)
    assert nearest[0] == -1 and np.isnan(cos[0])
    assert f"Near-duplicates (gradient-sketch cosine >= 0.98 with an earlier row): {int((cos >= 0.98).sum())}" in \
        capsys.readouterr().out
    assert main(["select", "--scored", str(out / "scored"), "--ratio", "1.0", "--drop_near_duplicates", "0.98"]) == 0
    assert f"Dropped {int((cos >= 0.98).sum())} near-duplicate rows" in capsys.readouterr().out
    kept = load_from_disk(str(out / "selected_neg_energy_token_top100pct_nodup0.98"))
    assert len(kept) == 300 - (cos >= 0.98).sum() and len(set(zip(kept["instruction"], kept["input"],
                                                                   kept["output"]))) == len(kept)
    # a 10% cut keeps 10% of all 300 rows (the count a random baseline gets), none of them a near-duplicate
    assert main(["select", "--scored", str(out / "scored"), "--ratio", "0.1", "--drop_near_duplicates", "0.98"]) == 0
    kept = load_from_disk(str(out / "selected_neg_energy_token_top10pct_nodup0.98"))
    assert len(kept) == 30 and not (np.asarray(kept["sketch_nearest_cos"], dtype=float) >= 0.98).any()
    assert kept.column_names == scored.column_names


@pytest.mark.slow
def test_drop_near_duplicates_needs_a_record_with_sketches(tmp_path, capsys):
    from hf_gradfilter.selection.select import drop_near_duplicates

    with pytest.raises(ValueError, match="--sketch_dim"):
        drop_near_duplicates(Dataset.from_dict({"x": [1, 2]}), 0.98)
    with pytest.raises(ValueError, match="cosine in"):
        drop_near_duplicates(Dataset.from_dict({"sketch_nearest_cos": [0.5, 0.99]}), 1.5)


def test_near_duplicates_are_never_selected_but_still_counted():
    from hf_gradfilter.selection.select import drop_near_duplicates

    rows = Dataset.from_dict({"neg_energy_token": [0.9, 0.8, 0.7, 0.6],
                              "sketch_nearest_cos": [float("nan"), 0.99, 0.5, 0.2]})
    masked, n = drop_near_duplicates(rows, 0.98)
    assert n == 1 and len(masked) == 4 and masked.column_names == rows.column_names
    scores = np.asarray(masked["neg_energy_token"], dtype=float)
    assert np.isnan(scores[1]) and scores[[0, 2, 3]].tolist() == [0.9, 0.7, 0.6]
