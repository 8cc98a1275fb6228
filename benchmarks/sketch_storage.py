"""What smaller sketches cost (``GradFilterConfig.sketch_storage`` / ``sketch_dtype``), against the float32
per-member sketches: run by ``python benchmarks/ann_search.py storage`` (docs/ann_search.md).

The reference is one record with float32 per-member sketches; the three other options are made from it the way
the recording makes them (``mean``: the members' mean, summed as they visit the row, equal to ``mean(axis=1)`` to
float32 rounding, tests/test_sketch_storage.py; ``float16``: each value rounded). Compared: the cosine between
rows' member-mean sketches (what the near-duplicate flags and the clusters use), the nearest earlier row and the
flags at 0.9 / 0.95 / 0.98, and target alignment (`scores.alignment`; with ``mean``, the cosine of member means)
with its top 10%. On the demo (the demo proxy, M = 5, 3,000 rows, 2 epochs in train mode, d = 1024; three target
tasks of 32 clean rows each) and on 20,000 synthetic rows (benchmarks/ann_search.py's, given 5 members that see each
row through their own random map, as the demo's nearly orthogonal members do: `synthetic_members`).
"""

from __future__ import annotations

import time
import warnings

import numpy as np

from hf_gradfilter import target_alignment
from hf_gradfilter.scores.duplicates import nearest_earlier

OPTIONS = ("float32 members", "float32 mean", "float16 members", "float16 mean")
FIELDS = ["instruction", "input", "output"]


def stored(members: np.ndarray, option: str) -> np.ndarray:
    """The ``(N, M or 1, d)`` sketches ``option`` keeps of the float32 per-member ``members``."""
    dtype, storage = option.split()
    out = members.mean(axis=1, keepdims=True, dtype=np.float32) if storage == "mean" else members
    return out.astype(np.float16) if dtype == "float16" else out


def unit_mean(x: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        m = np.nanmean(x.astype(np.float32), axis=1)
    return m / np.linalg.norm(m, axis=1, keepdims=True)


def top10(score: np.ndarray) -> set:
    return set(np.argsort(-score, kind="stable")[: round(0.1 * len(score))].tolist())


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def costs(members: np.ndarray, targets: dict, pairs: int = 200_000, seed: int = 0) -> dict:
    """Each option against the float32 per-member ``members`` ``(N, M, d)``."""
    ref_unit = unit_mean(members)
    rng = np.random.default_rng(seed)
    i, j = rng.integers(len(members), size=(2, pairs))
    ref_cos = np.einsum("nd,nd->n", ref_unit[i], ref_unit[j])
    ref_near, ref_near_cos = nearest_earlier(members, search="exact")
    ref_align = {t: target_alignment(members, tg) for t, tg in targets.items()}
    out = {}
    for option in OPTIONS:
        x = stored(members, option)
        unit = unit_mean(x)
        err = np.abs(np.einsum("nd,nd->n", unit[i], unit[j]) - ref_cos)
        near, near_cos = nearest_earlier(x, search="exact")
        row = {"bytes_per_row_at_d": int(x[0].nbytes), "mean_cos_error_pairs": float(err.mean()),
               "max_cos_error_pairs": float(err.max()),
               "nearest_changed": int((near != ref_near).sum()),
               **{f"flags_changed_at_{t}": int(((near_cos >= t) != (ref_near_cos >= t)).sum()
                                               + ((near_cos >= t) & (ref_near_cos >= t) & (near != ref_near)).sum())
                  for t in (0.9, 0.95, 0.98)}}
        align = {t: target_alignment(x, tg) for t, tg in targets.items()}
        row["alignment_spearman_min"] = min(spearman(align[t], ref_align[t]) for t in targets)
        row["alignment_top10_same_rows_min"] = min(len(top10(align[t]) & top10(ref_align[t])) / len(top10(align[t]))
                                                   for t in targets)
        row["alignment_max_abs_diff"] = max(float(np.nanmax(np.abs(align[t] - ref_align[t]))) for t in targets)
        out[option] = row
    out["flags_at_0.98_reference"] = int((ref_near_cos >= 0.98).sum())
    out["member_agreement"] = member_agreement(members)
    return out


def member_agreement(members: np.ndarray) -> float:
    """Mean cosine between two members' sketches of the same row."""
    u = members / np.linalg.norm(members, axis=2, keepdims=True)
    m = members.shape[1]
    return float(np.nanmean([np.einsum("nd,nd->n", u[:, a], u[:, b]) for a in range(m) for b in range(a + 1, m)]))


def demo(rows: int = 3000, members: int = 5, dim: int = 1024):
    from hf_gradfilter import GradFilterConfig, GradFilterTrainer
    from hf_gradfilter.demo import demo_proxy
    from hf_gradfilter.demo.data import make_demo_dataset
    from hf_gradfilter.proxy.probe import sketch_rows
    from hf_gradfilter.scores.duplicates import record_sketches

    data = make_demo_dataset(num_rows=rows)
    other = make_demo_dataset(num_rows=3000, corruption_rate=0.0, seed=777)
    model, tokenizer = demo_proxy(seed=0)
    cfg = GradFilterConfig(output_dir="/tmp/hfg_sketch_storage", num_members=members, num_train_epochs=2,
                           learning_rate=1e-3, per_device_train_batch_size=16, seed=0, max_length=256,
                           disable_tqdm=True, use_cpu=True, logging_steps=10_000, sketch_dim=dim)
    trainer = GradFilterTrainer(model, args=cfg, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    record = trainer.record
    sk = np.asarray(record_sketches(record))[np.argsort(record.example_id)]
    tasks = np.asarray(other["task"])
    targets = {t: sketch_rows(trainer, other.select(np.flatnonzero(tasks == t)[:32]).select_columns(FIELDS))
               for t in ("antonym", "describe", "add")}
    norms = np.linalg.norm(sk, axis=2)
    return sk, targets, {"sketch_norm_quantiles_0_1_50_100": [float(q) for q in np.quantile(norms, [0, .01, .5, 1])],
                         "share_of_values_below_float16_normal": float((np.abs(sk) < 2.0 ** -14).mean())}


def synthetic_members(n: int = 20_000, members: int = 5, seed: int = 0):
    """benchmarks/ann_search.py's synthetic rows given ``members`` sketches each, as the demo's members have them:
    member m sees a row through its own fixed random map ``Q_m`` (its LoRA factors differ from the others', so two
    members' sketches of one row are nearly orthogonal: mean cosine -0.07 on the demo), plus noise of 30% of the
    row's scale; targets: 32 rows of the set with fresh noise."""
    from ann_search import synthetic

    x, _ = synthetic(n, seed=seed)
    rng = np.random.default_rng(seed + 1)
    d = x.shape[1]
    maps = rng.standard_normal((members, d, d), dtype=np.float32) / np.float32(np.sqrt(d))
    scale = (0.3 * np.linalg.norm(x, axis=1) / np.sqrt(d)).astype(np.float32)[:, None, None]

    def sketch(rows, at):
        return np.stack([rows @ q for q in maps], axis=1) + scale[at] * rng.standard_normal(
            (len(rows), members, d), dtype=np.float32)

    out = sketch(x, np.arange(n))
    targets = {}
    for t in range(3):
        pick = rng.choice(n, 32, replace=False)
        targets[f"synthetic {t}"] = sketch(x[pick], pick)
    return out, targets


def part_storage() -> dict:
    t0 = time.time()
    sk, targets, stats = demo()
    res = {"demo": {**costs(sk, targets), **stats, "rows": len(sk), "members": sk.shape[1]}}
    from ann_search import compare  # the index on real sketches: blocks of 256 rows, so 11 of 12 go through it

    exact = nearest_earlier(sk, search="exact")
    res["demo"]["approx_search_block_256"] = {**compare(exact, nearest_earlier(sk, block=256, search="approx")),
                                              "nn_cos_quartiles": [round(float(q), 3) for q in
                                                                   np.nanquantile(exact[1], [0.25, 0.5, 0.75])]}
    print("demo", res["demo"], flush=True)
    x, targets = synthetic_members()
    res["synthetic"] = {**costs(x, targets), "rows": len(x), "members": x.shape[1]}
    print("synthetic", res["synthetic"], flush=True)
    m, d = 5, 1024
    res["bytes_at_1M_rows_M5_d1024_one_epoch"] = {
        o: 1_000_000 * (m if "members" in o else 1) * d * (4 if "float32" in o else 2) for o in OPTIONS}
    res["seconds"] = time.time() - t0
    return res
