"""Text near-duplicates by MinHash LSH (datasketch): for each row, an earlier row whose text is nearly the same.

This looks at the words alone, beside the gradient-sketch near-duplicates of `scores.duplicates`, which need a
scored record with ``--sketch_dim``. The two can disagree: a proxy can give two unrelated rows with the same answer
close gradients, and two copies of one row can have different gradients in train mode.

**Text of a row.** The row's fields, in order, joined by newlines: alpaca ``instruction``, ``input``, ``output``;
prompt/completion ``prompt``, ``completion``; a conversation's turn contents (`row_texts`). A null is read as ``""``.

**Normalisation and shingles.** The text is NFKC-normalised and lower-cased, then split into words, which are
the runs of letters, digits and ``_`` (regular expression ``\\w+``). So case, punctuation and whitespace are
ignored: ``"Hello,  World!"`` and ``"hello world"`` are the same text. A row's shingle set ``S_i`` is the set of
its word ``n``-grams (``n = NGRAM = 5``). A row with fewer than ``n`` words (but at least one) has a single
shingle, its whole word sequence. A row with no word has no shingle: it is never flagged and never matched.
Each shingle is hashed to 64 bits (blake2b), so ``S_i`` is stored as a sorted ``uint64`` array.

**Rule.** ``J(i, j) = |S_i ∩ S_j| / |S_i ∪ S_j|`` (exact Jaccard similarity of the shingle sets). Row ``i`` is
flagged with ``argmax_{j < i, J(i, j) >= threshold} J(i, j)``, the most similar earlier row (on ties, the
smallest ``j``), or ``-1`` when no earlier row reaches ``threshold``. So the first row of a group of copies is
never flagged. A chain a ~ b ~ c flags b and c even when ``J(a, c) < threshold``.

**How the candidates are found.** Comparing every pair would take ``O(N^2)`` set intersections. Instead each
row gets a MinHash signature (``num_perm = NUM_PERM = 128`` permutations, ``seed = SEED = 1``, datasketch's
default hash of each shingle's 8 bytes). The signatures go into a `datasketch.MinHashLSH` index of ``b`` bands
of ``r`` rows (``b * r <= num_perm``, `lsh_bands`). A pair of similarity ``J`` becomes a candidate with
probability ``1 - (1 - J^r)^b``, and ``r`` is the largest band width whose probability at ``J = threshold`` is
at least ``LSH_RECALL = 0.99`` (``b = num_perm // r``). At threshold 0.7 this gives ``r = 4, b = 32``: 0.9998
at 0.7, 0.99 at 0.6, 0.56 at 0.4. Rows are visited in order: row ``i`` queries the index, which holds rows
``0 .. i-1``, and is then inserted.

**Every candidate is confirmed by the exact** ``J(i, j)`` of the shingle sets. So an LSH false positive (an
estimate above the threshold for a pair below it) never flags a row. An LSH false negative (a pair at or above
the threshold that never shares a band) goes unflagged. `benchmarks/text_duplicates.py` measures how often.

**The choices** (measured in docs/text_duplicates.md; no set was held out for the choice).

- ``n = 5`` and ``threshold = 0.7`` (the default of ``--drop_text_duplicates``). Of the settings tried
  (``n`` in 2, 3, 5; thresholds 0.5 to 0.9), these flag no clean row of the 3,000-row demo dataset, whose rows
  share templates, and no row of 5,000 Alpaca rows. Among the settings that flag none, they find as many
  constructed rewordings of Alpaca rows as 3-grams at 0.8 (47%: every case and punctuation change, about
  half of the rows with two words swapped, inserted or deleted). They also find more of the real pool's near
  copies: 19 of 20 against 16 of 20. Lower thresholds or shorter shingles find more rewordings, but they also
  flag demo rows that only share a template and a long run of numbers ("List the numbers from 54 to 73."
  against "... from 54 to 71."). A heavy rewording (six edits in a 47-word row) is out of reach of any
  setting tried: word n-grams find near-verbatim copies, not paraphrases.
- ``num_perm = 128`` and ``LSH_RECALL = 0.99``. The benchmark's pairs at or above the threshold were all
  proposed at the default (at most 1 missed in any other setting). The estimate itself is never the answer.
- ``seed = 1``: datasketch's seed, fixed, so the flags are the same on every run and machine with the same
  datasketch (its 2.x signatures differ from 1.x ones; the confirmed flags can differ only by LSH misses).

**Shapes and cost.** The input is ``N`` texts; the output is ``(N,)`` int64 indices and ``(N,)`` float32
similarities. The time is ``O(total words * num_perm)`` for the signatures, plus the candidates' set
intersections. Memory holds every row's shingle hashes (8 bytes per shingle) and the LSH index (``b`` keys per
row). Measured: 6,200 Alpaca rows take about 2 s on one CPU core (docs/text_duplicates.md).

datasketch is an optional dependency: ``pip install 'hf-gradfilter[dedup]'``.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import asdict

import numpy as np

from ..data.formatting import InstructionFormat, _messages, _text

NGRAM = 5
NUM_PERM = 128
SEED = 1
DEFAULT_THRESHOLD = 0.7
LSH_RECALL = 0.99  # P(a pair at the threshold is a candidate); candidates are confirmed exactly, misses are not
COLUMN = "text_duplicate_of"
JACCARD_COLUMN = "text_duplicate_jaccard"
_WORD = re.compile(r"\w+")


def _datasketch():
    try:
        import datasketch
    except ImportError:
        raise ImportError("Text near-duplicates need datasketch, an optional dependency: "
                          "pip install 'hf-gradfilter[dedup]'.") from None
    return datasketch


def check_threshold(threshold: float, flag: str = "threshold") -> None:
    if not (isinstance(threshold, (int, float)) and 0 < threshold <= 1):
        raise ValueError(f"{flag} {threshold}: give a Jaccard similarity in (0, 1], e.g. {DEFAULT_THRESHOLD}.")


def check_text_duplicates(threshold: float, flag: str = "threshold") -> None:
    """Refuse, before any work, a threshold outside ``(0, 1]`` or a missing datasketch."""
    check_threshold(threshold, flag)
    _datasketch()


def words(text: str) -> list[str]:
    """The normalised words of ``text``: NFKC, lower-cased, runs of ``\\w`` (punctuation and spacing dropped)."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).lower())


def shingles(text: str, ngram: int = NGRAM) -> np.ndarray:
    """The sorted, unique 64-bit hashes of ``text``'s word ``ngram``-grams (one shingle, the whole text, when it
    has fewer than ``ngram`` words; none when it has no word)."""
    w = words(text)
    grams = {" ".join(w[i:i + ngram]) for i in range(max(1, len(w) - ngram + 1))} if w else set()
    hashes = [int.from_bytes(hashlib.blake2b(g.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
              for g in grams]
    return np.unique(np.asarray(hashes, dtype=np.uint64))


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard similarity of two sorted unique hash arrays (0 when both are empty)."""
    inter = len(np.intersect1d(a, b, assume_unique=True))
    union = len(a) + len(b) - inter
    return inter / union if union else 0.0


def lsh_bands(threshold: float, num_perm: int = NUM_PERM, recall: float = LSH_RECALL) -> tuple[int, int]:
    """``(b, r)``: the widest band ``r`` (``b = num_perm // r`` bands) with ``1 - (1 - threshold^r)^b >= recall``,
    the probability that a pair of Jaccard similarity ``threshold`` shares a band (``(num_perm, 1)`` if none)."""
    for r in range(num_perm, 0, -1):
        b = num_perm // r
        if 1 - (1 - threshold ** r) ** b >= recall:
            return b, r
    return num_perm, 1


def text_duplicates(texts, threshold: float = DEFAULT_THRESHOLD, *, ngram: int = NGRAM, num_perm: int = NUM_PERM,
                    seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """For each text, the most similar earlier text with word-``ngram`` Jaccard similarity ``>= threshold``.

    Args:
        texts: ``N`` strings, in row order (`row_texts` makes them from a dataset).
        threshold: the Jaccard similarity in ``(0, 1]`` at which a row counts as a copy of an earlier one.
        ngram, num_perm, seed: shingle length, MinHash permutations and their seed (the module docstring says why
            3, 128 and 1).

    Returns:
        ``(N,)`` int64, the position of the earlier row (-1: none), and ``(N,)`` float32, the exact Jaccard
        similarity of the pair (NaN where -1). The result does not depend on the run: MinHash is seeded, and
        the candidates are confirmed exactly.
    """
    check_threshold(threshold)
    if ngram < 1 or num_perm < 2:
        raise ValueError(f"ngram={ngram}, num_perm={num_perm}: use ngram >= 1 and num_perm >= 2 (e.g. 3 and 128).")
    ds = _datasketch()
    sets = [shingles(t, ngram) for t in texts]
    n = len(sets)
    index = np.full(n, -1, dtype=np.int64)
    similarity = np.full(n, np.nan, dtype=np.float32)
    lsh = ds.MinHashLSH(num_perm=num_perm, params=lsh_bands(threshold, num_perm))
    signatures = ds.MinHash.generator(([h.tobytes() for h in s] for s in sets), num_perm=num_perm, seed=seed)
    for i, (s, sig) in enumerate(zip(sets, signatures)):
        if not len(s):
            continue
        best, best_j = -1.0, -1
        for j in sorted(lsh.query(sig)):
            sim = jaccard(s, sets[j])
            if sim >= threshold and sim > best:  # ascending j: the smallest j keeps a tie
                best, best_j = sim, j
        if best_j >= 0:
            index[i], similarity[i] = best_j, best
        lsh.insert(i, sig, check_duplication=False)
    return index, similarity


def row_texts(dataset, fmt: InstructionFormat | None = None) -> list[str]:
    """Each row's text for `text_duplicates`: its formatted fields joined by newlines (alpaca: instruction, input,
    output; prompt/completion; a conversation's turn contents). ``fmt``: the columns (default: found from the
    column names, `InstructionFormat.resolve`)."""
    try:
        fmt = (fmt or InstructionFormat()).resolve(dataset.column_names)
    except ValueError as err:
        raise ValueError(f"Text near-duplicates read each row's text. {err}") from None
    if fmt.kind == "tokenized":
        raise ValueError("Text near-duplicates need the rows' text; this dataset holds only token ids (input_ids, "
                         "labels). Pass the text rows.")
    if fmt.kind == "messages":
        column = fmt.messages_column
        return ["\n".join(_text(m["content"]) for m in _messages(v, column, i))
                for i, v in enumerate(dataset[column])]
    columns = fmt.used_columns(dataset.column_names)
    values = [dataset[c] for c in columns]
    return ["\n".join(_text(v[i], c, i) for c, v in zip(columns, values)) for i in range(len(dataset))]


def text_settings(threshold: float, fmt: InstructionFormat | None = None) -> dict:
    """What decides the text near-duplicate columns besides the rows: the threshold, shingles, MinHash and LSH
    settings and the row format (`run` puts them in its columns stage's fingerprint)."""
    return {"threshold": threshold, "ngram": NGRAM, "num_perm": NUM_PERM, "seed": SEED, "lsh_recall": LSH_RECALL,
            "format": asdict(fmt or InstructionFormat())}


def add_text_duplicate_columns(dataset, threshold: float = DEFAULT_THRESHOLD, fmt: InstructionFormat | None = None):
    """``dataset`` with ``text_duplicate_of`` (the position in ``dataset`` of the earlier row whose text is most
    like the row's, if their word-5-gram Jaccard similarity is ``>= threshold``; -1: none) and
    ``text_duplicate_jaccard`` (that similarity; NaN: none), replacing any columns of those names, and the stats
    ``{"text_duplicates": {"threshold", "ngram", "num_perm", "seed", "lsh_recall", "num_flagged", "datasketch"}}``.

    ``select --drop_text_duplicates JACCARD`` never selects the flagged rows."""
    index, similarity = text_duplicates(row_texts(dataset, fmt), threshold)
    for name in (COLUMN, JACCARD_COLUMN):
        if name in dataset.column_names:
            dataset = dataset.remove_columns(name)
    dataset = dataset.add_column(COLUMN, index.tolist())
    dataset = dataset.add_column(JACCARD_COLUMN, similarity.astype(np.float64).tolist())
    stats = {k: v for k, v in text_settings(threshold).items() if k != "format"}
    stats.update(num_flagged=int((index >= 0).sum()), datasketch=getattr(_datasketch(), "__version__", None))
    return dataset, {"text_duplicates": stats}
