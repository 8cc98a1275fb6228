import collections
import re

import pytest

from hf_gradfilter.demo.data import CORRUPTIONS, make_demo_dataset

N = 300
RATE = 0.2


@pytest.fixture(scope="module")
def ds():
    return make_demo_dataset(N, RATE, seed=0)


@pytest.fixture(scope="module")
def clean():
    # Clean content depends only on (num_rows, seed), so rate 0 gives the originals.
    return make_demo_dataset(N, 0.0, seed=0)


def test_columns_and_types(ds):
    assert set(ds.column_names) == {"instruction", "input", "output", "task", "corruption", "is_corrupted"}
    assert len(ds) == N
    for row in ds:
        assert isinstance(row["is_corrupted"], bool)
        assert row["is_corrupted"] == (row["corruption"] != "none")
        assert row["corruption"] in ("none",) + CORRUPTIONS
    assert any(r == "" for r in ds["input"]) and any(r != "" for r in ds["input"])
    assert len(set(ds["task"])) >= 10


def test_deterministic_and_seed_dependent(ds):
    again = make_demo_dataset(N, RATE, seed=0)
    assert again.to_dict() == ds.to_dict()
    assert make_demo_dataset(N, RATE, seed=1).to_dict() != ds.to_dict()


def test_exact_count_and_all_kinds(ds):
    counts = collections.Counter(ds["corruption"])
    assert sum(ds["is_corrupted"]) == round(N * RATE)
    assert all(counts[k] >= 1 for k in CORRUPTIONS)
    assert max(counts[k] for k in CORRUPTIONS) - min(counts[k] for k in CORRUPTIONS) <= 1
    for n, rate in [(1, 0.0), (1, 0.9), (7, 0.5), (50, 0.33), (101, 0.99)]:
        assert sum(make_demo_dataset(n, rate, seed=3)["is_corrupted"]) == round(n * rate)


def test_clean_rows_match_uncorrupted_version(ds, clean):
    for a, b in zip(ds, clean):
        assert (a["instruction"], a["input"], a["task"]) == (b["instruction"], b["input"], b["task"])
        if not a["is_corrupted"]:
            assert a["output"] == b["output"]


def test_swapped_from_other_task(ds, clean):
    outputs_by_task = collections.defaultdict(set)
    for row in clean:
        outputs_by_task[row["task"]].add(row["output"])
    for row, orig in zip(ds, clean):
        if row["corruption"] == "swapped":
            assert row["output"] != orig["output"]
            assert any(row["output"] in outs for t, outs in outputs_by_task.items() if t != row["task"])


def test_truncated_and_shuffled(ds, clean):
    for row, orig in zip(ds, clean):
        words, orig_words = row["output"].split(), orig["output"].split()
        if row["corruption"] == "truncated":
            assert len(orig_words) >= 6 and words == orig_words[:3]
        elif row["corruption"] == "shuffled":
            assert len(set(orig_words)) >= 4
            assert sorted(words) == sorted(orig_words) and words != orig_words


def test_arithmetic_is_correct(clean):
    checked = 0
    for row in clean:
        if row["task"] in ("add", "subtract"):
            a, op, b = re.fullmatch(r"What is (\d+) (plus|minus) (\d+)\?", row["instruction"]).groups()
            m = re.fullmatch(r"(\d+) (plus|minus) (\d+) is (-?\d+)\.", row["output"])
            assert m.groups()[:3] == (a, op, b)
            expected = int(a) + int(b) if op == "plus" else int(a) - int(b)
            assert int(m.group(4)) == expected >= 0
            checked += 1
    assert checked >= 20


def test_other_clean_tasks(clean):
    for row in clean:
        inp, out = row["input"].split(), row["output"].split()
        if row["task"] == "reverse":
            assert out == inp[::-1]
        elif row["task"] == "sort":
            assert [int(x) for x in out] == sorted(int(x) for x in inp)
        elif row["task"] == "largest":
            assert int(row["output"]) == max(int(x) for x in inp)
        elif row["task"] == "count":
            assert row["output"] == f"There are {len(inp)} words."


def test_response_lengths_vary(clean):
    lengths = [len(o.split()) for o in clean["output"]]
    assert sum(n <= 4 for n in lengths) >= 30
    assert sum(8 <= n <= 30 for n in lengths) >= 60
    assert sum(n >= 25 for n in lengths) >= 5
    assert max(lengths) <= 60


@pytest.mark.parametrize(
    "kwargs, bad",
    [
        ({"num_rows": 0}, "0"),
        ({"num_rows": -5}, "-5"),
        ({"num_rows": 2.5}, "2.5"),
        ({"num_rows": True}, "True"),
        ({"corruption_rate": 1.0}, "1.0"),
        ({"corruption_rate": -0.1}, "-0.1"),
        ({"corruption_rate": float("nan")}, "nan"),
    ],
)
def test_bad_args(kwargs, bad):
    with pytest.raises(ValueError) as exc:
        make_demo_dataset(**kwargs)
    msg = str(exc.value)
    assert bad in msg
    assert ">= 1" in msg or "0 <= corruption_rate < 1" in msg
