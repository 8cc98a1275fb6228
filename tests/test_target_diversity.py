"""Target-aware and diversity-aware selection from gradient sketches: the alignment formula against loops
over hand-made arrays, the target rows' sketches against a batch-size-1 reference at the final weights,
the proxy loaded back from a score run's folder, clustering, and `select --target_dataset` /
`--diversity_clusters` end to end on the demo."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from datasets import Dataset, load_from_disk
from test_norms_exact import CaptureLora, config, make_model
from test_sketch_record import DIM, assert_sketches, reference_sketches

from hf_gradfilter import GradFilterTrainer, sketch_clusters, target_alignment
from hf_gradfilter.proxy.probe import load_proxy, sketch_rows

pytestmark = pytest.mark.slow  # trains the demo proxy and runs select/run: `pytest -m 'not slow'` skips it


def test_target_alignment_is_the_member_mean_of_the_mean_cosine_with_the_target_rows():
    rng = np.random.default_rng(0)
    rows, target = rng.normal(size=(5, 3, 4)), rng.normal(size=(6, 3, 4))
    rows[1, 2] = np.nan  # member 2 did not record row 1: the mean over members 0 and 1
    target[0, 1] = np.nan  # member 1 lacks target row 0: its mean over the other 5 target rows
    want = np.empty(5)
    for n in range(5):
        per_member = []
        for m in range(3):
            if np.isnan(rows[n, m]).any():
                continue
            cos = [rows[n, m] @ t / np.linalg.norm(rows[n, m]) / np.linalg.norm(t)
                   for t in target[:, m] if not np.isnan(t).any()]
            per_member.append(np.mean(cos))
        want[n] = np.mean(per_member)
    np.testing.assert_allclose(target_alignment(rows, target), want, rtol=1e-12)
    np.testing.assert_allclose(target_alignment(rows, target, block=2), want, rtol=1e-12)  # blocks agree
    rows[3] = np.nan
    assert np.isnan(target_alignment(rows, target)[3])


def test_target_alignment_refuses_mismatched_or_empty_target_sketches():
    with pytest.raises(ValueError, match="same proxy"):
        target_alignment(np.ones((2, 3, 4)), np.ones((1, 2, 4)))
    with pytest.raises(ValueError, match="no usable gradient sketch|No target row"):
        target_alignment(np.ones((2, 3, 4)), np.full((2, 3, 4), np.nan))


def test_clusters_recover_well_separated_gradient_directions_and_skip_rows_without_a_sketch():
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(4, 32))
    truth = np.repeat(np.arange(4), 25)
    sketches = (centers[truth][:, None, :] * rng.uniform(0.5, 2, size=(100, 1, 1))  # scale: only direction counts
                + 0.05 * rng.normal(size=(100, 2, 32)))  # (N, M=2, d)
    sketches[7] = np.nan
    labels = sketch_clusters(sketches, 4, seed=0)
    assert labels[7] == -1
    ok = np.arange(100) != 7
    # the same partition up to the names of the clusters
    assert len({(t, c) for t, c in zip(truth[ok], labels[ok])}) == 4 and set(labels[ok]) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="integer >= 2"):
        sketch_clusters(sketches, 1)
    with pytest.raises(ValueError, match="more than the 99 rows"):
        sketch_clusters(sketches, 100)


@pytest.fixture(scope="module")
def trained(tokenizer, demo_rows, tmp_path_factory):
    """A tiny Llama proxy trained 2 epochs in snapshot mode with sketches, its base model saved (for loading
    back), the final weights captured."""
    tmp = tmp_path_factory.mktemp("probe")
    rows = Dataset.from_dict({k: demo_rows.select(range(10))[k] for k in ("instruction", "input", "output")})
    base = make_model("llama", tokenizer)
    base.save_pretrained(tmp / "base")
    from transformers import AutoModelForCausalLM

    capture = CaptureLora()
    args = config(tmp / "out", record_mode="snapshot", sketch_dim=DIM,
                  lora_target_modules=["q_proj", "v_proj", "down_proj"])
    trainer = GradFilterTrainer(AutoModelForCausalLM.from_pretrained(tmp / "base"), args=args, train_dataset=rows,
                                processing_class=tokenizer, callbacks=[capture])
    trainer.train()
    trainer.save_model()
    return trainer, capture, rows, tmp


def test_target_rows_are_sketched_at_the_final_weights_exactly(trained):
    trainer, capture, rows, _ = trained
    got = sketch_rows(trainer, rows, batch_size=4)  # batches of 4 of 10 rows of mixed lengths: padding
    assert got.shape == (10, 2, DIM)
    ids = np.arange(10)
    for m in range(2):
        assert_sketches(got[:, m], reference_sketches(trainer, capture.epoch_ends[1], m, ids))
        # and equal to the record's own snapshot of the last epoch, taken at the same weights
        assert_sketches(got[:, m], trainer.record.sketches[:, m, 0])


def test_target_rows_in_another_format_and_rows_without_a_response(trained):
    trainer, _, rows, _ = trained
    target = Dataset.from_dict({"prompt": ["Say hi.", "Count to three."], "completion": ["hi", ""]})
    got = sketch_rows(trainer, target)
    assert np.isfinite(got[0]).all() and np.isnan(got[1]).all()  # the empty response has no gradient


def test_the_proxy_loaded_back_from_its_folder_gives_the_same_target_sketches(trained):
    trainer, _, rows, tmp = trained
    want = sketch_rows(trainer, rows)
    loaded = load_proxy(str(tmp / "out"), rows)  # base model: the path recorded at scoring
    np.testing.assert_allclose(sketch_rows(loaded, rows), want, rtol=1e-5, atol=1e-7 * np.abs(want).max())
    with pytest.raises(FileNotFoundError, match="--proxy_model"):
        load_proxy(str(tmp / "out"), rows, base_model=str(tmp / "nowhere" / "model"))
    with pytest.raises(FileNotFoundError, match="gradfilter_config.json"):
        load_proxy(str(tmp), rows)


@pytest.fixture(scope="module")
def scored_demo(tmp_path_factory):
    """`hf-gradfilter score --demo --sketch_dim 256` on 300 demo rows, and 30 clean rows of one task as a
    target dataset (another draw of the demo tasks)."""
    from test_cli import TINY

    from hf_gradfilter.cli import main
    from hf_gradfilter.demo.data import make_demo_dataset

    tmp = tmp_path_factory.mktemp("scored_demo")
    demo = ["--demo_rows", "300", "--demo_pretrain_rows", "200", "--demo_pretrain_epochs", "1"]
    assert main(["score", "--demo", "--output_dir", str(tmp / "s"), "--record_mode", "snapshot",
                 "--sketch_dim", "256"] + demo + TINY) == 0
    other = make_demo_dataset(num_rows=400, corruption_rate=0.0, seed=777)
    target = other.filter(lambda r: r["task"] == "antonym").select_columns(["instruction", "input", "output"])
    target.to_json(str(tmp / "target.jsonl"))
    return tmp


def test_select_for_a_target_dataset_keeps_rows_of_the_target_task(scored_demo, capsys):
    from hf_gradfilter.cli import main

    s = scored_demo / "s"
    assert main(["select", "--scored", str(s / "scored"), "--ratio", "0.1",
                 "--target_dataset", str(scored_demo / "target.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "by 'target_alignment'" in out and "Target alignment against" in out
    kept, scored = load_from_disk(str(s / "selected_target_alignment_top10pct")), load_from_disk(str(s / "scored"))
    assert len(kept) == 30
    base_rate = np.mean(np.asarray(scored["task"]) == "antonym")  # 8% of the demo rows
    share = np.mean(np.asarray(kept["task"]) == "antonym")
    assert share >= 3 * base_rate, (share, base_rate)  # 40% with this tiny proxy
    # the column is there to rank by any other way, and another score column can still be asked for
    assert "target_alignment" in kept.column_names
    assert main(["select", "--scored", str(s / "scored"), "--ratio", "0.1", "--score_column", "fit_rank",
                 "--target_dataset", str(scored_demo / "target.jsonl")]) == 0
    assert "by 'fit_rank'" in capsys.readouterr().out


def test_select_by_sketch_clusters_keeps_the_top_of_every_cluster(scored_demo, capsys):
    from hf_gradfilter.cli import main

    s = scored_demo / "s"
    # ratio 1: every row, with its cluster (same seed, same k-means as below)
    assert main(["select", "--scored", str(s / "scored"), "--ratio", "1.0", "--diversity_clusters", "8",
                 "--output", str(s / "all_clusters")]) == 0
    every = load_from_disk(str(s / "all_clusters"))
    assert main(["select", "--scored", str(s / "scored"), "--ratio", "0.1", "--diversity_clusters", "8"]) == 0
    assert "Rows kept per 'sketch_cluster' (per_group)" in capsys.readouterr().out
    kept = load_from_disk(str(s / "selected_neg_energy_token_per_sketch_cluster_top10pct"))
    clusters, fit = np.asarray(every["sketch_cluster"]), np.asarray(every["neg_energy_token"], dtype=float)
    assert set(clusters) == set(range(8))
    key = lambda r: (r["instruction"], r["input"], r["output"])  # noqa: E731
    want = []
    for c in range(8):  # each cluster keeps round(0.1 * n_c), at least 1, of its rows: its best by the default score
        rows = np.flatnonzero(clusters == c)
        want += [key(every[int(i)]) for i in rows[np.lexsort((rows, -fit[rows]))][:max(1, round(0.1 * len(rows)))]]
    assert Counter(map(key, kept)) == Counter(want)
    assert len(kept) == sum(max(1, round(0.1 * n)) for n in np.bincount(clusters))
    # with a group column as well: the top of every (task, cluster) cell, none of them left out
    assert main(["select", "--scored", str(s / "scored"), "--ratio", "0.1", "--diversity_clusters", "8",
                 "--group_column", "task", "--group_mode", "per_group", "--output", str(s / "cells")]) == 0
    kept = load_from_disk(str(s / "cells"))
    cells = Counter(zip(every["task"], every["sketch_cluster"]))
    assert Counter(zip(kept["task"], kept["sketch_cluster"])) == {c: max(1, round(0.1 * n)) for c, n in cells.items()}


def test_embedding_features_rank_by_the_target_rows_mean_embedding_and_need_no_sketches(scored_demo, capsys):
    import shutil

    from hf_gradfilter.cli import main
    from hf_gradfilter.data.io import load_rows
    from hf_gradfilter.proxy.embeddings import embed_rows

    s = scored_demo / "s"
    plain = scored_demo / "plain"  # the same score run as if it had recorded no sketches
    if not plain.exists():
        shutil.copytree(s, plain)
        meta = json.loads((plain / "gradfilter_config.json").read_text())
        meta.pop("sketch")
        (plain / "gradfilter_config.json").write_text(json.dumps(meta))
    assert main(["select", "--scored", str(plain / "scored"), "--ratio", "0.1", "--features", "embedding",
                 "--target_dataset", str(scored_demo / "target.jsonl")]) == 0
    assert "Target alignment (embeddings) against 33 of 33 target rows" in capsys.readouterr().out
    kept = load_from_disk(str(plain / "selected_target_alignment_top10pct_emb"))
    scored = load_from_disk(str(plain / "scored"))
    # the column is the cosine of each row's unit embedding with the mean of the target rows' unit embeddings
    trainer = load_proxy(str(plain), scored, need_sketches=False)
    rows, target = embed_rows(trainer, scored), embed_rows(trainer, load_rows(str(scored_demo / "target.jsonl")))
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    want = unit(rows) @ unit(target).mean(axis=0)
    top = np.sort(np.argsort(-want, kind="stable")[:30])
    key = lambda r: (r["instruction"], r["input"], r["output"])  # noqa: E731
    assert sorted(map(key, kept)) == sorted(key(scored[int(i)]) for i in top)
    np.testing.assert_allclose(kept["target_alignment"], want[top], rtol=1e-4, atol=1e-5)
    base_rate = np.mean(np.asarray(scored["task"]) == "antonym")
    assert np.mean(np.asarray(kept["task"]) == "antonym") > base_rate  # it does find the target's task
    # clusters of embeddings: the top of every cluster
    assert main(["select", "--scored", str(plain / "scored"), "--ratio", "0.1", "--features", "embedding",
                 "--diversity_clusters", "6"]) == 0
    kept = load_from_disk(str(plain / "selected_neg_energy_token_per_sketch_cluster_top10pct_emb"))
    assert set(kept["sketch_cluster"]) == set(range(6))
    assert main(["select", "--scored", str(plain / "scored"), "--features", "pixels",
                 "--diversity_clusters", "6"]) == 2
    assert "features='pixels': use one of sketch, embedding" in capsys.readouterr().err


def test_a_subset_or_reordered_copy_of_the_scored_rows_is_refused_not_misaligned(scored_demo, capsys):
    from hf_gradfilter.cli import main

    s = scored_demo / "s"
    scored = load_from_disk(str(s / "scored"))
    scored.select(range(100)).save_to_disk(str(s / "subset"))
    scored.select(list(range(1, len(scored))) + [0]).save_to_disk(str(s / "reordered"))
    for name, message in (("subset", "no example_id column"), ("reordered", "content hash mismatch")):
        assert main(["select", "--scored", str(s / name), "--diversity_clusters", "4", "--proxy_dir", str(s)]) == 2
        assert message in capsys.readouterr().err


def test_sketch_options_give_clear_errors(scored_demo, tmp_path, capsys):
    from hf_gradfilter.cli import main

    s = scored_demo / "s"
    assert main(["select", "--scored", str(s / "scored"), "--diversity_clusters", "8", "--group_mode", "quota",
                 "--group_column", "task", "--quota", "add=3"]) == 2
    assert "takes no quotas" in capsys.readouterr().err
    Dataset.from_dict({"neg_energy_token": [1.0, 2.0]}).save_to_disk(str(tmp_path / "scored"))
    assert main(["select", "--scored", str(tmp_path / "scored"), "--diversity_clusters", "2"]) == 2
    assert "--proxy_dir" in capsys.readouterr().err
    meta = json.loads((s / "gradfilter_config.json").read_text())
    assert meta["sketch"]["dim"] == 256


def test_run_selects_for_a_target_by_clusters_without_near_duplicates_and_reports_and_publishes_it(
        scored_demo, tmp_path, monkeypatch, capsys):
    from test_run import TINY_RUN

    from hf_gradfilter import hub
    from hf_gradfilter.cli import main

    monkeypatch.setenv("HF_GRADFILTER_CACHE", str(tmp_path / "cache"))
    pushed = {}
    monkeypatch.setattr(hub, "push_dataset_repo", lambda repo, scored, selected, settings, **kw: pushed.update(
        scored=scored, selected=selected, settings=settings) or "https://hf.co/d/commit/1")
    out = tmp_path / "run"
    flags = [f"--{k}={v}" if not isinstance(v, list) else f"--{k}={v[0]}" for k, v in TINY_RUN.items()]
    sketch_flags = ["--output_dir", str(out), "--skip_finetune", "true", "--sketch_dim", "256",
                    "--record_mode", "snapshot", "--target_dataset", str(scored_demo / "target.jsonl"),
                    "--diversity_clusters", "4", "--drop_near_duplicates", "0.98", "--push_dataset_id", "me/d"]
    assert main(["run", *flags, *sketch_flags]) == 0
    # the sketch-derived columns are a fingerprinted stage: computed once, reused by another ratio's selection
    assert json.loads((out / "stages.json").read_text())["columns"] == "ran"
    assert json.loads((out / "columns" / "columns.json").read_text())["group_column"] == "sketch_cluster"
    stats = json.loads((out / "select" / "target_alignment_top25pct" / "stats.json").read_text())
    assert stats["group_column"] == "sketch_cluster" and stats["diversity"]["num_clusters"] == 4
    assert stats["target"]["target_rows"] == len((scored_demo / "target.jsonl").read_text().splitlines())
    assert "num_near_duplicates_dropped" in stats
    kept = load_from_disk(str(out / "select" / "target_alignment_top25pct" / "data"))
    assert not (np.asarray(kept["sketch_nearest_cos"], dtype=float) >= 0.98).any()
    report = (out / "report.md").read_text()
    assert "ranked by alignment with the gradients of" in report and "k-means clusters" in report
    # every published split has the sketch columns, the card says how the rows were chosen
    assert {"target_alignment", "sketch_cluster"} <= set(pushed["scored"].column_names)
    assert all(sorted(split.column_names) == sorted(pushed["scored"].column_names)
               for split in pushed["selected"].values())
    assert pushed["settings"]["target_dataset"] == "target.jsonl"  # a local file: its name, not where it lives
    assert pushed["settings"]["diversity_clusters"] == 4
    assert main(["run", *flags, *sketch_flags, "--ratio", "0.5"]) == 0
    stages = json.loads((out / "stages.json").read_text())
    assert stages["columns"] == "skipped" and stages["select/target_alignment_top50pct"] == "ran"
    # text near-duplicates join the columns stage (whose fingerprint gains the setting only when it is given)
    assert main(["run", *flags, *sketch_flags, "--drop_text_duplicates", "0.7"]) == 0
    stages = json.loads((out / "stages.json").read_text())
    assert stages["score"] == "skipped" and stages["columns"] == "ran" and stages["push"] == "ran"
    flagged = np.asarray(load_from_disk(str(out / "columns" / "scored"))["text_duplicate_of"]) >= 0
    stats = json.loads((out / "select" / "target_alignment_top25pct" / "stats.json").read_text())
    assert stats["num_text_duplicates_dropped"] == flagged.sum() and stats["text_duplicates"]["threshold"] == 0.7
    kept = load_from_disk(str(out / "select" / "target_alignment_top25pct" / "data"))
    assert (np.asarray(kept["text_duplicate_of"]) == -1).all()
    assert "text near-duplicate rows never selected" in (out / "report.md").read_text()
    assert pushed["settings"]["drop_text_duplicates"] == 0.7 and "text_duplicate_of" in pushed["scored"].column_names
    # without sketches, or without the last epoch's, a clear error before anything runs
    assert main(["run", *flags, "--output_dir", str(tmp_path / "r2"), "--diversity_clusters", "4"]) == 2
    assert "--diversity_clusters needs gradient sketches: add --sketch_dim 1024" in capsys.readouterr().err
    assert main(["run", *flags, "--output_dir", str(tmp_path / "r3"), "--sketch_dim", "256", "--num_train_epochs", "3",
                 "--target_dataset", str(scored_demo / "target.jsonl")]) == 2
    assert "add --sketch_epochs 3" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists() and not (tmp_path / "r3" / "score").exists()
