"""Peak host memory of the scoring data path as the dataset grows (10k, 100k, 1M short rows).

Memory is anonymous resident memory (``RssAnon``, sampled every 10 ms): the pages of the
memory-mapped Arrow files are left out, since the kernel drops them under pressure.

Each size runs in a fresh process: short pre-tokenized rows are written to an Arrow file on disk
(`Dataset.from_generator`, memory-mapped like any `load_dataset` result), a `GradFilterTrainer`
tokenizes them (cached to disk), builds its sampler and record, then every epoch of every member's
batches is collated and written into the record, and the record is saved. The model's compute is
skipped (it does not grow with the dataset). Reported: peak RSS above the post-import baseline,
against the size of the record itself (norms, losses and cosines, N x M x E float32 each, plus
example_id and row_hash, N int64 each), side by side for the trainer as it is (the record and
each member's data order in unnamed files in the output dir, `record.file_array`) and with both
forced into memory (``--in_memory``, how it was before they had files).

    python benchmarks/memory.py                    # 10k, 100k, 1M rows; about 25 minutes on 2 CPU cores
    python benchmarks/memory.py --sizes 10000 100000 --output docs/memory.md
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile


def rss_mb(field: str = "RssAnon") -> float:
    """This process's resident memory in MB. ``RssAnon`` leaves out file-backed pages (the memory-mapped
    Arrow files), which the kernel can drop at any time; ``VmRSS`` counts them."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


class PeakSampler:
    """Samples ``rss_mb()`` every 10 ms in a thread; ``peak`` is the highest value seen."""

    def __init__(self):
        import threading

        self.peak, self._stop = rss_mb(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, rss_mb())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, rss_mb())


def child(n: int, members: int, epochs: int, batch: int, workdir: str, in_memory: bool = False) -> dict:
    import numpy as np
    from datasets import Dataset
    from transformers import GPT2Config, GPT2LMHeadModel

    from hf_gradfilter import GradFilterConfig, GradFilterTrainer
    from hf_gradfilter.proxy import record, sampler
    from hf_gradfilter.proxy import rows as rows_module

    if in_memory:  # the comparison: the record and the data orders in anonymous memory, as before they had files
        in_ram = record.file_array

        def file_array(shape, dtype, fill, directory=None):
            return in_ram(shape, dtype, fill, None)

        record.file_array = rows_module.file_array = sampler.file_array = file_array

    baseline = rss_mb()
    sampler = PeakSampler()

    def rows():
        rng = np.random.default_rng(0)
        for _ in range(n):
            k = int(rng.integers(8, 25))
            ids = rng.integers(3, 64, size=k).tolist()
            yield {"input_ids": ids, "labels": [-100] * (k // 2) + ids[k // 2 :]}

    data = Dataset.from_generator(rows, cache_dir=os.path.join(workdir, "cache"))
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_layer=1, n_embd=16, n_head=2, n_positions=32))
    config = GradFilterConfig(output_dir=os.path.join(workdir, "out"), num_members=members, num_train_epochs=epochs,
                              late_epoch=epochs, per_device_train_batch_size=batch, use_cpu=True, disable_tqdm=True,
                              max_length=32, report_to="none")
    trainer = GradFilterTrainer(model, args=config, train_dataset=data)
    loader = trainer.get_train_dataloader()
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for step in loader:
            for m, batch_m in enumerate(step["members"]):
                ones = np.ones(len(batch_m["example_id"]), dtype=np.float32)
                trainer._store(batch_m["example_id"], m, epoch, _t(ones), _t(ones), _t(ones))
    trainer.gather_record()
    trainer.save_record()
    assert np.isfinite(trainer.record.norms).all()
    peak = sampler.stop()
    r = trainer.record
    record_mb = sum(a.nbytes for a in (r.norms, r.losses, r.cosines, r.example_id, r.row_hash)) / 2**20
    return {"rows": n, "baseline_mb": baseline, "peak_above_baseline_mb": peak - baseline, "record_mb": record_mb,
            "peak_rss_total_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _t(array):
    import torch

    return torch.from_numpy(array)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--output", default=None)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--in_memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.members, args.epochs, args.batch, args.workdir, args.in_memory)))
        return
    lines = [f"Command: python benchmarks/memory.py --sizes {' '.join(map(str, args.sizes))} --members "
             f"{args.members} --epochs {args.epochs} --batch {args.batch}", "",
             "| rows | record: norms, losses, cosines, ids, hashes (MB) | peak RssAnon above baseline, record and "
             "orders in files (MB) | peak / record | same, record and orders in memory (MB) | peak VmRSS incl. "
             "mapped files, in files (MB) |",
             "|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    results = []
    for n in args.sizes:
        pair = []
        for in_memory in (False, True):
            with tempfile.TemporaryDirectory() as tmp:
                out = subprocess.run([sys.executable, __file__, "--child", str(n), "--workdir", tmp, "--members",
                                      str(args.members), "--epochs", str(args.epochs), "--batch", str(args.batch)]
                                     + ["--in_memory"] * in_memory, capture_output=True, text=True, check=True)
            pair.append(json.loads(out.stdout.strip().splitlines()[-1]))
        files, memory = pair
        results.append(pair)
        line = (f"| {n:,} | {files['record_mb']:.1f} | {files['peak_above_baseline_mb']:.0f} | "
                f"{files['peak_above_baseline_mb'] / files['record_mb']:.2f} | "
                f"{memory['peak_above_baseline_mb']:.0f} | "
                f"{files['peak_rss_total_mb']:.0f} |")
        lines.append(line)
        print(line, flush=True)
    if len(results) > 1:
        (first, first_mem), (last, last_mem) = results[0], results[-1]
        record_growth = last["record_mb"] - first["record_mb"]
        growth = last["peak_above_baseline_mb"] - first["peak_above_baseline_mb"]
        growth_mem = last_mem["peak_above_baseline_mb"] - first_mem["peak_above_baseline_mb"]
        summary = (f"\nFrom {args.sizes[0]:,} to {args.sizes[-1]:,} rows the record grows by {record_growth:.0f} MB; "
                   f"peak RssAnon grows by {growth:.0f} MB "
                   f"with the record and orders in files ({growth / record_growth:.2f}x "
                   f"the record's growth) and by {growth_mem:.0f} MB "
                   "with them in memory.")
        lines.append(summary)
        print(summary, flush=True)
    if args.output:
        with open(args.output, "w") as f:
            f.write("# Peak host memory of scoring\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
