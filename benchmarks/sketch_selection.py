"""Gradient sketches on a real model: target-aware selection, diversity clusters and near-duplicates,
with SmolLM2-135M-Instruct as the proxy and the target, on the pool of `real_quality.py`.

    bash scripts/setup_bench.sh                         # once (see real_quality.py)
    python benchmarks/sketch_selection.py               # about 45 min on 2 cores: docs/sketch_selection.md

One proxy ensemble (``--members`` LoRA members, 2 epochs, the library's defaults, ``sketch_dim``) scores the
302-row pool of ``real_quality.py`` (clean real Alpaca rows; weak answers, seven damage kinds and
duplicates labelled bad). The target task is Self-Instruct's user-oriented instructions
(``eval/sinstruct_test_set.jsonl``): its first ``--eval_rows`` rows are the held-out evaluation (loss on
the reference answers, ROUGE-L of greedy answers on the first ``--gen_rows``), and ``--target_draws``
disjoint draws of ``--target_rows`` *other* rows are the target datasets (what a user would hand to
``select --target_dataset``). Subsets of 10% (30 rows) fine-tune the same SmolLM2 (TRL + LoRA r16):

- ``target_alignment``, one subset per target draw (the spread is over target draws, one proxy seed);
- ``fit_rank`` globally and ``fit_rank`` per sketch cluster (``--clusters`` k-means clusters, 3 seeds);
- random subsets (3 seeds) and the untrained model.

Also reported, without training: the bad share of each subset, and how many of the pool's exact and
near copies the sketches flag as near-duplicates. Stages are cached under ``--work_dir``.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from pathlib import Path

import numpy as np
from real_quality import (
    HERE,
    _counts,
    build_pool,
    cached,
    candidate_rows,
    ensure_smollm2,
    finetune_and_eval,
    sinstruct_rows,
    versions,
)

FIELDS = ("instruction", "input", "output")


def sketch_scores(pool_ds, targets: list[list[dict]], model_dir: str, tokenizer, args, out_dir: str) -> dict:
    """Train the proxy with sketches; every per-row column the comparison needs, as lists."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from hf_gradfilter import GradFilterConfig, GradFilterTrainer, score_dataset, sketch_clusters, target_alignment
    from hf_gradfilter.proxy.probe import sketch_rows
    from hf_gradfilter.scores.clusters import unit_member_mean
    from hf_gradfilter.scores.duplicates import record_sketches

    cfg = GradFilterConfig(output_dir=out_dir, num_members=args.members, num_train_epochs=2, seed=args.seed,
                           max_length=args.max_length, disable_tqdm=True, use_cpu=True, logging_steps=10_000,
                           sketch_dim=args.sketch_dim)
    t0 = time.time()
    trainer = GradFilterTrainer(AutoModelForCausalLM.from_pretrained(model_dir), args=cfg, train_dataset=pool_ds,
                                processing_class=tokenizer)
    trainer.train()
    seconds = time.time() - t0
    scored = score_dataset(pool_ds, trainer.record)
    sk = np.asarray(record_sketches(trainer.record))[np.argsort(trainer.record.example_id)]  # (N, M, d), pool order
    t1 = time.time()
    target_sk = [sketch_rows(trainer, Dataset.from_list(t)) for t in targets]
    target_seconds = time.time() - t1
    unit, _ = unit_member_mean(sk)
    sim = unit @ unit.T
    np.fill_diagonal(sim, -np.inf)
    tbar = [np.nanmean(t / np.linalg.norm(t, axis=-1, keepdims=True), axis=0).ravel() for t in target_sk]
    return {
        "seconds": seconds, "target_seconds": target_seconds,
        "fit_rank": list(map(float, scored["fit_rank"])),
        "alignment": [target_alignment(sk, t).tolist() for t in target_sk],
        "clusters": [sketch_clusters(sk, args.clusters, seed=s).tolist() for s in range(3)],
        "max_cos": sim.max(axis=1).tolist(),  # each row's most similar other row, earlier or later
        "target_direction_cos": [[float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) for b in tbar] for a in tbar],
    }


def per_cluster_top(score: np.ndarray, clusters: np.ndarray, fraction: float) -> list[int]:
    from hf_gradfilter import top_indices_by_group

    idx, _ = top_indices_by_group(np.where(np.isfinite(score), score, -1e300), clusters.astype(str),
                                  fraction=fraction, mode="per_group")
    return sorted(int(i) for i in idx)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0, help="proxy seed")
    p.add_argument("--members", type=int, default=3)
    p.add_argument("--sketch_dim", type=int, default=1024)
    p.add_argument("--max_length", type=int, default=256)
    p.add_argument("--max_row_tokens", type=int, default=128)
    p.add_argument("--target_rows", type=int, default=32)
    p.add_argument("--target_draws", type=int, default=3)
    p.add_argument("--clusters", type=int, default=10)
    p.add_argument("--fraction", type=float, default=0.10)
    p.add_argument("--epochs", type=int, default=3, help="target fine-tuning epochs")
    p.add_argument("--eval_rows", type=int, default=64)
    p.add_argument("--gen_rows", type=int, default=32)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--random_seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--work_dir", default="runs/sketch_selection")
    p.add_argument("--out", default=str(HERE.parent / "docs" / "sketch_selection"))
    p.add_argument("--smoke", action="store_true", help="a tiny pool and 1 member: checks the script in minutes")
    args = p.parse_args(argv)
    sizes = dict(n_clean=200, n_weak=40, per_damage=6, n_dup=20)
    if args.smoke:
        sizes = dict(n_clean=20, n_weak=10, per_damage=1, n_dup=4)
        args.members, args.eval_rows, args.gen_rows, args.target_rows, args.clusters = 1, 8, 4, 4, 3
        args.epochs, args.max_new_tokens, args.work_dir, args.out = 1, 8, args.work_dir + "_smoke", args.out + "_smoke"
    work, out = Path(args.work_dir), Path(args.out)
    from datasets import Dataset
    from transformers import AutoTokenizer

    from hf_gradfilter import top_indices

    t_start = time.time()
    model_dir = ensure_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pool = build_pool(candidate_rows(tokenizer, args.max_row_tokens), **sizes)
    pool_ds = Dataset.from_list([{k: r[k] for k in FIELDS} for r in pool])
    sin = sinstruct_rows(tokenizer)
    eval_rows, rest = sin[:args.eval_rows], sin[args.eval_rows:]
    need = args.target_rows * args.target_draws
    if len(rest) < need:
        raise SystemExit(f"Only {len(rest)} Self-Instruct rows are left for targets; lower --target_rows or "
                         "--target_draws.")
    order = random.Random(0).sample(range(len(rest)), need)
    targets = [[rest[i] for i in order[d * args.target_rows:(d + 1) * args.target_rows]]
               for d in range(args.target_draws)]
    print(f"pool {len(pool)} rows; eval {len(eval_rows)}; {args.target_draws} target draws of {args.target_rows}",
          flush=True)

    sc = cached(work / f"sketch_scores_seed{args.seed}.json",
                lambda: sketch_scores(pool_ds, targets, model_dir, tokenizer, args, str(work / "proxy")))
    print(f"proxy {sc['seconds']:.0f}s; target sketches {sc['target_seconds']:.0f}s", flush=True)
    n_keep = round(args.fraction * len(pool))

    def top(score):
        s = np.asarray(score, float)
        return sorted(int(i) for i in top_indices(np.where(np.isfinite(s), s, -1e300), k=n_keep)[0])

    plan = {"untrained": [[]], "random": [sorted(random.Random(s).sample(range(len(pool)), n_keep))
                                          for s in args.random_seeds],
            "fit_rank": [top(sc["fit_rank"])],
            "target_alignment": [top(a) for a in sc["alignment"]],
            "fit_rank per cluster": [per_cluster_top(np.asarray(sc["fit_rank"], float), np.asarray(c), args.fraction)
                                     for c in sc["clusters"]]}
    gen_rows = eval_rows[:args.gen_rows]
    down = {}
    for name, subsets in plan.items():
        down[name] = []
        for j, idx in enumerate(subsets):
            tag = re.sub(r"[^A-Za-z0-9]+", "_", name) + f"_{j}"
            res = cached(work / f"down_{tag}.json", lambda idx=idx, tag=tag: finetune_and_eval(
                model_dir, tokenizer, [{k: pool[i][k] for k in FIELDS} for i in idx], eval_rows, gen_rows,
                epochs=args.epochs, out_dir=str(work / f"target_{tag}"), max_new_tokens=args.max_new_tokens))
            res["bad_share"] = float(np.mean([pool[i]["is_bad"] for i in idx])) if idx else float("nan")
            res["kinds"] = _counts([pool[i] for i in idx])
            down[name].append(res)
            print(f"[{name} #{j}] rows {len(idx)} bad {res['bad_share']:.0%} loss {res['eval_loss']:.4f} "
                  f"ROUGE-L {res['rougeL']:.4f} ({res['seconds']:.0f}s)", flush=True)

    max_cos = np.asarray(sc["max_cos"], float)
    flags = {}  # share of each kind of row whose sketch has cosine >= t with another row's
    for fam, kind in (("duplicate", "exact"), ("duplicate", "near"), ("clean", "clean"), ("weak", None),
                      ("damage", None)):
        rows = [i for i, r in enumerate(pool) if r["family"] == fam and (kind is None or r["kind"] == kind)]
        flags[kind or fam] = {"rows": len(rows), **{f"share_at_{t}": float(np.mean(max_cos[rows] >= t))
                                                    for t in (0.98, 0.95, 0.9)}}
    result = {"args": vars(args), "pool": {"rows": len(pool), "families": _counts(pool)}, "downstream": down,
              "near_duplicate_flags": flags, "proxy_seconds": sc["seconds"],
              "target_seconds": sc["target_seconds"], "target_direction_cos": sc["target_direction_cos"],
              "versions": versions(), "wall_seconds": time.time() - t_start}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("downstream", "versions")}, indent=1))
    for name, runs in down.items():
        loss = [r["eval_loss"] for r in runs]
        rl = [r["rougeL"] for r in runs]
        print(f"{name:<22} loss {np.mean(loss):.4f}±{np.std(loss):.4f}  ROUGE-L {np.mean(rl):.4f}±{np.std(rl):.4f}  "
              f"bad {np.nanmean([r['bad_share'] for r in runs]):.0%}  (n={len(runs)})")


if __name__ == "__main__":
    main()
