"""Text near-duplicates (MinHash LSH over word n-grams, `scores.text_duplicates`) and `--drop_text_duplicates`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset, load_from_disk

pytest.importorskip("datasketch")

from hf_gradfilter import add_text_duplicate_columns, text_duplicates  # noqa: E402
from hf_gradfilter.demo.data import make_demo_dataset  # noqa: E402
from hf_gradfilter.scores import text_duplicates as td  # noqa: E402

FIELDS = ("instruction", "input", "output")

# Real-looking rows (45 to 75 words, Alpaca's median is 47), then rewordings of them: case and punctuation, a swap of
# adjacent words, an inserted word, both, other spacing, and an exact repeat. (Two or more edits in a 47-word row
# are found about half the time: docs/text_duplicates.md.)
BASE = [
    {"instruction": "Explain why the sky appears blue during the day.", "input": "",
     "output": "Sunlight is made of many colours. When it enters the atmosphere, the short blue wavelengths are "
               "scattered by the gas molecules much more strongly than the long red ones, so blue light reaches "
               "our eyes from every part of the sky and the whole sky looks blue to us."},
    {"instruction": "Give three tips for staying healthy.", "input": "",
     "output": "First, eat a balanced diet with plenty of fruit and vegetables. Second, exercise regularly, for "
               "example thirty minutes of walking every day. Third, get enough sleep and keep a regular sleep "
               "schedule so that your body can rest and recover."},
    {"instruction": "Summarize the following paragraph in one sentence.",
     "input": "The city council met on Tuesday to discuss the new park. After a long debate the members voted to "
              "build a playground, a small lake and a path for bicycles, paid for by a local foundation.",
     "output": "The city council voted on Tuesday to build a park with a playground, a lake and a bike path, "
               "funded by a local foundation."},
    {"instruction": "Write a short story about a robot who learns to paint.", "input": "",
     "output": "Unit seven had only ever welded car doors. One night it found a box of paint in the storeroom and "
               "began to copy the sunset it saw through the factory window, again and again, until the foreman "
               "came in the morning and hung the best canvas above the assembly line."},
]


def reworded(row: dict, how: str) -> dict:
    out = dict(row)
    words = out["output"].split()
    if how == "case_punct":
        out = {k: v.upper().replace(",", "").replace(".", "!") for k, v in out.items()}
    elif how == "swap":  # two adjacent words swapped
        words[10], words[11] = words[11], words[10]
        out["output"] = " ".join(words)
    elif how == "insert":  # a word inserted
        out["output"] = " ".join(words[:8] + ["really"] + words[8:])
    elif how == "swap_and_insert":
        out["output"] = " ".join(words[:8] + ["really"] + words[8:20] + [words[21], words[20]] + words[22:])
    elif how == "spacing":  # whitespace and newlines
        out["output"] = "\n\n  ".join(words)
    return out


def texts_of(rows) -> list[str]:
    return ["\n".join(r[k] for k in FIELDS) for r in rows]


def test_rewordings_and_exact_repeats_are_flagged_with_their_original_and_the_originals_are_not():
    kinds = ["case_punct", "swap", "insert", "swap_and_insert", "spacing", "repeat"]
    rows = list(BASE) + [row if how == "repeat" else reworded(row, how) for how in kinds for row in BASE]
    index, jaccard = text_duplicates(texts_of(rows))
    originals = np.tile(np.arange(len(BASE)), len(kinds))
    assert index[:len(BASE)].tolist() == [-1] * len(BASE) and np.isnan(jaccard[:len(BASE)]).all()
    # each copy is flagged with its original, or with an earlier copy of the same original
    assert all(index[i] % len(BASE) == originals[i - len(BASE)] for i in range(len(BASE), len(rows))), index
    assert (jaccard[len(BASE):] >= td.DEFAULT_THRESHOLD).all()
    assert jaccard[len(BASE):len(BASE) * 2].tolist() == [1.0] * len(BASE)  # case and punctuation are ignored


def test_the_demo_repeats_are_all_flagged_and_no_clean_demo_row_is():
    rows = make_demo_dataset(num_rows=3000)
    keys = [tuple(r[k] for k in FIELDS) for r in rows]
    index, jaccard = text_duplicates(texts_of(rows))
    repeats = np.array([k in set(keys[:i]) for i, k in enumerate(keys)])  # exact repeats of an earlier row
    assert repeats.sum() > 500 and (index[repeats] >= 0).all()
    assert all(keys[index[i]] == keys[i] for i in np.flatnonzero(repeats))  # the best earlier match: a copy
    corrupted = np.asarray(rows["is_corrupted"])
    others = np.flatnonzero((index >= 0) & ~repeats)
    # the only other flags (2, docs/text_duplicates.md) pair a damaged row with a row that shares its prompt, or the
    # long answer that was swapped into it
    assert len(others) <= 3 and all(corrupted[i] or corrupted[index[i]] for i in others)


def test_every_flag_is_an_exact_jaccard_match_and_lsh_misses_none_of_the_demo_pairs():
    rows = make_demo_dataset(num_rows=300)
    texts = texts_of(rows)
    sets = [td.shingles(t) for t in texts]
    for threshold in (0.5, 0.7):
        index, jaccard = text_duplicates(texts, threshold)
        brute = np.full(len(texts), -1)
        for i in range(len(texts)):  # every earlier row, exactly: the most similar at or above the threshold
            sims = [td.jaccard(sets[i], sets[j]) for j in range(i)]
            if sims and max(sims) >= threshold:
                brute[i] = int(np.argmax(sims))
        np.testing.assert_array_equal(index, brute)
        flagged = index >= 0
        np.testing.assert_allclose(jaccard[flagged], [td.jaccard(sets[i], sets[index[i]])
                                                      for i in np.flatnonzero(flagged)], rtol=1e-6)


def test_lsh_false_positives_never_flag_a_row(monkeypatch):
    import datasketch

    # every earlier row a candidate (what a worst-case LSH could return): the exact check keeps only true matches
    monkeypatch.setattr(datasketch.MinHashLSH, "query", lambda self, m: list(self.keys.keys()))
    rows = make_demo_dataset(num_rows=200)
    everything, _ = text_duplicates(texts_of(rows))
    monkeypatch.undo()
    np.testing.assert_array_equal(everything, text_duplicates(texts_of(rows))[0])


def test_the_flags_are_the_same_in_another_process():
    rows = make_demo_dataset(num_rows=300)
    texts = texts_of(rows) + texts_of([reworded(r, "swap") for r in BASE]) + texts_of(BASE)
    here = text_duplicates(texts)
    code = ("import json, sys\nfrom hf_gradfilter.scores.text_duplicates import text_duplicates\n"
            "i, j = text_duplicates(json.load(sys.stdin))\nprint(json.dumps([i.tolist(), j.tolist()]))\n")
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(texts), capture_output=True, text=True,
                         check=True, env={**__import__("os").environ, "PYTHONHASHSEED": "123"})
    there = json.loads(out.stdout)
    assert there[0] == here[0].tolist()
    np.testing.assert_array_equal(np.array(there[1], dtype=np.float32), here[1])


def test_short_and_empty_texts():
    index, _ = text_duplicates(["cold", "Cold!", "", "  ", "hot", "what is the opposite of hot", "cold"])
    # a text shorter than n words is one shingle; a text with no word is never flagged nor matched
    assert index.tolist() == [-1, 0, -1, -1, -1, -1, 0]


def test_the_text_of_each_row_format():
    alpaca = Dataset.from_dict({"instruction": ["Name a drink."], "input": [None], "output": ["tea"]})
    assert td.row_texts(alpaca) == ["Name a drink.\n\ntea"]
    pc = Dataset.from_dict({"prompt": ["Name a drink."], "completion": ["tea"]})
    assert td.row_texts(pc) == ["Name a drink.\ntea"]
    chat = Dataset.from_dict({"messages": [[{"role": "user", "content": "Name a drink."},
                                            {"role": "assistant", "content": "tea"}]]})
    assert td.row_texts(chat) == ["Name a drink.\ntea"]
    with pytest.raises(ValueError, match="only token ids"):
        td.row_texts(Dataset.from_dict({"input_ids": [[1, 2]], "labels": [[-100, 2]]}))


def test_bad_thresholds_and_a_missing_datasketch_get_one_line(monkeypatch):
    for bad in (0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"Jaccard similarity in \(0, 1\]"):
            text_duplicates(["a b c"], bad)
    monkeypatch.setitem(sys.modules, "datasketch", None)  # `import datasketch` raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'hf-gradfilter\[dedup\]'"):
        text_duplicates(["a b c"])


def demo_scored(num_rows: int = 300) -> Dataset:
    """Demo rows with a score column, as `select` reads a scored dataset."""
    rows = make_demo_dataset(num_rows=num_rows)
    return rows.add_column("neg_energy_token", np.random.default_rng(0).random(len(rows)).tolist())


def test_pick_rows_never_selects_a_text_duplicate_but_counts_it():
    from hf_gradfilter.selection.select import pick_rows

    rows, stats = add_text_duplicate_columns(demo_scored())
    flagged = np.asarray(rows[td.COLUMN]) >= 0
    assert stats["text_duplicates"]["num_flagged"] == flagged.sum() > 0
    positions, picked = pick_rows(rows, "neg_energy_token", fraction=1.0, text_duplicates=0.7)
    assert picked["num_text_duplicates_dropped"] == flagged.sum()
    np.testing.assert_array_equal(positions, np.flatnonzero(~flagged))
    positions, picked = pick_rows(rows, "neg_energy_token", fraction=0.1, text_duplicates=0.7)
    assert len(positions) == 30 and not flagged[positions].any()  # 10% of all 300 rows
    with pytest.raises(ValueError, match="needs the column text_duplicate_jaccard"):
        pick_rows(demo_scored(), "neg_energy_token", fraction=0.1, text_duplicates=0.7)


def test_the_select_verb_drops_the_demo_repeats_and_keeps_what_run_keeps(tmp_path, capsys):
    from hf_gradfilter.cli import main
    from hf_gradfilter.proxy.config import GradFilterConfig
    from hf_gradfilter.run import pipeline

    scored = tmp_path / "score" / "scored"
    demo_scored().save_to_disk(str(scored))
    assert main(["select", "--scored", str(scored), "--ratio", "1.0", "--drop_text_duplicates", "0.7"]) == 0
    rows = make_demo_dataset(num_rows=300)
    keys = [tuple(r[k] for k in FIELDS) for r in rows]
    kept = load_from_disk(str(tmp_path / "score" / "selected_neg_energy_token_top100pct_notextdup0.7"))
    dropped = 300 - len(kept)
    assert f"Dropped {dropped} text near-duplicate rows first" in capsys.readouterr().out
    assert dropped >= len(keys) - len(set(keys))  # every exact repeat, at least
    assert len(set(zip(*(kept[k] for k in FIELDS)))) == len(kept)

    # run's columns and select stages (the same functions) with the same settings keep the same rows
    verb_out = tmp_path / "verb"
    assert main(["select", "--scored", str(scored), "--ratio", "0.25", "--drop_text_duplicates", "0.7",
                 "--output", str(verb_out)]) == 0
    args = pipeline.RunArguments(demo=True, ratio=[0.25], drop_text_duplicates=0.7, score_column="neg_energy_token")
    config = GradFilterConfig(output_dir=str(tmp_path / "run"), report_to="none")
    (tmp_path / "columns").mkdir()
    (tmp_path / "select").mkdir()
    pipeline._columns(str(scored), str(tmp_path / "columns"), args, config)
    pipeline._select(str(tmp_path / "columns" / "scored"), str(tmp_path / "select"), "neg_energy_token", 0.25,
                     args, config.seed)
    by_verb, by_run = load_from_disk(str(verb_out)), load_from_disk(str(tmp_path / "select" / "data"))
    assert len(by_run) == 75 and by_verb.to_pandas().equals(by_run.to_pandas())
    stats = json.loads(Path(tmp_path / "select" / "stats.json").read_text())
    assert stats["num_text_duplicates_dropped"] == dropped and stats["text_duplicates"]["threshold"] == 0.7


def test_the_select_verb_reads_the_text_from_the_columns_the_score_run_read(tmp_path, capsys):
    """A score run over custom column names (question/answer) records them in gradfilter_config.json; select reads
    the rows' text from those columns, not from the default names."""
    from hf_gradfilter.cli import main

    rows = make_demo_dataset(num_rows=300)
    renamed = rows.rename_columns({"instruction": "question", "input": "context", "output": "answer"})
    renamed = renamed.add_column("neg_energy_token", np.random.default_rng(0).random(len(rows)).tolist())
    run = tmp_path / "score"
    renamed.save_to_disk(str(run / "scored"))
    (run / "gradfilter_config.json").write_text(json.dumps({"config": {
        "dataset_format": "alpaca", "instruction_column": "question", "input_column": "context",
        "output_column": "answer"}}))
    out = tmp_path / "kept"
    assert main(["select", "--scored", str(run / "scored"), "--ratio", "1.0", "--drop_text_duplicates", "0.7",
                 "--output", str(out)]) == 0
    flagged, _ = add_text_duplicate_columns(rows)  # the same rows under the default names
    expected = int((np.asarray(flagged[td.COLUMN]) >= 0).sum())
    assert expected > 0 and len(load_from_disk(str(out))) == 300 - expected
    assert f"Dropped {expected} text near-duplicate rows first" in capsys.readouterr().out

    # a scored dataset moved away from its score run: the default names, and an error naming the columns
    (run / "gradfilter_config.json").unlink()
    assert main(["select", "--scored", str(run / "scored"), "--ratio", "1.0", "--drop_text_duplicates", "0.7",
                 "--output", str(tmp_path / "again")]) == 2
    err = capsys.readouterr().err
    assert "'question'" in err and f"No gradfilter_config.json in {run}" in err and "--proxy_dir" in err
