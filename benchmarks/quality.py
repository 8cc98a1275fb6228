"""Does the selection pick better data? Detection of corrupted rows, the paper's ablations, recording
modes, seeds, and a downstream fine-tune with its convergence curves. One command, CPU-sized:

    python benchmarks/quality.py                       # ~25 min on 2 CPU cores; writes docs/quality.md + PNGs
    python benchmarks/quality.py --quick               # a smoke run (a few minutes)
    python benchmarks/quality.py --dataset my.jsonl --label_column is_bad   # your own labelled data

Data with known corrupted rows:
- ``demo``: the embedded demo set (`hf_gradfilter.demo.data`, 20% corrupted) scored with the demo
  proxy (a 2-layer GPT-2 pre-trained on an independent clean draw of the same tasks).
- ``alpaca``: real Alpaca rows (``../shared/data/train/alpaca_cherry_5pct.json``, when present):
  the first ``--alpaca_rows`` rows are scored, 20% of them corrupted by `corrupt_rows` (seeded:
  a third each get another row's output, their output cut to its first 3 words, or their output's
  words shuffled); the proxy is a 2-layer GPT-2 pre-trained on the *other*, clean rows.
- any dataset you pass with a boolean label column (True = corrupted).

For every proxy seed and recording mode, every keep-score (higher = kept) is evaluated: AUROC of
ranking clean rows above corrupted ones, and the share of clean rows in the top 5/10/15%.
Downstream (demo data): a tiny Llama target is fine-tuned (LoRA, TRL) for the same number of steps
on the top 10% by G-SNR, by the best variant, by IFD, at random, and on all rows; held-out clean
rows give the loss curve and exact match.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import numpy as np

from hf_gradfilter import GradFilterConfig, GradFilterTrainer
from hf_gradfilter.demo import demo_proxy, demo_proxy_dir, pretrain_proxy
from hf_gradfilter.demo.data import make_demo_dataset
from hf_gradfilter.scores.formulas import fit_rank, mean_loss, score_parts
from hf_gradfilter.scores.ifd import IFDScorer
from hf_gradfilter.scores.metrics import auroc
from hf_gradfilter.scores.scorers import LengthScorer, RandomScorer, RecordScorer
from hf_gradfilter.selection import top_indices, top_indices_by_group

ALPACA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "train", "alpaca_cherry_5pct.json")


def corrupt_rows(rows: list[dict], rate: float = 0.2, seed: int = 0) -> list[dict]:
    """Copies of ``rows`` with ``round(rate * n)`` outputs corrupted, a third of each kind (seeded)."""
    rng = random.Random(seed)
    out = [dict(r, corruption="none", is_corrupted=False) for r in rows]
    chosen = rng.sample(range(len(rows)), round(rate * len(rows)))
    for k, i in enumerate(chosen):
        words = rows[i]["output"].split()
        kind = ("swapped", "truncated", "shuffled")[k % 3]
        if kind == "swapped":
            j = rng.choice([j for j in range(len(rows)) if j != i])
            new = rows[j]["output"]
        elif kind == "truncated":
            new = " ".join(words[:3])
        else:
            shuffled = words[:]
            rng.shuffle(shuffled)
            new = " ".join(shuffled)
        out[i].update(output=new, corruption=kind, is_corrupted=True)
    return out


def alpaca_data(n_scored: int, seed: int = 0):
    from datasets import Dataset

    with open(ALPACA) as f:
        rows = [{"instruction": r["instruction"], "input": r["input"], "output": r["output"]} for r in json.load(f)]
    random.Random(seed).shuffle(rows)
    scored = Dataset.from_list(corrupt_rows(rows[:n_scored], seed=seed))
    pretrain = Dataset.from_list(rows[n_scored:])
    return scored, pretrain


def keep_scores(rows, record, ifd) -> dict[str, np.ndarray]:
    """Every keep-score of the benchmark, higher = kept."""
    parts = score_parts(record.norms)
    rec = rows.map(RecordScorer(record), batched=True, with_indices=True)
    g_t, v_t = parts["grad_late"], parts["ens_var_late"]
    rank = lambda x: np.argsort(np.argsort(np.where(np.isfinite(x), x, -np.inf))) / max(len(x) - 1, 1)  # noqa: E731
    return {
        "fit_rank (default)": fit_rank(g_t, mean_loss(record.losses, 2)),
        "G-SNR (paper)": parts["gsnr"],
        "G-SNR x direction (gsnr_dir)": np.asarray(rec["gsnr_dir"], float),
        "direction only: cos_late": np.asarray(rec["cos_late"], float),
        "Alt 1: raw drop G_s-G_t": np.asarray(rec["raw_drop"], float),
        "Alt 2: relative drop": parts["rel_drop"],
        "Alt 3: drop / V_t": np.asarray(rec["var_drop"], float),
        "low late energy -G_t": -g_t,
        "low late variance -V_t": -v_t,
        "rank mix: rank(-G_t)+rank(-V_t)": rank(-g_t) + rank(-v_t),
        "low final proxy loss": np.asarray(rec["neg_loss_late"], float),
        "Superfiltering IFD": ifd,
        "response length": np.asarray(rows.map(LengthScorer(), batched=True)["response_length"], float),
        "random": np.asarray(rows.map(RandomScorer(seed=0), batched=True, with_indices=True)["random"], float),
    }


def detection(scores: dict, corrupted: np.ndarray) -> dict[str, dict]:
    clean = ~corrupted
    out = {}
    for name, s in scores.items():
        s = np.asarray(s, float)
        if name == "Superfiltering IFD":  # Superfiltering's rule: IFD >= 1 is dropped first
            s = np.where(s >= 1, -np.inf, s)
        row = {"auroc": auroc(s, clean)}
        for frac in (0.05, 0.10, 0.15):
            idx, _ = top_indices(np.where(np.isfinite(s), s, -1e300), fraction=frac)
            row[f"clean@{int(frac * 100)}"] = float(clean[idx].mean())
        out[name] = row
    return out


def score_run(rows, model_fn, tokenizer, *, seed, mode, out, members, lr, batch):
    args = GradFilterConfig(output_dir=out, num_members=members, num_train_epochs=2, learning_rate=lr,
                            per_device_train_batch_size=batch, per_device_eval_batch_size=batch, record_mode=mode,
                            seed=seed, max_length=256, disable_tqdm=True, use_cpu=True, logging_steps=10_000)
    trainer = GradFilterTrainer(model_fn(), args=args, train_dataset=rows, processing_class=tokenizer)
    trainer.train()
    return trainer


def diagnostics(record) -> dict:
    parts = score_parts(record.norms)
    loss = np.nanmean(record.losses, axis=(0, 1))
    return {"loss_epoch1": float(loss[0]), "loss_epoch2": float(loss[-1]),
            "rows_energy_rose": float(np.mean(parts["rel_drop"] < 0)),
            "median_G_t/G_s": float(np.nanmedian(parts["grad_late"] / parts["grad_early"]))}


def run_dataset(name, rows, proxy_dir, tokenizer, args, results):
    from transformers import AutoModelForCausalLM

    corrupted = np.asarray(rows["is_corrupted"], bool)
    model_fn = lambda: AutoModelForCausalLM.from_pretrained(proxy_dir)  # noqa: E731
    ifd = np.asarray(rows.map(IFDScorer(model_fn(), tokenizer, batch_size=16, max_length=256), batched=True,
                              batch_size=64)["ifd"], float)
    runs = [(s, "train") for s in args.seeds] + [(args.seeds[0], "snapshot")]
    first_scores = None  # the keep-scores of the first train-mode run, for the downstream test
    for seed, mode in runs:
        t0 = time.time()
        trainer = score_run(rows, model_fn, tokenizer, seed=seed, mode=mode,
                            out=f"/tmp/hfg_quality/{name}_{mode}_{seed}",
                            members=args.members, lr=args.lr, batch=args.batch)
        scores = keep_scores(rows, trainer.record, ifd)
        det = detection(scores, corrupted)
        first_scores = first_scores if first_scores is not None else scores
        results.append({"dataset": name, "seed": seed, "mode": mode, "seconds": time.time() - t0,
                        "detection": det, "diagnostics": diagnostics(trainer.record)})
        print(f"[{name} seed={seed} mode={mode}] {time.time() - t0:.0f}s  G-SNR AUROC "
              f"{det['G-SNR (paper)']['auroc']:.3f}  -G_t {det['low late energy -G_t']['auroc']:.3f}", flush=True)
    return first_scores


def downstream(rows, scores, tokenizer, args) -> dict:
    """Fine-tune a tiny Llama (LoRA) for the same steps on each top-10% subset; held-out clean loss curve."""
    import torch

    from hf_gradfilter.demo.tiny import tiny_llama
    from hf_gradfilter.finetuning.sft import finetune, sft_config, to_sft_rows

    held_out = make_demo_dataset(num_rows=300, corruption_rate=0.0, seed=777).select_columns(
        ["instruction", "input", "output"])
    eval_rows = to_sft_rows(held_out)
    subsets = {}
    for name in ("G-SNR (paper)", args.variant, "G-SNR x direction (gsnr_dir)", "Superfiltering IFD", "random"):
        s = np.asarray(scores[name], float)
        if name == "Superfiltering IFD":
            s = np.where(s >= 1, -np.inf, s)
        idx, _ = top_indices(np.where(np.isfinite(s), s, -1e300), fraction=0.10)
        subsets[name] = np.sort(idx)
    s = np.asarray(scores[args.variant], float)  # the same score, 10% of every task (a mixture-aware cut)
    idx, _ = top_indices_by_group(np.where(np.isfinite(s), s, -1e300), np.asarray(rows["task"]), fraction=0.10,
                                  mode="per_group")
    subsets[f"{args.variant}, 10% per task"] = np.sort(idx)
    subsets["all rows"] = np.arange(len(rows))
    out = {}
    for name, idx in subsets.items():
        subset = rows.select(idx).select_columns(["instruction", "input", "output"])
        cfg = sft_config(f"/tmp/hfg_quality/target_{len(out)}", max_steps=args.target_steps,
                         per_device_train_batch_size=8, gradient_accumulation_steps=1, learning_rate=1e-2,
                         logging_steps=10, eval_strategy="steps", eval_steps=max(args.target_steps // 6, 1),
                         per_device_eval_batch_size=32, max_length=256, disable_tqdm=True, use_cpu=True,
                         warmup_steps=0.05, seed=0)
        torch.manual_seed(0)
        trainer = finetune(tiny_llama(tokenizer, hidden_size=64), subset, args=cfg, processing_class=tokenizer,
                           eval_dataset=eval_rows)
        hist = trainer.state.log_history
        out[name] = {
            "corrupted_share": float(np.mean(np.asarray(rows["is_corrupted"])[idx])),
            "train": [(h["step"], h["loss"]) for h in hist if "loss" in h],
            "eval": [(h["step"], h["eval_loss"]) for h in hist if "eval_loss" in h],
        }
        print(f"[downstream {name}] corrupted {out[name]['corrupted_share']:.1%}, final held-out loss "
              f"{out[name]['eval'][-1][1]:.3f}", flush=True)
    return out


def markdown(results, down, args) -> str:
    command = f"Command: `python benchmarks/quality.py {' '.join(sys.argv[1:])}`".rstrip()
    lines = ["# Selection quality", "", command, ""]
    for dataset in dict.fromkeys(r["dataset"] for r in results):
        for mode in ("train", "snapshot"):
            runs = [r for r in results if r["dataset"] == dataset and r["mode"] == mode]
            if not runs:
                continue
            seeds = ", ".join(str(r["seed"]) for r in runs)
            lines += [f"## {dataset}: recording mode `{mode}`, proxy seeds {seeds}", "",
                      "mean ± std over seeds (a single run shows its value). AUROC: clean ranked above corrupted "
                      "(0.5 = random); clean@k: share of clean rows in the top k%.", "",
                      "| keep-score | AUROC | clean@5 | clean@10 | clean@15 |", "|---|---|---|---|---|"]
            for name in runs[0]["detection"]:
                cells = []
                for key in ("auroc", "clean@5", "clean@10", "clean@15"):
                    v = np.array([r["detection"][name][key] for r in runs])
                    cells.append(f"{v.mean():.3f} ± {v.std():.3f}" if len(v) > 1 else f"{v[0]:.3f}")
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            d = runs[0]["diagnostics"]
            lines += ["", f"Diagnostics (seed {runs[0]['seed']}): proxy loss {d['loss_epoch1']:.3f} -> "
                      f"{d['loss_epoch2']:.3f}; gradient energy rose for {d['rows_energy_rose']:.0%} of rows; "
                      f"median G_t/G_s {d['median_G_t/G_s']:.2f}.", ""]
    if down:
        lines += ["## Downstream (demo): tiny Llama target, LoRA, same steps on each subset", "",
                  "| training subset | corrupted rows in it | final held-out loss (clean rows) | best held-out loss |",
                  "|---|---|---|---|"]
        for name, d in down.items():
            lines.append(f"| {name} | {d['corrupted_share']:.1%} | {d['eval'][-1][1]:.3f} | "
                         f"{min(v for _, v in d['eval']):.3f} |")
        lines += ["", "![held-out loss curves](quality_convergence.png)", ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="Small sizes, one seed: a smoke run.")
    parser.add_argument("--demo_rows", type=int, default=1500)
    parser.add_argument("--alpaca_rows", type=int, default=1000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--target_steps", type=int, default=120)
    parser.add_argument("--variant", default="fit_rank (default)")
    parser.add_argument("--dataset", default=None, help="Your own labelled dataset (file or Hub id).")
    parser.add_argument("--label_column", default="is_corrupted")
    parser.add_argument("--model_name_or_path", default=None, help="Proxy for --dataset (default: demo proxy).")
    parser.add_argument("--output", default="docs/quality.md")
    args = parser.parse_args()
    if args.quick:
        args.demo_rows, args.alpaca_rows, args.seeds, args.target_steps = 300, 200, args.seeds[:1], 30
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    results, t0 = [], time.time()

    _, tokenizer = demo_proxy(seed=0)
    demo_dir = demo_proxy_dir(seed=0)
    if args.dataset:
        from hf_gradfilter.data.io import load_rows

        rows = load_rows(args.dataset)
        rows = rows.rename_column(args.label_column, "is_corrupted") if args.label_column != "is_corrupted" else rows
        run_dataset("your data", rows, args.model_name_or_path or demo_dir, tokenizer, args, results)
    demo_rows = make_demo_dataset(num_rows=args.demo_rows, seed=0)
    demo_scores = run_dataset("demo", demo_rows, demo_dir, tokenizer, args, results)
    if os.path.exists(ALPACA):
        scored, pretrain = alpaca_data(args.alpaca_rows)
        alpaca_dir = f"/tmp/hfg_quality/alpaca_proxy_{len(pretrain)}"
        if not os.path.exists(os.path.join(alpaca_dir, "model.safetensors")):
            pretrain_proxy(pretrain, alpaca_dir, seed=0, epochs=3, vocab_size=4096)
        from transformers import PreTrainedTokenizerFast

        run_dataset("alpaca", scored, alpaca_dir, PreTrainedTokenizerFast.from_pretrained(alpaca_dir), args, results)
    down = downstream(demo_rows, demo_scores, tokenizer, args) if args.target_steps else {}
    if down:
        from hf_gradfilter.plots import line_plot

        line_plot({name: d["eval"] for name, d in down.items()},
                  os.path.join(os.path.dirname(args.output) or ".", "quality_convergence.png"),
                  xlabel="optimizer step", ylabel="held-out loss", title="Target trained on each top-10% subset")
    text = markdown(results, down, args) + f"\nTotal time: {time.time() - t0:.0f} s on this machine.\n"
    with open(args.output, "w") as f:
        f.write(text)
    with open(os.path.splitext(args.output)[0] + ".json", "w") as f:
        json.dump({"results": results, "downstream": down}, f, indent=1, default=float)
    print(text)


if __name__ == "__main__":
    main()
