"""``hf-gradfilter run``: score -> select -> fine-tune -> (push) -> report, one folder per stage.

Layout of ``--output_dir`` (every stage folder holds a ``stage.json``)::

    run_args.json                  the arguments of the last run (``hf-gradfilter report DIR`` reads them)
    score/                         members, gradient_record.safetensors, scored/, log_history.json
    columns/                       scored/ with the sketch-derived and text-duplicate columns, columns.json
                                   (only with --target_dataset, --diversity_clusters or --drop_text_duplicates;
                                   every ratio reuses it)
    select/<column>_top10pct/      the selected rows (save_to_disk) and stats.json
    select/random_top10pct/        a random subset of the same size (--baseline_random)
    finetune/<column>_top10pct/    the target's LoRA adapter, loss curves, eval_metrics.json
    push/                          the Hub commits (--push_dataset_id / --push_adapter_id)
    report.md, report.html, report/   (`run.report`)

**Skipping.** A stage's *fingerprint* is a hash of everything that decides its outputs: its own
settings and the fingerprints of the stages it reads. ``stage.json`` is written with
``complete: false`` when a stage starts and ``complete: true`` when its outputs are all written;
a rerun skips a stage whose ``stage.json`` is complete with the same fingerprint. So a rerun after
a crash redoes only the unfinished stages (a killed scoring run resumes from its last checkpoint,
``--save_strategy steps``), and a new ``--ratio`` reuses the scoring run and redoes only selection
and what follows. A stage whose inputs changed starts from an empty folder (the changed inputs are named),
except the score stage of *another run*: a dataset or proxy model other than the one whose finished scoring
(or checkpoint) is in ``--output_dir`` is refused, not deleted; pass another folder or delete ``score/``. A Hub
dataset at a new commit (changed upstream, `engine.named_dataset_identity`) is the same run's: it is scored again.

**Several processes** (``torchrun`` / ``accelerate launch``, the same flags): every process scores
and fine-tunes (the Trainers split each batch among them); rank 0 alone selects, pushes, writes
stage files and the report, and the others wait at a barrier before each stage (`engine.run_stage`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from ..data.io import check_revision, load_rows
from ..dist import barrier, is_main_process, main_decides
from ..lora import LoraArguments
from ..proxy.model import check_causal_lm
from ..scores.formulas import DEFAULT_SCORE
from ..scores.score import ScoreArguments, score
from ..scores.sketched import CELL_COLUMN, CLUSTER_COLUMN, TARGET_COLUMN, sketch_options
from ..scores.text_duplicates import COLUMN as TEXT_DUP_COLUMN
from ..scores.text_duplicates import JACCARD_COLUMN, add_text_duplicate_columns, check_text_duplicates, text_settings
from ..selection.select import pick_rows
from .engine import Stage, keep_recorded_revision, named_dataset_identity, run_stage
from .sketches import check_sketch_flags

# TrainingArguments fields that do not change what a stage computes (logging, saving, hub, devices' I/O)
_NOT_INPUTS = ("output_dir", "logging", "save_", "report_to", "run_name", "disable_tqdm", "push_to_hub", "hub_",
               "resume_from_checkpoint", "overwrite_output_dir", "dataloader_", "log_level", "eval_", "tqdm",
               "include_", "torch_compile", "ddp_", "fsdp", "deepspeed", "accelerator_config", "debug",
               # evaluation, tracking and bookkeeping: the proxy is never evaluated, and these change no weight
               "trackio_", "project", "per_device_eval", "bf16_full_eval", "fp16_full_eval", "batch_eval_metrics",
               "do_eval", "do_predict", "do_train", "greater_is_better", "load_best_model_at_end",
               "metric_for_best_model", "prediction_loss_only", "log_on_each_node", "local_rank",
               "skip_memory_metrics", "restore_callback_states_from_checkpoint", "torch_empty_cache_steps",
               "enable_jit_checkpoint")
_LATER_DEFAULTS = {"sketch_storage": "members", "sketch_dtype": "float32"}


@dataclass
class RunArguments(ScoreArguments):
    """The stages after scoring: selection, the target's fine-tuning, evaluation and publishing.

    Every field is a flag of ``hf-gradfilter run`` and a key of its ``--config`` YAML file (TRL's
    convention), next to every ``GradFilterConfig`` field (the proxy's training).
    """

    score_column: str | None = field(default=None, metadata={
        "help": "Column to select by, higher kept: neg_energy_token (default, docs/default_choice.md; with "
                "--target_dataset: target_alignment), fit_rank (the previous default), gsnr (the paper), ... "
                "(see `hf-gradfilter select --help`; ifd uses Superfiltering's rule)."})
    ratio: list[float] = field(default_factory=lambda: [0.1], metadata={
        "help": "Fractions to keep, e.g. --ratio 0.05 0.10 0.15 (one scoring run, one target per ratio)."})
    group_column: str | None = field(default=None, metadata={
        "help": "Column naming each row's task or source in a mixture: with --group_mode per_group, the top --ratio "
                "of every group is kept (round(ratio * n_g), at least 1) instead of the top --ratio overall."})
    group_mode: str = field(default="global", metadata={"help": "global or per_group (see `select --help`).",
                                                        "choices": ["global", "per_group"]})
    target_dataset: str | None = field(default=None, metadata={
        "help": "Rows of the task you care about: select by their gradient alignment (column target_alignment; needs "
                "--sketch_dim, see `select --help`)."})
    target_split: str = field(default="train", metadata={"help": "Split of --target_dataset (a Hub id)."})
    diversity_clusters: int | None = field(default=None, metadata={
        "help": "Keep the top --ratio of every k-means cluster of the rows' gradient sketches (needs --sketch_dim)."})
    drop_near_duplicates: float | None = field(default=None, metadata={
        "help": "Never select rows whose gradient sketch has cosine >= this with an earlier row's (needs "
                "--sketch_dim)."})
    features: str = field(default="sketch", metadata={
        "help": "What --target_dataset and --diversity_clusters compare: 'sketch' (needs --sketch_dim) or "
                "'embedding' (mean hidden states under the proxy's frozen backbone, RDS+; see `select --help`)."})
    drop_text_duplicates: float | None = field(default=None, metadata={
        "help": "Never select rows whose text has word 5-gram Jaccard similarity >= this (e.g. 0.7) with an earlier "
                "row's (MinHash LSH; see `select --help`; needs `pip install 'hf-gradfilter[dedup]'`)."})
    baseline_random: bool = field(default=False, metadata={
        "help": "Also fine-tune the target on a random subset of the same size (seeded; with --group_mode "
                "per_group, as many rows of each group as the selection kept), for comparison."})
    skip_finetune: bool = field(default=False, metadata={"help": "Stop after selection (and the report)."})
    target_model: str = field(default="meta-llama/Llama-2-7b-hf", metadata={
        "help": "Target causal LM to fine-tune on each selection (with --demo: a tiny Llama built offline)."})
    target_lora_r: int = LoraArguments.prefixed_field("lora_r")
    target_lora_alpha: int = LoraArguments.prefixed_field("lora_alpha")
    target_lora_dropout: float = LoraArguments.prefixed_field("lora_dropout")
    target_lora_target_modules: list[str] | None = LoraArguments.prefixed_field("lora_target_modules")
    target_learning_rate: float | None = field(default=None, metadata={"help": "Target learning rate (2e-4)."})
    target_num_train_epochs: float | None = field(default=None, metadata={"help": "Target epochs (3)."})
    target_max_steps: int = field(default=-1, metadata={"help": "Target optimizer steps (overrides epochs if > 0)."})
    target_per_device_train_batch_size: int | None = field(default=None, metadata={"help": "Target batch (4)."})
    target_gradient_accumulation_steps: int | None = field(default=None, metadata={
        "help": "Target gradient accumulation (8)."})
    target_max_length: int | None = field(default=None, metadata={"help": "Target max tokens per row (1024)."})
    target_eval_steps: int | None = field(default=None, metadata={
        "help": "Evaluate the target on --eval_dataset_name every N steps (default: 6 times per run)."})
    eval_dataset_name: str | None = field(default=None, metadata={
        "help": "Held-out rows (file, saved dataset or Hub id) for the targets' loss (with --demo: clean demo rows)."})
    eval_dataset_split: str = field(default="train", metadata={"help": "Split of --eval_dataset_name."})
    eval_max_rows: int = field(default=300, metadata={
        "help": "Evaluate the targets on at most this many held-out rows."})
    push_dataset_id: str | None = field(default=None, metadata={
        "help": "Publish the scored data and every selection to this Hub dataset repo (namespace/name)."})
    push_adapter_id: str | None = field(default=None, metadata={
        "help": "Publish each target adapter to this Hub model repo (one ratio) or to <id>-top10pct ... (several)."})
    hub_private: bool = field(default=False, metadata={"help": "Create the Hub repos as private."})


DEMO_RUN_DEFAULTS = {
    "learning_rate": 1e-3, "per_device_train_batch_size": 16, "group_column": "task", "group_mode": "per_group",
    "baseline_random": True, "target_learning_rate": 1e-2,
    "target_max_steps": 60, "target_per_device_train_batch_size": 8, "target_gradient_accumulation_steps": 1,
    "target_max_length": 256,
}
"""Defaults of ``run --demo`` (a flag or a config key overrides each): the demo proxy's LoRA rate
(`demo.DEMO_LEARNING_RATE`); the top ratio of every task (the demo is a mixture of 12 task families,
and in docs/quality.md the per-task cut trained a better target than the global one: held-out loss
6.57 against 7.44); a tiny Llama target trained from scratch for 60 steps."""


# ---- stages -------------------------------------------------------------------------------------

def dataset_identity(args: RunArguments) -> dict:
    """What identifies the rows to score: the demo's settings, a local file's content hash, or the Hub id and the
    commit it is at (`engine.named_dataset_identity`)."""
    if args.demo:
        return {"demo_rows": args.demo_rows, "demo_pretrain_rows": args.demo_pretrain_rows,
                "demo_pretrain_epochs": args.demo_pretrain_epochs}
    return named_dataset_identity(args.dataset_name, args.dataset_config, args.dataset_split, args.dataset_revision)


def make_score_stage(args: RunArguments, config, out: str) -> Stage:
    """The score stage of the run in ``out``: its inputs are the rows (`dataset_identity`; a Hub dataset's commit
    unknown now is the one the finished stage recorded, `engine.keep_recorded_revision`), the proxy model and its
    training settings, and the extra scores."""
    folder = os.path.join(out, "score")
    return Stage("score", folder, {
        "dataset": keep_recorded_revision(dataset_identity(args), folder, "dataset"),
        "model": None if args.demo else args.model_name_or_path, "proxy": proxy_inputs(config),
        "extra_scores": sorted(args.extra_scores), "ifd_model": args.ifd_model, "canaries": args.canaries,
        # a forced near-duplicate search rescores; the default keeps older fingerprints
        **({"near_duplicate_search": args.near_duplicate_search} if args.near_duplicate_search != "auto" else {})})


def proxy_inputs(config) -> dict:
    """The proxy's training settings that decide the record (no logging/saving/output fields; fields added since
    runs were first fingerprinted only when they differ from their default, so older runs' stages stay done)."""
    return {k: v for k, v in config.to_dict().items()
            if not k.startswith(_NOT_INPUTS) and _LATER_DEFAULTS.get(k, _NOT_INPUTS) != v}


def eval_identity(args: RunArguments) -> dict | None:
    """The identity of ``--eval_dataset_name``'s rows (`engine.named_dataset_identity`: a file's content hash, a
    Hub dataset's commit), so that changed held-out rows fine-tune again; None without one."""
    if not args.eval_dataset_name:
        return None
    return named_dataset_identity(args.eval_dataset_name, None, args.eval_dataset_split)


def make_finetune_stage(args: RunArguments, config, out: str, name: str, select_fingerprint: str,
                        eval_data: dict | None) -> Stage:
    """The fine-tune stage of selection ``name``: its inputs are the selection, the ``--target_*``/``--eval_*`` flags,
    the seed and, with ``--eval_dataset_name``, the held-out rows' identity (`eval_identity`; a Hub commit unknown
    now is the one the finished stage recorded). Without one the inputs are as before it was added."""
    folder = os.path.join(out, "finetune", name)
    return Stage(f"finetune/{name}", folder, {
        "select": select_fingerprint, "target": _target_inputs(args), "seed": config.seed,
        **({"eval_data": keep_recorded_revision(eval_data, folder, "eval_data")} if eval_data else {})})


def tag(column: str, ratio: float) -> str:
    return f"{column}_top{round(ratio * 100)}pct"


# ---- the run ------------------------------------------------------------------------------------

def run(args: RunArguments, config) -> dict:
    """Run every stage that is not up to date; write the report. Returns ``{stage name: 'ran' | 'skipped'}``."""
    from .report import write_report

    ratios = args.ratio if isinstance(args.ratio, (list, tuple)) else [args.ratio]  # `ratio: 0.1` in a YAML file
    ratios = list(dict.fromkeys(float(r) for r in ratios))
    tags = [tag("x", r) for r in ratios]
    if len(set(tags)) < len(tags):
        same = sorted(r for r in ratios if tags.count(tag("x", r)) > 1)
        raise ValueError(f"--ratio {' '.join(f'{r:g}' for r in same)} name the same selection folder (top "
                         f"{round(same[0] * 100)}%): give ratios at least 0.01 apart.")
    for r in ratios:
        if not 0 < r <= 1:
            raise ValueError(f"ratio={r} is outside (0, 1]; use e.g. --ratio 0.05 0.1 0.15.")
    if not args.demo and not args.dataset_name:
        raise ValueError("Pass --dataset_name (a file, a saved dataset or a Hub id), or --demo.")
    check_revision(args.dataset_name, args.dataset_revision)
    if args.demo and args.target_model == RunArguments.target_model:
        args.target_model = "tiny-llama (demo)"
    if args.score_column is None:
        args.score_column = "target_alignment" if args.target_dataset else DEFAULT_SCORE
    check_sketch_flags(args, config)
    if args.drop_text_duplicates is not None:
        check_text_duplicates(args.drop_text_duplicates, "--drop_text_duplicates")
    out = os.path.abspath(config.output_dir)
    score_stage = make_score_stage(args, config, out)
    # another run's scoring is refused; the same Hub dataset at a new commit (changed upstream) is scored again
    if main_decides(lambda: score_stage.holds_another_runs_work(("dataset", "model"), ("dataset.revision",))):
        state = score_stage._state()
        took = f"it took {state['seconds']} s" if "seconds" in state else "unfinished, with a checkpoint"
        raise ValueError(
            f"--output_dir {config.output_dir} holds the score stage of another run "
            f"({', '.join(score_stage.changed_inputs())} differ; {took}): pass another --output_dir, or delete "
            f"{score_stage.folder} to score again there.")
    # every stage after scoring, planned now (a stage's fingerprint is its inputs', known before anything runs)
    text = None if args.drop_text_duplicates is None else text_settings(args.drop_text_duplicates,
                                                                        config.instruction_format)
    columns = None  # the sketch-derived and text-duplicate columns: a stage of their own when a flag asks for them
    if args.target_dataset is not None or args.diversity_clusters is not None or text is not None:
        columns = Stage("columns", os.path.join(out, "columns"), {
            "score": score_stage.fingerprint, "seed": config.seed, "clusters": args.diversity_clusters,
            "target": args.target_dataset and keep_recorded_revision(named_dataset_identity(
                args.target_dataset, None, args.target_split), os.path.join(out, "columns"), "target"),
            "group": args.group_column if args.group_mode == "per_group" and args.diversity_clusters else None,
            **({"features": args.features} if args.features != "sketch" else {}),
            **({"text_duplicates": text} if text is not None else {})})  # absent when off: older runs stay done
    columns_fp = columns and columns.fingerprint
    selects = {}  # name -> (column, ratio, stage)
    for ratio in ratios:
        for column in [args.score_column] + (["random"] if args.baseline_random else []):
            name = tag(column, ratio)
            selects[name] = (column, ratio, Stage(f"select/{name}", os.path.join(out, "select", name), {
                "score": score_stage.fingerprint, "column": column, "ratio": ratio,
                "group": [args.group_column, args.group_mode],
                "columns": columns_fp, "near_duplicates": args.drop_near_duplicates,
                "seed": config.seed if column == "random" else None,
                "match": args.score_column if column == "random" else None,
                **({"text_duplicates": args.drop_text_duplicates} if text is not None else {})}))
    eval_data = eval_identity(args)
    finetunes = {} if args.skip_finetune else {name: make_finetune_stage(args, config, out, name, stage.fingerprint,
                                                                         eval_data)
                                               for name, (_, _, stage) in selects.items()}
    if not args.demo and not all(main_decides(stage.done) for stage in finetunes.values()):
        # the target is loaded after scoring: refuse a bad one now (not when every fine-tune is done already)
        check_causal_lm(args.target_model, "--target_model", trust_remote_code=args.trust_remote_code)

    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "run_args.json"), "w") as f:
        json.dump({"run": dataclasses.asdict(args), "proxy": proxy_inputs(config)}, f, indent=1, default=str)
    statuses: dict[str, str] = {}

    run_stage(score_stage, lambda: _score(args, config, score_stage.folder), statuses, every_rank=True)
    scored_path = os.path.join(score_stage.folder, "scored")
    if columns is not None:
        run_stage(columns, partial(_columns, scored_path, columns.folder, args, config), statuses)
        scored_path = os.path.join(columns.folder, "scored")

    selections = {}  # name -> (folder, fingerprint)
    for name, (column, ratio, stage) in selects.items():
        run_stage(stage, partial(_select, scored_path, stage.folder, column, ratio, args, config.seed), statuses)
        selections[name] = (stage.folder, stage.fingerprint)

    targets, target_fps = {}, {}
    for name, stage in finetunes.items():
        folder = selections[name][0]
        run_stage(stage, lambda s=stage, f=folder: _finetune(args, config, f, s.folder, out), statuses,
                  every_rank=True)
        targets[name] = stage.folder
        target_fps[name] = stage.fingerprint

    if args.push_dataset_id or args.push_adapter_id:
        stage = Stage("push", os.path.join(out, "push"), {
            "score": score_stage.fingerprint, "columns": columns_fp,
            "selections": {k: v[1] for k, v in selections.items()},
            "targets": target_fps, "dataset_id": args.push_dataset_id, "adapter_id": args.push_adapter_id,
            "private": args.hub_private})
        run_stage(stage, lambda: _push(args, score_stage.folder, scored_path, selections, targets), statuses)
    barrier()
    if not is_main_process():  # under torchrun / accelerate launch: the others helped score and fine-tune
        return statuses

    with open(os.path.join(out, "stages.json"), "w") as f:
        json.dump(statuses, f, indent=1)
    paths = write_report(out)
    print("\nStages: " + ", ".join(f"{k} {v}" for k, v in statuses.items()))
    for name, folder in targets.items():
        with open(os.path.join(folder, "eval_metrics.json")) as f:
            metrics = json.load(f)
        held_out = metrics.get("final_eval_loss")
        print(f"Target trained on {name} ({metrics['train_rows']} rows): final training loss "
              f"{metrics.get('final_train_loss')}" + (f", held-out loss {held_out:.4f}" if held_out else ""))
    print(f"Report: {paths['html']}  (markdown: {paths['md']})")
    return statuses


def _score(args: RunArguments, config, folder: str) -> dict:
    trainer = score(args, dataclasses.replace(config, output_dir=folder))
    if not trainer.is_world_process_zero():
        return {}
    with open(os.path.join(folder, "log_history.json"), "w") as f:
        json.dump(trainer.state.log_history, f, indent=1)
    return {"rows": len(trainer.scored), "data_stats": trainer.data_stats}


def _select(scored_path: str, folder: str, column: str, ratio: float, args: RunArguments, seed: int) -> dict:
    """Keep the top ``ratio`` by ``column`` (`selection.select.pick_rows`, the `select` verb's rule), or for
    ``random`` as many rows as the ``args.score_column`` selection, drawn uniformly (per group, as many of each
    group). Writes ``data/``, ``positions.npy`` (rows of the scored set, ascending) and ``stats.json``."""
    scored = load_rows(scored_path)
    n = len(scored)
    if column == "random":  # as many rows as the main selection; per group, as many of each group
        main = os.path.join(os.path.dirname(folder), tag(args.score_column, ratio))
        with open(os.path.join(main, "stats.json")) as f:
            k = json.load(f)["num_selected"]
        rng = np.random.default_rng(seed)
        if args.group_column is not None and args.group_mode == "per_group":
            groups = np.asarray([str(g) for g in scored[args.group_column]])
            kept = groups[np.load(os.path.join(main, "positions.npy"))]
            positions = np.sort(np.concatenate([
                rng.choice(np.flatnonzero(groups == g), size=int((kept == g).sum()), replace=False)
                for g in sorted(set(kept.tolist()))]))
        else:
            positions = np.sort(rng.choice(n, size=k, replace=False))
        stats = {"score_column": "random", "fraction": ratio, "num_rows": n, "num_selected": int(k), "seed": seed,
                 "per_group": args.group_column if args.group_mode == "per_group" else None}
    else:
        stats_path = os.path.join(os.path.dirname(scored_path), "columns.json")  # written by the columns stage
        sketch_stats = {}
        if os.path.exists(stats_path):
            with open(stats_path) as f:
                sketch_stats = json.load(f)
        positions, stats = pick_rows(scored, column, fraction=ratio, group_column=args.group_column,
                                     group_mode=args.group_mode, near_duplicates=args.drop_near_duplicates,
                                     text_duplicates=args.drop_text_duplicates, sketch_stats=sketch_stats)
    data = os.path.join(folder, "data")
    scored.select(positions).save_to_disk(data)
    np.save(os.path.join(folder, "positions.npy"), positions.astype(np.int64))
    with open(os.path.join(folder, "stats.json"), "w") as f:
        json.dump(stats, f, indent=1, default=float)
    print(f"Selected {stats['num_selected']} of {n} rows by {column!r} -> {data}")
    if stats.get("groups"):
        from ..selection.top import format_group_table

        print(format_group_table(stats["groups"], stats["group_column"]))
    return {"num_selected": stats["num_selected"]}


def _target_inputs(args: RunArguments) -> dict:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(args)
            if f.name.startswith("target_") or f.name.startswith("eval_")}


def _sft_overrides(args: RunArguments, config) -> dict:
    given = {"learning_rate": args.target_learning_rate, "num_train_epochs": args.target_num_train_epochs,
             "per_device_train_batch_size": args.target_per_device_train_batch_size,
             "gradient_accumulation_steps": args.target_gradient_accumulation_steps,
             "max_length": args.target_max_length}
    steps = args.target_max_steps
    return {"max_steps": steps, "seed": config.seed, "report_to": config.report_to,
            "logging_steps": max(1, min(10, steps // 10)) if steps > 0 else 10,
            "use_cpu": config.use_cpu, "disable_tqdm": config.disable_tqdm,
            **{k: v for k, v in given.items() if v is not None}}


def _target_path(args: RunArguments, out: str) -> str:
    """The target model: ``--target_model``, or with --demo a tiny Llama saved once under ``out``."""
    if not args.demo:
        return args.target_model
    path = os.path.join(out, "target_init")
    if main_decides(lambda: not os.path.exists(os.path.join(path, "config.json"))):  # rank 0 writes it
        from ..demo.backbone import demo_proxy
        from ..demo.tiny import tiny_llama

        _, tokenizer = demo_proxy(seed=0, num_rows=args.demo_pretrain_rows, epochs=args.demo_pretrain_epochs)
        if is_main_process():
            tiny_llama(tokenizer, hidden_size=64, seed=0).save_pretrained(path)
            tokenizer.save_pretrained(path)
        barrier()
    return path


def _eval_rows(args: RunArguments):
    if args.eval_dataset_name:
        rows = load_rows(args.eval_dataset_name, split=args.eval_dataset_split)
        return rows.select(range(min(len(rows), args.eval_max_rows)))
    if args.demo:
        from ..demo.data import make_demo_dataset

        held_out = make_demo_dataset(num_rows=args.eval_max_rows, corruption_rate=0.0, seed=777)  # another seed, clean
        return held_out.select_columns(["instruction", "input", "output"])
    return None


def _finetune(args: RunArguments, config, selected_folder: str, folder: str, out: str) -> dict:
    """`finetuning.finetune.finetune_target` (the `finetune` verb's stage) with run's ``--target_*`` flags."""
    from ..data.formatting import DataFormatArguments
    from ..finetuning.finetune import FinetuneArguments, finetune_target
    from ..finetuning.sft import sft_config

    eval_rows = _eval_rows(args)
    overrides = _sft_overrides(args, config)
    if eval_rows is not None:
        steps = args.target_eval_steps or (max(args.target_max_steps // 6, 1) if args.target_max_steps > 0 else None)
        overrides.update(eval_strategy="steps" if steps else "epoch", per_device_eval_batch_size=32,
                         **({"eval_steps": steps} if steps else {}))
    data_format = {f.name: getattr(config, f.name) for f in dataclasses.fields(DataFormatArguments)}
    target = FinetuneArguments(dataset_name=os.path.join(selected_folder, "data"),
                               model_name_or_path=_target_path(args, out),
                               **vars(LoraArguments.from_fields(args, prefix="target_")), **data_format)
    trainer = finetune_target(target, sft_config(folder, trust_remote_code=args.trust_remote_code, **overrides),
                              eval_rows=eval_rows)
    if not trainer.is_world_process_zero():
        return {}
    with open(os.path.join(folder, "eval_metrics.json")) as f:
        return json.load(f)


def _columns(scored_path: str, folder: str, args: RunArguments, config) -> dict:
    """The sketch-derived columns (`scores.sketched.sketch_options`: ``target_alignment``, the clusters) and the
    text near-duplicate columns (`scores.text_duplicates.add_text_duplicate_columns`, with --drop_text_duplicates)
    of every scored row, saved once for every ratio's selection and the published splits: ``scored/`` and
    ``columns.json`` (their stats; ``group_column`` names the cluster column to select per group by)."""
    scored, stats = sketch_options(
        load_rows(scored_path), scored_path, target_dataset=args.target_dataset, target_split=args.target_split,
        diversity_clusters=args.diversity_clusters, seed=config.seed,
        group_column=args.group_column if args.group_mode == "per_group" else None, features=args.features)
    if args.drop_text_duplicates is not None:
        scored, text_stats = add_text_duplicate_columns(scored, args.drop_text_duplicates, config.instruction_format)
        stats.update(text_stats)
    scored.save_to_disk(os.path.join(folder, "scored"))
    with open(os.path.join(folder, "columns.json"), "w") as f:
        json.dump(stats, f, indent=1, default=float)
    made = (TARGET_COLUMN, CLUSTER_COLUMN, CELL_COLUMN, TEXT_DUP_COLUMN, JACCARD_COLUMN)
    return {"columns": [c for c in scored.column_names if c in made]}


def _push(args: RunArguments, score_folder: str, scored_path: str, selections: dict, targets: dict) -> dict:
    from ..publish import hub
    from ..publish.push import split_name

    urls = {}
    if args.push_dataset_id:
        scored = load_rows(scored_path)  # with the selections' sketch columns, so that all splits share them
        selected = {split_name(name): load_rows(os.path.join(f, "data"))
                    for name, (f, _) in selections.items() if not name.startswith("random_")}
        ratio = min(float(r) for r in args.ratio)
        sketch = {k: getattr(args, k) for k in ("target_dataset", "diversity_clusters", "drop_near_duplicates",
                                                "drop_text_duplicates") if getattr(args, k) is not None}
        if args.target_dataset and os.path.exists(args.target_dataset):  # a local path: its name, not where it lives
            sketch["target_dataset"] = os.path.basename(os.path.normpath(args.target_dataset))
        if args.features != "sketch" and (args.target_dataset or args.diversity_clusters is not None):
            sketch["features"] = args.features
        settings = hub.selection_settings(score_folder, score_column=args.score_column, ratio=ratio, **sketch)
        info = hub.push_dataset_repo(args.push_dataset_id, scored, selected, settings=settings,
                                     private=args.hub_private, source_dataset=None if args.demo else args.dataset_name)
        urls[args.push_dataset_id] = str(getattr(info, "commit_url", info))
    if args.push_adapter_id:
        mine = {n: f for n, f in targets.items() if not n.startswith("random_")}
        for name, folder in mine.items():
            repo = args.push_adapter_id if len(mine) == 1 else f"{args.push_adapter_id}-{name.split('_')[-1]}"
            info = hub.push_adapter_repo(repo, folder, private=args.hub_private,
                                         base_model=None if args.demo else args.target_model,
                                         datasets=[args.push_dataset_id] if args.push_dataset_id else None)
            urls[repo] = str(getattr(info, "commit_url", info))
    for repo, url in urls.items():
        print(f"Pushed {repo}: {url}")
    return {"commits": urls}
