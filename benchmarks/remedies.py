"""Why does the paper's G-SNR rank corrupted rows *above* clean ones, and what fixes it? A seeded grid.

    python benchmarks/remedies.py                          # screening grid (3 members): docs/remedies_grid.md
    python benchmarks/remedies.py --phase confirm          # + 5-member runs of the settings named in --confirm
    python benchmarks/remedies.py --only demo_lr0.001      # just the runs whose tag contains this

Each run trains a proxy ensemble (`GradFilterTrainer`) for ``--epochs`` epochs and saves its record
(plus the LoRA factors' norms at every epoch end) under ``--cache``; a rerun skips finished runs, so
the grid can be run in pieces. Every keep-score of ``quality.keep_scores`` (IFD left out: it does not
depend on the proxy run and is in docs/quality.md) and the candidate remedies of `extra_scores` are
evaluated at every epoch pair (s, t) of `PAIRS` by ``quality.detection`` (AUROC of clean over corrupted).

Data and proxies are the ones of benchmarks/quality.py: the demo set (1500 rows, 20% corrupted, the
demo proxy) and 1000 real Alpaca rows (20% corrupted; a 2-layer GPT-2 pre-trained on the other rows),
skipped when ../shared/data/train/alpaca_cherry_5pct.json is absent.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import numpy as np
import torch

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from quality import ALPACA, alpaca_data, detection, keep_scores
from transformers import TrainerCallback

from hf_gradfilter import GradFilterConfig, GradFilterTrainer
from hf_gradfilter.demo import demo_proxy, demo_proxy_dir, pretrain_proxy
from hf_gradfilter.demo.data import make_demo_dataset
from hf_gradfilter.proxy.record import GradientRecord
from hf_gradfilter.scores.formulas import fit_rank, mean_loss, score_parts
from hf_gradfilter.scores.metrics import auroc

PAIRS = ((1, 2), (2, 3), (2, 4), (3, 4), (1, 4))
# (lr, init, mode, demo seeds, alpaca seeds) of the screening grid; every run is 4 epochs, 3 members.
# Sized to ~50 CPU-minutes of a shared 2-core machine: two demo seeds per setting; an Alpaca run costs ~4x a
# demo run there (~390 s), so Alpaca gets one seed of the settings that moved the demo most.
SCREEN = [
    (1e-3, "true", "train", (0, 1), (0,)),
    (3e-3, "true", "train", (0, 1), ()),
    (1e-2, "true", "train", (0, 1), (0,)),
    (1e-3, "gaussian", "train", (0, 1), (0,)),
    (1e-3, "orthogonal", "train", (0, 1), ()),
    (1e-3, "false", "train", (0,), (0,)),
    (1e-3, "true", "snapshot", (0,), ()),
]


FIT = "fit rank: (r(-G_t)+r(-L_t))/2 (formulas.fit_rank)"
SUMMARY = {  # keep-score -> short column name of the summary tables
    "G-SNR (paper)": "G-SNR",
    "Alt 2: relative drop": "rel drop",
    "sign-aware G-SNR: rel/v if rel>=0 else rel*v": "sign-aware",
    "rank: rel drop + -V_t": "rank rel+(-V)",
    "rank: rel drop + -G_t + -V_t": "rank rel+(-G)+(-V)",
    "rank mix: rank(-G_t)+rank(-V_t)": "rank (-G)+(-V)",
    "low late energy -G_t": "-G_t",
    "low final proxy loss": "low loss",
    FIT: "fit_rank",
    "length-controlled energy: -G_t * response words": "-G_t*len",
    "random": "random",
}


def rank(x: np.ndarray) -> np.ndarray:
    """Ranks scaled to [0, 1], NaN lowest (the same convention as quality.keep_scores' rank mix)."""
    return np.argsort(np.argsort(np.where(np.isfinite(x), x, -np.inf))) / max(len(x) - 1, 1)


def extra_scores(norms: np.ndarray, s: int, t: int) -> dict[str, np.ndarray]:
    """Candidate remedies (higher = kept) that quality.keep_scores does not have."""
    p = score_parts(norms, s, t)
    rel, g_t, v_t = p["rel_drop"], p["grad_late"], p["ens_var_late"]
    v = (v_t + 1e-8) / np.nanmedian(v_t + 1e-8)  # V_t in units of its median: scale-free
    return {
        "sign-aware G-SNR: rel/v if rel>=0 else rel*v": np.where(rel >= 0, rel / v, rel * v),
        "positive drop only: max(rel,0)/V_t": np.maximum(rel, 0) / (v_t + 1e-8),
        "rank: rel drop + -V_t": rank(rel) + rank(-v_t),
        "rank: rel drop + -G_t + -V_t": rank(rel) + rank(-g_t) + rank(-v_t),
    }


class FactorNorms(TrainerCallback):
    """Squared Frobenius norms of all lora_A and of all lora_B weights, mean over members, at train start
    and every epoch end: does the adapter's scale grow (and with it the other factor's gradient)?"""

    def __init__(self):
        self.trainer, self.rows = None, []

    def _measure(self):
        model = self.trainer.model
        a = b = 0.0
        for name, p in model.named_parameters():
            if ".lora_A." in name:
                a += float(p.detach().double().pow(2).sum())
            elif ".lora_B." in name:
                b += float(p.detach().double().pow(2).sum())
        m = self.trainer.args.num_members
        self.rows.append((a / m, b / m))

    def on_train_begin(self, args, state, control, **kwargs):
        self._measure()

    def on_epoch_end(self, args, state, control, **kwargs):
        self._measure()


def tag(dataset, lr, init, mode, members, epochs, seed) -> str:
    return f"{dataset}_lr{lr:g}_{init}_{mode}_m{members}_e{epochs}_s{seed}"


def train_one(rows, proxy_dir, tokenizer, *, lr, init, mode, members, epochs, seed, batch, path):
    from transformers import AutoModelForCausalLM

    args = GradFilterConfig(output_dir=f"/tmp/hfg_remedies/out/{os.path.basename(path)}", num_members=members,
                            num_train_epochs=epochs, learning_rate=lr, init_lora_weights=init,
                            per_device_train_batch_size=batch, per_device_eval_batch_size=batch, record_mode=mode,
                            seed=seed, max_length=256, disable_tqdm=True, use_cpu=True, logging_steps=10_000)
    t0 = time.time()
    trainer = GradFilterTrainer(AutoModelForCausalLM.from_pretrained(proxy_dir), args=args, train_dataset=rows,
                                processing_class=tokenizer)
    factors = FactorNorms()
    factors.trainer = trainer
    trainer.add_callback(factors)
    trainer.train()
    r = trainer.record
    np.savez(path, norms=r.norms, losses=r.losses, example_id=r.example_id, row_hash=r.row_hash,
             factors=np.array(factors.rows), seconds=time.time() - t0, metadata=json.dumps(r.metadata, default=str))
    return time.time() - t0


def load_record(path):
    z = np.load(path)
    rec = GradientRecord(z["norms"], z["losses"], z["example_id"], z["row_hash"], json.loads(str(z["metadata"])))
    return rec, z["factors"], float(z["seconds"])


def spearman(x, y) -> float:
    ok = np.isfinite(x) & np.isfinite(y)
    return float(np.corrcoef(rank(x[ok]), rank(y[ok]))[0, 1])


def analyse(rows, rec, factors, seconds) -> dict:
    corrupted = np.asarray(rows["is_corrupted"], bool)
    clean = ~corrupted
    kinds = np.asarray(rows["corruption"])
    n_epochs = rec.num_epochs
    loss = np.nanmean(rec.losses, axis=1)  # (N, E)
    out = {"seconds": seconds, "loss": np.nanmean(loss, axis=0).tolist(),
           "loss_clean": np.nanmean(loss[clean], axis=0).tolist(),
           "loss_corrupted": np.nanmean(loss[corrupted], axis=0).tolist(),
           "factor_A_sq": factors[:, 0].tolist(), "factor_B_sq": factors[:, 1].tolist(),
           "energy_median": [float(np.nanmedian(np.mean(rec.norms[:, :, e].astype(float) ** 2, axis=1)))
                             for e in range(n_epochs)], "pairs": {}}
    for s, t in PAIRS:
        if t > n_epochs:
            continue
        sliced = GradientRecord(rec.norms[:, :, [s - 1, t - 1]], rec.losses[:, :, [s - 1, t - 1]], rec.example_id,
                                rec.row_hash, rec.metadata)
        scores = keep_scores(rows, sliced, ifd=np.zeros(len(rows)))
        scores.pop("Superfiltering IFD", None)
        scores = {k: v for k, v in scores.items() if np.isfinite(np.asarray(v, float)).any()}  # e.g. no cosines
        scores.update(extra_scores(rec.norms, s, t))
        scores["length-controlled energy: -G_t * response words"] = -score_parts(rec.norms, s, t)["grad_late"] * \
            np.asarray(scores["response length"], float)
        scores[FIT] = fit_rank(score_parts(rec.norms, s, t)["grad_late"], mean_loss(rec.losses, t))
        det = detection(scores, corrupted)
        by_kind = {kind: {name: auroc(np.asarray(scores[name], float)[clean | (kinds == kind)],
                                      clean[clean | (kinds == kind)]) for name in SUMMARY}
                   for kind in sorted(set(kinds[corrupted]))}
        p = score_parts(rec.norms, s, t)
        sq = rec.norms.astype(float) ** 2
        per_member_rel = (sq[:, :, s - 1] - sq[:, :, t - 1]) / sq[:, :, s - 1]
        m = rec.num_members
        agree = np.mean([spearman(per_member_rel[:, a], per_member_rel[:, b])
                         for a, b in itertools.combinations(range(m), 2)]) if m > 1 else float("nan")
        length = scores["response length"]
        out["pairs"][f"{s},{t}"] = {
            "auroc": {k: v["auroc"] for k, v in det.items()},
            "clean@10": {k: v["clean@10"] for k, v in det.items()},
            "auroc_by_kind": by_kind,
            "spearman_length": {k: spearman(np.asarray(v, float), length) for k, v in scores.items()
                                if k not in ("response length", "random")},
            "rows_energy_rose": float(np.mean(p["grad_late"] > p["grad_early"])),
            "rows_energy_rose_clean": float(np.mean(p["grad_late"][clean] > p["grad_early"][clean])),
            "median_G_t/G_s": float(np.nanmedian(p["grad_late"] / p["grad_early"])),
            "median_CV2_t": float(np.nanmedian(p["ens_var_late"] / p["grad_late"] ** 2)),
            "member_agreement_rel_drop": float(agree),
        }
    return out


def datasets():
    """(name, rows, proxy_dir, tokenizer) of the demo set and, when present, the Alpaca rows."""
    from transformers import PreTrainedTokenizerFast

    _, tok = demo_proxy(seed=0)
    out = [("demo", make_demo_dataset(num_rows=1500, seed=0), demo_proxy_dir(seed=0), tok)]
    if os.path.exists(ALPACA):
        scored, pretrain = alpaca_data(1000)
        alpaca_dir = f"/tmp/hfg_quality/alpaca_proxy_{len(pretrain)}"
        if not os.path.exists(os.path.join(alpaca_dir, "model.safetensors")):
            pretrain_proxy(pretrain, alpaca_dir, seed=0, epochs=3, vocab_size=4096)
        out.append(("alpaca", scored, alpaca_dir, PreTrainedTokenizerFast.from_pretrained(alpaca_dir)))
    return out


def grid(args, dataset):
    runs = [(lr, init, mode, 3, args.epochs, seed) for lr, init, mode, demo_seeds, alpaca_seeds in SCREEN
            for seed in (demo_seeds if dataset == "demo" else alpaca_seeds)]
    if args.phase == "confirm":
        for spec in args.confirm:
            kv = dict(item.split("=") for item in spec.split(","))
            for seed in args.confirm_seeds:
                runs.append((float(kv.get("lr", 1e-3)), kv.get("init", "true"), kv.get("mode", "train"),
                             int(kv.get("members", 5)), int(kv.get("epochs", args.epochs)), seed))
    return runs


def fmt(values) -> str:
    v = np.asarray(values, float)
    return f"{v.mean():.3f} ± {v.std():.3f}" if len(v) > 1 else f"{v[0]:.3f}"


def setting_name(key) -> str:
    lr, init, mode, members, epochs = key
    return f"lr {lr:g}, init {init}, {mode}, M={members}, {epochs} ep"


def diagnostics_row(key, res: list[dict]) -> str:
    """One row of the diagnostics table: means over the seeds' results ``res``."""
    def mean(field):
        return np.mean([r[field] for r in res], axis=0)

    def pair(p, field):
        return np.mean([r["pairs"][p][field] if p in r["pairs"] else np.nan for r in res])

    c, x = mean("loss_clean"), mean("loss_corrupted")
    return " | ".join([
        f"| {setting_name(key)}", str(len(res)), " ".join(f"{a:.2f}/{b:.2f}" for a, b in zip(c, x)),
        " ".join(f"{v:.3g}" for v in mean("energy_median")), " ".join(f"{v:.3g}" for v in mean("factor_A_sq")),
        " ".join(f"{v:.3g}" for v in mean("factor_B_sq")),
        ", ".join(f"{pair(p, 'rows_energy_rose'):.0%}" for p in ("1,2", "2,4", "3,4")),
        ", ".join(f"{pair(p, 'median_G_t/G_s'):.2f}" for p in ("1,2", "3,4")),
        ", ".join(f"{pair(p, 'member_agreement_rel_drop'):.2f}" for p in ("1,2", "3,4")),
        f"{mean('seconds'):.0f} |"])


def markdown(results: dict, args) -> str:
    cmd = f"python benchmarks/remedies.py {' '.join(sys.argv[1:])}".rstrip()
    lines = ["# Remedies for the paper's G-SNR: a seeded grid", "", f"Command: `{cmd}`", "",
             ("AUROC of ranking clean rows above corrupted ones (0.5 = random), mean ± std over proxy seeds "
              "(a single value: one seed). Setting: learning rate, PEFT `init_lora_weights`, recording mode, "
              "ensemble size M, epochs trained (linear decay over all of them). Pair (s,t): the early and late "
              "epochs the score reads."), ""]
    for dataset in dict.fromkeys(k[0] for k in results):
        groups: dict = {}
        for (ds, lr, init, mode, members, epochs, seed), res in results.items():
            if ds == dataset:
                groups.setdefault((lr, init, mode, members, epochs), []).append((seed, res))
        lines += [f"## {dataset}", "", "### Diagnostics (mean over seeds)", "",
                  ("| setting | seeds | proxy loss per epoch (clean / corrupted rows) | median G per epoch | "
                   "‖A‖² per epoch end (start first) | ‖B‖² | rows energy rose (1→2, 2→4, 3→4) | "
                   "median G_t/G_s (1→2, 3→4) | member agreement on drop (1→2, 3→4) | s/run |"),
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for key, runs in groups.items():
            lines.append(diagnostics_row(key, [r for _, r in runs]))
        lines.append("")
        for p in ("1,2", "2,3", "3,4"):
            lines += [f"### {dataset}: summary at (s,t) = ({p})", "",
                      "| setting | seeds | " + " | ".join(SUMMARY.values()) + " |", "|---|---|" + "---|" * len(SUMMARY)]
            for key, runs in groups.items():
                res = [r for _, r in runs if p in r["pairs"]]
                if res:
                    lines.append(f"| {setting_name(key)} | {len(res)} | " + " | ".join(
                        fmt([r["pairs"][p]["auroc"][name] for r in res]) for name in SUMMARY) + " |")
            lines.append("")
        lines += [f"### {dataset}: AUROC of clean rows against each corruption kind, (s,t) = (1,2)", "",
                  "| setting | kind | " + " | ".join(SUMMARY.values()) + " |", "|---|---|" + "---|" * len(SUMMARY)]
        for key, runs in groups.items():
            for kind in runs[0][1]["pairs"]["1,2"]["auroc_by_kind"]:
                lines.append(f"| {setting_name(key)} | {kind} | " + " | ".join(
                    fmt([r["pairs"]["1,2"]["auroc_by_kind"][kind][name] for _, r in runs]) for name in SUMMARY) + " |")
        lines.append("")
        for key, runs in groups.items():
            res = [r for _, r in runs]
            pairs = [p for p in res[0]["pairs"]]
            lines += [f"### {dataset}: {setting_name(key)}; seeds {', '.join(str(s) for s, _ in runs)}", "",
                      "| keep-score | " + " | ".join(f"AUROC ({p})" for p in pairs) + " |",
                      "|---|" + "---|" * len(pairs)]
            for name in res[0]["pairs"][pairs[0]]["auroc"]:
                lines.append(f"| {name} | " + " | ".join(fmt([r["pairs"][p]["auroc"][name] for r in res])
                                                      for p in pairs) + " |")
            lines.append("")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phase", choices=["screen", "confirm"], default="screen")
    parser.add_argument("--confirm", nargs="*", default=[],
                        help="Settings for the 5-member confirmation, e.g. 'lr=3e-3,init=gaussian,mode=train'.")
    parser.add_argument("--confirm_seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--only", default=None, help="Run only tags containing this string.")
    parser.add_argument("--datasets", nargs="+", default=["demo", "alpaca"])
    parser.add_argument("--cache", default="/tmp/hfg_remedies/records")
    parser.add_argument("--no_train", action="store_true", help="Only analyse runs already in the cache.")
    parser.add_argument("--output", default="docs/remedies_grid.md")
    args = parser.parse_args()
    os.makedirs(args.cache, exist_ok=True)
    results, t0 = {}, time.time()
    for name, rows, proxy_dir, tok in datasets():
        if name not in args.datasets:
            continue
        for lr, init, mode, members, epochs, seed in grid(args, name):
            key = tag(name, lr, init, mode, members, epochs, seed)
            path = os.path.join(args.cache, key + ".npz")
            if args.only and args.only not in key:
                continue
            if not os.path.exists(path):
                if args.no_train:
                    continue
                sec = train_one(rows, proxy_dir, tok, lr=lr, init=init, mode=mode, members=members, epochs=epochs,
                                seed=seed, batch=args.batch, path=path)
                print(f"[{key}] trained in {sec:.0f}s (total {time.time() - t0:.0f}s)", flush=True)
            rec, factors, sec = load_record(path)
            res = analyse(rows, rec, factors, sec)
            results[(name, lr, init, mode, members, epochs, seed)] = res
            a = res["pairs"]["1,2"]["auroc"]
            print(f"[{key}] AUROC (1,2): G-SNR {a['G-SNR (paper)']:.3f}  -G_t {a['low late energy -G_t']:.3f}  "
                  f"rose {res['pairs']['1,2']['rows_energy_rose']:.0%}", flush=True)
    text = markdown(results, args) + f"\nTotal time of this invocation: {time.time() - t0:.0f} s.\n"
    with open(args.output, "w") as f:
        f.write(text)
    with open(os.path.splitext(args.output)[0] + ".json", "w") as f:
        json.dump([{"key": list(k), **v} for k, v in results.items()], f, indent=1, default=float)
    print(text)


if __name__ == "__main__":
    main()
