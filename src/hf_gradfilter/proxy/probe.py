"""Probe a trained proxy with other rows: each row's gradient sketch for every member at the members'
current weights, and the proxy of a finished ``score`` run loaded back for that.

Target-aware selection (`scores.alignment`) compares the record's sketches of the scored rows with the
sketches of a few rows of the task one cares about. The target rows are never trained on: they go
through the same hooks (`norms.LoraNormRecorder` with its `sketch.LoraSketcher`), the same projection
(seed, ``d``, matrices) and the same per-example loss, at fixed weights (eval mode, no optimizer
step), one forward and one backward per member batch.

The loss is computed in float32 (``mixed_precision=False``), also when the scored rows were recorded
under ``--bf16`` / ``--fp16`` autocast: the sketches then differ by that rounding. The weights are the
members' at the end of training, so the scored rows' sketches to compare with are
the last epoch's: in ``snapshot`` mode both are taken at exactly these weights; in ``train`` mode the
scored rows' were taken at the step that visited each row, during the last epoch (as LESS compares
checkpoint gradients, a row's pull is taken where the member was then).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.columns import read_int_columns
from ..data.formatting import DataFormatArguments, InstructionFormat, tokenize_dataset
from .checkpoint import load_members
from .sampler import pad_rows


def tokenize_probe_rows(trainer, rows) -> tuple:
    """``rows`` tokenized as the scored rows (the trainer's format resolved on their own columns, so alpaca rows may
    be probed against a messages target; its ``max_length``), and the positions of the rows that kept a response
    token, longest first (similar lengths share a batch)."""
    fmt = dataclasses.replace(trainer.args.instruction_format, kind="auto")
    tokenized, _ = tokenize_dataset(rows, trainer.processing_class, fmt, trainer.args.max_length)
    counts = read_int_columns(tokenized, ["num_response_tokens", "length"])
    usable = np.flatnonzero(counts["num_response_tokens"] > 0)
    return tokenized, usable[np.argsort(-counts["length"][usable], kind="stable")]


def sketch_rows(trainer, rows, batch_size: int | None = None) -> np.ndarray:
    """``(N, M, d)`` float32: each row's gradient sketch for every member of ``trainer`` (a `GradFilterTrainer`
    built with ``sketch_dim``) at its current weights; NaN for rows with no response token.

    ``rows``: raw instruction rows in any supported format (``kind="auto"`` with the trainer's column names,
    resolved on their own columns, so alpaca rows may be scored against a messages target), tokenized like the
    scored rows (``max_length`` of the trainer).
    """
    recorder, args = trainer.recorder, trainer.args
    if recorder.sketcher is None:
        raise ValueError("The proxy records no sketches (sketch_dim=0): score with --sketch_dim (e.g. 1024).")
    tokenized, usable = tokenize_probe_rows(trainer, rows)
    size = batch_size or args.per_device_eval_batch_size
    out = np.full((len(rows), len(trainer.member_names), recorder.sketcher.dim), np.nan, dtype=np.float32)
    model = trainer.accelerator.unwrap_model(trainer.model)
    was_training, was_enabled = model.training, recorder.sketcher.enabled
    model.eval()  # no dropout: the gradient at fixed weights
    recorder.sketcher.enabled = True
    progress = tqdm(total=len(usable) * len(trainer.member_names), desc="Sketching target rows",
                    disable=args.disable_tqdm)
    try:
        for m, name in enumerate(trainer.member_names):
            trainer._activate(name)
            params = [p for n, p in model.named_parameters() if f".{name}." in n]
            for start in range(0, len(usable), size):
                idx = usable[start:start + size]
                chunk = tokenized[idx.tolist()]
                batch = trainer._prepare_inputs(pad_rows(chunk, trainer.pad_token_id))
                recorder.start(len(idx), args.device)
                try:
                    losses = trainer._member_forward(model, batch, mixed_precision=False)
                    torch.autograd.grad(losses.sum(), params, allow_unused=True)
                finally:
                    recorder.stop()
                out[idx, m] = recorder.sketches.cpu().numpy()
                progress.update(len(idx))
    finally:
        progress.close()
        recorder.sketcher.enabled = was_enabled
        trainer._activate(trainer.member_names)
        model.train(was_training)
    return out


def recorded_format(score_dir: str) -> InstructionFormat | None:
    """The row format the ``score`` run in ``score_dir`` read its rows with (``dataset_format`` and the
    ``*_column`` names of its ``gradfilter_config.json``), so later verbs read the scored rows' text from the same
    columns; ``None`` when the folder holds no such file (the default column names then apply)."""
    path = os.path.join(score_dir, "gradfilter_config.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        config = json.load(f).get("config", {})
    names = {f.name for f in dataclasses.fields(DataFormatArguments)}
    return DataFormatArguments(**{k: v for k, v in config.items() if k in names}).instruction_format


def load_proxy(score_dir: str, rows, base_model: str | None = None, need_sketches: bool = True):
    """The `GradFilterTrainer` of a finished ``score`` run in ``score_dir`` (its members, tokenizer and sketch
    settings), its train rows ``rows`` (e.g. the target rows: nothing is trained), ready for `sketch_rows`.

    ``base_model``: the proxy's frozen backbone (default: the one recorded in ``gradfilter_config.json``).
    ``need_sketches=False``: for `proxy.embeddings` only, a run without sketches will do.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .config import GradFilterConfig
    from .trainer import GradFilterTrainer

    meta_path = os.path.join(score_dir, "gradfilter_config.json")
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"{score_dir} holds no gradfilter_config.json: give the output_dir of "
                                "`hf-gradfilter score` (--proxy_dir).")
    with open(meta_path) as f:
        meta = json.load(f)
    sketch, config = meta.get("sketch"), meta.get("config", {})
    if not sketch and need_sketches:
        raise ValueError(f"The proxy in {score_dir} recorded no gradient sketches; score again with --sketch_dim "
                         "(e.g. 1024) to select for a target dataset.")
    base = base_model or meta.get("base_model")
    if not base or (os.path.sep in base and not os.path.isdir(base)):
        raise FileNotFoundError(f"The proxy's base model {base!r} (recorded in {meta_path}) is not there; pass "
                                "--proxy_model with its Hub id or local path.")
    keep = ("num_members", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "init_lora_weights",
            "max_length", "dataset_format", "instruction_column", "input_column", "output_column", "prompt_column",
            "completion_column", "messages_column", "num_train_epochs", "early_epoch", "late_epoch",
            "per_device_eval_batch_size", "use_cpu", "seed")
    scratch = tempfile.mkdtemp(prefix="gradfilter_probe_")  # the trainer's record files: unnamed, gone with it
    sketching = ({"sketch_dim": sketch["dim"], "sketch_seed": sketch["seed"], "sketch_epochs": sketch["epochs"]}
                 if sketch else {})
    args = GradFilterConfig(output_dir=scratch, report_to="none", **sketching,
                            **{k: config[k] for k in keep if k in config})
    tokenizer = AutoTokenizer.from_pretrained(score_dir)
    try:
        trainer = GradFilterTrainer(AutoModelForCausalLM.from_pretrained(base), args=args, train_dataset=rows,
                                    processing_class=tokenizer)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    load_members(trainer.accelerator.unwrap_model(trainer.model), trainer.member_names, score_dir)
    return trainer
