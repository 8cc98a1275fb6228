"""Per-group selection of a mixture: exact kept counts per group in every mode, on a dataset with a
dominant group (90% / 8% / 2%); quota errors; the CLI table and the dataset card."""

from __future__ import annotations

import numpy as np
import pytest
from datasets import Dataset, load_from_disk
from huggingface_hub import DatasetCard

from hf_gradfilter import hub
from hf_gradfilter.cli import main
from hf_gradfilter.selection import (
    format_group_table,
    group_counts,
    select_top,
    top_indices,
    top_indices_by_group,
)
from hf_gradfilter.selection.select import parse_quotas

SIZES = {"chat": 900, "code": 80, "math": 20}


@pytest.fixture(scope="module")
def mixture():
    """1000 rows, the dominant group scoring higher, so a global cut keeps only it; row 5 of `code` is NaN."""
    rng = np.random.default_rng(0)
    groups = np.repeat(list(SIZES), list(SIZES.values()))
    order = rng.permutation(len(groups))
    groups = groups[order]
    scores = rng.normal(size=len(groups)) + np.where(groups == "chat", 5.0, 0.0)
    scores[np.flatnonzero(groups == "code")[5]] = np.nan
    return scores, groups


def kept(groups, chosen) -> dict[str, int]:
    return {g: int(np.sum(groups[chosen] == g)) for g in SIZES}


def best_of_group(scores, groups, group, count) -> set[int]:
    rows = np.flatnonzero((groups == group) & np.isfinite(scores))
    return set(rows[np.argsort(-scores[rows], kind="stable")][:count].tolist())


def test_global_mode_keeps_the_global_top_fraction_and_counts_the_groups(mixture):
    scores, groups = mixture
    chosen, stats = top_indices_by_group(scores, groups, fraction=0.1, mode="global")
    np.testing.assert_array_equal(chosen, top_indices(scores, fraction=0.1)[0])
    assert kept(groups, chosen) == {"chat": 100, "code": 0, "math": 0}
    assert [(r["group"], r["rows"], r["kept"]) for r in stats["groups"]] == [
        ("chat", 900, 100), ("code", 80, 0), ("math", 20, 0)]


def test_per_group_mode_keeps_round_fraction_of_every_group(mixture):
    scores, groups = mixture
    chosen, stats = top_indices_by_group(scores, groups, fraction=0.1, mode="per_group")
    assert kept(groups, chosen) == {"chat": 90, "code": 8, "math": 2}
    assert stats["num_selected"] == stats["num_requested"] == 100
    for g, count in (("chat", 90), ("code", 8), ("math", 2)):
        assert set(chosen[groups[chosen] == g].tolist()) == best_of_group(scores, groups, g, count)
    assert {r["group"]: r["share"] for r in stats["groups"]} == pytest.approx({"chat": 0.1, "code": 0.1, "math": 0.1})
    assert {r["group"]: r["selection_share"] for r in stats["groups"]} == pytest.approx(
        {"chat": 0.9, "code": 0.08, "math": 0.02})


def test_per_group_rounding_is_half_to_even_with_at_least_one_row():
    groups = np.array(["a"] * 25 + ["b"] * 35 + ["c"] * 3)
    chosen, _ = top_indices_by_group(np.arange(63.0), groups, fraction=0.1, mode="per_group")
    assert {g: int(np.sum(groups[chosen] == g)) for g in "abc"} == {"a": 2, "b": 4, "c": 1}  # 2.5, 3.5, 0.3


def test_per_group_with_k_keeps_k_rows_of_every_group_or_all_of_a_smaller_one(mixture):
    scores, groups = mixture
    chosen, _ = top_indices_by_group(scores, groups, k=30, mode="per_group")
    assert kept(groups, chosen) == {"chat": 30, "code": 30, "math": 20}


def test_quota_mode_keeps_counts_and_fractions_and_the_default_for_other_groups(mixture):
    scores, groups = mixture
    chosen, _ = top_indices_by_group(scores, groups, mode="quota", quotas={"chat": 50, "code": 0.5})
    assert kept(groups, chosen) == {"chat": 50, "code": 40, "math": 0}
    chosen, _ = top_indices_by_group(scores, groups, fraction=0.1, mode="quota", quotas={"chat": 0, "math": 20})
    assert kept(groups, chosen) == {"chat": 0, "code": 8, "math": 20}
    assert set(chosen[groups[chosen] == "chat"].tolist()) == set()


def test_nan_scores_are_never_kept_and_a_short_group_reports_its_request(mixture):
    scores, groups = mixture
    chosen, stats = top_indices_by_group(scores, groups, mode="quota", quotas={"code": 80})
    assert kept(groups, chosen) == {"chat": 0, "code": 79, "math": 0}
    assert np.isfinite(scores[chosen]).all() and stats["num_nonfinite_excluded"] == 1
    row = next(r for r in stats["groups"] if r["group"] == "code")
    assert (row["requested"], row["kept"]) == (80, 79)


def test_a_single_group_gives_the_global_selection_in_every_mode():
    scores = np.random.default_rng(1).normal(size=37)
    groups = ["only"] * 37
    expected = top_indices(scores, fraction=0.15)[0]
    for mode, quotas in (("global", None), ("per_group", None), ("quota", {"only": 0.15})):
        chosen, _ = top_indices_by_group(scores, groups, fraction=0.15 if quotas is None else None, mode=mode,
                                         quotas=quotas)
        np.testing.assert_array_equal(np.sort(chosen), np.sort(expected))


@pytest.mark.parametrize("quotas, message", [
    ({"math": 21}, "Quota 21 for group 'math' exceeds its 20 rows"),
    ({"poetry": 3}, "Quota for unknown group 'poetry'; the groups are ['chat', 'code', 'math']"),
    ({"code": 1.5}, "Quota 1.5 for group 'code' is a fraction outside [0, 1]"),
    ({"code": -1}, "Quota -1 for group 'code' is negative"),
])
def test_bad_quotas_name_the_group(mixture, quotas, message):
    scores, groups = mixture
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        top_indices_by_group(scores, groups, mode="quota", quotas=quotas)


def test_bad_modes_and_arguments_are_refused(mixture):
    scores, groups = mixture
    with pytest.raises(ValueError, match="Unknown group mode 'by_task'"):
        top_indices_by_group(scores, groups, fraction=0.1, mode="by_task")
    with pytest.raises(ValueError, match="needs fraction"):
        top_indices_by_group(scores, groups, mode="per_group")
    with pytest.raises(ValueError, match="only used with mode='quota'"):
        top_indices_by_group(scores, groups, fraction=0.1, mode="per_group", quotas={"chat": 1})


def test_select_top_by_group_keeps_original_order_and_reports_the_table(mixture):
    scores, groups = mixture
    data = Dataset.from_dict({"task": groups.tolist(), "gsnr": scores.tolist(), "row": list(range(len(scores)))})
    selected, stats = select_top(data, "gsnr", fraction=0.1, group_column="task", group_mode="per_group")
    assert selected["row"] == sorted(selected["row"]) and len(selected) == 100
    assert stats["group_column"] == "task" and [r["kept"] for r in stats["groups"]] == [90, 8, 2]
    assert group_counts(data["task"], selected["task"]) == [{k: r[k] for k in r if k != "requested"}
                                                            for r in stats["groups"]]
    with pytest.raises(ValueError, match="Group column 'source' is not in the dataset"):
        select_top(data, "gsnr", fraction=0.1, group_column="source")
    with pytest.raises(ValueError, match="need a group_column"):
        select_top(data, "gsnr", fraction=0.1, group_mode="per_group")


def test_group_counts_and_its_text_table():
    table = group_counts(["a", "b", "a", "a"], ["a", "b"])
    assert table == [{"group": "a", "rows": 3, "kept": 1, "share": 1 / 3, "selection_share": 0.5},
                     {"group": "b", "rows": 1, "kept": 1, "share": 1.0, "selection_share": 0.5}]
    text = format_group_table(table, "task").splitlines()
    assert text[0].split() == ["task", "rows", "kept", "share", "of", "selection"]
    assert text[1].split() == ["a", "3", "1", "33.3%", "50.0%"]


def test_parse_quotas_reads_counts_and_fractions_and_names_bad_items():
    assert parse_quotas(["code=500", "math=0.2", "a=b=3"]) == {"code": 500, "math": 0.2, "a=b": 3}
    for bad in ("code", "=3", "code=many"):
        with pytest.raises(ValueError, match=f"Bad quota '{bad}'"):
            parse_quotas([bad])


@pytest.fixture
def scored_dir(mixture, tmp_path):
    scores, groups = mixture
    Dataset.from_dict({"task": groups.tolist(), "gsnr": scores.tolist()}).save_to_disk(str(tmp_path / "scored"))
    return tmp_path / "scored"


def test_select_cli_prints_the_per_group_table_and_names_its_output(scored_dir, capsys):
    assert main(["select", "--scored", str(scored_dir), "--score_column", "gsnr", "--group_column", "task",
                 "--group_mode", "per_group",
                 "--ratio", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "Rows kept per 'task' (per_group)" in out
    assert out.splitlines()[-1].split() == ["math", "20", "2", "10.0%", "2.0%"]
    assert len(load_from_disk(str(scored_dir.parent / "selected_gsnr_per_task_top10pct"))) == 100
    assert main(["select", "--scored", str(scored_dir), "--score_column", "gsnr", "--group_column", "task",
                 "--group_mode", "quota",
                 "--quota", "chat=10", "math=0.5"]) == 0
    selected = load_from_disk(str(scored_dir.parent / "selected_gsnr_quota_task_top20"))
    assert sorted(selected["task"]) == ["chat"] * 10 + ["math"] * 10


@pytest.mark.parametrize("args, message", [
    (["--group_column", "source"], "Group column 'source' is not in the dataset"),
    (["--group_mode", "per_group"], "--group_mode per_group needs --group_column"),
    (["--group_column", "task", "--quota", "chat=1"], "--quota is used with --group_mode quota"),
    (["--group_column", "task", "--group_mode", "quota", "--quota", "chat:1"], "Bad quota 'chat:1'"),
    (["--group_column", "task", "--group_mode", "quota", "--quota", "poetry=1"], "unknown group 'poetry'"),
])
def test_select_cli_errors_name_the_bad_value(scored_dir, capsys, args, message):
    assert main(["select", "--scored", str(scored_dir), "--score_column", "gsnr"] + args) == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_select_cli_refuses_an_unknown_group_mode(scored_dir, capsys):
    with pytest.raises(SystemExit):
        main(["select", "--scored", str(scored_dir), "--score_column", "gsnr", "--group_column", "task",
              "--group_mode", "by_task"])
    assert "by_task" in capsys.readouterr().err


def test_dataset_card_shows_what_each_group_kept(mixture, tmp_path):
    scores, groups = mixture
    data = Dataset.from_dict({"instruction": ["i"] * len(scores), "output": ["o"] * len(scores),
                              "task": groups.tolist(), "gsnr": scores.tolist()})
    per_group, _ = select_top(data, "gsnr", fraction=0.1, group_column="task", group_mode="per_group")
    overall, _ = select_top(data, "gsnr", fraction=0.1)
    settings = {"score_column": "gsnr", "ratio": 0.1, "group_column": "task", "group_mode": "per_group"}
    hub.build_dataset_repo(tmp_path / "repo", data, {"top_10pct": per_group, "global_10pct": overall},
                           settings=settings)
    card = DatasetCard.load(tmp_path / "repo" / "README.md").text
    header = "| `task` | rows in `scored` | kept in `top_10pct` (share) | kept in `global_10pct` (share) |"
    for text in ("## Rows kept per `task`", header, "| chat | 900 | 90 (10.0%) | 100 (11.1%) |",
                 "| math | 20 | 2 (10.0%) | 0 (0.0%) |", "Group mode | per_group"):
        assert text in card, text
    with pytest.raises(ValueError, match="Group column 'source' is not in the scored dataset"):
        hub.build_dataset_repo(tmp_path / "other", data, {"top": per_group}, settings={"group_column": "source"})


def test_ifd_per_group_never_keeps_rows_with_ifd_at_or_above_one():
    from hf_gradfilter.selection.select import select_rows

    rows = Dataset.from_dict({"task": ["a"] * 4 + ["b"] * 4, "ifd": [1.5, 0.9, 0.2, 0.5, 0.3, 2.0, 0.8, 1.0]})
    selected, stats = select_rows(rows, "ifd", fraction=0.5, group_column="task", group_mode="per_group")
    assert selected["ifd"] == [0.9, 0.5, 0.3, 0.8] and stats["score_column"] == "ifd"


def test_ifd_just_above_one_is_dropped_in_float64_as_stored():
    from hf_gradfilter.selection.select import select_rows

    # 1 + 1e-9 rounds to 1.0 in float32 but is >= 1 either way; 1 - 1e-9 is below 1 only in float64.
    rows = Dataset.from_dict({"task": ["a", "a", "b", "b"], "ifd": [1 + 1e-9, 0.5, 1 - 1e-9, 0.4]})
    selected, _ = select_rows(rows, "ifd", fraction=0.5, group_column="task", group_mode="per_group")
    assert selected["ifd"] == [0.5, 1 - 1e-9]


@pytest.mark.parametrize("format_type", [None, "torch", "numpy"])
def test_float64_scores_are_read_as_stored_whatever_the_datasets_format(format_type):
    from hf_gradfilter import superfiltering_select

    # 1 + 2^-30 and 1 - 2^-30 are 1.0 in float32 (datasets' torch format): the ranking and the IFD < 1 rule
    # below hold only in float64, as stored.
    rows = Dataset.from_dict({"gsnr": [1.0, 1.0 + 2**-30, 0.5], "ifd": [0.5, 1 - 2**-30, 1.5]})
    rows = rows.with_format(format_type) if format_type else rows
    top, stats = select_top(rows, "gsnr", k=1)
    assert list(top.with_format(None)["gsnr"]) == [1.0 + 2**-30] and stats["threshold"] == 1.0 + 2**-30
    kept, _ = superfiltering_select(rows, fraction=0.34)
    assert list(kept.with_format(None)["ifd"]) == [1 - 2**-30]


def test_pick_rows_returns_a_selection_of_ascending_positions_and_its_stats(mixture):
    from hf_gradfilter import Selection, pick_rows

    scores, groups = mixture
    scored = Dataset.from_dict({"score": scores, "task": groups.tolist()})
    picked = pick_rows(scored, "score", fraction=0.1, group_column="task", group_mode="per_group")
    assert isinstance(picked, Selection)
    chosen, _ = top_indices_by_group(scores, groups, fraction=0.1, mode="per_group")
    np.testing.assert_array_equal(picked.positions, np.sort(chosen))
    assert picked.stats["num_selected"] == 100 and picked.stats["group_column"] == "task"
    positions, stats = picked  # still unpacks as the (positions, stats) pair
    assert stats is picked.stats
