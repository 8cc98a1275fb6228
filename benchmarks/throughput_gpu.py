"""The paper's scoring recipe timed end to end on one GPU, and stacked members against per-member batches.

One call measures, on a GPT-2-124M-shaped model (random weights, `GPT2Config`) with M=5 members,
2 epochs, batch 16 per member, bf16 autocast and SDPA attention, on Alpaca-like rows (log-normal
lengths, pre-tokenized random ids; nothing is downloaded):

  (a)  the ensemble's training with recording off
  (b)  GradFilterTrainer in train mode and in snapshot mode
       each of (a) and (b) with the members' batches one after another and stacked (``stack_members``)
  (c)  a batch-size-1 loop (one backward per example and member) and (d) torch.func vmap(grad),
       at fixed weights on a subset
  norms/s, tokens/s and peak GPU memory for each; then the recipe end to end (trainer set-up,
  training with recording, G-SNR scores, top 5%) on as many rows as fit in ``--budget_s``, its time
  against the time projected from (b), and the projected time of the full 52,002-row recipe.

    bash benchmarks/run_throughput_gpu.sh OUT_DIR   # a GPU machine: OUT_DIR/throughput_gpu.{md,json}, ~5 min on an H200
    python benchmarks/throughput_gpu.py --tiny      # CPU check of the whole script at tiny sizes (~1 min)

Results are written after each measurement, so a run stopped early keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from throughput import (  # noqa: E402  (a benchmark script beside this one)
    SIZES,
    Result,
    alpaca_like_rows,
    config,
    make_model,
    peak_gb,
    reset_peak,
    run_batch_size_one,
    run_trainer,
    run_vmap,
)

from hf_gradfilter import GradFilterTrainer  # noqa: E402
from hf_gradfilter.proxy.sampler import MemberSampler  # noqa: E402
from hf_gradfilter.scores.formulas import score_parts  # noqa: E402

ALPACA_ROWS = 52_002
SETTINGS = {  # the GPU run; --tiny: the same steps at sizes a CPU does in about a minute
    "full": dict(size="gpt2-small", rows=1024, subset=128, members=5, batch=16, epochs=2, budget_s=120),
    "tiny": dict(size="tiny", rows=64, subset=8, members=3, batch=4, epochs=2, budget_s=5),
}


def environment() -> dict:
    import peft
    import transformers

    cuda = torch.cuda.is_available()
    return {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads",
            "device": torch.cuda.get_device_name() if cuda else "CPU only",
            "gpu_memory_gb": round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1) if cuda else None,
            "cuda": torch.version.cuda if cuda else None, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "precision": "bf16 autocast" if cuda else "fp32", "attention": "sdpa"}


def recipe(size, n_rows, members, batch, epochs, stack) -> dict:
    """The scoring recipe end to end on ``n_rows`` fresh rows: set-up, training with recording (train mode),
    G-SNR and the top 5%. Seconds per part."""
    rows = alpaca_like_rows(n_rows, SIZES[size]["vocab_size"], 512, seed=1)
    reset_peak()
    start = time.perf_counter()
    trainer = GradFilterTrainer(make_model(size), train_dataset=rows,
                                args=config("/tmp/hfg_recipe", "train", members, batch, epochs, "group_by_length",
                                            stack))
    built = time.perf_counter()
    trainer.train()
    trained = time.perf_counter()
    parts = score_parts(np.asarray(trainer.record.norms), 1, epochs)
    top = np.argsort(-np.nan_to_num(parts["gsnr"], nan=-np.inf))[: max(1, n_rows // 20)]
    done = time.perf_counter()
    return {"rows": n_rows, "stacked": stack, "setup_s": built - start, "train_s": trained - built,
            "score_select_s": done - trained, "total_s": done - start, "selected": len(top), "peak_gb": peak_gb(),
            "norms": n_rows * members * epochs}


def padding(lengths: np.ndarray, members: int, batch: int) -> dict[str, float]:
    """Tokens computed / real tokens in one epoch of length-grouped batches: each member's batch padded to
    its own longest row, and the members' batches of a step stacked and padded to the step's longest."""
    sampler = MemberSampler(len(lengths), members, batch, seed=0, lengths=lengths)
    batches = [sampler.batches(m, 0) for m in range(members)]
    real = members * lengths.sum()
    own = sum(len(b) * lengths[b].max() for member in batches for b in member)
    stacked = sum(sum(map(len, step)) * max(lengths[b].max() for b in step) for step in zip(*batches))
    return {"per_member": float(own / real), "stacked": float(stacked / real)}


def table(results: list[Result]) -> list[str]:
    lines = ["| method | norms/s | tokens/s | time (s) | peak GPU memory (GB) | note |", "|---|---|---|---|---|---|"]
    for r in results:
        if not r.visits:
            lines.append(f"| {r.name} | - | - | - | - | {r.note} |")
            continue
        peak = "-" if np.isnan(r.peak_gb) else f"{r.peak_gb:.2f}"
        lines.append(f"| {r.name} | {r.per_second:.1f} | {r.tokens / r.seconds:.0f} | {r.seconds:.1f} | {peak} "
                     f"| {r.note} |")
    return lines


def ratios(by: dict[str, Result]) -> list[str]:
    def per_norm(a, b):  # time per norm of a / time per norm of b
        ra, rb = by.get(a), by.get(b)
        return rb.per_second / ra.per_second if ra and rb and ra.visits and rb.visits else float("nan")

    lines = []
    for mode in ("none", "train", "snapshot"):
        lines.append(f"- stacked / per-member time per norm, {mode}: **{per_norm(mode + '+stack', mode):.3f}** "
                     "(below 1: stacking is faster)")
    lines += [f"- recording overhead, (b-train) / (a), per-member: {per_norm('train', 'none'):.3f}; "
              f"stacked: {per_norm('train+stack', 'none+stack'):.3f}",
              f"- snapshot / (a), per-member: {per_norm('snapshot', 'none'):.3f}; stacked: "
              f"{per_norm('snapshot+stack', 'none+stack'):.3f}",
              f"- batch-size-1 loop time per norm / (b-train, per-member): {per_norm('bs1', 'train'):.2f}",
              f"- vmap(grad) time per norm / (b-train, per-member): {per_norm('vmap', 'train'):.2f}"]
    return lines


def write(out_dir, env, args, settings, results, by, real, projected, pads) -> None:
    text = ["# Throughput on a GPU: the scoring recipe and stacked members", "",
            f"Machine: {env['machine']}; device: {env['device']}"
            + (f" ({env['gpu_memory_gb']} GB, CUDA {env['cuda']})" if env["cuda"] else "") + ".",
            f"Versions: Python {env['python']}, torch {env['torch']}, transformers {env['transformers']}, "
            f"peft {env['peft']}; {env['precision']}, {env['attention']} attention.",
            f"Command: `{args.command}`", "",
            f"## {settings['size']}: {settings['rows']} rows, M={settings['members']}, batch {settings['batch']} per "
            f"member, {settings['epochs']} epochs ((c), (d): {settings['subset']} rows, fixed weights)", ""]
    text += table(results) + [""] + ratios(by)
    text += [f"- padding, tokens computed / real tokens ({name}): per-member batches {p['per_member']:.3f}, "
             f"stacked {p['stacked']:.3f}" for name, p in pads.items()] + [""]
    if real:
        rate = real["norms"] / real["train_s"]
        text += ["## The recipe end to end: projected against measured", "",
                 f"Path: {'stacked members' if real['stacked'] else 'per-member batches'} (the faster in (b)); "
                 f"{real['rows']} rows, as many as fit in {settings['budget_s']} s at the rate of (b).", "",
                 "| | seconds |", "|---|---|",
                 f"| projected training time from (b)'s rate | {projected:.1f} |",
                 f"| measured training time | {real['train_s']:.1f} |",
                 f"| set-up (rows surveyed, members built) | {real['setup_s']:.1f} |",
                 f"| G-SNR scores and top 5% | {real['score_select_s']:.2f} |",
                 f"| total | {real['total_s']:.1f} |", "",
                 f"- measured / projected training time: **{real['train_s'] / projected:.3f}**",
                 f"- the full recipe ({ALPACA_ROWS:,} rows, M={settings['members']}, {settings['epochs']} epochs, "
                 f"{ALPACA_ROWS * settings['members'] * settings['epochs']:,} norms) at the measured rate "
                 f"({rate:.0f} norms/s): **{ALPACA_ROWS * settings['members'] * settings['epochs'] / rate / 60:.1f} "
                 "min** of training, plus set-up and scoring", ""]
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "throughput_gpu.md"), "w") as f:
        f.write("\n".join(text))
    with open(os.path.join(out_dir, "throughput_gpu.json"), "w") as f:
        json.dump({"environment": env, "command": args.command, "settings": settings,
                   "results": [dict(r.__dict__, per_second=r.per_second if r.visits else None) for r in results],
                   "padding": pads, "recipe": real, "projected_train_s": projected}, f, indent=2, default=float)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="Tiny sizes: check the script on CPU.")
    parser.add_argument("--output_dir", default=None, help="Where throughput_gpu.{md,json} go (default: a temp dir).")
    parser.add_argument("--budget_s", type=float, default=None, help="Seconds for the end-to-end recipe run.")
    args = parser.parse_args()
    args.command = "python benchmarks/throughput_gpu.py " + " ".join(sys.argv[1:])
    settings = dict(SETTINGS["tiny" if args.tiny else "full"])
    settings["budget_s"] = args.budget_s or settings["budget_s"]
    if not args.tiny and not torch.cuda.is_available():
        parser.error("no CUDA device: the full sizes are for a GPU; use --tiny to check the script on CPU.")
    out_dir = args.output_dir or tempfile.mkdtemp(prefix="throughput_gpu_")
    env = environment()
    print(json.dumps(env), flush=True)
    size, members, batch, epochs = settings["size"], settings["members"], settings["batch"], settings["epochs"]
    run_trainer("tiny", alpaca_like_rows(32, 1024, 64), "train", 2, 8, 1, repeats=1)  # warm-up: CUDA context, kernels
    rows = alpaca_like_rows(settings["rows"], SIZES[size]["vocab_size"], 512)
    results, by, real, projected = [], {}, None, float("nan")
    alpaca = np.clip(np.random.default_rng(1).lognormal(np.log(90), 0.6, size=ALPACA_ROWS).astype(int), 12, 512)
    pads = {"this run": padding(np.asarray(rows["length"] if "length" in rows.column_names else
                                           [len(x) for x in rows["input_ids"]]), members, batch),
            f"{ALPACA_ROWS:,} rows, same length law": padding(alpaca, members, batch)}
    for stack in (False, True):
        for mode in ("none", "train", "snapshot"):
            by[mode + ("+stack" if stack else "")] = result = run_trainer(size, rows, mode, members, batch, epochs,
                                                                            repeats=1, stack=stack)
            results.append(result)
            print(table([result])[-1], flush=True)
            write(out_dir, env, args, settings, results, by, real, projected, pads)
    subset = rows.select(range(settings["subset"]))
    for key, run in (("bs1", lambda: run_batch_size_one(size, subset, members)),
                     ("vmap", lambda: run_vmap(size, subset, members, batch))):
        by[key] = result = run()
        results.append(result)
        print(table([result])[-1], flush=True)
        write(out_dir, env, args, settings, results, by, real, projected, pads)
    stack = by["train+stack"].per_second > by["train"].per_second
    rate = by["train+stack" if stack else "train"].per_second  # norms/s
    n_rows = int(min(ALPACA_ROWS, max(settings["rows"], rate * settings["budget_s"] / (members * epochs))))
    projected = n_rows * members * epochs / rate
    real = recipe(size, n_rows, members, batch, epochs, stack)
    print(json.dumps(real), flush=True)
    write(out_dir, env, args, settings, results, by, real, projected, pads)
    print(f"Wrote {os.path.join(out_dir, 'throughput_gpu.md')} and .json", flush=True)


if __name__ == "__main__":
    main()
