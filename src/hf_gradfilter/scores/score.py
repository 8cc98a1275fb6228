"""The score stage (``hf-gradfilter score``): train the proxy ensemble on the rows, record every
example's gradient norms, and write the members, the record and the scored rows."""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from datasets import concatenate_datasets

from ..data.canaries import canary_table, make_canaries
from ..data.columns import read_columns
from ..data.io import load_rows, save_rows
from ..proxy.config import GradFilterConfig
from ..proxy.learning import learning_check
from ..proxy.model import load_causal_lm
from ..proxy.record import record_rows
from ..proxy.trainer import GradFilterTrainer
from .checks import failure_signatures
from .duplicates import nearest_earlier_ids
from .ifd import BaseLossScorer, IFDScorer
from .scorers import HIGHER_IS_BETTER, DynamicsScorer, LengthScorer, RandomScorer, RecordScorer, score_dataset
from .search import require_faiss, resolve_search


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
    dataset_revision: str | None = field(default=None, metadata={
        "help": "Hub dataset revision to load: a branch, tag or commit (default: the latest on main). `run` puts the "
                "commit in the score stage's fingerprint either way, so a dataset changed upstream is scored again."})
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
    canaries: float = field(default=0.0, metadata={
        "help": "Share of rows to copy with damage (e.g. 0.05): the copies are trained on and scored with the rest, "
                "then left out of every output; <output_dir>/canaries.json says how often each score ranks an "
                "original above its damaged copy, on your data. Costs that share more proxy compute, and the members "
                "also train on the copies (their originals' scores shift a little). 0: off."})
    near_duplicate_search: str = field(default="auto", metadata={
        "help": "How sketch_nearest_id / sketch_nearest_cos are found (with --sketch_dim): exact, approx (a faiss IVF "
                "index: pip install 'hf-gradfilter[ann]'), or auto: approximate from 20,000 rows when faiss is "
                "installed (docs/ann_search.md).", "choices": ["auto", "exact", "approx"]})


def score(args: ScoreArguments, config: GradFilterConfig):
    """Train the ensemble, record norms, write members + record + the scored dataset. Returns the trainer."""
    if args.demo and args.dataset_name:
        raise ValueError(f"Pass either --demo or --dataset_name (got both: --dataset_name {args.dataset_name}); "
                         "--demo scores the embedded demo dataset instead of your file.")
    resolve_search(0, args.near_duplicate_search)  # a bad name is refused before training
    if args.near_duplicate_search == "approx" and config.sketch_dim:
        require_faiss("--near_duplicate_search approx")
    if args.demo:
        from ..demo.backbone import demo_proxy
        from ..demo.data import make_demo_dataset

        rows = make_demo_dataset(num_rows=args.demo_rows)
        model, tokenizer = demo_proxy(seed=0, num_rows=args.demo_pretrain_rows, epochs=args.demo_pretrain_epochs)
    else:
        if not args.dataset_name:
            raise ValueError("Pass --dataset_name (a file, a saved dataset or a Hub id), or --demo.")
        rows = load_rows(args.dataset_name, args.dataset_config, args.dataset_split, args.dataset_revision)
        model, tokenizer = load_causal_lm(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    canaries = None
    if args.canaries:
        canaries = make_canaries(rows, config.instruction_format.resolve(rows.column_names), args.canaries,
                                 seed=config.seed)
    train_rows = rows if canaries is None else concatenate_datasets([rows, canaries[0]])
    trainer = GradFilterTrainer(model, args=config, train_dataset=train_rows, processing_class=tokenizer)
    resume = config.resume_from_checkpoint
    if resume is None and os.path.isdir(config.output_dir):
        from transformers.trainer_utils import get_last_checkpoint

        resume = get_last_checkpoint(config.output_dir)  # the same command again resumes a killed run
    if resume:
        print(f"Resuming from {resume}")
    trainer.train(resume_from_checkpoint=resume)
    full = trainer.record
    if canaries is not None and trainer.is_world_process_zero():  # the user's rows only, from here on
        trainer.record = full.head(len(rows))
        trainer.record.metadata["canaries"] = {
            "rows": len(canaries[1]), "share": args.canaries, "seed": config.seed,
            "note": "the members were also trained on these damaged copies, which shifts their originals' scores"}
        trainer.learning_check = learning_check(trainer.record, config.early_epoch, config.late_epoch,
                                                learning_rate=config.learning_rate)
        trainer.record.metadata["learning_check"] = trainer.learning_check.to_dict()
        trainer.data_stats["num_canary_rows"] = len(canaries[1])
    trainer.save_model()  # members and the record are safe before anything else runs
    if not trainer.is_world_process_zero():  # under torchrun / accelerate launch, one process writes the outputs
        return trainer
    base_columns = None
    if canaries is not None:
        trainer.canary_table, base_columns = score_canaries(trainer, full, train_rows, len(rows), canaries, args,
                                                            model, tokenizer)
    scored = add_scores(score_dataset(rows, trainer.record), trainer, args, model, tokenizer,
                        base_columns=base_columns)
    scored_path = save_rows(scored, os.path.join(config.output_dir, "scored"))
    trainer.scored, trainer.scored_path = scored, scored_path
    print_score_summary(trainer)
    return trainer


def score_canaries(trainer, full, train_rows, num_rows: int, canaries, args: ScoreArguments, model,
                   tokenizer) -> tuple[dict, dict]:
    """Score the rows and their damaged copies together on the ``full`` record (rank columns over both), and write
    ``<output_dir>/canaries/`` (the copies with their scores, ``canary_of`` and ``canary_kind``) and
    ``<output_dir>/canaries.json`` (`data.canaries.canary_table` for every keep-score). Returns the table and the
    user's rows' ``base_loss`` / ``response_length`` (reused, not recomputed)."""
    _, sources, kinds = canaries
    scored = add_scores(score_dataset(train_rows, full), trainer, args, model, tokenizer, record=full)
    keep = [c for c in scored.column_names if HIGHER_IS_BETTER.get(c)]
    cols = read_columns(scored, keep + ["base_loss", "response_length"])
    table = canary_table({c: np.asarray(cols[c], dtype=np.float64)[sources] for c in keep},
                         {c: np.asarray(cols[c], dtype=np.float64)[num_rows:] for c in keep}, kinds)
    out = trainer.args.output_dir
    copies_scored = scored.select(range(num_rows, len(scored)))
    copies_scored = copies_scored.add_column("canary_of", sources.tolist()).add_column("canary_kind", list(kinds))
    save_rows(copies_scored, os.path.join(out, "canaries"))
    with open(os.path.join(out, "canaries.json"), "w") as f:
        json.dump({"rows": len(sources), "share": args.canaries, "kinds": dict(Counter(kinds)), "table": table}, f,
                  indent=1)
    base = {k: np.asarray(cols[k], dtype=np.float64)[:num_rows] for k in ("base_loss", "response_length")}
    return table, base


def print_canary_table(table: dict, limit: int = 12) -> None:
    if not table:
        return
    kinds = [k for k in next(iter(table.values())) if k not in ("all", "pairs")]
    print(f"\nCanaries: share of (original, damaged copy) pairs where the original scores higher "
          f"({next(iter(table.values()))['pairs']} pairs; 0.5 = cannot tell; best first)")
    print(f"  {'score':<18} {'all':>5}  " + "  ".join(f"{k[:12]:>12}" for k in kinds))
    for name, row in list(table.items())[:limit]:
        print(f"  {name:<18} {row['all']:5.2f}  " + "  ".join(f"{row[k]:12.2f}" for k in kinds))


def score_columns(rows, trainer, record=None, search: str = "auto"):
    """``rows`` (the ones ``trainer`` trained on) with every column `hf-gradfilter score` adds by default:
    `GSNRScorer`'s (``fit_rank``, ``gsnr`` and its parts), `RecordScorer`'s ablations, near-duplicate columns
    when the record holds sketches, ``response_length``, ``base_loss`` and the literature's keep-scores,
    among them the default ``neg_energy_token`` (`formulas.DEFAULT_SCORE`)::

        trainer.train()
        scored = score_columns(rows, trainer)
        top10, stats = select_top(scored, fraction=0.10)

    ``record``: default ``trainer.record``; ``search``: how the near-duplicate columns are found
    (`duplicates.nearest_earlier`)."""
    record = trainer.record if record is None else record
    return _record_columns(score_dataset(rows, record), trainer, trainer.processing_class, record, search=search)


def _record_columns(scored, trainer, tokenizer, record, base_columns=None, search: str = "auto"):
    scored = scored.map(RecordScorer(record), batched=True, with_indices=True, desc="Ablations")
    if record.sketches is not None:  # scored with --sketch_dim
        scored = add_nearest_columns(scored, record, search)
    return add_dynamics_columns(scored, trainer, tokenizer, record, base_columns)


def add_scores(scored, trainer, args: ScoreArguments, model, tokenizer, record=None, base_columns=None):
    """Append the record-based ablations (free), the literature's scores and the requested baselines to the scored
    rows (``record``: default ``trainer.record``; ``base_columns``: ``base_loss`` / ``response_length`` already
    computed for these rows)."""
    record = trainer.record if record is None else record
    fmt = trainer.instruction_format
    scored = _record_columns(scored, trainer, tokenizer, record, base_columns, args.near_duplicate_search)
    for name in args.extra_scores:
        if name == "response_length":  # always added by add_dynamics_columns
            continue
        adapters_off = contextlib.nullcontext()
        if name == "ifd":
            if args.ifd_model:
                ifd_model, ifd_tok = load_causal_lm(args.ifd_model, "--ifd_model")
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


def add_dynamics_columns(scored, trainer, tokenizer, record, base_columns=None):
    """``response_length`` (the response tokens the proxy trained on), ``base_loss`` (the frozen backbone, members
    switched off: one forward pass per row, on the main process only) and the literature's keep-scores of
    `DynamicsScorer`. ``base_columns``: those two columns already computed for these rows."""
    fmt, max_length = trainer.instruction_format, trainer.args.max_length
    if base_columns is not None:
        for name in ("response_length", "base_loss"):
            scored = scored.add_column(name, base_columns[name].tolist())
    else:
        scored = scored.map(LengthScorer(tokenizer, fmt=fmt, max_length=max_length), batched=True,
                            with_indices=True, desc="response_length")
        with trainer.model.disable_adapter():
            base = BaseLossScorer(trainer.model.get_base_model(), tokenizer, fmt=fmt, max_length=max_length,
                                  batch_size=trainer.args.per_device_eval_batch_size)
            scored = scored.map(base, batched=True, with_indices=True, desc="base_loss (frozen base)")
    cols = read_columns(scored, ["base_loss", "response_length"])
    at = record_rows(record, scored)
    aligned = {k: np.full(record.num_examples, np.nan) for k in cols}
    for k, v in cols.items():
        aligned[k][at] = np.asarray(v, dtype=np.float64)
    scorer = DynamicsScorer(record, aligned["base_loss"], aligned["response_length"])
    return scored.map(scorer, batched=True, with_indices=True, desc="Literature scores")


def add_nearest_columns(scored, record, search: str = "auto"):
    """``scored`` (the rows ``record`` was made from: matched by ``example_id``, or by position) with
    ``sketch_nearest_id`` (the example id of the earlier row whose member-averaged late-epoch gradient sketch
    is most like the row's; -1: none) and ``sketch_nearest_cos`` (their cosine; NaN: none), from
    `duplicates.nearest_earlier_ids` (``search``: exact, approx or auto). ``select --drop_near_duplicates COS`` drops
    rows whose cosine >= COS."""
    ids, cos = nearest_earlier_ids(record, search=search)
    at = record_rows(record, scored)
    scored = scored.add_column("sketch_nearest_id", ids[at].tolist())
    return scored.add_column("sketch_nearest_cos", cos[at].astype(np.float64).tolist())


def print_score_summary(trainer) -> None:
    table = trainer.member_loss_table()
    stats = trainer.data_stats
    print("\nProxy ensemble: mean response loss per member and epoch "
          f"({trainer.args.record_mode} mode)")
    print("  member   " + "  ".join(f"epoch {e + 1:>2}" for e in range(table.shape[1])))
    for m, row in enumerate(table):
        print(f"  {m:>6}   " + "  ".join(f"{v:8.4f}" for v in row))
    if stats.get("num_canary_rows"):
        print(f"(The counts below include the {stats['num_canary_rows']} canary copies; the scores and outputs do "
              "not.)")
    print(f"Rows: {stats['num_rows']}; truncated to max_length={stats['max_length']}: {stats['num_truncated']}; "
          f"no response token (NaN score): {stats['num_no_response']}, of which empty responses: "
          f"{stats.get('num_empty_response', 0)}; duplicate rows (scored each): {stats.get('num_duplicate_rows', 0)}")
    if "sketch_nearest_cos" in trainer.scored.column_names:
        cos = np.asarray(read_columns(trainer.scored, ["sketch_nearest_cos"])["sketch_nearest_cos"], dtype=float)
        print(f"Near-duplicates (gradient-sketch cosine >= 0.98 with an earlier row): {int((cos >= 0.98).sum())}; "
              "`select --drop_near_duplicates 0.98` drops them.")
    for line in trainer.learning_check.lines():
        print(line)
    print_canary_table(getattr(trainer, "canary_table", {}))
    for warning in failure_signatures(trainer.record, trainer.args.early_epoch, trainer.args.late_epoch):
        print(f"Warning: {warning}")
    out = trainer.args.output_dir
    print(f"Members (PEFT adapters): {out}/member_0 ... member_{trainer.args.num_members - 1}")
    print(f"Gradient record:         {out}/gradient_record.safetensors")
    print(f"Scored dataset:          {trainer.scored_path}")
