"""Embeddings against gradient sketches on a real model (issue 23, item 4): the protocol of
`sketch_selection.py`, with the row features switched from the proxy's gradient sketches to the mean
last hidden state over the response under the frozen backbone (`hf_gradfilter.proxy.embeddings`, RDS+).

    bash scripts/setup_bench.sh                         # once (see real_quality.py)
    python benchmarks/embedding_selection.py            # about 25 min on 2 cores: docs/embedding_selection.md

Same pool (the 302 rows of ``real_quality.py``), same held-out evaluation (the first 64 Self-Instruct rows:
loss on the reference answers, ROUGE-L of greedy answers on the first 32), the same three target draws of 32
other Self-Instruct rows, the same 10% subsets (30 rows) fine-tuning SmolLM2 (TRL + LoRA r16, 3 epochs):

- ``target_alignment`` by embedding, one subset per target draw (cosine with the target rows' mean unit
  embedding: `select --target_dataset ... --features embedding`);
- ``fit_rank`` per embedding cluster (10 k-means clusters, 3 seeds: ``--diversity_clusters 10 --features
  embedding``), ``fit_rank`` from the very proxy record the sketch run used (M=3, 2 epochs, lr 5e-5, seed 0;
  shared with `default_choice.py`'s cache, trained here if missing);
- random subsets (3 seeds), rerun here: they are the same subsets as the sketch run's, so their numbers say
  whether the protocol reproduces.

The sketch rows of the table are read from ``docs/sketch_selection.json`` (that run's subsets and numbers).
Also, without training: how many exact and near copies the embeddings flag (cosine with another row), and the
cost of the embedding pass against the proxy's training. Stages are cached under ``--work_dir``.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from pathlib import Path

import default_choice as dc
import numpy as np
import real_quality as rq
from sketch_selection import FIELDS, per_cluster_top

THRESHOLDS = (0.99, 0.98, 0.95)
MARKER = "<!-- generated below by benchmarks/embedding_selection.py -->"


def embed(pool: list[dict], targets: list[list[dict]], model_dir: str, tokenizer, max_length: int) -> dict:
    """The embeddings of the pool and of each target draw (as lists), with the seconds each took."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from hf_gradfilter import GradFilterConfig, GradFilterTrainer
    from hf_gradfilter.proxy.embeddings import embed_rows

    ds = Dataset.from_list([{k: r[k] for k in FIELDS} for r in pool])
    cfg = GradFilterConfig(output_dir="/tmp/embedding_selection_unused", num_members=1, max_length=max_length,
                           disable_tqdm=True, use_cpu=True, per_device_eval_batch_size=8)
    trainer = GradFilterTrainer(AutoModelForCausalLM.from_pretrained(model_dir), args=cfg, train_dataset=ds,
                                processing_class=tokenizer)
    t0 = time.time()
    rows = embed_rows(trainer, ds)
    pool_seconds = time.time() - t0
    t1 = time.time()
    tgt = [embed_rows(trainer, Dataset.from_list(t)) for t in targets]
    return {"pool": rows.tolist(), "targets": [t.tolist() for t in tgt], "pool_seconds": pool_seconds,
            "target_seconds": time.time() - t1}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max_length", type=int, default=256)
    p.add_argument("--max_row_tokens", type=int, default=128)
    p.add_argument("--target_rows", type=int, default=32)
    p.add_argument("--target_draws", type=int, default=3)
    p.add_argument("--clusters", type=int, default=10)
    p.add_argument("--fraction", type=float, default=0.10)
    p.add_argument("--epochs", type=int, default=3, help="target fine-tuning epochs")
    p.add_argument("--random_seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--work_dir", default="runs/embedding_selection")
    p.add_argument("--record_dir", default="runs/default_choice", help="where pool 1's proxy record is cached")
    p.add_argument("--sketch_json", default=str(rq.HERE.parent / "docs" / "sketch_selection.json"))
    p.add_argument("--out", default=str(rq.HERE.parent / "docs" / "embedding_selection"))
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    from hf_gradfilter import sketch_clusters, target_alignment, top_indices

    t_start = time.time()
    work, out, rec_dir = Path(args.work_dir), Path(args.out), Path(args.record_dir)
    sketch = json.loads(Path(args.sketch_json).read_text())
    model_dir = rq.ensure_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pool = rq.build_pool(rq.candidate_rows(tokenizer, args.max_row_tokens), n_clean=200, n_weak=40, per_damage=6,
                         n_dup=20)
    sin = rq.sinstruct_rows(tokenizer)
    eval_rows, rest = sin[:64], sin[64:]
    need = args.target_rows * args.target_draws
    order = random.Random(0).sample(range(len(rest)), need)  # the draws of sketch_selection.py
    targets = [[rest[i] for i in order[d * args.target_rows:(d + 1) * args.target_rows]]
               for d in range(args.target_draws)]

    recipe = argparse.Namespace(lr=5e-5, epochs=2, seed=0, members=3)
    record = rq.cached(rec_dir / f"pool1_{dc.recipe_tag(recipe)}.json", lambda: dc.proxy_record(
        pool, model_dir, tokenizer, seed=0, members=3, max_length=args.max_length,
        out_dir=str(rec_dir / f"proxy_1_{dc.recipe_tag(recipe)}"), learning_rate=5e-5, num_train_epochs=2,
        early_epoch=1, late_epoch=2))
    base = rq.cached(rec_dir / "pool1_base.json", lambda: dc.base_columns(pool, model_dir, tokenizer,
                                                                          args.max_length))
    fit_rank = np.asarray(dc.keep_scores(record, base)["fit_rank"], float)
    emb = rq.cached(work / "embeddings.json", lambda: embed(pool, targets, model_dir, tokenizer, args.max_length))
    rows = np.asarray(emb["pool"], np.float32)[:, None]  # (N, 1, d): one "member"
    print(f"pool {len(pool)} rows embedded in {emb['pool_seconds']:.0f} s, targets in {emb['target_seconds']:.0f} s "
          f"(proxy training with sketches: {sketch['proxy_seconds']:.0f} s)", flush=True)

    n_keep = round(args.fraction * len(pool))

    def top(score):
        s = np.asarray(score, float)
        return sorted(int(i) for i in top_indices(np.where(np.isfinite(s), s, -1e300), k=n_keep)[0])

    alignment = [target_alignment(rows, np.asarray(t, np.float32)[:, None]) for t in emb["targets"]]
    clusters = [sketch_clusters(rows, args.clusters, seed=s) for s in range(3)]
    plan = {"random": [sorted(random.Random(s).sample(range(len(pool)), n_keep)) for s in args.random_seeds],
            "target_alignment (embedding)": [top(a) for a in alignment],
            "fit_rank per embedding cluster": [per_cluster_top(fit_rank, c, args.fraction) for c in clusters]}
    check = top(fit_rank)
    kinds = rq._counts([pool[i] for i in check])
    if kinds != sketch["downstream"]["fit_rank"][0]["kinds"]:
        raise SystemExit(f"fit_rank's top {n_keep} differs from the sketch run's ({kinds}): not the same record.")
    gen_rows = eval_rows[:32]
    down = {}
    for name, subsets in plan.items():
        down[name] = []
        for j, idx in enumerate(subsets):
            tag = re.sub(r"[^A-Za-z0-9]+", "_", name) + f"_{j}"
            res = rq.cached(work / f"down_{tag}.json", lambda idx=idx, tag=tag: rq.finetune_and_eval(
                model_dir, tokenizer, [{k: pool[i][k] for k in FIELDS} for i in idx], eval_rows, gen_rows,
                epochs=args.epochs, out_dir=str(work / f"target_{tag}"), max_new_tokens=64))
            res["bad_share"] = float(np.mean([pool[i]["is_bad"] for i in idx]))
            res["kinds"] = rq._counts([pool[i] for i in idx])
            down[name].append(res)
            print(f"[{name} #{j}] rows {len(idx)} bad {res['bad_share']:.0%} loss {res['eval_loss']:.4f} "
                  f"ROUGE-L {res['rougeL']:.4f} ({res['seconds']:.0f}s)", flush=True)

    unit = rows[:, 0] / np.linalg.norm(rows[:, 0], axis=1, keepdims=True)
    sim = unit @ unit.T
    np.fill_diagonal(sim, -np.inf)
    max_cos = sim.max(axis=1)
    flags = {}
    for fam, kind in (("duplicate", "exact"), ("duplicate", "near"), ("clean", "clean"), ("weak", None),
                      ("damage", None)):
        idx = [i for i, r in enumerate(pool) if r["family"] == fam and (kind is None or r["kind"] == kind)]
        flags[kind or fam] = {"rows": len(idx), **{f"share_at_{t}": float(np.mean(max_cos[idx] >= t))
                                                   for t in THRESHOLDS}}
    result = {"args": vars(args), "pool": {"rows": len(pool), "families": rq._counts(pool)}, "downstream": down,
              "sketch_downstream": {k: sketch["downstream"][k] for k in
                                    ("untrained", "random", "fit_rank", "target_alignment", "fit_rank per cluster")},
              "embedding_flags": flags, "sketch_flags": sketch["near_duplicate_flags"],
              "embedding_seconds": {"pool": emb["pool_seconds"], "targets": emb["target_seconds"]},
              "sketch_seconds": {"proxy": sketch["proxy_seconds"], "targets": sketch["target_seconds"]},
              "versions": rq.versions(), "wall_seconds": time.time() - t_start}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    path = out.with_suffix(".md")
    head = path.read_text().split(MARKER)[0] if path.exists() else "# Embeddings against sketches on SmolLM2\n\n"
    path.write_text(head + MARKER + "\n\n" + render(result))
    print(render(result))


def _cell(runs: list[dict], key: str) -> str:
    v = [r[key] for r in runs]
    return f"{np.mean(v):.3f}" + (f" ± {np.std(v):.3f}" if len(v) > 1 else "")


def render(res: dict) -> str:
    """The tables of docs/embedding_selection.md (the prose around them is written by hand there)."""
    rows = [("untrained", "", res["sketch_downstream"]["untrained"]),
            ("random (sketch run)", "", res["sketch_downstream"]["random"]),
            ("random (this run, same subsets)", "", res["downstream"]["random"]),
            ("`fit_rank`, global", "", res["sketch_downstream"]["fit_rank"]),
            ("`target_alignment`", "sketch", res["sketch_downstream"]["target_alignment"]),
            ("`target_alignment`", "embedding", res["downstream"]["target_alignment (embedding)"]),
            ("`fit_rank` per cluster (k=10)", "sketch", res["sketch_downstream"]["fit_rank per cluster"]),
            ("`fit_rank` per cluster (k=10)", "embedding", res["downstream"]["fit_rank per embedding cluster"])]
    lines = ["| subset (30 rows) | features | n | bad rows in it | held-out loss | ROUGE-L |",
             "|---|---|---|---|---|---|"]
    for name, feat, runs in rows:
        bad = [r["bad_share"] for r in runs if np.isfinite(r.get("bad_share", float("nan")))]
        lines.append(f"| {name} | {feat} | {len(runs)} | {f'{np.mean(bad):.0%}' if bad else ''} | "
                     f"{_cell(runs, 'eval_loss')} | {_cell(runs, 'rougeL')} |")
    lines += ["", "| rows | how many | features | share with cosine >= 0.99 with another row | >= 0.98 | >= 0.95 |",
              "|---|---|---|---|---|---|"]
    for kind, f in res["embedding_flags"].items():
        s = res["sketch_flags"][kind]
        lines.append(f"| {kind} | {f['rows']} | embedding | {f['share_at_0.99']:.0%} | {f['share_at_0.98']:.0%} | "
                     f"{f['share_at_0.95']:.0%} |")
        lines.append(f"| {kind} | {s['rows']} | sketch | | {s['share_at_0.98']:.0%} | {s['share_at_0.95']:.0%} |")
    e, s = res["embedding_seconds"], res["sketch_seconds"]
    lines += ["", f"Cost on 2 CPU cores: embedding the pool took {e['pool']:.0f} s and the 96 target rows "
              f"{e['targets']:.0f} s, against {s['proxy']:.0f} s for the proxy's training with sketches and "
              f"{s['targets']:.0f} s for sketching the target rows."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
