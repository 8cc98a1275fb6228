"""Pairwise LLM-as-a-judge: outcome rules, score parsing, the five prompt schemas, resumable generation
and judging, through a fake OpenAI-compatible server on loopback and a tiny local judge (all offline)."""

from __future__ import annotations

import json
import math
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from hf_gradfilter.demo.tiny import tiny_llama
from hf_gradfilter.finetuning.pairwise import (
    EndpointJudge,
    LocalJudge,
    generate_answers,
    judge_messages,
    judge_pairs,
    load_judgements,
    load_prompts,
    outcome,
    parse_scores,
    report,
    set_name_from,
    tally,
    winning_score,
)

# ------------------------------------------------------------------------------ outcome rules
# order 1 = (A, B) scores with A shown first; order 2 = (B, A) scores with B shown first.
CASES = [
    ((8, 6), (6, 8), "win"),    # A better in both orders
    ((8, 6), (7, 7), "win"),    # better, then tied
    ((7, 7), (5, 9), "win"),    # tied, then better
    ((6, 8), (8, 6), "loss"),   # B better in both orders
    ((6, 8), (7, 7), "loss"),   # worse, then tied
    ((7, 7), (9, 5), "loss"),   # tied, then worse
    ((8, 6), (8, 6), "tie"),    # split decision: each order favours the answer shown first
    ((6, 8), (6, 8), "tie"),    # split decision the other way
    ((7, 7), (7, 7), "tie"),    # tied in both orders
    ((8.5, 8), (8, 8), "win"),  # half points count
    (None, (6, 8), "unparseable"),
    ((8, 6), None, "unparseable"),
    (None, None, "unparseable"),
]


@pytest.mark.parametrize("order1,order2,expected", CASES)
def test_outcome_rules(order1, order2, expected):
    assert outcome(order1, order2) == expected


def test_outcome_mirror_symmetry():
    for o1, o2, expected in CASES:
        if o1 is None or o2 is None:
            continue
        mirrored = outcome(o2, o1)  # the same judgements with A and B swapped
        assert mirrored == {"win": "loss", "loss": "win", "tie": "tie"}[expected]


def test_winning_score():
    assert winning_score(10, 0, 0) == 2.0
    assert winning_score(0, 0, 10) == 0.0
    assert winning_score(3, 4, 3) == 1.0
    assert winning_score(5, 3, 2) == pytest.approx((5 - 2) / 10 + 1)
    assert winning_score(1, 2, 0) == pytest.approx(1 + 1 / 3)
    assert math.isnan(winning_score(0, 0, 0))


def test_tally_excludes_unparseable_from_score():
    pairs = [dict(set="s", outcome=o) for o in ("win", "win", "tie", "loss", "unparseable")]
    t = tally(pairs)
    assert t["s"] == t["overall"]
    assert (t["s"]["win"], t["s"]["tie"], t["s"]["loss"], t["s"]["unparseable"], t["s"]["pairs"]) == (2, 1, 1, 1, 5)
    assert t["s"]["winning_score"] == pytest.approx(1.25)


# ---------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("text,expected", [
    ("8 7\nAssistant 1 is more detailed.", (8.0, 7.0)),
    ("8, 7\nbecause", (8.0, 7.0)),
    ("8,7", (8.0, 7.0)),
    ("8.5 7", (8.5, 7.0)),
    ("10 1", (10.0, 1.0)),
    ("\n\n  9 3  \nexplanation", (9.0, 3.0)),
    ("Assistant 1: 8 Assistant 2: 7\nwhy", (8.0, 7.0)),
    ("Assistant 1: 8, Assistant 2: 7", (8.0, 7.0)),
    ("assistant 1: 6/10 assistant 2: 9/10", (6.0, 9.0)),
    ("**7 4**\n", (7.0, 4.0)),
])
def test_parse_scores(text, expected):
    assert parse_scores(text) == expected


@pytest.mark.parametrize("text", [
    "", "   \n ", "Assistant 1 is better.\n8 7", "87", "8.7", "8 7 6", "8", "Scores: 8 and 7",
    "11 3", "2023 5", "eight seven", "8\n7", "The scores are 8 7",
])
def test_parse_scores_unparseable(text):
    assert parse_scores(text) is None


# ----------------------------------------------------------------------------- prompt schemas
SCHEMAS = {
    "vicuna_test_set.jsonl": [
        {"question_id": 1, "text": "How can I improve my time management skills?", "category": "generic"},
        {"question_id": 2, "text": "What is stress?", "category": "generic"},
    ],
    "koala_test_set.jsonl": [
        {"id": "koala_0", "prompt": "List three films from 1935."},
        {"id": "koala_1", "prompt": "Turn a speech into a song."},
    ],
    "wizardlm_test_set.jsonl": [
        {"idx": 1, "Skill": "Math", "Difficulty": 1, "Instruction": "What is 120 / 2?"},
        {"idx": 2, "Skill": "Math", "Difficulty": 3, "Instruction": "If x + y = z, what is x?"},
    ],
    "sinstruct_test_set.jsonl": [
        {"id": "user_oriented_task_0", "motivation_app": "Grammarly", "instruction": "Rewrite the sentence.",
         "instances": [{"input": "If you have any questions, let me know.", "output": "Questions? Ask."}]},
        {"id": "user_oriented_task_1", "motivation_app": "Google", "instruction": "Name a prime.",
         "instances": [{"input": "", "output": "2"}]},
    ],
    "lima_test_set.jsonl": [
        {"conversations": "I'm buying a car for the first time, any advice?"},
        {"conversations": "Write a haiku.\nAbout rain."},
    ],
}


def _write_sets(tmp_path):
    paths = {}
    for name, rows in SCHEMAS.items():
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths[name.split("_")[0]] = str(path)
    return paths


def test_load_prompts_five_schemas(tmp_path):
    paths = _write_sets(tmp_path)
    vicuna, koala, wizard, sinst, lima = (load_prompts(paths[k]) for k in ("vicuna", "koala", "wizardlm",
                                                                            "sinstruct", "lima"))
    assert [p["set"] for p in vicuna + koala + wizard + sinst + lima] == (
        ["vicuna"] * 2 + ["koala"] * 2 + ["wizardlm"] * 2 + ["sinstruct"] * 2 + ["lima"] * 2)
    assert vicuna[0] == dict(set="vicuna", id="1", key="vicuna/1", prompt=SCHEMAS["vicuna_test_set.jsonl"][0]["text"],
                                  instruction=SCHEMAS["vicuna_test_set.jsonl"][0]["text"], input="")
    assert koala[1]["id"] == "koala_1" and koala[1]["prompt"] == "Turn a speech into a song."
    assert wizard[1]["id"] == "2" and wizard[1]["prompt"] == "If x + y = z, what is x?"
    assert sinst[0]["prompt"] == "Rewrite the sentence.\n\nIf you have any questions, let me know."
    assert sinst[0]["instruction"] == "Rewrite the sentence." and sinst[0]["input"].startswith("If you")
    assert sinst[1]["prompt"] == "Name a prime." and sinst[1]["input"] == ""
    assert [p["id"] for p in lima] == ["0", "1"] and lima[1]["prompt"] == "Write a haiku.\nAbout rain."
    assert len({p["key"] for p in vicuna + wizard}) == 4  # same raw ids, distinct keys


def test_load_prompts_json_array_set_name_and_errors(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps([{"instruction": "Say hi.", "input": "Bob"},
                                {"conversations": ["Hello?", "Hi there."]}]))
    prompts = load_prompts(str(path), set_name="custom")
    assert [p["set"] for p in prompts] == ["custom", "custom"]
    assert prompts[0]["prompt"] == "Say hi.\n\nBob" and prompts[1]["prompt"] == "Hello?"
    assert set_name_from("/x/vicuna_test_set.jsonl") == "vicuna" and set_name_from("org/koala-test") == "koala"
    folder = tmp_path / "koala-test"  # a dataset folder (or Hub id) goes through datasets.load_dataset
    folder.mkdir()
    (folder / "test.jsonl").write_text('{"id": "k0", "prompt": "Hi?"}\n{"id": "k1", "prompt": "Bye?"}\n')
    assert [(p["key"], p["prompt"]) for p in load_prompts(str(folder))] == [("koala/k0", "Hi?"), ("koala/k1", "Bye?")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"foo": 1}\n')
    with pytest.raises(ValueError, match="not a known prompt schema"):
        load_prompts(str(bad))
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n')
    with pytest.raises(ValueError, match="appears twice"):
        load_prompts(str(dup))


# ------------------------------------------------------------------------------- generation
@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    return tiny_llama(tokenizer)


def _count_generate(model, monkeypatch):
    calls = []
    original = model.generate

    def counting(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "generate", counting)
    return calls


def test_generate_answers_resumable(tmp_path, tokenizer, tiny_model, monkeypatch):
    prompts = load_prompts(_write_sets(tmp_path)["sinstruct"]) + load_prompts(_write_sets(tmp_path)["vicuna"])
    path = str(tmp_path / "answers_a.jsonl")
    calls = _count_generate(tiny_model, monkeypatch)
    first = generate_answers(tiny_model, tokenizer, prompts, path, max_new_tokens=5, batch_size=3)
    assert calls == [3, 1] and set(first) == {p["key"] for p in prompts}
    assert tokenizer.padding_side == "right"  # restored after left-padded generation
    lines = open(path).read().splitlines()
    assert len(lines) == 4
    # the run is killed while writing the last answer: the file ends in half a line
    with open(path, "w") as f:
        f.write("\n".join(lines[:3]) + "\n" + lines[3][:10])
    calls.clear()
    second = generate_answers(tiny_model, tokenizer, prompts, path, max_new_tokens=5, batch_size=3)
    assert calls == [1]  # only the missing answer is generated again
    assert second == first  # greedy: the same answer
    calls.clear()
    generate_answers(tiny_model, tokenizer, prompts, path, max_new_tokens=5)
    assert calls == []
    records = [json.loads(x) for x in open(path).read().splitlines() if x.startswith("{") and x.endswith("}")]
    assert sorted(r["key"] for r in records) == sorted(p["key"] for p in prompts)


# ------------------------------------------------------------------- fake OpenAI-compatible server
PROMPTS = [dict(set=s, id=str(i), key=f"{s}/{i}", prompt=f"question {s} {i}", instruction=f"question {s} {i}",
                input="") for s, i in (("vicuna", 1), ("vicuna", 2), ("koala", 1), ("koala", 2))]
ANSWERS_A = {p["key"]: f"answer-A {p['key']}" for p in PROMPTS}
ANSWERS_B = {p["key"]: f"answer-B {p['key']}" for p in PROMPTS}
# replies per (question, order); a list is served one item per call (the last one repeats)
SCRIPT = {
    ("question vicuna 1", "ab"): ["8 6\nA is better"], ("question vicuna 1", "ba"): ["5, 9\nA is better"],  # win
    ("question vicuna 2", "ab"): ["7 7"], ("question vicuna 2", "ba"): ["Assistant 1: 9 Assistant 2: 4"],  # loss
    ("question koala 1", "ab"): ["I think Assistant 1 is better.", "9 3\nretried"],  # retry then parse
    ("question koala 1", "ba"): ["4 8"],  # -> win
    ("question koala 2", "ab"): ["Both are fine."], ("question koala 2", "ba"): ["6 6"],  # unparseable
}


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server = self.server
        server.requests.append(dict(path=self.path, body=body, auth=self.headers.get("Authorization")))
        user = body["messages"][-1]["content"]
        question = re.search(r"\[Question\]\n(.*?)\n", user).group(1)
        first = re.search(r"\[The Start of Assistant 1's Answer\]\n(\S+)", user).group(1)
        key = (question, "ab" if first == "answer-A" else "ba")
        n = server.counts[key] = server.counts.get(key, 0) + 1
        replies = SCRIPT[key]
        content = replies[min(n, len(replies)) - 1]
        out = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": body.get("model"),
                          "choices": [{"index": 0, "finish_reason": "stop",
                                       "message": {"role": "assistant", "content": content}}],
                          "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.requests, server.counts = [], {}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_judge_through_endpoint(tmp_path, fake_server, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_must_not_leak")
    url = f"http://127.0.0.1:{fake_server.server_address[1]}/v1"
    judge = EndpointJudge(url, model="judge-model", max_tokens=64)
    path = str(tmp_path / "judgements.jsonl")
    pairs = judge_pairs(judge, PROMPTS, ANSWERS_A, ANSWERS_B, path)
    assert [p["outcome"] for p in pairs] == ["win", "loss", "win", "unparseable"]
    assert pairs[0]["ab"] == [8.0, 6.0] and pairs[0]["ba"] == [5.0, 9.0]
    c = fake_server.counts
    assert c[("question koala 1", "ab")] == 2  # unparseable once, retried, parsed
    assert c[("question koala 2", "ab")] == 2  # unparseable twice: recorded as such, not retried further
    assert c[("question vicuna 1", "ab")] == 1 and c[("question koala 2", "ba")] == 1
    req = fake_server.requests[0]
    assert req["path"] == "/v1/chat/completions"
    assert req["body"]["model"] == "judge-model" and req["body"]["temperature"] == 0
    assert req["body"]["messages"] == judge_messages("question vicuna 1", ANSWERS_A["vicuna/1"], ANSWERS_B["vicuna/1"])
    assert all("hf_must_not_leak" not in (r["auth"] or "") for r in fake_server.requests)
    records = [json.loads(x) for x in open(path)]
    bad = [r for r in records if r["key"] == "koala/2" and r["order"] == "ab"][0]
    assert bad["scores"] is None and bad["replies"] == ["Both are fine."] * 2

    # resumable: a second run asks nothing; a run after losing the last line asks for that order only
    n = len(fake_server.requests)
    assert judge_pairs(judge, PROMPTS, ANSWERS_A, ANSWERS_B, path) == pairs
    assert len(fake_server.requests) == n
    lines = open(path).read().splitlines()
    open(path, "w").write("\n".join(lines[:-1]) + "\n")
    assert judge_pairs(judge, PROMPTS, ANSWERS_A, ANSWERS_B, path) == pairs
    assert len(fake_server.requests) == n + 1
    # changed answers are judged again
    changed = dict(ANSWERS_B, **{"vicuna/1": "answer-B revised"})
    judge_pairs(judge, PROMPTS, ANSWERS_A, changed, path)
    assert len(fake_server.requests) == n + 3
    assert load_judgements(path)[0]["outcome"] == "win"

    md = report(path, str(tmp_path / "report"), name_a="gsnr-10%", name_b="random-10%")
    assert "| vicuna | 2 | 1 | 0 | 1 | 0 | 1.000 |" in md
    assert "| koala | 2 | 1 | 0 | 0 | 1 | 2.000 |" in md
    assert "| **overall** | 4 | 2 | 0 | 1 | 1 | **1.333** |" in md
    assert os.path.getsize(tmp_path / "report" / "pairwise.png") > 1000
    assert open(tmp_path / "report" / "pairwise.md").read() == md


def test_judge_pairs_refuses_missing_answers(tmp_path):
    with pytest.raises(KeyError, match="lack an answer"):
        judge_pairs(lambda m: "8 7", PROMPTS, ANSWERS_A, {}, str(tmp_path / "j.jsonl"))


# ------------------------------------------------------------------------------ tiny local judge
def test_local_judge_gibberish_is_unparseable(tmp_path, tokenizer, tiny_model, monkeypatch):
    judge = LocalJudge(tiny_model, tokenizer, max_new_tokens=12)
    calls = _count_generate(tiny_model, monkeypatch)
    prompts, a, b = PROMPTS[:1], {"vicuna/1": "Seven."}, {"vicuna/1": "Eight."}
    reply = judge(judge_messages("question vicuna 1", "Seven.", "Eight."))
    assert isinstance(reply, str) and parse_scores(reply) is None
    calls.clear()
    pairs = judge_pairs(judge, prompts, a, b, str(tmp_path / "local.jsonl"))
    assert pairs[0]["outcome"] == "unparseable" and pairs[0]["ab"] is None and pairs[0]["ba"] is None
    assert len(calls) == 4  # two orders x (one try + exactly one retry)
    records = [json.loads(x) for x in open(tmp_path / "local.jsonl")]
    assert [len(r["replies"]) for r in records] == [2, 2]
    md = report(pairs, str(tmp_path / "rep"))
    assert "| **overall** | 1 | 0 | 0 | 0 | 1 | **nan** |" in md
    assert (tmp_path / "rep" / "pairwise.png").exists()


def test_local_judge_needs_chat_template(tokenizer, tiny_model):
    plain = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, eos_token=tokenizer.eos_token)
    with pytest.raises(ValueError, match="chat template"):
        LocalJudge(tiny_model, plain)
