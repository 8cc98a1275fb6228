"""Throughput of per-example gradient norms: GradFilterTrainer against the other ways to get them.

Measured side by side in one run, on the same rows and model, and printed as ratios:

  (a)  the M-member LoRA training with recording off (record_mode="none"): the floor
  (b)  GradFilterTrainer recording in "train" mode, and in "snapshot" mode
  (c)  a batch-size-1 loop, one backward per example and member, at fixed weights (what LESS does)
  (d)  torch.func vmap(grad) per-example gradients (and Opacus, when installed)
  padding waste: tokens computed / real tokens, for random and for length-grouped batches
  sketches: train mode recording norms and ``--sketch_dim`` gradient sketches against norms alone

(c) and (d) only compute norms while (a) and (b) also train, so their ratios to (b) are
conservative. Rows have Alpaca-like lengths (log-normal, most short, a long tail), pre-tokenized
with random ids. Two model sizes: "tiny" (2 layers, 128 wide) and "gpt2-small" (12 layers, 768
wide, GPT-2's vocabulary; random weights).

    python benchmarks/throughput.py                          # both sizes, CPU, a few minutes
    python benchmarks/throughput.py --sizes tiny --rows 512 --output docs/throughput.md
    python benchmarks/throughput.py --sketch_only --sketch_dim 1024   # the sketch overhead alone
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import time
from dataclasses import dataclass

import numpy as np
import torch
from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel

from hf_gradfilter import GradFilterConfig, GradFilterTrainer
from hf_gradfilter.proxy.model import per_example_loss
from hf_gradfilter.proxy.sampler import MemberSampler

SIZES = {
    "tiny": dict(n_layer=2, n_embd=128, n_head=4, vocab_size=1024),
    "gpt2-small": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257),
}


@dataclass
class Result:
    name: str
    seconds: float
    visits: int  # example x member (x epoch) gradient norms produced
    tokens: int
    note: str = ""
    peak_gb: float = float("nan")  # peak GPU memory allocated (CUDA only)

    @property
    def per_second(self) -> float:
        return self.visits / self.seconds


def alpaca_like_rows(n: int, vocab: int, max_length: int, seed: int = 0) -> Dataset:
    """Pre-tokenized rows: lengths log-normal (median ~90 tokens, long tail), the first ~40% prompt."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(90), 0.6, size=n).astype(int), 12, max_length)
    ids, labels = [], []
    for length in lengths:
        row = rng.integers(2, vocab, size=length).tolist()
        prompt = int(length * rng.uniform(0.3, 0.5))
        ids.append(row)
        labels.append([-100] * prompt + row[prompt:])
    return Dataset.from_dict({"input_ids": ids, "labels": labels})


def make_model(size: str, attn_implementation: str | None = None) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = SIZES[size]
    return GPT2LMHeadModel(GPT2Config(n_positions=1024, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, bos_token_id=0,
                                      eos_token_id=0, pad_token_id=0, attn_implementation=attn_implementation, **cfg))


def config(out: str, mode: str, members: int, batch: int, epochs: int, strategy: str,
           stack: bool = False, sketch_dim: int = 0) -> GradFilterConfig:
    return GradFilterConfig(output_dir=out, num_members=members, num_train_epochs=epochs, late_epoch=epochs,
                            early_epoch=1, per_device_train_batch_size=batch, per_device_eval_batch_size=batch,
                            record_mode=mode, learning_rate=1e-4, logging_steps=10_000, disable_tqdm=True,
                            use_cpu=not torch.cuda.is_available(), train_sampling_strategy=strategy,
                            bf16=torch.cuda.is_available(), max_length=1024, report_to="none", stack_members=stack,
                            sketch_dim=sketch_dim)


def autocast():
    """bf16 autocast on CUDA (as the trainer's ``bf16=True``), nothing on CPU."""
    return torch.autocast("cuda", torch.bfloat16) if torch.cuda.is_available() else contextlib.nullcontext()


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_gb() -> float:
    """Peak GPU memory allocated since `reset_peak`, in GB (NaN on CPU)."""
    if not torch.cuda.is_available():
        return float("nan")
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 1e9


def run_trainer(size, rows, mode, members, batch, epochs, strategy="group_by_length", repeats=2,
                stack=False, sketch_dim=0) -> Result:
    seconds, peak = float("inf"), float("nan")
    for _ in range(repeats):  # the best of `repeats` runs: the first pays one-off allocation costs
        trainer = GradFilterTrainer(make_model(size), train_dataset=rows,
                                    args=config("/tmp/hfg_bench", mode, members, batch, epochs, strategy, stack,
                                                sketch_dim))
        reset_peak()
        start = time.perf_counter()
        trainer.train()
        seconds = min(seconds, time.perf_counter() - start)
        peak = peak_gb()
        del trainer
    tokens = int(np.sum(rows["length"] if "length" in rows.column_names else [len(x) for x in rows["input_ids"]]))
    label = {"none": "(a) training, recording off", "train": "(b) GradFilterTrainer, train mode",
             "snapshot": "(b) GradFilterTrainer, snapshot mode"}[mode]
    extra = (", stacked members" if stack else "") + (f", + sketches (d={sketch_dim})" if sketch_dim else "")
    return Result(f"{label}{extra}", seconds, len(rows) * members * epochs,
                  tokens * members * epochs, note=f"{strategy} batches", peak_gb=peak)


def member_model(size, members, attn_implementation=None):
    """A trainer-built ensemble, reused by the per-example baselines (same weights and adapters)."""
    rows = alpaca_like_rows(8, SIZES[size]["vocab_size"], 64)
    trainer = GradFilterTrainer(make_model(size, attn_implementation),
                                args=config("/tmp/hfg_bench", "none", members, 4, 1, "random"),
                                train_dataset=rows)
    model = trainer.model.eval()
    return model


def run_batch_size_one(size, rows, members) -> Result:
    model = member_model(size, members)
    device = next(model.parameters()).device
    reset_peak()
    start = time.perf_counter()
    for m in range(members):
        model.base_model.set_adapter(f"member_{m}")
        params = [p for n, p in model.named_parameters() if f".member_{m}." in n]
        for ids, labels in zip(rows["input_ids"], rows["labels"]):
            ids_t, labels_t = torch.tensor([ids], device=device), torch.tensor([labels], device=device)
            with autocast():
                loss = per_example_loss(model(input_ids=ids_t).logits, labels_t)[0]
            grads = torch.autograd.grad(loss, params)
            torch.sqrt(sum(g.float().pow(2).sum() for g in grads)).item()
    seconds = time.perf_counter() - start
    tokens = sum(len(x) for x in rows["input_ids"])
    return Result("(c) batch-size-1 loop (one backward per example)", seconds, len(rows) * members,
                  tokens * members, note="fixed weights, no training", peak_gb=peak_gb())


def run_vmap(size, rows, members, batch) -> Result:
    from torch.func import functional_call, grad, vmap

    model = member_model(size, members, "eager")  # SDPA's mask checks call .item(), which vmap cannot trace
    device = next(model.parameters()).device
    sampler = MemberSampler(len(rows), 1, batch, seed=0, lengths=[len(x) for x in rows["input_ids"]])
    reset_peak()
    start = time.perf_counter()
    try:
        for m in range(members):
            model.base_model.set_adapter(f"member_{m}")
            params = {n: p.detach() for n, p in model.named_parameters() if f".member_{m}." in n}

            def loss_fn(p, ids, mask, labels):
                out = functional_call(model, p, args=(), kwargs={"input_ids": ids[None], "attention_mask": mask[None]})
                return per_example_loss(out.logits, labels[None])[0]

            per_example_grad = vmap(grad(loss_fn), in_dims=(None, 0, 0, 0))
            for idx in sampler.batches(0, 0):
                feats = [rows[int(i)] for i in idx]
                width = max(len(f["input_ids"]) for f in feats)
                ids = torch.zeros(len(feats), width, dtype=torch.long)
                mask = torch.zeros_like(ids)
                labels = torch.full_like(ids, -100)
                for j, f in enumerate(feats):
                    k = len(f["input_ids"])
                    ids[j, :k], mask[j, :k], labels[j, :k] = torch.tensor(f["input_ids"]), 1, torch.tensor(f["labels"])
                with autocast():
                    grads = per_example_grad(params, ids.to(device), mask.to(device), labels.to(device))
                torch.sqrt(sum(g.float().pow(2).flatten(1).sum(1) for g in grads.values())).tolist()
    except Exception as err:  # noqa: BLE001 - report, do not hide, an unsupported peer
        return Result("(d) torch.func vmap(grad)", float("nan"), 0, 0,
                      note=f"failed: {type(err).__name__}: {err}"[:120])
    seconds = time.perf_counter() - start
    tokens = sum(len(x) for x in rows["input_ids"])
    return Result("(d) torch.func vmap(grad)", seconds, len(rows) * members, tokens * members,
                  note="fixed weights, no training", peak_gb=peak_gb())


def padding(rows, batch, members) -> dict[str, float]:
    """Padding of this run's rows, and of an Alpaca-sized set (52,002 rows) of the same length law."""
    out = _padding(np.array([len(x) for x in rows["input_ids"]]), batch, members)
    rng = np.random.default_rng(1)
    alpaca = np.clip(rng.lognormal(np.log(90), 0.6, size=52_002).astype(int), 12, 512)
    out.update({f"{k} (52k rows)": v for k, v in _padding(alpaca, batch, members).items()})
    return out


def _padding(lengths, batch, members) -> dict[str, float]:
    grouped = MemberSampler(len(lengths), members, batch, seed=0, lengths=lengths).padding_ratio()
    plain = MemberSampler(len(lengths), members, batch, seed=0)
    computed = sum(len(b) * lengths[b].max() for m in range(members) for b in plain.batches(m, 0))
    return {"random": computed / (members * lengths.sum()), "group_by_length": grouped}


def bench(size, n_rows, members, batch, epochs) -> tuple[list[Result], dict]:
    rows = alpaca_like_rows(n_rows, SIZES[size]["vocab_size"], 512)
    n_small = max(batch, n_rows // 4)  # the per-example baselines are slow: a subset, rates compared
    repeats = 2 if size == "tiny" else 1  # a gpt2-small run is long enough to amortise one-off costs
    results = [run_trainer(size, rows, "none", members, batch, epochs, repeats=repeats),
               run_trainer(size, rows, "train", members, batch, epochs, repeats=repeats),
               run_trainer(size, rows, "snapshot", members, batch, epochs, repeats=repeats)]
    if size == "tiny":  # random batches: measured where it is cheap
        results.append(run_trainer(size, rows, "train", members, batch, epochs, strategy="random", repeats=repeats))
    else:
        results.append(Result("(b) GradFilterTrainer, train mode", float("nan"), 0, 0, note="random batches: "
                              "not run at this size (time budget); see tiny"))
    subset = rows.select(range(n_small))
    results += [run_batch_size_one(size, subset, members), run_vmap(size, subset, members, batch)]
    try:
        import opacus  # noqa: F401

        results.append(Result("(d) Opacus", float("nan"), 0, 0, note="installed but not wired: see README"))
    except ImportError:
        results.append(Result("(d) Opacus", float("nan"), 0, 0, note="not installed (optional peer)"))
    return results, padding(rows, batch, members)


def bench_sketches(size, n_rows, members, batch, epochs, dim, modes=("train",)) -> str:
    """Norms and ``dim``-dim sketches against norms alone, side by side, in each record mode of ``modes``
    (issue 14's <= 1.3x)."""
    rows = alpaca_like_rows(n_rows, SIZES[size]["vocab_size"], 512)
    repeats = 2 if size == "tiny" else 1
    lines = [f"### {size}: {n_rows} rows, M={members}, batch {batch} per member, {epochs} epoch(s), sketch d={dim}",
             "", "| record mode | method | norms/s | time (s) |", "|---|---|---|---|"]
    ratios = {}
    for mode in modes:
        alone = run_trainer(size, rows, mode, members, batch, epochs, repeats=repeats)
        both = run_trainer(size, rows, mode, members, batch, epochs, repeats=repeats, sketch_dim=dim)
        lines += [f"| {mode} | {r.name} | {r.per_second:.1f} | {r.seconds:.1f} |" for r in (alone, both)]
        ratios[mode] = alone.per_second / both.per_second
    lines += [""] + [f"- {mode} mode, sketch overhead, time (norms + sketches) / (norms alone): **{ratio:.3f}** "
                     "(target <= 1.3)" for mode, ratio in ratios.items()]
    lines += [f"- sketch storage: 4 x M x (sketched epochs) x d bytes a row = {4 * members * dim / 1e3:.1f} kB a row "
              f"here (one sketched epoch); at 1M rows, M=5, d={dim}: {4 * 5 * dim * 1e6 / 1e9:.1f} GB (file-backed "
              "while training, like the record)",
              ""]
    return "\n".join(lines)


def report(size, results, pad, args) -> str:
    floor = results[0].per_second
    train = results[1].per_second
    lines = [f"### {size}: {args.rows if size == 'tiny' else args.rows_gpt2} rows, M={args.members}, "
             f"batch {args.batch} per member, {args.epochs} epoch(s)", "",
             "| method | norms/s | tokens/s | time (s) | vs (a) floor "
             "| (c)/(b-train) style: b-train rate / this | note |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        if not r.visits:
            lines.append(f"| {r.name} | - | - | - | - | - | {r.note} |")
            continue
        lines.append(f"| {r.name} | {r.per_second:.1f} | {r.tokens / r.seconds:.0f} | {r.seconds:.1f} | "
                     f"{floor / r.per_second:.3f} | {train / r.per_second:.2f} | {r.note} |")
    b_snap = results[2].per_second
    c = results[4].per_second
    d = results[5].per_second if results[5].visits else float("nan")
    lines += ["", f"- recording overhead, time per norm (b-train) / (a): **{floor / train:.3f}** (target <= 1.05)",
              f"- snapshot mode, time per norm (b-snapshot) / (a): {floor / b_snap:.3f}",
              f"- batch-size-1 loop time per norm / (b-train): **{train / c:.2f}** (target >= 1.5)",
              f"- vmap(grad) time per norm / (b-train): {train / d:.2f}",
              f"- random vs length-grouped batches, (b-train, random) time / (b-train, grouped): "
              f"{train / results[3].per_second if results[3].visits else float('nan'):.2f}",
              f"- padding waste, tokens computed / real tokens, this run: random {pad['random']:.3f}, "
              f"length-grouped {pad['group_by_length']:.3f}; at Alpaca size (52,002 rows, same length law): "
              f"random {pad['random (52k rows)']:.3f}, length-grouped **{pad['group_by_length (52k rows)']:.3f}** "
              "(target <= 1.10)", ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--rows", type=int, default=1024, help="Rows for the tiny model.")
    parser.add_argument("--rows_gpt2", type=int, default=64, help="Rows for the GPT-2-small-shaped model.")
    parser.add_argument("--members", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--output", default=None, help="Also write the markdown report here.")
    parser.add_argument("--sketch_dim", type=int, default=1024, help="Sketch dimension measured (0: skip).")
    parser.add_argument("--sketch_only", action="store_true", help="Only the sketch overhead rows.")
    parser.add_argument("--sketch_modes", nargs="+", default=["train", "snapshot"], choices=["train", "snapshot"],
                        help="Record modes of the sketch overhead rows.")
    args = parser.parse_args()
    torch.manual_seed(0)
    run_trainer("tiny", alpaca_like_rows(32, 1024, 64), "train", 2, 8, 1, repeats=1)  # warm-up
    header = [f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
              f"{'GPU ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only'}; "
              f"torch {torch.__version__}, transformers {__import__('transformers').__version__}, "
              f"peft {__import__('peft').__version__}.", f"Command: python benchmarks/throughput.py "
              f"--sizes {' '.join(args.sizes)} --rows {args.rows} --rows_gpt2 {args.rows_gpt2} --members "
              f"{args.members} --batch {args.batch} --epochs {args.epochs} --sketch_dim {args.sketch_dim}"
              f"{' --sketch_only' if args.sketch_only else ''} --sketch_modes {' '.join(args.sketch_modes)}", ""]
    text = "\n".join(header)
    print(text, flush=True)
    for size in args.sizes if args.sketch_dim else []:
        part = bench_sketches(size, args.rows if size == "tiny" else args.rows_gpt2, args.members, args.batch,
                              args.epochs, args.sketch_dim, args.sketch_modes)
        print(part, flush=True)
        text += "\n" + part
    for size in [] if args.sketch_only else args.sizes:
        results, pad = bench(size, args.rows if size == "tiny" else args.rows_gpt2, args.members, args.batch,
                             args.epochs)
        part = report(size, results, pad, args)
        print(part, flush=True)
        text += "\n" + part
    if args.output:
        with open(args.output, "w") as f:
            f.write("# Throughput of per-example gradient norms\n\n" + text)


if __name__ == "__main__":
    main()
