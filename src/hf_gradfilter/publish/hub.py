"""Publish a GradFiltering run on the Hugging Face Hub: the scored and selected data, the proxy
ensemble with its gradient record, and a fine-tuned target adapter.

Builders (`build_dataset_repo`, `build_proxy_repo`, `build_adapter_repo`) only write a local
folder, with a card rendered from the templates in ``model_cards/``; `push_folder` uploads one
(``create_repo`` + ``create_branch`` + ``upload_folder``). ``push_*_repo`` do both. The token comes
from the ``token`` argument or `huggingface_hub.get_token()` (``HF_TOKEN`` / ``hf auth login``) and
is never printed, logged or written.
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import json
import logging
import math
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import huggingface_hub
import numpy as np
from huggingface_hub import DatasetCard, DatasetCardData, HfApi, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from ..data.columns import read_columns
from ..proxy.learning import summarize
from ..proxy.record import RECORD_NAME, GradientRecord
from ..scores.formulas import DEFAULT_EPS, DEFAULT_SCORE, SCORE_COLUMNS, score_parts

logger = logging.getLogger(__name__)

FORMULA = "G-SNR = (G_s - G_t) / (G_s + eps) * 1 / (V_t + eps)"
CITATION = """@article{gradfiltering2026,
  title   = {Uncertainty-Aware Gradient Signal-to-Noise Data Selection for Instruction Tuning},
  journal = {arXiv preprint arXiv:2601.13697},
  year    = {2026}
}"""
TAGS = ["hf-gradfilter", "gradfiltering", "data-selection", "instruction-tuning"]
REPO_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}", re.ASCII)
SPLIT_RE = re.compile(r"[A-Za-z0-9]\w*", re.ASCII)
PLACEHOLDER_REPO = "your-namespace/your-repo"
SETTING_LABELS = {
    "proxy_model": "Proxy model", "num_members": "Ensemble size M", "num_train_epochs": "Proxy epochs",
    "early_epoch": "Early epoch s", "late_epoch": "Late epoch t", "record_mode": "Record mode",
    "learning_rate": "Proxy learning rate", "lora_r": "Proxy LoRA rank", "max_length": "Max length",
    "seed": "Seed", "score_column": "Score column", "ratio": "Selection ratio", "top_k": "Selected rows (k)",
    "eps": "eps", "group_column": "Group column", "group_mode": "Group mode", "quotas": "Quotas",
    "sketch_dim": "Gradient sketch dim", "target_dataset": "Target dataset (gradient alignment, LESS's rule)",
    "diversity_clusters": "Sketch clusters (top ratio of each)",
    "drop_near_duplicates": "Near-duplicates dropped at sketch cosine >=",
    "features": "Target / cluster features (sketch: gradients; embedding: base hidden states, RDS+)",
    "drop_text_duplicates": "Text near-duplicates dropped at word 5-gram Jaccard >= (MinHash LSH)",
    "proxy_learning": "Did the proxy learn? (learning check, docs/method.md)",
}
VERSIONED = ["hf-gradfilter", "transformers", "peft", "trl", "datasets", "torch", "huggingface_hub"]
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
EXTRA_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
               "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json", "log_history.json",
               "loss_curve.png", "loss_curve.json", "loss_curve.csv")
TEXT_SUFFIXES = {".md", ".json", ".jinja", ".txt", ".csv", ".yaml", ".yml"}


# ---- validation ------------------------------------------------------------------------------------

def check_repo_id(repo_id) -> str:
    """Return ``repo_id`` if it is ``namespace/name`` (Hub naming rules), else raise a ValueError."""
    problem = None
    if not isinstance(repo_id, str) or not REPO_ID_RE.fullmatch(repo_id):
        problem = "it is not of the form 'namespace/name' (letters, digits, '-', '_', '.'; no spaces)"
    else:
        try:
            validate_repo_id(repo_id)
        except HFValidationError as err:
            problem = str(err)
    if problem:
        raise ValueError(f"repo_id {repo_id!r} is invalid: {problem}. Use e.g. 'your-username/alpaca-gsnr-top10'.")
    return repo_id


def _resolve_token(token: str | None) -> str:
    token = token if token is not None else huggingface_hub.get_token()
    if not isinstance(token, str) or not token.strip():
        raise ValueError("No Hugging Face token: pass token=..., run `hf auth login`, or set HF_TOKEN "
                         "(a token with write access).")
    return token


def _check_target(repo_id, repo_type, token, revision) -> str:
    check_repo_id(repo_id)
    if repo_type not in ("model", "dataset"):
        raise ValueError(f"repo_type={repo_type!r} must be 'model' or 'dataset'.")
    if revision is not None and (not isinstance(revision, str) or not re.fullmatch(r"[\w./-]+", revision, re.ASCII)):
        raise ValueError(f"revision={revision!r} is not a valid branch name (letters, digits, '-', '_', '.', '/').")
    return _resolve_token(token)


def _hub_id(name) -> str | None:
    """``name`` if it looks like a Hub model/dataset id rather than a local path, else None."""
    if not isinstance(name, str) or not name or name.startswith((".", "/", "~")) or os.path.exists(name):
        return None
    try:
        validate_repo_id(name)
        return name
    except HFValidationError:
        return None


# ---- upload ----------------------------------------------------------------------------------------

def push_folder(folder, repo_id: str, *, repo_type: str, private: bool = False, revision: str | None = None,
                token: str | None = None, commit_message: str | None = None):
    """Upload a built folder to ``repo_id``: create the repo (and branch ``revision``) if needed.

    Everything is checked before the first Hub call: the folder and its README.md, the repo id
    (``namespace/name``), the repo type, the revision, the token (``token`` or the stored/``HF_TOKEN``
    one) and that the token appears in none of the folder's text files. Returns the `CommitInfo`
    (``.commit_url``, ``.oid``) of ``upload_folder``.
    """
    folder = Path(folder)
    if not (folder / "README.md").is_file():
        raise ValueError(f"{folder} has no README.md: build it first with build_dataset_repo / build_proxy_repo / "
                         "build_adapter_repo.")
    token = _check_target(repo_id, repo_type, token, revision)
    for path in folder.rglob("*"):
        if path.suffix in TEXT_SUFFIXES and path.is_file() and token in path.read_text(errors="ignore"):
            raise ValueError(f"{path} contains your Hugging Face token; remove it before uploading.")
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
    if revision not in (None, "main") and not revision.startswith("refs/"):
        api.create_branch(repo_id, branch=revision, repo_type=repo_type, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type=repo_type, revision=revision,
                             commit_message=commit_message or f"Upload with hf-gradfilter {_version('hf-gradfilter')}")
    logger.info("Uploaded %s to %s (%s)", folder, repo_id, getattr(info, "commit_url", info))
    return info


def _publish(builder, repo_type, repo_id, private, revision, token, commit_message, *args, **kwargs):
    token = _check_target(repo_id, repo_type, token, revision)
    with tempfile.TemporaryDirectory(prefix="hf_gradfilter_") as tmp:
        folder = builder(os.path.join(tmp, "repo"), *args, repo_id=repo_id, **kwargs)
        return push_folder(folder, repo_id, repo_type=repo_type, private=private, revision=revision, token=token,
                           commit_message=commit_message)


def push_dataset_repo(repo_id, scored, selected, *, settings, private=False, revision=None, token=None,
                      commit_message=None, **card):
    """`build_dataset_repo` in a temporary folder, then `push_folder` it as a dataset repo."""
    return _publish(build_dataset_repo, "dataset", repo_id, private, revision, token, commit_message,
                    scored, selected, settings=settings, **card)


def push_proxy_repo(repo_id, trainer_output_dir, *, private=False, revision=None, token=None,
                    commit_message=None, **card):
    """`build_proxy_repo` in a temporary folder, then `push_folder` it as a model repo."""
    return _publish(build_proxy_repo, "model", repo_id, private, revision, token, commit_message,
                    trainer_output_dir, **card)


def push_adapter_repo(repo_id, adapter_dir, *, private=False, revision=None, token=None, commit_message=None,
                      **card):
    """`build_adapter_repo` in a temporary folder, then `push_folder` it as a model repo."""
    return _publish(build_adapter_repo, "model", repo_id, private, revision, token, commit_message,
                    adapter_dir, **card)


# ---- card helpers ----------------------------------------------------------------------------------

def _template(name: str) -> str:
    try:
        return importlib.resources.files("hf_gradfilter.model_cards").joinpath(name).read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError):  # a source checkout that was not installed
        return (Path(__file__).resolve().parents[3] / "model_cards" / name).read_text(encoding="utf-8")


def _fmt(value) -> str:
    if isinstance(value, float):
        return "—" if not math.isfinite(value) else f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return str(value).replace("|", "\\|")


def _settings_rows(settings: dict | None) -> list[tuple[str, str]]:
    settings = {k: v for k, v in (settings or {}).items() if v is not None}
    keys = [k for k in SETTING_LABELS if k in settings] + [k for k in settings if k not in SETTING_LABELS]
    return [(SETTING_LABELS.get(k, k), _fmt(settings[k])) for k in keys] + [("Formula", f"`{FORMULA}`")]


def _stats_rows(columns: dict[str, np.ndarray]) -> list[dict]:
    rows = []
    for name, values in columns.items():
        values = np.asarray(values, dtype=np.float64)
        finite = values[np.isfinite(values)]
        q = np.quantile(finite, [0, 0.05, 0.25, 0.5, 0.75, 0.95, 1]) if len(finite) else [math.nan] * 7
        rows.append({"column": name, "count": len(values), "nan": int(len(values) - len(finite)),
                     "mean": _fmt(float(finite.mean()) if len(finite) else math.nan),
                     **{k: _fmt(float(v)) for k, v in zip(("min", "q05", "q25", "q50", "q75", "q95", "max"), q)}})
    return rows


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _new_folder(folder) -> Path:
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ValueError(f"{folder} exists and is not an empty folder: every file in it would be uploaded; "
                         "pass a new or empty folder.")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _as_list(value) -> list[str] | None:
    return [value] if isinstance(value, str) else (list(value) if value else None)


def _write_card(folder: Path, card_cls, data, template: str, **kwargs) -> None:
    card = card_cls.from_template(data, template_str=_template(template), citation=CITATION,
                                  versions=[(n, _version(n)) for n in VERSIONED], **kwargs)
    card.text = re.sub(r"\n{3,}", "\n\n", card.text)  # blank lines left by the templates' optional blocks
    card.save(folder / "README.md")


def selection_settings(record, *, score_column: str = DEFAULT_SCORE, ratio: float | None = None, **extra) -> dict:
    """The settings table of a run, read from a `GradientRecord` (or its file / the trainer's output dir)."""
    record = record if isinstance(record, GradientRecord) else GradientRecord.load(str(record))
    config = record.metadata.get("config", {})
    keys = ("num_members", "num_train_epochs", "early_epoch", "late_epoch", "learning_rate", "lora_r",
            "max_length", "seed", "sketch_dim")
    return {"proxy_model": record.metadata.get("base_model") or None, **{k: config.get(k) for k in keys},
            "record_mode": record.metadata.get("record_mode"), "score_column": score_column, "ratio": ratio,
            "proxy_learning": summarize(record.metadata.get("learning_check")), **extra}


def _histogram(path: Path, values, cut, xlabel: str) -> str | None:
    from ..plots import histogram

    values = np.asarray(values, dtype=np.float64)
    if not np.isfinite(values).any():
        return None
    histogram(values, str(path), cut=cut, xlabel=xlabel, title=f"{xlabel} over {len(values)} rows")
    return path.name


# ---- builders --------------------------------------------------------------------------------------

def build_dataset_repo(folder, scored, selected: dict, *, settings: dict, license: str | None = None,
                       source_dataset: str | None = None, repo_id: str | None = None) -> str:
    """Write a dataset repo folder: ``data/<split>-00000-of-00001.parquet`` for ``scored`` and every
    selected split (e.g. ``{"top_10pct": top10}``), a score histogram and a README.md dataset card
    whose ``configs`` make ``load_dataset(folder)`` (or the repo) return exactly those splits.

    ``settings`` fills the selection table (see `selection_settings`); its ``score_column``
    (default `DEFAULT_SCORE`, ``neg_energy_token``) must be a column of ``scored``. With a
    ``group_column`` in ``settings`` (a per-group selection, `selection.select_top`), the card also shows
    the rows each group kept in every split (`selection.group_counts`). Returns the folder path.
    """
    score_column = (settings or {}).get("score_column") or DEFAULT_SCORE
    group_column = (settings or {}).get("group_column")
    if group_column is not None and group_column not in scored.column_names:
        raise ValueError(f"Group column {group_column!r} is not in the scored dataset (columns: "
                         f"{scored.column_names}); drop it from settings or pass the column the selection used.")
    if not selected:
        raise ValueError("Pass at least one selected split, e.g. selected={'top_10pct': top10}.")
    if score_column not in scored.column_names:
        raise ValueError(f"Score column {score_column!r} is not in the scored dataset (columns: "
                         f"{scored.column_names}); score it first.")
    for name, split in selected.items():
        if not isinstance(name, str) or not SPLIT_RE.fullmatch(name) or name == "scored":
            raise ValueError(f"Split name {name!r} is invalid: use letters, digits and '_' (e.g. 'top_10pct'), "
                             "not 'scored'.")
        if len(split) == 0:
            raise ValueError(f"Selected split {name!r} is empty: nothing to publish; select a larger ratio.")
        if sorted(split.column_names) != sorted(scored.column_names):
            extra = sorted(set(split.column_names) - set(scored.column_names))
            hint = (f" The columns {extra} come from `select --target_dataset / --diversity_clusters`: publish with "
                    "`hf-gradfilter run ... --push_dataset_id`, which adds them to every split." if extra else "")
            raise ValueError(f"Selected split {name!r} has columns {split.column_names}, but scored has "
                             f"{scored.column_names}; select rows from the scored dataset.{hint}")
    folder = _new_folder(folder)
    (folder / "data").mkdir()
    splits = {"scored": scored, **selected}
    for name, split in splits.items():
        split.to_parquet(str(folder / "data" / f"{name}-00000-of-00001.parquet"))
    scores = np.asarray(read_columns(scored, [score_column])[score_column], dtype=np.float64)
    cuts = {name: float(np.nanmin(np.asarray(read_columns(s, [score_column])[score_column], dtype=np.float64)))
            for name, s in selected.items()}
    first = next(iter(selected))
    plot = _histogram(folder / f"{score_column}_hist.png", scores, cuts[first], score_column)
    n = len(scored)
    size = next(c for lim, c in [(1e3, "n<1K"), (1e4, "1K<n<10K"), (1e5, "10K<n<100K"), (1e6, "100K<n<1M"),
                                 (1e7, "1M<n<10M"), (math.inf, "n>10M")] if n < lim)
    data = DatasetCardData(
        license=license, size_categories=[size], source_datasets=_as_list(source_dataset),
        task_categories=["text-generation"], tags=TAGS,
        configs=[{"config_name": "default",
                  "data_files": [{"split": s, "path": f"data/{s}-*"} for s in splits]}],
    )
    table = [{"name": s, "rows": len(d), "share": f"{len(d) / max(n, 1):.1%}", "cut": _fmt(cuts.get(s, math.nan))}
             for s, d in splits.items()]
    columns = [c for c in dict.fromkeys([score_column, *SCORE_COLUMNS]) if c in scored.column_names]
    stats = _stats_rows(read_columns(scored, columns))
    title = f"{source_dataset} — G-SNR scored and selected" if source_dataset else "G-SNR scored and selected data"
    _write_card(folder, DatasetCard, data, "dataset_card.md", title=title, source_dataset=source_dataset,
                splits=table, settings=_settings_rows({**(settings or {}), "score_column": score_column}), stats=stats,
                plot=plot, score_column=score_column, first_split=first, repo_id=repo_id or PLACEHOLDER_REPO,
                group_column=group_column, groups=_group_rows(scored, selected, group_column) if group_column else None)
    return str(folder)


def _group_rows(scored, selected: dict, group_column: str) -> list[dict]:
    """Per group: its rows in ``scored`` and, per selected split, ``"kept (share of the group)"``."""
    from ..selection.top import group_counts

    tables = {name: group_counts(scored[group_column], split[group_column]) for name, split in selected.items()}
    first = next(iter(tables.values()))
    return [{"group": _fmt(row["group"]), "rows": row["rows"],
             "kept": [f"{t[i]['kept']} ({t[i]['share']:.1%})" for t in tables.values()]}
            for i, row in enumerate(first)]


def _check_adapter(path: Path) -> dict:
    missing = [f for f in ADAPTER_FILES if not (path / f).is_file()]
    if missing:
        raise ValueError(f"{path} is not a PEFT adapter folder: {missing} missing (save it with save_pretrained).")
    return json.loads((path / "adapter_config.json").read_text())


def _copy_extras(src: Path, dst: Path) -> list[str]:
    copied = [f for f in EXTRA_FILES if (src / f).is_file()]
    for f in copied:
        shutil.copy2(src / f, dst / f)
    return copied


def build_proxy_repo(folder, trainer_output_dir, *, settings: dict | None = None, license: str | None = None,
                     datasets=None, repo_id: str | None = None) -> str:
    """Write a model repo folder from a `GradFilterTrainer` output dir: every member as a PEFT adapter
    (``member_0`` ... ``member_{M-1}``), ``gradient_record.safetensors``, ``gradfilter_config.json``,
    the tokenizer files, a G-SNR histogram and a README.md model card (``library_name: peft``).

    ``settings`` adds to / overrides what is read from the record. Returns the folder path.
    """
    src = Path(trainer_output_dir)
    for f in (RECORD_NAME, "gradfilter_config.json"):
        if not (src / f).is_file():
            raise ValueError(f"{src} has no {f}: pass the output_dir of GradFilterTrainer after save_model().")
    record = GradientRecord.load(str(src))
    members = [f"member_{m}" for m in range(record.num_members)]
    configs = [_check_adapter(src / m) for m in members]
    folder = _new_folder(folder)
    for m in members:
        (folder / m).mkdir()
        for f in ADAPTER_FILES:
            shutil.copy2(src / m / f, folder / m / f)
    for f in (RECORD_NAME, "gradfilter_config.json"):
        shutil.copy2(src / f, folder / f)
    _copy_extras(src, folder)
    base_model = _hub_id(configs[0].get("base_model_name_or_path"))
    config = record.metadata.get("config", {})
    parts = score_parts(record.norms, int(config.get("early_epoch", 1)), int(config.get("late_epoch", 2)),
                        DEFAULT_EPS)
    plot = _histogram(folder / "gsnr_hist.png", parts["gsnr"], None, "gsnr")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        losses = np.nanmean(record.losses, axis=0)
    lora = configs[0]
    run = {**selection_settings(record), "score_column": None, "lora_alpha": lora.get("lora_alpha"),
           "target_modules": lora.get("target_modules"), **(settings or {})}
    data = ModelCardData(base_model=base_model, datasets=_as_list(datasets), library_name="peft",
                         license=license, tags=[*TAGS, "peft", "lora"])
    _write_card(folder, ModelCard, data, "proxy_card.md", title="GradFiltering proxy ensemble",
                base_model=base_model, datasets=_as_list(datasets), num_members=record.num_members,
                num_epochs=record.num_epochs, num_examples=record.num_examples, settings=_settings_rows(run),
                member_losses=[{"name": m, "losses": [_fmt(float(v)) for v in losses[i]]}
                               for i, m in enumerate(members)],
                stats=_stats_rows({k: parts[k] for k in SCORE_COLUMNS}), plot=plot,
                repo_id=repo_id or PLACEHOLDER_REPO)
    return str(folder)


def build_adapter_repo(folder, adapter_dir, *, base_model: str | None = None, datasets=None,
                       settings: dict | None = None, license: str | None = None, repo_id: str | None = None) -> str:
    """Write a model repo folder from a fine-tuned PEFT adapter folder (``adapter_config.json`` +
    ``adapter_model.safetensors``), with its tokenizer files and loss curve (``loss_curve.png``,
    drawn from ``log_history.json`` / ``loss_curve.json`` when only those exist) and a README.md card.

    ``base_model`` defaults to the adapter's ``base_model_name_or_path`` when that is a Hub id;
    ``datasets`` are the Hub ids of the training data. Returns the folder path.
    """
    src = Path(adapter_dir)
    config = _check_adapter(src)
    if base_model is not None and _hub_id(base_model) is None:
        raise ValueError(f"base_model={base_model!r} is not a Hub model id (e.g. 'meta-llama/Llama-2-7b-hf').")
    base_model = base_model or _hub_id(config.get("base_model_name_or_path"))
    folder = _new_folder(folder)
    for f in ADAPTER_FILES:
        shutil.copy2(src / f, folder / f)
    copied = _copy_extras(src, folder)
    history = next((json.loads((folder / f).read_text()) for f in ("log_history.json", "loss_curve.json")
                    if f in copied), [])
    points = [(h["step"], float(h["loss"])) for h in history if isinstance(h, dict) and {"step", "loss"} <= set(h)]
    if points and "loss_curve.png" not in copied:
        from ..plots import line_plot

        line_plot({"training loss": points}, str(folder / "loss_curve.png"), xlabel="step", ylabel="loss")
    has_plot = (folder / "loss_curve.png").is_file()
    lora = [(k, _fmt(config[k])) for k in ("peft_type", "r", "lora_alpha", "lora_dropout", "target_modules")
            if config.get(k) is not None]
    data = ModelCardData(base_model=base_model, datasets=_as_list(datasets), library_name="peft",
                         license=license, tags=[*TAGS, "peft", "lora", "sft"])
    _write_card(folder, ModelCard, data, "adapter_card.md", title="LoRA adapter trained on a G-SNR selection",
                base_model=base_model, datasets=_as_list(datasets), lora=lora,
                settings=_settings_rows(settings) if settings else None, loss_points=len(points),
                first=(points[0][0], _fmt(points[0][1])) if points else None,
                last=(points[-1][0], _fmt(points[-1][1])) if points else None,
                plot="loss_curve.png" if has_plot else None, has_tokenizer="tokenizer_config.json" in copied,
                repo_id=repo_id or PLACEHOLDER_REPO)
    return str(folder)
