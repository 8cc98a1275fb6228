"""The (s, t, M') sweep: the grid, each setting's scores against hand-sliced arrays, Spearman against
hand-computed values, AUROC, and the CLI on a small saved record (no training)."""

from __future__ import annotations

import csv
import json
from itertools import combinations
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from datasets import Dataset

from hf_gradfilter.cli import main
from hf_gradfilter.proxy.record import GradientRecord
from hf_gradfilter.scores.formulas import score_parts
from hf_gradfilter.scores.metrics import average_ranks, spearman
from hf_gradfilter.scores.sweep_grid import (
    Setting,
    epoch_pairs,
    member_subsets,
    setting_scores,
    summarize,
    sweep,
    sweep_record,
    sweep_settings,
)


@pytest.fixture(scope="module")
def record():
    """40 rows, M=3 members, E=3 epochs; the last 10 rows are 'corrupted': their energy rises."""
    rng = np.random.default_rng(0)
    norms = rng.uniform(1.0, 2.0, size=(40, 3, 3))
    norms[:, :, 1] *= 0.8
    norms[:, :, 2] *= 0.6
    norms[30:, :, 1:] *= 3.0
    losses = rng.uniform(1.0, 2.0, size=(40, 3, 3))
    return GradientRecord(norms.astype(np.float32), losses.astype(np.float32), np.arange(40), np.arange(40))


LABELS = np.arange(40) >= 30


def test_epoch_pairs_are_every_s_before_t():
    assert epoch_pairs(4) == [(1, 2), (1, 3), (1, 4), (2, 3), (2, 4), (3, 4)]
    assert epoch_pairs(4, [4, 1, 3]) == [(1, 3), (1, 4), (3, 4)]
    with pytest.raises(ValueError, match="Epoch 5 is outside the 4 recorded epoch"):
        epoch_pairs(4, [1, 5])
    with pytest.raises(ValueError, match="at least two epochs"):
        epoch_pairs(1)


def test_member_subsets_are_all_combinations_up_to_max_subsets_else_a_seeded_sample():
    assert member_subsets(3) == [(0, 1), (0, 2), (1, 2), (0, 1, 2)]
    assert member_subsets(5, [4, 5], max_subsets=5) == list(combinations(range(5), 4)) + [(0, 1, 2, 3, 4)]
    sample = member_subsets(5, [2], max_subsets=4, seed=3)
    assert len(sample) == len(set(sample)) == 4 and sample == sorted(sample)
    assert all(len(s) == 2 and set(s) <= set(range(5)) for s in sample)
    assert sample == member_subsets(5, [2], max_subsets=4, seed=3)
    with pytest.raises(ValueError, match="Sub-ensemble size 6 is outside 1..5"):
        member_subsets(5, [6])


def test_the_grid_is_every_pair_with_every_subset():
    settings = sweep_settings(3, 3)
    assert len(settings) == 3 * 4 and settings[0] == Setting(1, 2, (0, 1))
    assert settings[-1] == Setting(2, 3, (0, 1, 2))


def test_a_setting_scores_the_sliced_record(record):
    values = setting_scores(record.norms, record.losses, Setting(1, 3, (0, 2)), ("gsnr", "raw_drop"))
    sliced = record.norms[:, [0, 2], :].astype(np.float64)
    np.testing.assert_array_equal(values["gsnr"], score_parts(sliced, 1, 3)["gsnr"])
    g_s, g_t = np.mean(sliced[:, :, 0] ** 2, axis=1), np.mean(sliced[:, :, 2] ** 2, axis=1)
    v_t = np.var(sliced[:, :, 2] ** 2, axis=1)
    np.testing.assert_allclose(values["gsnr"], (g_s - g_t) / (g_s + 1e-8) / (v_t + 1e-8))
    np.testing.assert_allclose(values["raw_drop"], g_s - g_t)
    with pytest.raises(ValueError, match="Unknown score 'ifd'"):
        setting_scores(record.norms, record.losses, Setting(1, 2, (0, 1)), ("ifd",))


def test_spearman_matches_hand_computed_values():
    # no ties: 1 - 6 sum d^2 / (n (n^2 - 1)) with d = (-1, 1, -1, 1, 0)
    assert spearman(np.array([1, 2, 3, 4, 5]), np.array([2, 1, 4, 3, 5])) == pytest.approx(1 - 6 * 4 / 120)
    # ties: ranks (1, 2.5, 2.5, 4) and (1.5, 1.5, 3, 4); centred dot 3.75, norms^2 4.5 each
    assert spearman(np.array([1, 2, 2, 3]), np.array([1, 1, 2, 3])) == pytest.approx(3.75 / 4.5)
    np.testing.assert_array_equal(average_ranks(np.array([3.0, 1.0, 3.0, 2.0])), [3.5, 1, 3.5, 2])
    # NaN rows are dropped pairwise; a constant side has no correlation
    assert spearman(np.array([1, np.nan, 3, 2]), np.array([1, 5, 3, 2])) == pytest.approx(1.0)
    assert np.isnan(spearman(np.ones(4), np.arange(4.0)))


def test_sweep_rows_hold_spearman_with_the_reference_and_auroc(record):
    settings = [Setting(1, 2, (0, 1, 2)), Setting(1, 3, (0, 2)), Setting(2, 3, (1, 2))]
    rows = sweep(record.norms, record.losses, settings, ("gsnr",), reference=(1, 2), labels=LABELS)
    assert [(r["early_epoch"], r["late_epoch"], r["members"]) for r in rows] == [(1, 2, "0 1 2"), (1, 3, "0 2"),
                                                                                 (2, 3, "1 2")]
    assert rows[0]["spearman"] == pytest.approx(1.0)
    reference = score_parts(record.norms.astype(np.float64), 1, 2)["gsnr"]
    mine = score_parts(record.norms[:, [0, 2], :].astype(np.float64), 1, 3)["gsnr"]
    assert rows[1]["spearman"] == pytest.approx(spearman(mine, reference))
    clean, bad = mine[~LABELS], mine[LABELS]
    pairs = (clean[:, None] > bad[None, :]).mean() + 0.5 * (clean[:, None] == bad[None, :]).mean()
    assert rows[1]["auroc"] == pytest.approx(pairs)  # P(clean row outranks a corrupted one)
    assert rows[1]["auroc"] > 0.9


def test_summarize_averages_over_the_subsets_of_one_size(record):
    rows = sweep(record.norms, record.losses, sweep_settings(3, 3), ("gsnr",), labels=LABELS)
    summary = summarize(rows)
    assert [(r["early_epoch"], r["late_epoch"], r["num_members"], r["subsets"]) for r in summary] == [
        (1, 2, 2, 3), (1, 2, 3, 1), (1, 3, 2, 3), (1, 3, 3, 1), (2, 3, 2, 3), (2, 3, 3, 1)]
    mine = [r for r in rows if (r["early_epoch"], r["late_epoch"], r["num_members"]) == (1, 3, 2)]
    assert summary[2]["spearman_mean"] == pytest.approx(np.mean([r["spearman"] for r in mine]))
    assert summary[2]["spearman_min"] == pytest.approx(min(r["spearman"] for r in mine))
    assert summary[2]["auroc_sd"] == pytest.approx(np.std([r["auroc"] for r in mine]))
    assert summary[1]["spearman_mean"] == pytest.approx(1.0) and summary[1]["auroc_sd"] == 0


def test_sweep_refuses_bad_labels(record):
    with pytest.raises(ValueError, match="boolean array of shape"):
        sweep(record.norms, record.losses, sweep_settings(3, 3), labels=np.zeros(40))
    with pytest.raises(ValueError, match="all True or all False"):
        sweep(record.norms, record.losses, sweep_settings(3, 3), labels=np.zeros(40, dtype=bool))


def test_sweep_record_writes_csv_json_and_heatmaps(record, tmp_path):
    result = sweep_record(record, str(tmp_path), labels=LABELS, scores=("gsnr", "neg_grad_late"),
                          label_column="is_corrupted")
    with open(result["paths"]["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 12 and rows[0].keys() == {"score", "early_epoch", "late_epoch", "num_members",
                                                      "members", "spearman", "auroc"}
    payload = json.loads(Path(result["paths"]["json"]).read_text())
    assert payload["meta"]["reference"] == [1, 2] and len(payload["summary"]) == 2 * 6
    assert payload["pair_spearman"]["gsnr"]["matrix"][0][0] == pytest.approx(1.0)
    for name in ("gsnr", "neg_grad_late"):
        assert Path(result["paths"][f"png_{name}"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def record_dir(record, tmp_path):
    record.save(str(tmp_path / "run"))
    scored = Dataset.from_dict({"is_corrupted": LABELS.tolist(), "task": ["x"] * 40,
                                "response_length": list(range(1, 41))})
    scored.save_to_disk(str(tmp_path / "run" / "scored"))
    return tmp_path / "run"


def test_sweep_cli_prints_the_table_and_writes_its_files(record_dir, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", "--record", str(record_dir), "--label_column", "is_corrupted", "--score", "gsnr",
                 "raw_drop", "--output_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Sweep of 40 rows, 3 members, 3 epochs: 24 (score, setting) pairs" in printed
    assert "AUROC mean ± sd" in printed and "Spearman of raw_drop between epoch pairs" in printed
    table = [line.split() for line in printed.splitlines() if line.startswith("  gsnr ")]
    assert [row[:5] for row in table] == [["gsnr", "1", "2", "2", "3"], ["gsnr", "1", "2", "3", "1"],
                                          ["gsnr", "1", "3", "2", "3"], ["gsnr", "1", "3", "3", "1"],
                                          ["gsnr", "2", "3", "2", "3"], ["gsnr", "2", "3", "3", "1"]]
    assert table[1][5] == "1.000"
    assert {p.name for p in out.iterdir()} >= {"sweep.csv", "sweep.json", "sweep_gsnr.png", "sweep_raw_drop.png"}


def test_sweep_cli_sweeps_the_default_score_with_the_scored_response_length(record, record_dir, tmp_path, capsys):
    from hf_gradfilter.scores.formulas import grad_energy

    assert main(["sweep", "--record", str(record_dir), "--output_dir", str(tmp_path / "o")]) == 0  # the default
    assert "Spearman of neg_energy_token between epoch pairs" in capsys.readouterr().out
    order = record.example_id
    length = np.arange(1, 41, dtype=float)[order]
    want = -grad_energy(record.norms.astype(np.float64), 2) * length
    got = setting_scores(record.norms, record.losses, Setting(1, 2, (0, 1, 2)), ("neg_energy_token",),
                         length=length)["neg_energy_token"]
    np.testing.assert_allclose(got, want)
    Dataset.from_dict({"is_corrupted": LABELS.tolist()}).save_to_disk(str(record_dir / "scored"))
    assert main(["sweep", "--record", str(record_dir), "--output_dir", str(tmp_path / "p")]) == 2
    assert "neg_energy_token needs the column 'response_length'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="neg_energy_token needs each row's response length"):
        setting_scores(record.norms, record.losses, Setting(1, 2, (0, 1)), ("neg_energy_token",))


@pytest.mark.parametrize("args, message", [
    ([], "Pass --record"),
    (["--record", "RECORD", "--epochs", "1", "4"], "Epoch 4 is outside the 3 recorded epoch(s)"),
    (["--record", "RECORD", "--members", "4"], "Sub-ensemble size 4 is outside 1..3"),
    (["--record", "RECORD", "--label_column", "task"], "Label column 'task' must be boolean"),
    (["--record", "RECORD", "--label_column", "missing"], "Label column 'missing' is not in the scored dataset"),
    (["--record", "RECORD", "--score", "ifd"], "Unknown score 'ifd'"),
    (["--record", "RECORD", "--reference_epochs", "1"], "--reference_epochs takes two epochs"),
])
def test_sweep_cli_errors_name_the_bad_value(record_dir, tmp_path, capsys, args, message):
    args = [str(record_dir) if a == "RECORD" else a for a in args]
    assert main(["sweep", "--output_dir", str(tmp_path / "o")] + args) == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_sweep_demo_trains_the_demo_ensemble_for_four_epochs_then_sweeps_it(record, tmp_path, monkeypatch, capsys):
    from hf_gradfilter.demo import DEMO_LEARNING_RATE
    from hf_gradfilter.scores import sweep as sweep_stage

    seen = {}

    def fake_score(args, config):  # stands in for training: the wiring, not the proxy, is under test
        seen.update(demo=args.demo, epochs=config.num_train_epochs, lr=config.learning_rate)
        scored = Dataset.from_dict({"is_corrupted": LABELS.tolist(), "response_length": [5] * 40})
        return SimpleNamespace(record=record, scored=scored)

    monkeypatch.setattr(sweep_stage, "score", fake_score)
    assert main(["sweep", "--demo", "--output_dir", str(tmp_path / "d")]) == 0
    assert seen == {"demo": True, "epochs": 4, "lr": DEMO_LEARNING_RATE}
    assert "AUROC of each score as a keep-score against 'is_corrupted'" in capsys.readouterr().out
    assert main(["sweep", "--demo", "--record", "x", "--output_dir", str(tmp_path / "e")]) == 2
