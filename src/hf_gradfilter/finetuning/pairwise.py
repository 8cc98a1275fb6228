"""Pairwise LLM-as-a-judge: answers of two fine-tuned targets, judged in both orders, as wins/ties/losses.

The protocol of the Superfiltering / GradFiltering papers (docs/method.md, "Evaluation in the paper"):

1. `load_prompts` reads a prompt set (Vicuna, Koala, WizardLM, Self-Instruct, LIMA: five schemas,
   detected by their keys) from a local .jsonl/.json file or a Hub dataset.
2. `generate_answers` answers every prompt greedily with target A, then with target B, rendering the
   prompts with the Alpaca template the targets were trained on.
3. `judge_pairs` asks a judge (`LocalJudge`: any transformers chat model; `EndpointJudge`: any
   OpenAI-compatible server through ``huggingface_hub.InferenceClient``) to score both answers 1-10,
   once with A as Assistant 1 (order ``ab``) and once with B as Assistant 1 (order ``ba``).
   A reply whose first line holds no two scores is asked again once, then recorded as unparseable:
   a score is never guessed.
4. `outcome` turns the two orders into win / tie / loss for A; `report` counts them per set and
   overall with the winning score ``(W - L) / (W + T + L) + 1`` (above 1: A is better), as a markdown
   table (``pairwise.md``) and a bar plot (``pairwise.png``). Unparseable pairs are counted in their
   own column and left out of W, T, L and the winning score.

Answers and judgements are appended to JSON-lines files one record at a time; a rerun skips what
the file already holds, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable
from urllib.parse import urlparse

from tqdm.auto import tqdm

from ..data.formatting import ALPACA_PROMPT, ALPACA_PROMPT_WITH_INPUT

SYSTEM_PROMPT = "You are a helpful and precise assistant for checking the quality of the answer."
JUDGE_TEMPLATE = (
    "[Question]\n{question}\n\n"
    "[The Start of Assistant 1's Answer]\n{answer_1}\n\n[The End of Assistant 1's Answer]\n\n"
    "[The Start of Assistant 2's Answer]\n{answer_2}\n\n[The End of Assistant 2's Answer]\n\n"
    "[System]\nWe would like to request your feedback on the performance of two AI assistants in response "
    "to the user question displayed above.\nPlease rate the helpfulness, relevance, accuracy, level of details "
    "of their responses. Each assistant receives an overall score on a scale of 1 to 10, where a higher score "
    "indicates better overall performance.\nPlease first output a single line containing only two values "
    "indicating the scores for Assistant 1 and 2, respectively. The two scores are separated by a space. In the "
    "subsequent line, please provide a comprehensive explanation of your evaluation, avoiding any potential bias "
    "and ensuring that the order in which the responses were presented does not affect your judgment.\n\n"
)
ORDERS = ("ab", "ba")  # ab: A is Assistant 1; ba: B is Assistant 1
OUTCOMES = ("win", "tie", "loss", "unparseable")


# ----------------------------------------------------------------------------------------- prompts
def _from_row(row: dict, index: int) -> tuple[str | None, str, str]:
    """``(id, instruction, input)`` of one row of any understood schema."""
    if "conversations" in row:  # LIMA: the first user turn, as given
        conv = row["conversations"]
        if isinstance(conv, list):
            turns = [t for t in conv if not isinstance(t, dict) or t.get("from", t.get("role")) in ("human", "user")]
            conv = turns[0] if turns else ""
            conv = conv.get("value", conv.get("content", "")) if isinstance(conv, dict) else conv
        return row.get("id"), str(conv), ""
    if "instances" in row and "instruction" in row:  # Self-Instruct: instruction + the first instance's input
        instances = row["instances"] or [{}]
        return row.get("id"), row["instruction"], str(instances[0].get("input") or "")
    if "Instruction" in row:  # WizardLM
        return row.get("idx"), row["Instruction"], ""
    if "question_id" in row and "text" in row:  # Vicuna
        return row["question_id"], row["text"], ""
    if "prompt" in row:  # Koala
        return row.get("id"), row["prompt"], ""
    if "instruction" in row:  # Alpaca-style rows (AlpacaEval and the like)
        return row.get("id"), row["instruction"], str(row.get("input") or "")
    raise ValueError(f"Row {index} has keys {sorted(row)}: not a known prompt schema (vicuna {{question_id, text}}, "
                     "koala {id, prompt}, wizardlm {idx, Instruction}, self-instruct {id, instruction, instances}, "
                     "lima {conversations}, alpaca {instruction, input}).")


def set_name_from(path_or_hub_id: str) -> str:
    """``.../vicuna_test_set.jsonl`` -> ``vicuna``; ``org/koala-test`` -> ``koala``."""
    stem = os.path.basename(path_or_hub_id.rstrip("/")).split(".")[0]
    return re.sub(r"[_-]?test([_-]?set)?$", "", stem, flags=re.I) or stem


def load_prompts(path_or_hub_id: str, set_name: str | None = None, split: str | None = None) -> list[dict]:
    """The prompts of one set as ``{set, id, key, prompt, instruction, input}`` dicts, in file order.

    ``path_or_hub_id`` is a local ``.jsonl`` / ``.json`` file (a JSON array, or JSON lines), or a Hub
    dataset id or local dataset folder read with ``datasets.load_dataset`` (``split``: default the
    only split, else ``test``). ``prompt`` is the text the judge
    sees (instruction, then the input when there is one); ``instruction``/``input`` feed the Alpaca
    template. ``id`` is the row's own id (LIMA has none: its position); ``key`` = ``set/id`` is unique
    across sets and names the row in the answer and judgement files.
    """
    if os.path.isfile(path_or_hub_id):
        with open(path_or_hub_id, encoding="utf-8") as f:
            text = f.read()
        stripped = text.lstrip()
        rows = json.loads(text) if stripped.startswith("[") else [json.loads(x) for x in text.splitlines() if x.strip()]
    else:
        from datasets import load_dataset

        data = load_dataset(path_or_hub_id)
        split = split or (next(iter(data)) if len(data) == 1 else "test")
        rows = list(data[split])
    name = set_name or set_name_from(path_or_hub_id)
    prompts, seen = [], set()
    for i, row in enumerate(rows):
        row_id, instruction, inp = _from_row(row, i)
        row_id = str(i if row_id is None else row_id)
        if row_id in seen:
            raise ValueError(f"{path_or_hub_id}: id {row_id!r} appears twice; ids must be unique within a set.")
        seen.add(row_id)
        prompt = f"{instruction}\n\n{inp}" if inp.strip() else instruction
        prompts.append(dict(set=name, id=row_id, key=f"{name}/{row_id}", prompt=prompt, instruction=instruction,
                            input=inp))
    return prompts


# -------------------------------------------------------------------------------- JSON-lines files
def _read_jsonl(path: str) -> list[dict]:
    """Records of ``path`` (none when it is missing); a line cut short by a crash is skipped."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            with contextlib.suppress(json.JSONDecodeError):
                if line.strip():
                    out.append(json.loads(line))
    return out


def _appender(path: str):
    """Open ``path`` for appending, starting on a fresh line if the last one was cut short."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    needs_newline = False
    if os.path.exists(path) and os.path.getsize(path):
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            needs_newline = f.read(1) != b"\n"
    f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by the caller
    if needs_newline:
        f.write("\n")
    return f


def _write(f, record: dict) -> None:
    f.write(json.dumps(record, ensure_ascii=False) + "\n")
    f.flush()


# -------------------------------------------------------------------------------------- generation
def _greedy(model, tokenizer, texts: list[str], max_new_tokens: int, add_special_tokens: bool = True) -> list[str]:
    """Greedy continuations of ``texts`` (one left-padded batch), decoded without special tokens."""
    import torch

    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
    finally:
        tokenizer.padding_side = side
    enc = enc.to(model.device)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    new = out[:, enc["input_ids"].shape[1]:]
    return [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]


def render_prompt(prompt: dict, tokenizer=None, prompt_format: str = "alpaca") -> str:
    """The target's input: ``alpaca`` (the training template), ``chat`` (its chat template) or ``plain``."""
    if prompt_format == "alpaca":
        template = ALPACA_PROMPT_WITH_INPUT if prompt["input"].strip() else ALPACA_PROMPT
        return template.format(instruction=prompt["instruction"], input=prompt["input"])
    if prompt_format == "chat":
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt["prompt"]}], tokenize=False,
                                             add_generation_prompt=True)
    if prompt_format == "plain":
        return prompt["prompt"]
    raise ValueError(f"prompt_format must be 'alpaca', 'chat' or 'plain', not {prompt_format!r}.")


def generate_answers(model, tokenizer, prompts: list[dict], path: str, *, max_new_tokens: int = 512,
                     batch_size: int = 8, prompt_format: str = "alpaca") -> dict[str, str]:
    """Answer ``prompts`` greedily; append ``{key, set, id, answer}`` lines to ``path``; return ``{key: answer}``.

    Prompts whose key ``path`` already holds are not generated again (resumable). The rest are
    batched longest first (less padding), ``batch_size`` at a time with left padding.
    """
    done = {r["key"]: r["answer"] for r in _read_jsonl(path) if "key" in r and "answer" in r}
    todo = sorted((p for p in prompts if p["key"] not in done), key=lambda p: -len(p["prompt"]))
    model.eval()
    with _appender(path) as f, tqdm(total=len(todo), desc="Generating answers", unit="prompt") as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            texts = [render_prompt(p, tokenizer, prompt_format) for p in batch]
            answers = _greedy(model, tokenizer, texts, max_new_tokens, add_special_tokens=prompt_format != "chat")
            for p, answer in zip(batch, answers):
                done[p["key"]] = answer
                _write(f, dict(key=p["key"], set=p["set"], id=p["id"], answer=answer))
            bar.update(len(batch))
    return {p["key"]: done[p["key"]] for p in prompts}


# ------------------------------------------------------------------------------------------ judges
class LocalJudge:
    """A local transformers chat model as judge: its chat template, greedy decoding."""

    def __init__(self, model, tokenizer, max_new_tokens: int = 512):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("The judge's tokenizer has no chat template: use an instruct/chat model as judge.")
        self.model, self.tokenizer, self.max_new_tokens = model, tokenizer, max_new_tokens
        model.eval()

    def __call__(self, messages: list[dict]) -> str:
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:  # templates without a system role: fold the system prompt into the user turn
            system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
            rest = [dict(m) for m in messages if m["role"] != "system"]
            rest[0]["content"] = f"{system}\n\n{rest[0]['content']}"
            text = self.tokenizer.apply_chat_template(rest, tokenize=False, add_generation_prompt=True)
        return _greedy(self.model, self.tokenizer, [text], self.max_new_tokens, add_special_tokens=False)[0]


class EndpointJudge:
    """Any OpenAI-compatible chat endpoint (vLLM, TGI, a hosted API) through ``huggingface_hub.InferenceClient``.

    ``base_url`` is the server (``http://localhost:8000/v1``); ``model`` the name the server expects
    (vLLM: the served model; omit for TGI). Your Hugging Face token is not sent unless you pass it as
    ``api_key``. ``HF_HUB_OFFLINE`` blocks the Hub, not your own server: requests to a non-Hub
    ``base_url`` go through even when it is set.
    """

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None,
                 max_tokens: int = 1024, timeout: float | None = 300):
        from huggingface_hub import InferenceClient

        self.base_url, self.model, self.max_tokens = base_url, model, max_tokens
        # "EMPTY" (the vLLM convention) keeps InferenceClient from falling back to the stored HF token.
        self.client = InferenceClient(base_url=base_url, api_key=api_key or "EMPTY", timeout=timeout)
        host = urlparse(base_url).hostname or ""
        self._hub = host.endswith(("huggingface.co", "hf.co", "huggingface.cloud"))

    def __call__(self, messages: list[dict]) -> str:
        with contextlib.ExitStack() as stack:
            if not self._hub:
                stack.enter_context(_hub_offline_mode_off())
            out = self.client.chat_completion(messages, model=self.model, max_tokens=self.max_tokens, temperature=0)
        return out.choices[0].message.content or ""


@contextlib.contextmanager
def _hub_offline_mode_off():
    """``huggingface_hub`` refuses every request in offline mode, even to a loopback server; lift that meanwhile."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = False
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


# --------------------------------------------------------------------------------------- judging
_NUM = r"(\d+(?:\.\d+)?)(?:\s*/\s*10)?"
_PLAIN = re.compile(rf"^{_NUM}(?:\s*[,;]\s*|\s+){_NUM}\.?$")
_LABELLED = re.compile(rf"^assistant\s*1\s*[:=-]?\s*{_NUM}\s*[,;.]?\s*assistant\s*2\s*[:=-]?\s*{_NUM}\.?$", re.I)


def parse_scores(text: str) -> tuple[float, float] | None:
    """The two scores on the reply's first non-empty line, or ``None`` when that line is anything else.

    Understood: ``8 7``, ``8, 7``, ``8.5 7``, ``8/10 7/10``, ``Assistant 1: 8 Assistant 2: 7`` (optionally
    in ``**bold**``). Scores must lie in [0, 10]. Nothing is searched for further down the reply.
    """
    line = next((x.strip() for x in (text or "").splitlines() if x.strip()), "")
    line = line.strip("*`").strip()
    m = _PLAIN.match(line) or _LABELLED.match(line)
    if not m:
        return None
    scores = float(m.group(1)), float(m.group(2))
    return scores if all(0 <= s <= 10 for s in scores) else None


def judge_messages(question: str, answer_1: str, answer_2: str) -> list[dict]:
    """The standard pairwise prompt (Vicuna / Superfiltering evaluation) as chat messages."""
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": JUDGE_TEMPLATE.format(question=question, answer_1=answer_1, answer_2=answer_2)}]


def _digest(messages: list[dict]) -> str:
    return hashlib.blake2b(json.dumps(messages, ensure_ascii=False).encode(), digest_size=8).hexdigest()


def outcome(order1_scores, order2_scores) -> str:
    """A's result against B from ``(A, B)`` scores in order ``ab`` and ``(B, A)`` scores in order ``ba``.

    Win: A better in both orders, or better in one and tied in the other; loss: the mirror; every
    other parsed case (both tied, or a split decision) is a tie; a missing order is ``unparseable``.
    """
    if order1_scores is None or order2_scores is None:
        return "unparseable"
    sign = [(d > 0) - (d < 0) for d in (order1_scores[0] - order1_scores[1], order2_scores[1] - order2_scores[0])]
    if max(sign) == 1 and min(sign) >= 0:
        return "win"
    if min(sign) == -1 and max(sign) <= 0:
        return "loss"
    return "tie"


def winning_score(w: int, t: int, l: int) -> float:  # noqa: E741
    """``(W - L) / (W + T + L) + 1``: 2 all wins, 1 even, 0 all losses; NaN with no judged pair."""
    n = w + t + l
    return (w - l) / n + 1 if n else float("nan")


def _pairs(prompts: list[dict], records: Iterable[dict]) -> list[dict]:
    """One ``{key, set, id, ab, ba, outcome}`` dict per prompt from per-order judgement records."""
    latest = {(r["key"], r["order"]): r for r in records}
    out = []
    for p in prompts:
        ab, ba = (latest.get((p["key"], o), {}).get("scores") for o in ORDERS)
        out.append(dict(key=p["key"], set=p["set"], id=p["id"], ab=ab, ba=ba, outcome=outcome(ab, ba)))
    return out


def judge_pairs(judge: Callable[[list[dict]], str], prompts: list[dict], answers_a: dict[str, str],
                answers_b: dict[str, str], path: str, *, retries: int = 1) -> list[dict]:
    """Judge every prompt's pair in both orders; append one line per order to ``path``; return the pairs.

    A record is ``{key, set, id, order, scores, replies, digest}``: ``scores`` is ``[s1, s2]`` as
    the judge gave them (Assistant 1 first) or ``null`` after ``1 + retries`` unparseable replies,
    all of which are kept in ``replies``. Orders already in ``path`` with the same prompt and answers
    (``digest``) are skipped; changed answers are judged again. Returns one dict per prompt with
    ``ab`` (A, B scores), ``ba`` (B, A scores) and its `outcome`.
    """
    missing = [p["key"] for p in prompts if p["key"] not in answers_a or p["key"] not in answers_b]
    if missing:
        raise KeyError(f"{len(missing)} prompt(s) lack an answer from A or B, e.g. {missing[:3]}.")
    records = _read_jsonl(path)
    done = {(r["key"], r["order"], r.get("digest")) for r in records}
    with _appender(path) as f:
        for p in tqdm(prompts, desc="Judging pairs", unit="pair"):
            a, b = answers_a[p["key"]], answers_b[p["key"]]
            for order, (first, second) in zip(ORDERS, ((a, b), (b, a))):
                messages = judge_messages(p["prompt"], first, second)
                digest = _digest(messages)
                if (p["key"], order, digest) in done:
                    continue
                replies, scores = [], None
                while scores is None and len(replies) <= retries:
                    replies.append(judge(messages))
                    scores = parse_scores(replies[-1])
                record = dict(key=p["key"], set=p["set"], id=p["id"], order=order,
                              scores=list(scores) if scores else None, replies=replies, digest=digest)
                _write(f, record)
                records.append(record)
    return _pairs(prompts, records)


def load_judgements(path: str) -> list[dict]:
    """The pairs of a judgement file written by `judge_pairs` (the latest record of each order wins)."""
    records = _read_jsonl(path)
    prompts = list({r["key"]: dict(key=r["key"], set=r["set"], id=r["id"]) for r in records}.values())
    return _pairs(prompts, records)


# ----------------------------------------------------------------------------------------- report
def tally(pairs: list[dict]) -> dict[str, dict]:
    """``{set: {win, tie, loss, unparseable, pairs, winning_score}}`` in first-seen order, plus ``overall``."""
    groups: dict[str, list[dict]] = {}
    for p in pairs:
        groups.setdefault(p["set"], []).append(p)
    groups["overall"] = list(pairs)
    table = {}
    for name, rows in groups.items():
        counts = {o: sum(r["outcome"] == o for r in rows) for o in OUTCOMES}
        table[name] = dict(**counts, pairs=len(rows),
                           winning_score=winning_score(counts["win"], counts["tie"], counts["loss"]))
    return table


def report(judgements, out_dir: str, name_a: str = "A", name_b: str = "B") -> str:
    """Write ``pairwise.md`` (table) and ``pairwise.png`` (bars) to ``out_dir``; return the markdown.

    ``judgements``: the pairs returned by `judge_pairs` / `load_judgements`, or a judgement file path.
    """
    from ..plots import plt

    pairs = load_judgements(judgements) if isinstance(judgements, str) else judgements
    table = tally(pairs)
    lines = [f"Pairwise judge: **{name_a}** (A) vs **{name_b}** (B), each pair judged in both orders. "
             "Winning score (W - L) / (W + T + L) + 1; above 1 means A is better. Unparseable pairs are "
             "left out of W, T, L and the score.", "",
             "| set | pairs | win | tie | loss | unparseable | winning score |", "|---|---|---|---|---|---|---|"]
    for name, r in table.items():
        bold = "**" if name == "overall" else ""
        lines.append(f"| {bold}{name}{bold} | {r['pairs']} | {r['win']} | {r['tie']} | {r['loss']} | "
                     f"{r['unparseable']} | {bold}{r['winning_score']:.3f}{bold} |")
    markdown = "\n".join(lines) + "\n"
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "pairwise.md"), "w", encoding="utf-8") as f:
        f.write(markdown)

    names = list(table)
    fig, ax = plt.subplots(figsize=(6, 0.6 * len(names) + 1.4), dpi=100)
    left = [0.0] * len(names)
    colors = dict(win="#55A868", tie="#8C8C8C", loss="#C44E52", unparseable="#DDDDDD")
    for o in OUTCOMES:
        widths = [table[n][o] / max(table[n]["pairs"], 1) for n in names]
        ax.barh(names, widths, left=left, color=colors[o], label=o)
        left = [x + w for x, w in zip(left, widths)]
    for i, n in enumerate(names):
        ax.text(1.01, i, f"{table[n]['winning_score']:.2f}", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set(xlim=(0, 1.12), xlabel="fraction of pairs (winning score at the right)",
           title=f"{name_a} vs {name_b}")
    fig.legend(ncol=4, fontsize=7, loc="lower center", frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(os.path.join(out_dir, "pairwise.png"))
    plt.close(fig)
    return markdown
