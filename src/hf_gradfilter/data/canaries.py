"""Canaries: damaged copies of a user's own rows, scored with the rest, to see *on that data* which score ranks
originals above their damage. No labels needed.

`make_canaries` picks ``share`` of the rows (seeded), and writes one damaged copy of each, the damage kinds
taken in turn (`DAMAGE_KINDS`, the kinds of the real-model benchmark, each seen in real scraped or distilled
data). Only the response changes (alpaca ``output``, ``completion``, or the last assistant turn of
``messages``). `canary_table` then gives, for every keep-score, the share of (original, copy) pairs in which
the original scores higher (ties count half): a paired AUROC, 0.5 for a score that cannot tell them apart.

The copies are trained on with the other rows (so the proxy sees ``share`` more rows, a cost of ``share`` more
proxy compute), scored, and then left out of every output (`scores.score.score` keeps them in
``<output_dir>/canaries``): selection never sees them. Their *effect* stays: the members also trained on a
damaged copy of ``share`` of the rows, which shifts those originals' (and, slightly, every row's) scores.
"""

from __future__ import annotations

import random
import re

import numpy as np

DAMAGE_KINDS = ("truncated", "off_topic", "mojibake", "html_residue", "repetition", "prompt_echo", "refusal")
REFUSALS = [
    "I'm sorry, but as an AI language model, I cannot complete this request.",
    "As an AI language model, I do not have personal opinions or the ability to perform this task.",
    "I apologize, but I am not able to help with that. Is there anything else I can assist you with?",
    "As an AI, I cannot provide an answer to this question. Please consult a qualified professional.",
]
HTML_FOOTER = ("</p></div>\n<div class=\"share\">Share this: Facebook | Twitter | Pinterest</div>\n"
               "<footer>&copy; 2023 All rights reserved. | Privacy Policy | Subscribe to our newsletter</footer>")


def sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def damage_text(response: str, kind: str, *, prompt: str, donor: str, rng: random.Random) -> str:
    """``response`` with one kind of damage (``prompt``: the request, for ``prompt_echo``; ``donor``: another
    row's response, for ``off_topic``)::

        truncated     the first 25-50% of the words (a teacher's max-token limit)
        off_topic     another row's response (misaligned pairs from merging or scraping)
        mojibake      curly quotes, dashes and some no-break spaces, UTF-8 read as cp1252 ('â€™', 'Â')
        html_residue  the response inside page markup with a share bar and a footer
        repetition    the first sentence (at most 16 words) six times (a degenerate generation loop)
        prompt_echo   the request restated
        refusal       "As an AI language model, I cannot ..." boilerplate
    """
    words = response.split()
    if kind == "truncated":
        keep = max(3, int(len(words) * rng.uniform(0.25, 0.5)))
        return " ".join(words[:keep]) if len(words) > 3 else " ".join(words[:2])
    if kind == "off_topic":
        return donor
    if kind == "mojibake":
        text = response.replace("'", "\u2019").replace('"', "\u201c").replace(" - ", " \u2013 ")
        text = "".join(c + "\u00a0" if c == " " and rng.random() < 0.25 else c for c in text)
        text = text.replace("\u00a0 ", "\u00a0")
        return text.encode("utf-8").decode("cp1252", errors="replace")
    if kind == "html_residue":
        body = "</p>\n<p>".join(sentences(response)) or response
        return f"<div class=\"post-content\"><p>{body}&nbsp;{HTML_FOOTER}"
    if kind == "repetition":
        first = (sentences(response) or [response])[0]
        return " ".join([" ".join(first.split()[:16])] * 6)
    if kind == "prompt_echo":
        return prompt.strip()
    if kind == "refusal":
        return rng.choice(REFUSALS)
    raise ValueError(f"unknown damage kind {kind!r}; choose from {', '.join(DAMAGE_KINDS)}.")


def _response(row: dict, fmt) -> tuple[str, str] | None:
    """(request text, response text) of a row in a resolved format; None when it has no non-empty response."""
    if fmt.kind == "alpaca":
        request = f"{row[fmt.instruction_column] or ''} {row.get(fmt.input_column) or ''}"
        response = row[fmt.output_column]
    elif fmt.kind == "prompt_completion":
        request, response = row[fmt.prompt_column], row[fmt.completion_column]
    else:
        turns = [t for t in (row[fmt.messages_column] or []) if isinstance(t, dict)]
        last = [i for i, t in enumerate(turns) if t.get("role") == "assistant"]
        if not last:
            return None
        request = " ".join(str(t.get("content") or "") for t in turns[:last[-1]] if t.get("role") == "user")
        response = turns[last[-1]].get("content")
    if not isinstance(response, str) or not response.strip():
        return None
    return str(request or ""), response


def _with_response(row: dict, fmt, text: str) -> dict:
    row = dict(row)
    if fmt.kind == "alpaca":
        row[fmt.output_column] = text
    elif fmt.kind == "prompt_completion":
        row[fmt.completion_column] = text
    else:
        turns = [dict(t) for t in row[fmt.messages_column]]
        last = max(i for i, t in enumerate(turns) if t.get("role") == "assistant")
        turns[last]["content"] = text
        row[fmt.messages_column] = turns
    return row


def make_canaries(rows, fmt, share: float = 0.05, seed: int = 0, kinds=DAMAGE_KINDS):
    """Damaged copies of ``share`` of ``rows`` (a `datasets.Dataset` in a resolved `InstructionFormat`).

    Returns ``(canaries, sources, kinds)``: a Dataset with the columns of ``rows``, and for each of its rows the
    position of its original in ``rows`` and its damage kind. At least one row per kind when ``rows`` has
    enough; a copy that comes out equal to its original (e.g. mojibake of an answer with no space or quote) is
    dropped."""
    from datasets import Dataset

    if not 0 < share < 1:
        raise ValueError(f"canaries={share}: give the share of rows to copy with damage, in (0, 1), e.g. 0.05.")
    if fmt.kind not in ("alpaca", "prompt_completion", "messages"):
        raise ValueError(f"Canaries need raw text rows (alpaca, prompt_completion or messages), not {fmt.kind!r}.")
    bad = [k for k in kinds if k not in DAMAGE_KINDS]
    if bad:
        raise ValueError(f"unknown damage kind(s) {bad}; choose from {', '.join(DAMAGE_KINDS)}.")
    parts = [_response(r, fmt) for r in rows]
    usable = [i for i, p in enumerate(parts) if p is not None]  # rows with a non-empty response
    n = len(usable)
    if n < 2:
        raise ValueError(f"Canaries need at least 2 rows with a non-empty response (got {n}): off_topic takes "
                         "another row's response.")
    count = min(n, max(len(kinds), int(round(share * len(rows)))))
    rng = random.Random(seed)
    picked = sorted(rng.sample(usable, count))
    out, sources, made = [], [], []
    for j, i in enumerate(picked):
        kind = kinds[j % len(kinds)]
        prompt, response = parts[i]
        donor = usable[(usable.index(i) + 1 + rng.randrange(n - 1)) % n]  # any other usable row
        text = damage_text(response, kind, prompt=prompt, donor=parts[donor][1], rng=rng)
        if text == response:
            continue
        copy = _with_response(rows[i], fmt, text)
        if "example_id" in copy:  # a copy is a new row: ids after every real row's
            copy["example_id"] = len(rows) + len(out)
        out.append(copy)
        sources.append(i)
        made.append(kind)
    if not out:
        raise ValueError("No canary differs from its original (the responses are too short to damage).")
    return Dataset.from_list(out, features=rows.features), np.asarray(sources, dtype=np.int64), made


def canary_table(originals: dict[str, np.ndarray], copies: dict[str, np.ndarray], kinds) -> dict[str, dict]:
    """Per keep-score: the share of pairs (original, its damaged copy) where the original scores higher, ties
    counting half (NaN pairs left out), overall (``"all"``) and per damage kind. ``originals[c]``,
    ``copies[c]``: ``(P,)`` scores of pair p's original and copy; ``kinds``: ``(P,)`` the copies' kinds."""
    kinds = np.asarray(kinds)
    table = {}
    for name in originals:
        a, b = np.asarray(originals[name], dtype=np.float64), np.asarray(copies[name], dtype=np.float64)
        ok = np.isfinite(a) & np.isfinite(b)
        if not ok.any():
            continue
        win = np.where(a > b, 1.0, np.where(a == b, 0.5, 0.0))
        row = {"all": float(win[ok].mean()), "pairs": int(ok.sum())}
        for k in dict.fromkeys(kinds.tolist()):
            sel = ok & (kinds == k)
            row[k] = float(win[sel].mean()) if sel.any() else float("nan")
        table[name] = row
    return dict(sorted(table.items(), key=lambda kv: -kv[1]["all"]))
