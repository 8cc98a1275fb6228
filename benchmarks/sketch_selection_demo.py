"""Gradient sketches on the embedded demo (a tiny proxy, offline): target-aware selection, diversity
clusters and near-duplicates, with the demo's known tasks and corruptions as labels.

    python benchmarks/sketch_selection_demo.py          # ~15 min on 2 CPU cores: docs/sketch_selection_demo.md

For each proxy seed (the demo proxy, ``--members`` LoRA members, 2 epochs at the demo's rate, train
mode, ``sketch_dim``) on ``--rows`` demo rows (12 task families, 20% corrupted):

- target-aware: each of the 12 tasks in turn is the target (``--target_rows`` clean rows of it from
  another draw); the top 10% by ``target_alignment`` is scored by the share of the target task in it
  (base rate: the task's share of the data) and its corrupted share;
- diversity: the top 10% by ``fit_rank`` globally, per sketch cluster (k-means, ``--clusters``), and per
  task (the oracle grouping the sketches stand in for): tasks covered, the smallest task's share of the
  selection against its share of the data, the corrupted share;
- near-duplicates: of the rows that repeat an earlier row exactly, the share flagged at each cosine;
- the same target and cluster selections from representation features instead of sketches (``--features
  embedding``: mean hidden states over the response under the frozen backbone, `proxy.embeddings`), side by side.

Downstream (the first seed): a tiny Llama target is fine-tuned with the same recipe as
``benchmarks/quality.py`` on each diversity subset and on random rows (held-out loss on clean rows of
every task), and, for three target tasks, on the target-aligned top 10% against random rows (held-out
loss on clean rows of the target task).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from hf_gradfilter import GradFilterConfig, GradFilterTrainer, score_dataset, sketch_clusters, target_alignment
from hf_gradfilter.demo import demo_proxy
from hf_gradfilter.demo.data import make_demo_dataset
from hf_gradfilter.proxy.embeddings import embed_rows
from hf_gradfilter.proxy.probe import sketch_rows
from hf_gradfilter.scores.duplicates import nearest_earlier, record_sketches
from hf_gradfilter.selection import top_indices, top_indices_by_group

FIELDS = ["instruction", "input", "output"]


def top10(score, groups=None) -> np.ndarray:
    s = np.where(np.isfinite(score), score, -1e300)
    if groups is None:
        return np.sort(top_indices(s, fraction=0.1)[0])
    return np.sort(top_indices_by_group(s, np.asarray(groups).astype(str), fraction=0.1, mode="per_group")[0])


def coverage(idx, tasks, corrupted) -> dict:
    names, counts = np.unique(tasks, return_counts=True)
    kept = {t: int((tasks[idx] == t).sum()) for t in names}
    ratio = min(kept[t] / len(idx) / (c / len(tasks)) for t, c in zip(names, counts))
    return {"tasks_covered": sum(v > 0 for v in kept.values()), "smallest_task_ratio": float(ratio),
            "corrupted_share": float(corrupted[idx].mean())}


def finetune_loss(rows, idx, eval_rows, tokenizer, steps, tag) -> float:
    import torch

    from hf_gradfilter.demo.tiny import tiny_llama
    from hf_gradfilter.finetuning.sft import finetune, sft_config, to_sft_rows

    cfg = sft_config(f"/tmp/hfg_sketch_demo/{tag}", max_steps=steps, per_device_train_batch_size=8,
                     gradient_accumulation_steps=1, learning_rate=1e-2, logging_steps=steps,
                     per_device_eval_batch_size=32, max_length=256, disable_tqdm=True, use_cpu=True,
                     warmup_steps=0.05, seed=0)
    torch.manual_seed(0)
    trainer = finetune(tiny_llama(tokenizer, hidden_size=64), rows.select(idx).select_columns(FIELDS), args=cfg,
                       processing_class=tokenizer, eval_dataset=to_sft_rows(eval_rows))
    return float(trainer.evaluate()["eval_loss"])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1500)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--members", type=int, default=3)
    p.add_argument("--sketch_dim", type=int, default=1024)
    p.add_argument("--target_rows", type=int, default=32)
    p.add_argument("--clusters", type=int, nargs="+", default=[12, 24])
    p.add_argument("--target_steps", type=int, default=120)
    p.add_argument("--downstream_targets", nargs="+", default=["antonym", "describe", "add"])
    p.add_argument("--output", default="docs/sketch_selection_demo")
    args = p.parse_args()
    t_start = time.time()
    rows = make_demo_dataset(num_rows=args.rows)
    tasks, corrupted = np.asarray(rows["task"]), np.asarray(rows["is_corrupted"], bool)
    other = make_demo_dataset(num_rows=3000, corruption_rate=0.0, seed=777)  # clean, another draw
    other_tasks = np.asarray(other["task"])
    targets = {t: other.select(np.flatnonzero(other_tasks == t)[:args.target_rows]).select_columns(FIELDS)
               for t in sorted(set(tasks))}
    held_out = other.select(range(2000, 3000))  # rows not used as targets (targets come from the first rows)
    out = {"args": vars(args), "seeds": []}
    for seed in args.seeds:
        t0 = time.time()
        model, tokenizer = demo_proxy(seed=0)
        cfg = GradFilterConfig(output_dir=f"/tmp/hfg_sketch_demo/proxy_{seed}", num_members=args.members,
                               num_train_epochs=2, learning_rate=1e-3, per_device_train_batch_size=16, seed=seed,
                               max_length=256, disable_tqdm=True, use_cpu=True, logging_steps=10_000,
                               sketch_dim=args.sketch_dim)
        trainer = GradFilterTrainer(model, args=cfg, train_dataset=rows, processing_class=tokenizer)
        trainer.train()
        record = trainer.record
        sk = np.asarray(record_sketches(record))[np.argsort(record.example_id)]
        fit = np.asarray(score_dataset(rows, record)["fit_rank"], float)
        proxy_seconds, t_emb = time.time() - t0, time.time()
        emb = embed_rows(trainer, rows)[:, None]  # (N, 1, d): one "member"
        emb_seconds = time.time() - t_emb
        res = {"seed": seed, "proxy_seconds": proxy_seconds, "embedding_seconds": emb_seconds, "target": {},
               "diversity": {}, "duplicates": {}}
        for task, target in targets.items():
            align = target_alignment(sk, sketch_rows(trainer, target))
            align_e = target_alignment(emb, embed_rows(trainer, target)[:, None])
            idx, idx_e = top10(align), top10(align_e)
            base = float(np.mean(tasks == task))
            res["target"][task] = {"share": float(np.mean(tasks[idx] == task)), "base_rate": base,
                                   "embedding_share": float(np.mean(tasks[idx_e] == task)),
                                   "fit_rank_share": float(np.mean(tasks[top10(fit)] == task)),
                                   "corrupted_share": float(corrupted[idx].mean()),
                                   "embedding_corrupted_share": float(corrupted[idx_e].mean()),
                                   "align": align.tolist(), "align_emb": align_e.tolist()}
        res["diversity"]["fit_rank global"] = coverage(top10(fit), tasks, corrupted)
        res["diversity"]["fit_rank per task (oracle)"] = coverage(top10(fit, tasks), tasks, corrupted)
        clusters = {k: sketch_clusters(sk, k, seed=seed) for k in args.clusters}
        emb_clusters = {k: sketch_clusters(emb, k, seed=seed) for k in args.clusters}
        for k, labels in clusters.items():
            res["diversity"][f"fit_rank per cluster (k={k})"] = coverage(top10(fit, labels), tasks, corrupted)
            res["diversity"][f"fit_rank per embedding cluster (k={k})"] = coverage(top10(fit, emb_clusters[k]), tasks,
                                                                                  corrupted)
        rng = np.random.default_rng(seed)
        res["diversity"]["random"] = coverage(np.sort(rng.choice(len(rows), round(0.1 * len(rows)), replace=False)),
                                              tasks, corrupted)
        keys = [tuple(r[k] for k in FIELDS) for r in rows]
        first = {}
        repeats = [i for i, k in enumerate(keys) if first.setdefault(k, i) != i]
        _, cos = nearest_earlier(sk)
        res["duplicates"] = {"exact_repeats": len(repeats),
                             **{f"flagged_at_{t}": int((cos[repeats] >= t).sum()) for t in (0.98, 0.95, 0.9)},
                             **{f"distinct_rows_flagged_at_{t}": int(np.delete(cos >= t, repeats).sum())
                                for t in (0.98, 0.95, 0.9)}}
        if seed == args.seeds[0]:
            down = {}
            sub = {"fit_rank global": top10(fit), "fit_rank per task (oracle)": top10(fit, tasks),
                   **{f"fit_rank per cluster (k={k})": top10(fit, c) for k, c in clusters.items()},
                   **{f"fit_rank per embedding cluster (k={k})": top10(fit, c) for k, c in emb_clusters.items()},
                   "random": np.sort(np.random.default_rng(0).choice(len(rows), round(0.1 * len(rows)),
                                                                     replace=False))}
            every = held_out.select_columns(FIELDS).select(range(300))
            down["all tasks"] = {name: finetune_loss(rows, idx, every, tokenizer, args.target_steps, f"d{j}")
                                 for j, (name, idx) in enumerate(sub.items())}
            for task in args.downstream_targets:
                mine = held_out.select(np.flatnonzero(np.asarray(held_out["task"]) == task)).select_columns(FIELDS)
                align = np.asarray(res["target"][task]["align"])
                align_e = np.asarray(res["target"][task]["align_emb"])
                down[task] = {"target_alignment": finetune_loss(rows, top10(align), mine, tokenizer, args.target_steps,
                                                                f"t_{task}"),
                              "target_alignment (embedding)": finetune_loss(rows, top10(align_e), mine, tokenizer,
                                                                            args.target_steps, f"e_{task}"),
                              "random": finetune_loss(rows, sub["random"], mine, tokenizer, args.target_steps,
                                                      f"r_{task}"),
                              "fit_rank global": finetune_loss(rows, sub["fit_rank global"], mine, tokenizer,
                                                               args.target_steps, f"f_{task}")}
            res["downstream"] = down
            print(json.dumps(down, indent=1), flush=True)
        for t in res["target"].values():
            del t["align"], t["align_emb"]
        out["seeds"].append(res)
        share = [v["share"] / v["base_rate"] for v in res["target"].values()]
        share_e = [v["embedding_share"] / v["base_rate"] for v in res["target"].values()]
        print(f"[seed {seed}] embeddings: target share / base rate: mean {np.mean(share_e):.2f} "
              f"(min {np.min(share_e):.2f}), {emb_seconds:.1f}s", flush=True)
        print(f"[seed {seed}] {res['proxy_seconds']:.0f}s; target share / base rate: mean {np.mean(share):.2f} "
              f"(min {np.min(share):.2f}); diversity {json.dumps(res['diversity'])}; dup {res['duplicates']}",
              flush=True)
    out["wall_seconds"] = time.time() - t_start
    Path(args.output).with_suffix(".json").write_text(json.dumps(out, indent=1))
    print(f"wrote {args.output}.json ({out['wall_seconds']:.0f}s)")


if __name__ == "__main__":
    main()
