"""``hf-gradfilter``: score a dataset with the G-SNR proxy ensemble, select its top rows, or run the demo.

    hf-gradfilter demo   --output_dir demo_out                 # embedded default, offline
    hf-gradfilter score  --dataset_name tatsu-lab/alpaca --model_name_or_path gpt2 --output_dir out
    hf-gradfilter select --scored out/scored --ratio 0.1

Every ``GradFilterConfig`` / ``TrainingArguments`` field is a flag of ``score`` and ``demo``
(``--num_members``, ``--learning_rate``, ``--record_mode snapshot`` ...); ``--help`` lists them.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field

import numpy as np
from transformers import HfArgumentParser

from .config import GradFilterConfig
from .formatting import DataFormatArguments
from .metrics import auroc
from .scoring import DEFAULT_SCORE


@dataclass
class ScoreArguments:
    """What to score and with which proxy."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "A local .json/.jsonl/.csv/.parquet file, a folder saved with save_to_disk, or a Hub "
                          "dataset id (e.g. tatsu-lab/alpaca)."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_split: str = field(default="train", metadata={"help": "Split to score."})
    model_name_or_path: str = field(default="gpt2", metadata={"help": "Proxy causal LM: Hub id or local path."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom code from the Hub (off)."})
    extra_scores: list[str] = field(default_factory=list, metadata={
        "help": "Baselines to append besides G-SNR and its ablations (always added): ifd (Superfiltering, with "
                "--ifd_model), random, response_length.", "choices": ["ifd", "random", "response_length"]})
    ifd_model: str | None = field(default=None, metadata={"help": "Small LM for IFD (default: the proxy model)."})
    demo: bool = field(default=False, metadata={"help": "Score the embedded demo dataset with the tiny demo proxy."})
    demo_rows: int = field(default=3000, metadata={"help": "Rows of the demo dataset."})
    demo_pretrain_rows: int = field(default=3000, metadata={"help": "Clean rows that pre-train the demo backbone."})
    demo_pretrain_epochs: int = field(default=4, metadata={"help": "Pre-training epochs of the demo backbone."})


@dataclass
class SelectArguments:
    """Which rows to keep."""

    scored: str = field(metadata={"help": "Scored dataset: the `scored` folder written by `score`, or a file."})
    score_column: str = field(default=DEFAULT_SCORE, metadata={
        "help": "Column to rank by, higher kept: fit_rank (default: low late gradient energy and low late proxy "
                "loss, by rank; docs/remedies.md), gsnr (the paper's formula), gsnr_dir, rel_drop, raw_drop, "
                "var_drop, neg_grad_late, neg_var_late, neg_loss_late, or a baseline added with --extra_scores "
                "(ifd uses Superfiltering's rule), or any numeric column."})
    ratio: float | None = field(default=None, metadata={"help": "Fraction to keep, in (0, 1] (default 0.1)."})
    top_k: int | None = field(default=None, metadata={"help": "Number of rows to keep (instead of --ratio)."})
    output: str | None = field(
        default=None,
        metadata={"help": "Where to write the selection: a folder (save_to_disk) or a .jsonl/.json/.parquet file. "
                          "Default: next to the scored data, named after the column and ratio."},
    )
    group_column: str | None = field(default=None, metadata={
        "help": "Column naming each row's group in a mixture (e.g. task or source): print what each group kept "
                "and allow --group_mode per_group / quota."})
    group_mode: str = field(default="global", metadata={
        "help": "global: the top --ratio overall; per_group: the top --ratio of every group (round(ratio * n_g), "
                "at least 1; --top_k: k rows per group); quota: the --quota of each group.",
        "choices": ["global", "per_group", "quota"]})
    quota: list[str] = field(default_factory=list, metadata={
        "help": "With --group_mode quota: GROUP=N (rows) or GROUP=0.25 (a fraction, with a decimal point), one per "
                "group; groups without a quota follow --ratio / --top_k per group, or keep nothing."})


@dataclass
class DemoArguments:
    """The embedded default."""

    demo_rows: int = field(default=3000, metadata={"help": "Rows of the demo dataset (20% corrupted)."})
    ratio: float = field(default=0.1, metadata={"help": "Fraction of rows to select."})
    demo_pretrain_rows: int = field(default=3000, metadata={"help": "Clean rows that pre-train the demo backbone."})
    demo_pretrain_epochs: int = field(default=4, metadata={"help": "Pre-training epochs of the demo backbone."})


@dataclass
class FinetuneArguments(DataFormatArguments):
    """The target model, its LoRA, and the selected split to train on."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "The selected split: a folder written by `select`, a file, or a Hub id."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_split: str = field(default="train", metadata={"help": "Split to train on (Hub / DatasetDict)."})
    model_name_or_path: str = field(default="meta-llama/Llama-2-7b-hf",
                                    metadata={"help": "Target causal LM: Hub id or local path."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank of the target adapter."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha of the target adapter."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout of the target adapter."})
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"],
                                           metadata={"help": "Modules that get LoRA ('all-linear' or names)."})


@dataclass
class PushArguments:
    """What to publish, and where (the token comes from `hf auth login` or HF_TOKEN; it is never printed)."""

    what: str = field(metadata={"help": "dataset (scored + selected splits), proxy (the ensemble and its record) "
                                        "or adapter (a fine-tuned target adapter).",
                                "choices": ["dataset", "proxy", "adapter"]})
    repo_id: str = field(metadata={"help": "Target repo, namespace/name."})
    path: str = field(metadata={"help": "dataset: the scoring output dir (holding scored/ and the record); "
                                        "proxy: the scoring output dir; adapter: the fine-tuning output dir."})
    selected: list[str] = field(default_factory=list, metadata={
        "help": "dataset: selected splits written by `select` (split name from the folder: top_10pct, ...)."})
    score_column: str = field(default=DEFAULT_SCORE, metadata={"help": "dataset: the column the selection used."})
    group_column: str | None = field(default=None, metadata={
        "help": "dataset: the --group_column of `select` (task, source...): the card shows what each group kept."})
    base_model: str | None = field(default=None, metadata={"help": "adapter: the target's Hub id."})
    datasets: list[str] = field(default_factory=list, metadata={"help": "Hub dataset ids for the card metadata."})
    license: str | None = field(default=None, metadata={"help": "License for the card metadata (e.g. apache-2.0)."})
    private: bool = field(default=False, metadata={"help": "Create the repo as private."})
    revision: str | None = field(default=None, metadata={"help": "Branch to push to (created if missing)."})


def split_name(path: str) -> str:
    """``selected_gsnr_top10pct`` -> ``top_10pct``; ``selected_gsnr_top500`` -> ``top_500``."""
    import re

    match = re.search(r"top(\d+)(pct)?$", os.path.basename(os.path.normpath(path)))
    if not match:
        raise ValueError(f"Cannot name the split of {path!r}; use folders written by `hf-gradfilter select`.")
    return f"top_{match.group(1)}{match.group(2) or ''}"


def push(args: PushArguments):
    from . import hub

    common = dict(private=args.private, revision=args.revision, license=args.license)
    if args.what == "dataset":
        if not args.selected:
            raise ValueError("Pass --selected with at least one folder written by `hf-gradfilter select`.")
        scored = load_rows(os.path.join(args.path, "scored"))
        selected = {split_name(p): load_rows(p) for p in args.selected}
        ratio = len(next(iter(selected.values()))) / len(scored)
        settings = hub.selection_settings(args.path, score_column=args.score_column, ratio=round(ratio, 4),
                                          group_column=args.group_column)
        info = hub.push_dataset_repo(args.repo_id, scored, selected, settings=settings,
                                     source_dataset=(args.datasets or [None])[0], **common)
    elif args.what == "proxy":
        info = hub.push_proxy_repo(args.repo_id, args.path, datasets=args.datasets or None, **common)
    else:
        info = hub.push_adapter_repo(args.repo_id, args.path, base_model=args.base_model,
                                     datasets=args.datasets or None, **common)
    print(f"Pushed {args.what} to {args.repo_id}: {getattr(info, 'commit_url', info)}")
    return info


@dataclass
class JudgeArguments:
    """Pairwise LLM-as-a-judge between two fine-tuned targets (resumable: rerun to continue)."""

    target_a: str = field(metadata={"help": "Target A: a model or adapter folder (e.g. fine-tuned on the G-SNR split)."})
    target_b: str = field(metadata={"help": "Target B: the model to compare against (e.g. random split)."})
    prompts: list[str] = field(metadata={"help": "Prompt sets: .jsonl/.json files (Vicuna, Koala, WizardLM, "
                                                 "Self-Instruct, LIMA schemas) or Hub dataset ids."})
    output_dir: str = field(default="judge_output", metadata={"help": "Answers, judgements and the report go here."})
    name_a: str = field(default="A", metadata={"help": "Display name of target A."})
    name_b: str = field(default="B", metadata={"help": "Display name of target B."})
    judge_model: str | None = field(default=None, metadata={"help": "A local transformers chat model as judge."})
    judge_url: str | None = field(default=None, metadata={"help": "An OpenAI-compatible endpoint (vLLM, TGI, ...)."})
    judge_served_name: str | None = field(default=None, metadata={"help": "Model name at the endpoint."})
    judge_api_key: str | None = field(default=None, metadata={"help": "API key for the endpoint (never printed)."})
    max_new_tokens: int = field(default=512, metadata={"help": "Answer length."})
    batch_size: int = field(default=8, metadata={"help": "Generation batch size."})


def judge_command(args: JudgeArguments):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import judge

    if (args.judge_model is None) == (args.judge_url is None):
        raise ValueError("Pass exactly one judge: --judge_model (local) or --judge_url (OpenAI-compatible endpoint).")
    prompts = [p for source in args.prompts for p in judge.load_prompts(source)]
    os.makedirs(args.output_dir, exist_ok=True)
    answers = []
    for target, name in ((args.target_a, args.name_a), (args.target_b, args.name_b)):
        model = AutoModelForCausalLM.from_pretrained(target)  # an adapter folder loads through PEFT
        tokenizer = AutoTokenizer.from_pretrained(target)
        answers.append(judge.generate_answers(model, tokenizer, prompts, os.path.join(args.output_dir,
                       f"answers_{name}.jsonl"), max_new_tokens=args.max_new_tokens, batch_size=args.batch_size))
        del model
    if args.judge_url:
        judge_fn = judge.EndpointJudge(args.judge_url, model=args.judge_served_name, api_key=args.judge_api_key)
    else:
        judge_fn = judge.LocalJudge(AutoModelForCausalLM.from_pretrained(args.judge_model),
                                    AutoTokenizer.from_pretrained(args.judge_model))
    pairs = judge.judge_pairs(judge_fn, prompts, answers[0], answers[1],
                              os.path.join(args.output_dir, "judgements.jsonl"))
    print(judge.report(pairs, args.output_dir, args.name_a, args.name_b))
    print(f"Report: {args.output_dir}/pairwise.md, {args.output_dir}/pairwise.png")


def load_rows(name: str, config: str | None = None, split: str = "train"):
    """A `datasets.Dataset` from a local file, a save_to_disk folder, or the Hub."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    def first_invalid_utf8(path: str, chunk_size: int = 1 << 20) -> tuple[int, int] | None:
        """``(line, byte offset)`` of the first byte of ``path`` that is not valid UTF-8, or None."""
        carry, offset, line = b"", 0, 1  # offset: file position of data[0]
        with open(path, "rb") as f:
            while True:
                chunk = f.read(chunk_size)
                data, carry = carry + chunk, b""
                try:
                    data.decode("utf-8")
                except UnicodeDecodeError as err:
                    if not (chunk and err.reason == "unexpected end of data"):
                        return line + data[: err.start].count(b"\n"), offset + err.start
                    data, carry = data[: err.start], data[err.start :]  # a character split across chunks
                if not chunk:
                    return None
                offset, line = offset + len(data), line + data.count(b"\n")

    if os.path.isfile(name):
        ext = name.rsplit(".", 1)[-1].lower()
        builder = {"json": "json", "jsonl": "json", "csv": "csv", "parquet": "parquet", "arrow": "arrow"}.get(ext)
        if builder is None:
            raise ValueError(f"Cannot read {name!r}: use a .json, .jsonl, .csv or .parquet file.")
        # Checked first: datasets 5.2 loads a JSON Lines file with invalid UTF-8 without complaint and fails
        # only when the rows are read (UnicodeDecodeError); .json and .csv fail with DatasetGenerationError.
        bad = first_invalid_utf8(name) if builder in ("json", "csv") else None
        if bad is not None:
            raise ValueError(
                f"{name!r} is not valid UTF-8 (first bad byte at line {bad[0]}, byte offset {bad[1]}); re-encode it "
                f"as UTF-8 from its real encoding, e.g. `iconv -f latin1 -t utf-8 {name} > fixed.{ext}`."
            )
        try:
            return load_dataset(builder, data_files=name, split="train")
        except StopIteration:  # datasets' json reader on a file with no rows
            raise ValueError(f"The dataset file {name!r} is empty: there is nothing to score.") from None
    if os.path.isdir(name):
        if os.path.exists(os.path.join(name, "dataset_info.json")) or os.path.exists(os.path.join(name, "dataset_dict.json")):
            data = load_from_disk(name)
            if isinstance(data, DatasetDict):
                if split not in data:
                    raise ValueError(f"Split {split!r} not in {name} (splits: {list(data)}); pass --dataset_split.")
                data = data[split]
            return data
        return load_dataset(name, config, split=split)
    if os.sep in name and not name.count("/") == 1:
        raise FileNotFoundError(f"No file or folder {name!r}, and it is not a Hub dataset id (namespace/name).")
    return load_dataset(name, config, split=split)


def save_rows(dataset, path: str) -> str:
    ext = path.rsplit(".", 1)[-1].lower() if "." in os.path.basename(path) else ""
    if ext in ("jsonl", "json"):
        dataset.to_json(path, lines=ext == "jsonl")
    elif ext == "parquet":
        dataset.to_parquet(path)
    else:
        dataset.save_to_disk(path)
    return path


def score(args: ScoreArguments, config: GradFilterConfig):
    """Train the ensemble, record norms, write members + record + the scored dataset. Returns the trainer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .scorer import score_dataset
    from .trainer import GradFilterTrainer

    if args.demo:
        from .demo import demo_proxy
        from .demo_data import make_demo_dataset

        rows = make_demo_dataset(num_rows=args.demo_rows)
        model, tokenizer = demo_proxy(seed=0, num_rows=args.demo_pretrain_rows, epochs=args.demo_pretrain_epochs)
    else:
        if not args.dataset_name:
            raise ValueError("Pass --dataset_name (a file, a saved dataset or a Hub id), or --demo.")
        rows = load_rows(args.dataset_name, args.dataset_config, args.dataset_split)
        tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path,
                                                     trust_remote_code=args.trust_remote_code)
    trainer = GradFilterTrainer(model, args=config, train_dataset=rows, processing_class=tokenizer)
    resume = config.resume_from_checkpoint
    if resume is None and os.path.isdir(config.output_dir):
        from transformers.trainer_utils import get_last_checkpoint

        resume = get_last_checkpoint(config.output_dir)  # the same command again resumes a killed run
    if resume:
        print(f"Resuming from {resume}")
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()
    if not trainer.is_world_process_zero():  # under torchrun / accelerate launch, one process writes the outputs
        return trainer
    scored = add_scores(score_dataset(rows, trainer.record), trainer, args, model, tokenizer)
    scored_path = save_rows(scored, os.path.join(config.output_dir, "scored"))
    trainer.scored, trainer.scored_path = scored, scored_path
    _print_score_summary(trainer)
    return trainer


def add_scores(scored, trainer, args: ScoreArguments, model, tokenizer):
    """Append the record-based ablations (free) and the requested baselines to the scored rows."""
    from .baselines import IFDScorer, LengthScorer, RandomScorer, RecordScorer

    scored = scored.map(RecordScorer(trainer.record), batched=True, with_indices=True, desc="Ablations")
    fmt = trainer.instruction_format
    for name in args.extra_scores:
        adapters_off = contextlib.nullcontext()
        if name == "ifd":
            from transformers import AutoModelForCausalLM, AutoTokenizer

            if args.ifd_model:
                ifd_model, ifd_tok = (AutoModelForCausalLM.from_pretrained(args.ifd_model),
                                      AutoTokenizer.from_pretrained(args.ifd_model))
            else:  # the proxy's frozen backbone, members switched off
                ifd_model, ifd_tok = trainer.model.get_base_model(), tokenizer
                adapters_off = trainer.model.disable_adapter()
            scorer = IFDScorer(ifd_model, ifd_tok, fmt=fmt, max_length=trainer.args.max_length)
        elif name == "random":
            scorer = RandomScorer(seed=trainer.args.seed)
        else:
            scorer = LengthScorer(tokenizer, fmt=fmt)
        with adapters_off:
            scored = scored.map(scorer, batched=True, with_indices=True, desc=name)
    return scored


def failure_signatures(record, early_epoch: int = 1, late_epoch: int = 2) -> list[str]:
    """The failure signatures of METHOD.md seen in a record, each with what to try."""
    import warnings as _warnings

    from .scoring import score_parts

    parts = score_parts(record.norms, early_epoch, late_epoch)
    out = []
    with _warnings.catch_warnings():
        _warnings.simplefilter("ignore", RuntimeWarning)
        loss = np.nanmean(record.losses, axis=(0, 1))
        rose = float(np.nanmean(parts["rel_drop"] < 0))
        v_rel = float(np.nanmedian(parts["ens_var_late"] / np.maximum(parts["grad_late"] ** 2, 1e-30)))
    if loss[late_epoch - 1] >= loss[early_epoch - 1]:
        out.append(f"the proxy's mean loss did not fall ({loss[early_epoch - 1]:.4f} -> {loss[late_epoch - 1]:.4f}): "
                   "its scores mean little; raise --learning_rate or train more epochs.")
    if rose > 0.5:
        out.append(f"the gradient energy rose from epoch {early_epoch} to {late_epoch} for {rose:.0%} of rows, so "
                   "the drop in G-SNR is mostly negative and the paper's score ranks rows it has learned last; "
                   "the default --score_column fit_rank does not use the drop (docs/remedies.md).")
    if np.isfinite(v_rel) and v_rel < 1e-4:
        out.append("the members' late norms barely differ (ensemble variance collapsed): the uncertainty term "
                   "carries no signal; use more members or different seeds/data orders.")
    if np.isfinite(parts["gsnr"]).any() and np.nanmax(np.abs(parts["gsnr"])) < 1e-6:
        out.append("G-SNR is near zero for every row: check the proxy's loss and learning rate.")
    return out


def _print_score_summary(trainer) -> None:
    table = trainer.member_loss_table()
    stats = trainer.data_stats
    print("\nProxy ensemble: mean response loss per member and epoch "
          f"({trainer.args.record_mode} mode)")
    print("  member   " + "  ".join(f"epoch {e + 1:>2}" for e in range(table.shape[1])))
    for m, row in enumerate(table):
        print(f"  {m:>6}   " + "  ".join(f"{v:8.4f}" for v in row))
    print(f"Rows: {stats['num_rows']}; truncated to max_length={stats['max_length']}: {stats['num_truncated']}; "
          f"no response token (NaN score): {stats['num_no_response']}, of which empty responses: "
          f"{stats.get('num_empty_response', 0)}; duplicate rows (scored each): {stats.get('num_duplicate_rows', 0)}")
    for warning in failure_signatures(trainer.record, trainer.args.early_epoch, trainer.args.late_epoch):
        print(f"Warning: {warning}")
    out = trainer.args.output_dir
    print(f"Members (PEFT adapters): {out}/member_0 ... member_{trainer.args.num_members - 1}")
    print(f"Gradient record:         {out}/gradient_record.safetensors")
    print(f"Scored dataset:          {trainer.scored_path}")


def parse_quotas(items: list[str]) -> dict[str, int | float]:
    """``["code=500", "math=0.2"]`` -> ``{"code": 500, "math": 0.2}``: an integer is a row count, a number with a
    decimal point (or an exponent) a fraction of the group."""
    quotas = {}
    for item in items:
        group, sep, value = item.rpartition("=")
        try:
            if not (sep and group):
                raise ValueError
            quotas[group] = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            raise ValueError(f"Bad quota {item!r}: write GROUP=N (a row count, e.g. code=500) or GROUP=FRACTION "
                             "(e.g. math=0.2).") from None
    return quotas


def select(args: SelectArguments):
    from .baselines import select_rows
    from .selection import format_group_table

    quotas = parse_quotas(args.quota)
    if quotas and args.group_mode != "quota":
        raise ValueError(f"--quota is used with --group_mode quota (got --group_mode {args.group_mode}).")
    if args.group_mode != "global" and args.group_column is None:
        raise ValueError(f"--group_mode {args.group_mode} needs --group_column (e.g. task or source).")
    if args.ratio is None and args.top_k is None and args.group_mode != "quota":
        args.ratio = 0.1
    if args.ratio is not None and args.top_k is not None:
        raise ValueError("Pass either --ratio or --top_k, not both.")
    scored = load_rows(args.scored)
    selected, stats = select_rows(scored, args.score_column, fraction=args.ratio, k=args.top_k,
                                  group_column=args.group_column, group_mode=args.group_mode, quotas=quotas or None)
    if args.group_mode == "quota":
        tag = f"quota_{args.group_column}_top{stats['num_selected']}"
    else:
        tag = f"top{round(args.ratio * 100)}pct" if args.ratio is not None else f"top{args.top_k}"
        tag = f"per_{args.group_column}_{tag}" if args.group_mode == "per_group" else tag
    output = args.output or os.path.join(os.path.dirname(os.path.abspath(args.scored)), f"selected_{args.score_column}_{tag}")
    save_rows(selected, output)
    print(f"Selected {stats['num_selected']} of {stats['num_rows']} rows by {args.score_column!r} "
          f"(threshold {stats['threshold']:.6g}; {stats['num_nonfinite_excluded']} NaN/inf rows excluded) -> {output}")
    if args.group_column is not None:
        print(f"Rows kept per {args.group_column!r} ({args.group_mode}):")
        print(format_group_table(stats["groups"], args.group_column))
    return selected, stats, output


@dataclass
class SweepArguments:
    """Which record to re-score, on which grid of (s, t, M'), and against which labels."""

    record: str | None = field(default=None, metadata={
        "help": "The gradient record: a `score` output dir or a gradient_record.safetensors file."})
    scored: str | None = field(default=None, metadata={
        "help": "Scored dataset holding --label_column (default: the record dir's scored/ folder)."})
    label_column: str | None = field(default=None, metadata={
        "help": "Boolean column, True = a bad row (e.g. is_corrupted): adds the AUROC of each setting."})
    score: list[str] = field(default_factory=lambda: [DEFAULT_SCORE, "gsnr"], metadata={
        "help": "Scores to sweep: fit_rank, gsnr, rel_drop, raw_drop, var_drop, neg_grad_late, neg_var_late, neg_loss_late..."})
    epochs: list[int] = field(default_factory=list, metadata={
        "help": "Epochs to pair as (s, t), s < t (default: every recorded epoch)."})
    members: list[int] = field(default_factory=list, metadata={
        "help": "Sub-ensemble sizes M' (default: 2..M). All subsets of a size when at most --max_subsets, else a "
                "seeded sample of --max_subsets."})
    max_subsets: int = field(default=10, metadata={"help": "Most member subsets per size M'."})
    subset_seed: int = field(default=0, metadata={"help": "Seed of the member-subset sample."})
    reference_epochs: list[int] = field(default_factory=lambda: [1, 2], metadata={
        "help": "The reference (s, t), with all members, that every setting is rank-correlated with."})
    demo: bool = field(default=False, metadata={
        "help": "Train the demo proxy ensemble on the embedded demo dataset first (into --output_dir; 4 epochs "
                "unless --num_train_epochs), then sweep its record with labels from is_corrupted."})
    demo_rows: int = field(default=3000, metadata={"help": "Rows of the demo dataset."})
    demo_pretrain_rows: int = field(default=3000, metadata={"help": "Clean rows that pre-train the demo backbone."})
    demo_pretrain_epochs: int = field(default=4, metadata={"help": "Pre-training epochs of the demo backbone."})


def _labels(scored, column: str, record) -> np.ndarray:
    """The boolean ``column`` of ``scored`` in the record's row order."""
    if column not in scored.column_names:
        raise ValueError(f"Label column {column!r} is not in the scored dataset (columns: {scored.column_names}).")
    values = np.asarray(scored[column])
    if values.dtype != bool and not (values.dtype.kind in "iu" and set(np.unique(values)) <= {0, 1}):
        raise ValueError(f"Label column {column!r} must be boolean (True = a bad row), got {values.dtype} values "
                         f"such as {values[:3].tolist()}.")
    if len(values) != record.num_examples:
        raise ValueError(f"The scored dataset has {len(values)} rows but the record {record.num_examples}: pass the "
                         "dataset this record was scored on.")
    return values.astype(bool)[record.example_id]


def sweep_command(args: SweepArguments, config: GradFilterConfig):
    """Re-score the record on a grid of (s, t, M'); print, and write sweep.csv / sweep.json / sweep_<score>.png."""
    import time

    from .record import GradientRecord
    from .sweep import format_pair_matrix, format_table, sweep_record

    if len(args.reference_epochs) != 2:
        raise ValueError(f"--reference_epochs takes two epochs, s and t (got {args.reference_epochs}).")
    label_column, scored = args.label_column, None
    if args.demo:
        if args.record:
            raise ValueError("Pass either --record (an existing run) or --demo (train the demo ensemble), not both.")
        trainer = score(ScoreArguments(demo=True, demo_rows=args.demo_rows, demo_pretrain_rows=args.demo_pretrain_rows,
                                       demo_pretrain_epochs=args.demo_pretrain_epochs), config)
        record, scored, label_column = trainer.record, trainer.scored, label_column or "is_corrupted"
    else:
        if not args.record:
            raise ValueError("Pass --record (a `score` output dir or its gradient_record.safetensors), or --demo.")
        record = GradientRecord.load(args.record)
        if label_column:
            where = args.scored or os.path.join(args.record if os.path.isdir(args.record)
                                                else os.path.dirname(args.record), "scored")
            if not os.path.exists(where):
                raise FileNotFoundError(f"No scored dataset at {where} for --label_column; pass --scored.")
            scored = load_rows(where)
    labels = _labels(scored, label_column, record) if label_column else None
    start = time.perf_counter()
    result = sweep_record(record, config.output_dir, labels=labels, scores=tuple(args.score), epochs=args.epochs or None,
                          member_counts=args.members or None, max_subsets=args.max_subsets, seed=args.subset_seed,
                          reference=tuple(args.reference_epochs), label_column=label_column)
    s0, t0 = args.reference_epochs
    print(f"\nSweep of {record.num_examples} rows, {record.num_members} members, {record.num_epochs} epochs: "
          f"{len(result['rows'])} (score, setting) pairs in {time.perf_counter() - start:.1f} s")
    print(f"Spearman with the reference (s={s0}, t={t0}, all {record.num_members} members), mean [min] over the "
          "member subsets of each size M'" + (f"; AUROC of each score as a keep-score against {label_column!r}"
                                              if labels is not None else ""))
    print(format_table(result["summary"]))
    for name, matrix in result["pair_spearman"].items():
        print(f"\nSpearman of {name} between epoch pairs (s-t), all members:")
        print(format_pair_matrix(matrix, result["pairs"]))
    print(f"\nWrote {', '.join(result['paths'].values())}")
    return result


def finetune_command(args: FinetuneArguments, config):
    """Fine-tune the target on a selected split with TRL's SFTTrainer + LoRA."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .finetune import default_lora_config, finetune

    if not args.dataset_name:
        raise ValueError("Pass --dataset_name: the selected split written by `hf-gradfilter select`.")
    rows = load_rows(args.dataset_name, args.dataset_config, args.dataset_split)
    if len(rows) == 0:
        raise ValueError(f"The selected split {args.dataset_name!r} is empty: select a larger ratio.")
    remote = bool(config.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path, trust_remote_code=remote)
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, trust_remote_code=remote, dtype="auto")
    targets = args.lora_target_modules
    lora = default_lora_config(args.lora_r, args.lora_alpha, args.lora_dropout,
                               targets[0] if targets == ["all-linear"] else targets)
    trainer = finetune(model, rows, args=config, peft_config=lora, processing_class=tokenizer,
                       fmt=args.instruction_format)
    print(f"Target adapter: {config.output_dir} (loss curve: {config.output_dir}/loss_curve.png)")
    return trainer


def demo(args: DemoArguments, config: GradFilterConfig):
    """The embedded default end to end: score the demo set, select the top rows, compare with random."""
    from .demo import DEMO_LEARNING_RATE

    if not 0 < args.ratio <= 1:
        raise ValueError(f"ratio={args.ratio} is outside (0, 1]; use e.g. 0.1 for the top 10%.")
    trainer = score(ScoreArguments(demo=True, demo_rows=args.demo_rows, demo_pretrain_rows=args.demo_pretrain_rows,
                                   demo_pretrain_epochs=args.demo_pretrain_epochs), config)
    selected, stats, output = select(SelectArguments(scored=trainer.scored_path, ratio=args.ratio))
    scored = trainer.scored
    rate = float(np.mean(scored["is_corrupted"]))
    kept = int(np.sum(selected["is_corrupted"]))
    n = len(selected)
    print(f"\nCorrupted rows in the top {args.ratio:.0%} by {DEFAULT_SCORE}: {kept} of {n} ({kept / n:.1%}); "
          f"a random selection of {n} keeps {rate * n:.1f} on average ({rate:.0%}).")
    for kind in ("swapped", "truncated", "shuffled"):
        print(f"  {kind:<10} kept {int(np.sum(np.asarray(selected['corruption']) == kind))}")
    clean = ~np.asarray(scored["is_corrupted"])
    print("AUROC for ranking clean rows above corrupted ones over the whole set (random: 0.5):")
    for column, what in ((DEFAULT_SCORE, "the default"), ("gsnr", "the paper's G-SNR")):
        print(f"  {column:<9} {auroc(np.asarray(scored[column], dtype=float), clean):.3f}  ({what})")
    if config.learning_rate == DEMO_LEARNING_RATE:
        print(f"(demo proxy LoRA learning rate {DEMO_LEARNING_RATE}; the paper's 5e-5 is meant for GPT-2)")
    return trainer, selected


@dataclass
class ReportArguments:
    """Which run to report on."""

    output_dir: str = field(metadata={"help": "The --output_dir of `hf-gradfilter run`."})


def report_command(args: ReportArguments):
    from .report import write_report

    paths = write_report(args.output_dir)
    print(f"Report: {paths['html']}  (markdown: {paths['md']})")
    return paths


COMMANDS = {
    "score": ("Train the proxy ensemble on a dataset, record per-example gradient norms, write G-SNR columns.",
              (ScoreArguments, GradFilterConfig)),
    "select": ("Keep the top fraction (or top k) of a scored dataset by a score column, globally or per group.",
               (SelectArguments,)),
    "sweep": ("Re-score a record for a grid of (s, t, M'): rank correlations and detection AUROC, no training.",
              (SweepArguments, GradFilterConfig)),
    "finetune": ("Fine-tune a target model (LoRA, TRL SFTTrainer) on a selected split.",
                 (FinetuneArguments, "SFTConfig")),
    "judge": ("Compare two fine-tuned targets with a pairwise LLM judge on instruction prompt sets.",
              (JudgeArguments,)),
    "push": ("Publish scored/selected data, the proxy ensemble or a target adapter to the Hub, with a card.",
             (PushArguments,)),
    "demo": ("Run score + select on the embedded demo dataset with a tiny proxy (offline, a few minutes on CPU).",
             (DemoArguments, GradFilterConfig)),
    "run": ("score -> select -> fine-tune -> (push) -> report in one command, from flags or --config run.yaml; "
            "finished stages are skipped.", ("RunArguments", GradFilterConfig)),
    "report": ("Rebuild report.md / report.html of a `run` output dir.", (ReportArguments,)),
}


def _parse_run(rest: list[str]):
    """`run`'s arguments: TRL's `TrlParser` (``--config run.yaml``; flags override the file), and the
    ``--demo`` defaults (`pipeline.DEMO_RUN_DEFAULTS`) under both."""
    import yaml
    from trl import TrlParser

    from .pipeline import DEMO_RUN_DEFAULTS, RunArguments

    parser = TrlParser((RunArguments, GradFilterConfig), prog="hf-gradfilter run", description=COMMANDS["run"][0])
    from_file = {}
    if "--config" in rest[:-1]:
        path = rest[rest.index("--config") + 1]
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No config file {path!r} (--config takes a YAML file of run flags).")
        with open(path) as f:
            from_file = yaml.safe_load(f) or {}
        if not isinstance(from_file, dict):
            raise ValueError(f"Config file {path!r} must be a YAML mapping of flag names to values.")
    demo_flag = "--demo" in rest and rest[rest.index("--demo") + 1:][:1] not in (["false"], ["False"])
    defaults = {"output_dir": "gradfilter_run"}
    if demo_flag or from_file.get("demo"):
        defaults.update(DEMO_RUN_DEFAULTS)
    parser.set_defaults_with_config(**defaults)
    return parser.parse_args_and_config(rest)


def _usage() -> str:
    lines = [f"usage: hf-gradfilter {{{','.join(COMMANDS)}}} [--help] [options]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (help_, _) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(_usage(), file=sys.stderr)
        print(f"hf-gradfilter: error: unknown command {command!r}", file=sys.stderr)
        return 2
    help_, types = COMMANDS[command]
    if command == "report" and rest and not rest[0].startswith("-"):  # `hf-gradfilter report DIR`
        rest = ["--output_dir", *rest]
    if command == "run":
        if "-h" in rest or "--help" in rest:
            from .pipeline import RunArguments

            types = (RunArguments, GradFilterConfig)
        else:
            try:
                from .pipeline import run

                run(*_parse_run(rest))
            except (ValueError, FileNotFoundError, TypeError, FloatingPointError) as err:
                print(f"hf-gradfilter run: error: {err}", file=sys.stderr)
                return 2
            return 0
    if "SFTConfig" in types:
        from trl import SFTConfig

        types = tuple(SFTConfig if t == "SFTConfig" else t for t in types)
    parser = HfArgumentParser(types, prog=f"hf-gradfilter {command}", description=help_)
    try:
        if GradFilterConfig in types:
            if "--output_dir" not in rest:
                rest += ["--output_dir", {"demo": "demo_out", "sweep": "sweep_output"}.get(command, "gradfilter_output")]
            if command == "sweep" and "--demo" in rest and "--num_train_epochs" not in rest:
                rest += ["--num_train_epochs", "4"]
            if command == "demo" or (command == "sweep" and "--demo" in rest):
                from .demo import DEMO_LEARNING_RATE

                for flag, value in (("--learning_rate", DEMO_LEARNING_RATE), ("--per_device_train_batch_size", 16)):
                    if flag not in rest:
                        rest += [flag, str(value)]
        if command == "finetune":
            from .finetune import sft_defaults

            defaults = {"output_dir": "gradfilter_target", **sft_defaults()}
            given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in rest if a.startswith("--")}
            rest += [x for k, v in defaults.items() if k not in given for x in (f"--{k}", str(v))]
        parsed = parser.parse_args_into_dataclasses(rest)
        {"score": score, "select": select, "sweep": sweep_command, "finetune": finetune_command,
         "judge": judge_command, "push": push,
         "demo": demo, "report": report_command}[command](*parsed)
    except (ValueError, FileNotFoundError, TypeError, FloatingPointError) as err:
        print(f"hf-gradfilter {command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
