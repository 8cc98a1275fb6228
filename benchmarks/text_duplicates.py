"""Text near-duplicates (MinHash LSH, `hf_gradfilter.scores.text_duplicates`): precision, recall and false flags.

    python benchmarks/text_duplicates.py     # under a minute on one CPU core: docs/text_duplicates.md

Three sets of rows, each with known copies:

(i)   the demo dataset (3,000 rows, `make_demo_dataset`). Its small vocabularies repeat rows exactly, and those
      repeats are the positives. A flag on any other row is a false flag. It is a *clean* false flag when neither
      row of the pair is corrupted.
(ii)  real Alpaca rows (``--alpaca``, 5,000 rows of Stanford Alpaca) plus constructed rewordings of
      ``--rewordings`` of them, at random places. Each rewording makes a pair with its original. A flag is right
      when it points from one row of a pair to the other, and every other flag is a false flag on a clean row.
(iii) the real pool of docs/default_choice.md (pool 1, 302 rows, ``--pool``): 10 exact and 10 near copies of
      clean rows. A near copy starts with "Please" and lacks the last sentence of the answer. The other rows
      are 200 clean rows, 40 weak answers (SmolLM2's) to 40 of the clean rows' instructions, and 42 damaged
      rows. A weak answer flagged against its clean twin is a false flag (the same question, another answer).

A pair is found when its later row is flagged with the earlier one. The rows are compared in their order, so
the first row of a group is kept. Precision is right flags / all flags, and recall is pairs found / pairs.
"LSH misses" counts the pairs whose exact Jaccard similarity reaches the threshold but that LSH never proposed.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np

from hf_gradfilter.demo.data import make_demo_dataset
from hf_gradfilter.scores import text_duplicates as td

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ("instruction", "input", "output")
FILLERS = ("really", "also", "just", "very", "then", "actually", "simply", "quite", "the", "and")
KINDS = ("case_punct", "swap2", "insert2", "delete2", "mixed3", "mixed6")


def text(row: dict) -> str:
    return "\n".join(row.get(k) or "" for k in FIELDS)


# ---- constructed rewordings ------------------------------------------------------------------------

def _edit(fields: list[list[str]], op: str, rng: random.Random) -> None:
    spots = [(f, i) for f, ws in enumerate(fields) for i in range(len(ws))]
    if not spots:
        return
    f, i = rng.choice(spots)
    ws = fields[f]
    if op == "swap" and len(ws) > 1:
        j = i + 1 if i + 1 < len(ws) else i - 1
        ws[i], ws[j] = ws[j], ws[i]
    elif op == "insert":
        ws.insert(i + 1, rng.choice(FILLERS))
    elif op == "delete" and len(ws) > 1:
        del ws[i]


def _case_punct(ws: list[str], rng: random.Random) -> list[str]:
    out = []
    for w in ws:
        r = rng.random()
        w = w.upper() if r < 0.1 else w.capitalize() if r < 0.2 else w.lower() if r < 0.3 else w
        w = w.rstrip(".,;:!?") + rng.choice((",", ";", "!", "")) if rng.random() < 0.1 else w
        out.append(w)
    return out


def reword(row: dict, kind: str, rng: random.Random) -> dict:
    """A rewording of ``row``: ``case_punct`` (case and punctuation of about 30% / 10% of the words changed),
    ``swapK`` / ``insertK`` / ``deleteK`` (K adjacent-word swaps, filler-word insertions or deletions anywhere in
    the row), ``mixed3`` (one of each, plus case_punct), ``mixed6`` (two of each, plus case_punct)."""
    fields = [(row.get(k) or "").split() for k in FIELDS]
    ops = {"swap2": ["swap"] * 2, "insert2": ["insert"] * 2, "delete2": ["delete"] * 2,
           "mixed3": ["swap", "insert", "delete"], "mixed6": ["swap", "insert", "delete"] * 2}.get(kind, [])
    for op in ops:
        _edit(fields, op, rng)
    if kind in ("case_punct", "mixed3", "mixed6"):
        fields = [_case_punct(ws, rng) for ws in fields]
    return {k: " ".join(ws) for k, ws in zip(FIELDS, fields)}


def alpaca_with_rewordings(rows: list[dict], n: int, seed: int = 0):
    """``rows`` plus rewordings of ``n`` of them (kinds in turn), shuffled: ``(texts, partner, kind)``, where
    ``partner[i]`` is the other row of i's pair (-1: none) and ``kind[i]`` the rewording's kind ("" for none)."""
    rng = random.Random(seed)
    chosen = rng.sample(range(len(rows)), n)
    items = [(text(r), i, "") for i, r in enumerate(rows)]
    items += [(text(reword(rows[i], KINDS[k % len(KINDS)], rng)), i, KINDS[k % len(KINDS)])
              for k, i in enumerate(chosen)]
    rng.shuffle(items)
    where = {}
    for pos, (_, src, _kind) in enumerate(items):
        where.setdefault(src, []).append(pos)
    partner = np.full(len(items), -1)
    kinds = np.array([kind for _, _, kind in items], dtype=object)
    for positions in where.values():
        if len(positions) == 2:
            a, b = positions
            partner[a], partner[b] = b, a
            kinds[a] = kinds[a] or kinds[b]
            kinds[b] = kinds[b] or kinds[a]
    return [t for t, _, _ in items], partner, kinds


# ---- the pool's copies -----------------------------------------------------------------------------

def pool_pairs(pool: list[dict]):
    """``(partner, kind)`` for the pool's rows: each duplicate copy and its clean original point at each other
    (kind ``exact`` / ``near``), each weak answer and its clean twin (kind ``weak``)."""
    partner, kind = np.full(len(pool), -1), np.array([""] * len(pool), dtype=object)
    clean = {(r["instruction"], r["input"]): i for i, r in enumerate(pool) if r["family"] == "clean"}
    for i, r in enumerate(pool):
        if r["family"] == "duplicate":
            instr = r["instruction"]
            if r["kind"] == "near":  # near_copy: "Please " + the instruction with its first letter lowered
                instr = instr[len("Please "):]
                candidates = [k for k in clean if k[1] == r["input"] and k[0][:1].lower() + k[0][1:] == instr]
                key = candidates[0]
            else:
                key = (instr, r["input"])
            j = clean[key]
        elif r["family"] == "weak":
            j = clean[(r["instruction"], r["input"])]
        else:
            continue
        partner[i], partner[j] = j, i
        kind[i] = kind[j] = r["kind"] if r["family"] == "duplicate" else "weak"
    return partner, kind


# ---- measuring -------------------------------------------------------------------------------------

def measure(texts, partner, kinds, threshold: float, ngram: int, positive_kinds) -> dict:
    """Flags at ``threshold`` and ``ngram``; a pair's kind in ``positive_kinds`` makes it a positive."""
    t0 = time.perf_counter()
    index, _ = td.text_duplicates(texts, threshold, ngram=ngram)
    seconds = time.perf_counter() - t0
    flagged = np.flatnonzero(index >= 0)
    right = [i for i in flagged if partner[i] == index[i] and kinds[i] in positive_kinds]
    out = {"flags": len(flagged), "right": len(right), "seconds": seconds,
           "precision": len(right) / len(flagged) if len(flagged) else float("nan")}
    later = [(partner[i], i) for i in range(len(texts)) if 0 <= partner[i] < i]  # (earlier, later)
    shingles = {}

    def sh(i):
        if i not in shingles:
            shingles[i] = td.shingles(texts[i], ngram)
        return shingles[i]

    for kind in sorted(set(positive_kinds)):
        pairs = [(a, b) for a, b in later if kinds[b] == kind]
        found = sum(index[b] == a for a, b in pairs)
        reach = [(a, b) for a, b in pairs if td.jaccard(sh(a), sh(b)) >= threshold]
        out[kind] = {"pairs": len(pairs), "found": int(found),
                     "lsh_misses": int(sum(index[b] < 0 for a, b in reach))}
    pairs = [(a, b) for a, b in later if kinds[b] in positive_kinds]
    out["recall"] = sum(index[b] == a for a, b in pairs) / len(pairs) if pairs else float("nan")
    out["false_flags"] = [int(i) for i in flagged if not (partner[i] == index[i] and kinds[i] in positive_kinds)]
    out["index"] = index
    return out


def demo_set(num_rows: int):
    rows = make_demo_dataset(num_rows=num_rows)
    keys = [tuple(r[k] for k in FIELDS) for r in rows]
    first, partner, kinds = {}, np.full(len(keys), -1), np.array([""] * len(keys), dtype=object)
    for i, k in enumerate(keys):
        if k in first:
            partner[i], kinds[i] = first[k], "repeat"  # later -> first (one direction: the first has many)
        else:
            first[k] = i
    return [text(dict(zip(FIELDS, k))) for k in keys], partner, kinds, np.asarray(rows["is_corrupted"])


def measure_demo(texts, partner, kinds, corrupted, threshold, ngram) -> dict:
    t0 = time.perf_counter()
    index, _ = td.text_duplicates(texts, threshold, ngram=ngram)
    seconds = time.perf_counter() - t0
    flagged = index >= 0
    repeat = kinds == "repeat"
    right = flagged & repeat  # a repeat flagged with any earlier copy of its text
    same = np.array([index[i] >= 0 and texts[index[i]] == texts[i] for i in range(len(texts))])
    other = flagged & ~repeat
    clean_ff = int(sum(1 for i in np.flatnonzero(other) if not corrupted[i] and not corrupted[index[i]]))
    return {"flags": int(flagged.sum()), "repeats": int(repeat.sum()), "found": int((right & same).sum()),
            "precision": float((right & same).sum() / max(flagged.sum(), 1)),
            "recall": float((right & same).sum() / max(repeat.sum(), 1)),
            "false_clean": clean_ff, "false_corrupted": int(other.sum()) - clean_ff, "seconds": seconds,
            "index": index}


def _f(x, digits=3) -> str:
    return "-" if x != x else f"{x:.{digits}f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--alpaca", default="/work/shared/data/train/stanford_alpaca_5000.json")
    p.add_argument("--pool", default=str(ROOT / "benchmarks" / "data" / "default_choice_pool1.json"))
    p.add_argument("--demo_rows", type=int, default=3000)
    p.add_argument("--rewordings", type=int, default=1200)
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.75, 0.8, 0.9])
    p.add_argument("--ngrams", type=int, nargs="+", default=[2, 3, 5])
    p.add_argument("--output", default=str(ROOT / "docs" / "text_duplicates.md"))
    args = p.parse_args()
    import datasketch

    t_start = time.perf_counter()
    demo = demo_set(args.demo_rows)
    alpaca = json.loads(Path(args.alpaca).read_text())
    a_texts, a_partner, a_kinds = alpaca_with_rewordings(alpaca, args.rewordings)
    pool = json.loads(Path(args.pool).read_text())
    p_texts = [text(r) for r in pool]
    p_partner, p_kinds = pool_pairs(pool)

    lines = [
        "# Text near-duplicates: MinHash LSH on word n-grams",
        "",
        f"`python benchmarks/text_duplicates.py` (datasketch {getattr(datasketch, '__version__', '?')}, num_perm "
        f"{td.NUM_PERM}, seed {td.SEED}, LSH bands with P(candidate) >= {td.LSH_RECALL} at the threshold; one CPU "
        "core). What a flag means and "
        "how it is computed: `hf_gradfilter.scores.text_duplicates`. Every LSH candidate is checked against the exact "
        "Jaccard similarity of the two shingle sets, so a flag always has exact similarity >= the threshold. "
        "**False flags** are flags on rows that are not a copy of the row they point to.",
        "",
        "## (i) The demo's exact repeats",
        "",
        f"{args.demo_rows} rows of `make_demo_dataset` (seed 0, 20% corrupted). {int((demo[2] == 'repeat').sum())} "
        "rows repeat an earlier row exactly: these are the positives. A false flag on a *clean* row pairs two "
        "uncorrupted rows that are not the same. A false flag on a *corrupted* row pairs a damaged row with a "
        "row that shares its prompt (the damaged answer is truncated or shuffled) or its answer (swapped in from "
        "that row).",
        "",
        "| n | threshold | flags | precision | recall | false flags: clean rows | false flags: corrupted rows | s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    examples, default = {}, {}
    lower = max([t for t in args.thresholds if t < td.DEFAULT_THRESHOLD], default=None)  # its examples
    for n in args.ngrams:
        for t in args.thresholds:
            r = measure_demo(*demo, t, n)
            lines.append(f"| {n} | {t:g} | {r['flags']} | {_f(r['precision'])} | {_f(r['recall'])} | "
                         f"{r['false_clean']} | {r['false_corrupted']} | {r['seconds']:.1f} |")
            if n == td.NGRAM and t == td.DEFAULT_THRESHOLD:
                default["demo"] = r
            if n == td.NGRAM and t == lower:
                examples["demo"] = [(demo[0][i], demo[0][r["index"][i]]) for i in np.flatnonzero(r["index"] >= 0)
                                    if demo[2][i] != "repeat" and not demo[3][i]
                                    and not demo[3][r["index"][i]]][:3]
    lines += [
        "",
        "## (ii) Constructed rewordings of real Alpaca rows",
        "",
        f"{len(alpaca)} Stanford Alpaca rows plus rewordings of {args.rewordings} of them "
        f"({args.rewordings // len(KINDS)} of each kind below), shuffled together (seed 0). The kinds: "
        "`case_punct` changes the case of about 30% of the words and the punctuation after about 10% of them; "
        "`swap2` swaps two pairs of adjacent words; `insert2` inserts two filler words; `delete2` deletes two "
        "words; `mixed3` does one swap, one insertion and one deletion, plus case_punct; `mixed6` does two of "
        "each, plus case_punct. The edits fall anywhere in the instruction, input or output. The rows have a "
        "median of 47 words (10% under 17). Recall is given for each kind, as found/pairs. An LSH miss is a pair "
        "at or above the threshold that LSH did not propose.",
        "",
        "| n | threshold | flags | precision | recall | " + " | ".join(KINDS) + " | LSH misses | false flags | s |",
        "|---|---|---|---|---|" + "---|" * len(KINDS) + "---|---|---|",
    ]
    for n in args.ngrams:
        for t in args.thresholds:
            r = measure(a_texts, a_partner, a_kinds, t, n, KINDS)
            if n == td.NGRAM and t == td.DEFAULT_THRESHOLD:
                default["alpaca"] = r
            lines.append(f"| {n} | {t:g} | {r['flags']} | {_f(r['precision'])} | {_f(r['recall'])} | "
                         + " | ".join(f"{r[k]['found']}/{r[k]['pairs']}" for k in KINDS)
                         + f" | {sum(r[k]['lsh_misses'] for k in KINDS)} | {len(r['false_flags'])} | "
                           f"{r['seconds']:.1f} |")
    lines += [
        "",
        "## (iii) The real pool's copies (docs/default_choice.md, pool 1)",
        "",
        "302 rows (`benchmarks/data/default_choice_pool1.json`, a copy of the pool `benchmarks/default_choice.py` "
        "built): 200 clean rows, 10 exact copies and 10 near copies of clean rows (a near copy has \"Please \" "
        "before the instruction and one sentence fewer in its answer, or one word fewer when the answer has one "
        "sentence), 40 weak answers (SmolLM2's, to 40 of the clean rows' instructions) and 42 damaged rows. "
        "Precision and recall are over the 20 copies. A weak answer flagged against its clean twin, or the other "
        "way round, is a false flag.",
        "",
        "| n | threshold | flags | precision | recall | exact | near | LSH misses | false flags (weak twins) | s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in args.ngrams:
        for t in args.thresholds:
            r = measure(p_texts, p_partner, p_kinds, t, n, ("exact", "near"))
            weak = sum(p_kinds[i] == "weak" and p_partner[i] == r["index"][i] for i in r["false_flags"])
            lines.append(f"| {n} | {t:g} | {r['flags']} | {_f(r['precision'])} | {_f(r['recall'])} | "
                         f"{r['exact']['found']}/{r['exact']['pairs']} | {r['near']['found']}/{r['near']['pairs']} | "
                         f"{r['exact']['lsh_misses'] + r['near']['lsh_misses']} | {len(r['false_flags'])} ({weak}) | "
                         f"{r['seconds']:.1f} |")
            if n == td.NGRAM and t == td.DEFAULT_THRESHOLD:
                default["pool"] = r
                near = [(a, b) for b, a in enumerate(p_partner) if 0 <= a < b and p_kinds[b] == "near"]
                examples["near"] = sorted(td.jaccard(td.shingles(p_texts[a]), td.shingles(p_texts[b]))
                                          for a, b in near)
    lines += ["", "## Notes", ""]
    if "near" in examples:
        lines.append(f"- The pool's near copies have exact word-{td.NGRAM}-gram Jaccard similarities "
                     + ", ".join(f"{x:.2f}" for x in examples["near"])
                     + f" with their originals; the default ({td.DEFAULT_THRESHOLD:g}) misses those below it.")
    for a, b in examples.get("demo", []):
        lines.append(f"- A clean demo pair flagged at n = {td.NGRAM}, threshold {lower:g}: "
                     f"`{a[:70]!r}` and `{b[:70]!r}`.")
    lines.append(f"\nTotal time {time.perf_counter() - t_start:.0f} s.")
    if len(default) == 3:  # the default's numbers, first
        d, a, p = default["demo"], default["alpaca"], default["pool"]
        lines[4:4] = [
            f"**At the default** (word {td.NGRAM}-grams, Jaccard >= {td.DEFAULT_THRESHOLD:g}, "
            f"`--drop_text_duplicates {td.DEFAULT_THRESHOLD:g}`):",
            "",
            f"- (i) the demo's exact repeats: precision {_f(d['precision'])}, recall {_f(d['recall'])} "
            f"({d['found']}/{d['repeats']}); {d['false_clean']} false flags on clean rows, "
            f"{d['false_corrupted']} on corrupted ones;",
            f"- (ii) rewordings of Alpaca rows: precision {_f(a['precision'])}, recall {_f(a['recall'])} "
            f"({a['right']}/{args.rewordings}: " + ", ".join(f"{k} {a[k]['found']}/{a[k]['pairs']}" for k in KINDS)
            + f"); {len(a['false_flags'])} false flags on the {len(alpaca)} clean rows;",
            f"- (iii) the real pool's copies: precision {_f(p['precision'])}, recall {_f(p['recall'])} (exact "
            f"{p['exact']['found']}/{p['exact']['pairs']}, near {p['near']['found']}/{p['near']['pairs']}); "
            f"{len(p['false_flags'])} false flags.",
            "",
            "Why this default: the module docstring of `hf_gradfilter.scores.text_duplicates`. In short, among the "
            "settings below that flag no clean demo row and no Alpaca row, it finds about as many rewordings as "
            "any other and the most of the pool's near copies. Word n-grams find near-verbatim copies. They miss "
            "rewordings with several edits in a short row, and paraphrases.",
            "",
        ]
    Path(args.output).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
