"""The run report: ``report.md`` and ``report.html`` (plots in ``report/``) from a run's output dir.

`write_report(output_dir)` reads only files (``run_args.json``, ``score/``, ``select/*/``,
``finetune/*/``, ``stages.json``), so ``hf-gradfilter report DIR`` rebuilds it at any time, also
for a run that stopped early: missing stages are left out. One list of blocks is rendered twice,
to Markdown and to self-contained-enough HTML (images are files next to it).

Sections: settings and stages; warnings (the failure signatures of docs/method.md, each with what to
try); score distributions (G-SNR and its parts G_s, G_t, relative drop, V_t, with the selection
cut); relative drop against late variance, selected rows highlighted; the proxy members' loss
curves; per-ratio selection tables and, where a column names corrupted rows, sources or tasks,
what the selection kept of each; the targets' loss curves and held-out metrics; the top and
bottom rows by score.
"""

from __future__ import annotations

import glob
import html
import json
import os
from dataclasses import dataclass, field

import numpy as np

from ..plots import line_plot, plt

LABEL_COLUMNS = ("is_corrupted", "corruption", "source", "task", "category")
"""Columns whose values the report breaks the selection down by, when present."""

TEXT_COLUMNS = ("instruction", "input", "output", "prompt", "completion", "messages")


def _read_json(path: str, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return default


def _short(value, width: int = 160) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= width else text[: width - 1] + "…"


# ---- plots ---------------------------------------------------------------------------------------

def display_scale(values: np.ndarray, name: str, allow_log: bool = True):
    """How to show a column on a histogram axis: ``(transform, axis label)``.

    Positive columns (energies, variances) spanning more than 100x are shown as log10 (unless
    ``allow_log`` is False: the score column, whose cut is read on its own scale); negative ones (the
    negated energies, such as the default ``neg_energy_token``) spanning more than 100x as -log10(-x), which
    keeps their order, so the cut stays where it is; signed
    columns with a heavy tail (max |x| over 1000x the median |x|, as G-SNR's division makes them)
    as sign(x) log10(1 + |x| / m), m = median |x|; others as they are.
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if allow_log and v.size and (v > 0).all() and v.max() > 100 * v.min():
        return np.log10, f"log10 {name}"
    if v.size and (v < 0).all() and v.min() < 100 * v.max():  # negated energies (neg_energy_token, ...)
        return (lambda x: -np.log10(-x)), f"-log10(-{name})"
    m = float(np.median(np.abs(v))) if v.size else 0.0
    if v.size and m > 0 and np.abs(v).max() > 1000 * m:
        return (lambda x: np.sign(x) * np.log10(1 + np.abs(x) / m)), f"sign·log10(1+|{name}|/{m:.2g})"
    return (lambda x: x), name


def score_histograms(columns: dict[str, np.ndarray], selected: np.ndarray, cuts: dict[str, float],
                     score_column: str, path: str) -> str:
    """One panel per column (`display_scale`): all rows and the selected ones; the score column's panel
    marks each selection's cut."""
    names = list(columns)
    ncols = min(3, len(names))
    nrows = -(-len(names) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 3.0 * nrows), dpi=100, squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, names):
        values = np.asarray(columns[name], dtype=np.float64)
        transform, label = display_scale(values, name, allow_log=name != score_column)
        with np.errstate(all="ignore"):
            shown = transform(values)
        ok = np.isfinite(shown)
        bins = np.histogram_bin_edges(shown[ok], bins=40) if ok.any() else 10
        ax.hist(shown[ok], bins=bins, color="#9DB4D3", label="all rows")
        ax.hist(shown[ok & selected], bins=bins, color="#C44E52", alpha=0.8, label="selected")
        if ok.any():
            ax.set_yscale("log")
        if name == score_column:
            for text, cut in cuts.items():
                x = float(transform(np.float64(cut)))
                ax.axvline(x, color="black", linestyle="--", linewidth=1)
                ax.annotate(text, (x, ax.get_ylim()[1]), fontsize=7, rotation=90, ha="right", va="top")
        ax.set(xlabel=label, title=name)
    for row in axes:
        row[0].set_ylabel("rows")
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def drop_vs_variance(rel_drop: np.ndarray, var_late: np.ndarray, selected: np.ndarray, path: str) -> str:
    """Relative drop (x) against the late ensemble variance (y, log), selected rows in red."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ok = np.isfinite(rel_drop) & np.isfinite(var_late) & (var_late > 0)
    if not ok.any():
        ax.text(0.5, 0.5, "V_t is 0 or NaN for every row:\nthe ensemble variance collapsed", ha="center",
                transform=ax.transAxes)
        ok = np.isfinite(rel_drop) & np.isfinite(var_late)
        ax.scatter(rel_drop[ok], var_late[ok], s=4, color="#9DB4D3")
        fig.savefig(path)
        plt.close(fig)
        return path
    ax.scatter(rel_drop[ok & ~selected], var_late[ok & ~selected], s=4, color="#9DB4D3", label="not selected")
    ax.scatter(rel_drop[ok & selected], var_late[ok & selected], s=6, color="#C44E52", label="selected")
    ax.set_yscale("log")
    ax.axvline(0, color="grey", linewidth=0.8)
    ax.set(xlabel="relative drop (G_s - G_t) / G_s", ylabel="late ensemble variance V_t",
           title="Learning progress against member disagreement")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ---- data ----------------------------------------------------------------------------------------

def _load_run(out: str) -> dict:
    from datasets import load_from_disk

    run = {"out": out, "args": _read_json(os.path.join(out, "run_args.json"), {}),
           "stages": _read_json(os.path.join(out, "stages.json"), {})}
    score = os.path.join(out, "score")
    run["score_state"] = _read_json(os.path.join(score, "stage.json"), {})
    scored = os.path.join(score, "scored")
    if "columns" in run["stages"]:  # the run's sketch-derived columns (target_alignment, clusters) beside the scores
        scored = os.path.join(out, "columns", "scored")
    run["scored"] = load_from_disk(scored) if os.path.isdir(scored) else None
    record = os.path.join(score, "gradient_record.safetensors")
    if os.path.exists(record):
        from ..proxy.record import GradientRecord

        run["record"] = GradientRecord.load(record)
    run["proxy_log"] = _read_json(os.path.join(score, "log_history.json"), [])
    run["selections"] = {}
    for folder in sorted(glob.glob(os.path.join(out, "select", "*", ""))):
        stats = _read_json(os.path.join(folder, "stats.json"))
        state = _read_json(os.path.join(folder, "stage.json"), {})
        if stats is not None and state.get("complete"):
            run["selections"][os.path.basename(os.path.normpath(folder))] = {"stats": stats, "folder": folder}
    run["targets"] = {}
    for folder in sorted(glob.glob(os.path.join(out, "finetune", "*", ""))):
        state = _read_json(os.path.join(folder, "stage.json"), {})
        if state.get("complete"):
            run["targets"][os.path.basename(os.path.normpath(folder))] = {
                "metrics": _read_json(os.path.join(folder, "eval_metrics.json"), {}),
                "log": _read_json(os.path.join(folder, "log_history.json"), [])}
    run["push"] = _read_json(os.path.join(out, "push", "stage.json"), {})
    return run


def _selected_mask(n: int, sel_folder: str) -> np.ndarray:
    """Which of the ``n`` scored rows a selection kept (its ``positions.npy``)."""
    mask = np.zeros(n, dtype=bool)
    mask[np.load(os.path.join(sel_folder, "positions.npy"))] = True
    return mask


def label_breakdown(scored, mask: np.ndarray, column: str) -> list[list]:
    """Rows ``[value, rows, kept, kept share of its rows, share of the selection, share of the data]``
    (`selection.group_counts`)."""
    from ..selection.top import group_counts

    values = list(scored[column])
    n = len(values)
    return [[g["group"], g["rows"], g["kept"], f"{g['share']:.1%}", f"{g['selection_share']:.1%}",
             f"{g['rows'] / n:.1%}"]
            for g in group_counts(values, [values[i] for i in np.flatnonzero(mask)])]


# ---- blocks -> markdown / html -------------------------------------------------------------------

def _md_cell(value) -> str:
    return str(value).replace("|", "\\|")


def _md(blocks) -> str:
    lines = []
    for kind, *rest in blocks:
        if kind == "h1":
            lines += [f"# {rest[0]}", ""]
        elif kind == "h2":
            lines += [f"## {rest[0]}", ""]
        elif kind == "p":
            lines += [rest[0], ""]
        elif kind == "warn":
            lines += [f"> **Warning:** {rest[0]}", ""]
        elif kind == "img":
            lines += [f"![{rest[1]}]({rest[0]})", ""]
        elif kind == "table":
            header, rows = rest
            lines += ["| " + " | ".join(map(_md_cell, header)) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in rows] + [""]
    return "\n".join(lines)


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222}h1{border-bottom:2px solid #C44E52;padding-bottom:.2em}h2{margin-top:1.6em;
border-bottom:1px solid #ddd}table{border-collapse:collapse;margin:.6em 0;font-size:.9em}td,th{border:1px solid #ccc;
padding:.25em .6em;text-align:left;vertical-align:top}th{background:#f3f3f3}img{max-width:100%;margin:.4em 0}
.warn{background:#fff4e5;border-left:4px solid #e69500;padding:.5em .8em;margin:.5em 0}.ok{color:#2a7a2a}"""


def _html(blocks, title: str) -> str:
    body = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2"):
            body.append(f"<{kind}>{html.escape(rest[0])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{html.escape(rest[0])}</p>")
        elif kind == "warn":
            body.append(f'<div class="warn"><b>Warning:</b> {html.escape(rest[0])}</div>')
        elif kind == "img":
            body.append(f'<img src="{html.escape(rest[0])}" alt="{html.escape(rest[1])}">')
        elif kind == "table":
            header, rows = rest
            head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
            cells = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
            body.append(f"<table><tr>{head}</tr>{cells}</table>")
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


# ---- the report ----------------------------------------------------------------------------------

def sketch_lines(selections: dict) -> list[str]:
    """A sentence per selection made with gradient sketches (target alignment, clusters, near-duplicates) or without
    text near-duplicates."""
    lines = []
    for name, sel in selections.items():
        stats, said = sel["stats"], []
        if "target" in stats:
            t = stats["target"]
            said.append(f"ranked by alignment with the gradients of {t.get('target_rows_sketched')} target rows "
                        f"({t.get('target_dataset')}; mean alignment {_fmt(t.get('alignment_mean'))})")
        if "diversity" in stats:
            d = stats["diversity"]
            said.append(f"the top of each of {d['num_clusters']} k-means clusters of gradient sketches (sizes "
                        f"{d['smallest_cluster']} to {d['largest_cluster']} rows)")
        if "num_near_duplicates_dropped" in stats:
            said.append(f"{stats['num_near_duplicates_dropped']} near-duplicate rows never selected")
        if "num_text_duplicates_dropped" in stats:
            t = stats.get("text_duplicates", {})
            said.append(f"{stats['num_text_duplicates_dropped']} text near-duplicate rows never selected (word "
                        f"{t.get('ngram')}-gram Jaccard >= {t.get('threshold')})")
        if said:
            lines.append(f"{name}: " + "; ".join(said) + ".")
    return lines


def report_blocks(run: dict, fig_dir: str) -> list[tuple]:
    """The report's content as blocks; plots are written to ``fig_dir`` (paths relative to its parent)."""
    from ..data.columns import read_columns
    from ..proxy.learning import change, learning_check
    from ..scores.checks import failure_signatures
    from ..scores.formulas import DEFAULT_SCORE, score_parts

    args, proxy = run["args"].get("run", {}), run["args"].get("proxy", {})
    column = args.get("score_column", DEFAULT_SCORE)

    def rel(name: str) -> str:
        return os.path.join(os.path.basename(fig_dir), name)

    source = "embedded demo dataset" if args.get("demo") else args.get("dataset_name")
    proxy_name = "tiny demo GPT-2" if args.get("demo") else args.get("model_name_or_path")
    blocks = [("h1", "hf-gradfilter run report"),
              ("p", f"Data: {source}. Proxy: {proxy_name}"
                    f", M={proxy.get('num_members')} LoRA members, {proxy.get('num_train_epochs')} epochs, "
                    f"record mode {proxy.get('record_mode')}, s={proxy.get('early_epoch')}, "
                    f"t={proxy.get('late_epoch')}. "
                    f"Selection by {column!r}; target: {args.get('target_model')}.")]
    if run["stages"]:
        blocks.append(("table", ["stage", "this run", "seconds (when it ran)"],
                       [[name, status, _read_json(os.path.join(run["out"], name, "stage.json"), {}).get("seconds", "")]
                        for name, status in run["stages"].items()]))
    record, scored = run.get("record"), run["scored"]
    if record is None or scored is None:
        return blocks + [("p", "No finished scoring stage yet: nothing else to show.")]
    s, t = int(proxy.get("early_epoch") or 1), int(proxy.get("late_epoch") or 2)

    blocks.append(("h2", "Did the proxy learn?"))
    check = learning_check(record, s, t)
    blocks.append(("table", ["mean response loss per epoch", "change s -> t", "rows whose gradient energy fell",
                             "members' spread (late)", "verdict"],
                   [[" -> ".join(f"{v:.4f}" for v in check.loss_per_epoch), change(check.loss_drop),
                     f"{check.energy_fell:.0%}", f"{check.member_spread:.3f}", check.verdict]]))
    canaries = _read_json(os.path.join(run["out"], "score", "canaries.json"))
    if canaries:
        table = canaries["table"]
        kinds = [k for k in next(iter(table.values()), {}) if k not in ("all", "pairs")]
        blocks += [("h2", "Canaries: which score works on this data?"),
                   ("p", f"{canaries['rows']} damaged copies of this data's own rows ({canaries['share']:.0%}) were "
                         "trained on and scored with the rest, then left out of every output. Share of (original, "
                         "copy) pairs where the original scores higher (0.5: the score cannot tell them apart); "
                         "best first. They only know the damage kinds written in `data/canaries.py`."),
                   ("table", ["score", "all", *kinds],
                    [[name, f"{row['all']:.2f}", *(f"{row[k]:.2f}" for k in kinds)] for name, row in table.items()])]
    blocks.append(("h2", "Warnings"))
    warnings = failure_signatures(record, s, t)
    blocks += [("warn", w) for w in warnings] or [("p", "None of the failure signatures of docs/method.md was seen.")]
    stats = run["score_state"].get("data_stats") or {}
    if stats:
        blocks.append(("p", f"Rows: {stats.get('num_rows')}; truncated to max_length: {stats.get('num_truncated')}; "
                            f"no response token (NaN score, never selected): {stats.get('num_no_response')}; "
                            f"duplicate rows (each scored): {stats.get('num_duplicate_rows', 0)}."))

    parts = score_parts(record.norms, s, t)
    sels = {k: v for k, v in run["selections"].items() if not k.startswith("random_")}
    masks = {k: _selected_mask(len(scored), v["folder"]) for k, v in sels.items()}
    first = next(iter(masks.values()), np.zeros(len(scored), dtype=bool))
    values = (np.asarray(read_columns(scored, [column])[column], dtype=np.float64) if column in scored.column_names
              else parts["gsnr"])
    cuts = {k.rsplit("_", 1)[-1]: v["stats"].get("threshold") for k, v in sels.items()
            if v["stats"].get("threshold") is not None}
    columns = {k: parts[k] for k in ("grad_early", "grad_late", "rel_drop", "ens_var_late")}
    if column in scored.column_names or column == "gsnr":  # target_alignment lives in the selections only
        columns = {column: values, **columns}
    if "cos_late" in scored.column_names:  # direction: cosine with the member's mean gradient (late epoch)
        cos = np.asarray(read_columns(scored, ["cos_late"])["cos_late"], dtype=np.float64)
        if np.isfinite(cos).any():
            columns["cos_late"] = cos
    blocks += [("h2", "Scores"),
               ("p", f"Distribution of the score and of its parts over all rows, the rows kept at the smallest "
                     f"ratio in red; dashed lines: the cut of each ratio. grad_early = G_{s}, grad_late = G_{t} "
                     f"(mean squared gradient norm over members), ens_var_late = V_{t} (variance over members), "
                     f"cos_late: the members' mean cosine between a row's gradient and their mean gradient of "
                     f"epoch {t}."),
               ("img", rel("scores.png"), "score histograms"),
               ("img", rel("drop_vs_variance.png"), "relative drop against late variance")]
    score_histograms(columns, first, cuts, column, os.path.join(fig_dir, "scores.png"))
    drop_vs_variance(parts["rel_drop"], parts["ens_var_late"], first, os.path.join(fig_dir, "drop_vs_variance.png"))

    curves = {}
    for h in run["proxy_log"]:
        for key, v in h.items():
            if key.startswith("loss_member_"):
                curves.setdefault(key[len("loss_"):], []).append((h.get("epoch", h.get("step")), v))
    if curves:
        line_plot(curves, os.path.join(fig_dir, "proxy_loss.png"), xlabel="epoch", ylabel="training loss",
                  title="Proxy members' training loss")
        blocks += [("h2", "Proxy ensemble"), ("img", rel("proxy_loss.png"), "proxy members' loss curves")]

    blocks.append(("h2", "Selection"))
    blocks.append(("table", ["selection", "rows kept", "of", "cut (lowest kept score)", "NaN/inf excluded"],
                   [[k, v["stats"].get("num_selected"), v["stats"].get("num_rows"),
                     _fmt(v["stats"].get("threshold")), v["stats"].get("num_nonfinite_excluded", "")]
                    for k, v in run["selections"].items()]))
    blocks += [("p", line) for line in sketch_lines(run["selections"])]
    for label in (c for c in LABEL_COLUMNS if c in scored.column_names):
        for name, mask in masks.items():
            blocks += [("p", f"{name}: what the selection kept, by {label!r}."),
                       ("table", [label, "rows", "kept", "kept of its rows", "share of selection", "share of data"],
                        label_breakdown(scored, mask, label))]

    if run["targets"]:
        blocks.append(("h2", "Target fine-tuning"))
        train = {k: [(h["step"], h["loss"]) for h in v["log"] if "loss" in h] for k, v in run["targets"].items()}
        evals = {k: [(h["step"], h["eval_loss"]) for h in v["log"] if "eval_loss" in h]
                 for k, v in run["targets"].items()}
        line_plot(train, os.path.join(fig_dir, "target_loss.png"), xlabel="optimizer step", ylabel="training loss",
                  title="Target training loss on each selection")
        blocks.append(("img", rel("target_loss.png"), "target training loss"))
        if any(evals.values()):
            line_plot(evals, os.path.join(fig_dir, "target_eval_loss.png"), xlabel="optimizer step",
                      ylabel="held-out loss", title="Target held-out loss")
            blocks.append(("img", rel("target_eval_loss.png"), "target held-out loss"))
        header = ["trained on", "rows", "final training loss", "final held-out loss", "best held-out loss"]
        blocks.append(("table", header,
                       [[k, v["metrics"].get("train_rows"), _fmt(v["metrics"].get("final_train_loss")),
                         _fmt(v["metrics"].get("final_eval_loss")), _fmt(v["metrics"].get("best_eval_loss"))]
                        for k, v in run["targets"].items()]))
    if run["push"].get("commits"):
        blocks += [("h2", "Published"), ("table", ["repo", "commit"], list(run["push"]["commits"].items()))]

    blocks += _examples(scored, values, column)
    return blocks


def _fmt(value) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _examples(scored, values: np.ndarray, column: str, k: int = 5) -> list[tuple]:
    text_cols = [c for c in TEXT_COLUMNS if c in scored.column_names][:3]
    labels = [c for c in LABEL_COLUMNS if c in scored.column_names][:2]
    finite = np.flatnonzero(np.isfinite(values))
    order = finite[np.argsort(-values[finite], kind="stable")]
    out = []
    for title, idx in ((f"Top {k} rows by {column}", order[:k]), (f"Bottom {k} rows by {column}", order[::-1][:k])):
        rows = [[_fmt(float(values[i])), *[_short(scored[int(i)][c]) for c in text_cols],
                 *[scored[int(i)][c] for c in labels]] for i in idx]
        out += [("h2", title), ("table", [column, *text_cols, *labels], rows)]
    return out


def write_report(output_dir: str) -> dict[str, str]:
    """Write ``report.md``, ``report.html`` and the PNGs in ``report/`` for the run in ``output_dir``."""
    out = os.path.abspath(output_dir)
    if not os.path.isdir(out):
        raise FileNotFoundError(f"No run folder {output_dir!r}: pass the --output_dir of `hf-gradfilter run`.")
    if not os.path.exists(os.path.join(out, "run_args.json")):
        raise ValueError(f"{output_dir!r} is not a `hf-gradfilter run` output dir (no run_args.json): pass the "
                         "--output_dir of `hf-gradfilter run`.")
    fig_dir = os.path.join(out, "report")
    os.makedirs(fig_dir, exist_ok=True)
    blocks = report_blocks(_load_run(out), fig_dir)
    paths = {"md": os.path.join(out, "report.md"), "html": os.path.join(out, "report.html")}
    with open(paths["md"], "w") as f:
        f.write(_md(blocks))
    with open(paths["html"], "w") as f:
        f.write(_html(blocks, "hf-gradfilter run report"))
    return paths


@dataclass
class ReportArguments:
    """Which run to report on."""

    output_dir: str = field(metadata={"help": "The --output_dir of `hf-gradfilter run`."})


def report(args: ReportArguments) -> dict[str, str]:
    """``hf-gradfilter report DIR``: rebuild the report of a run and print where it is."""
    paths = write_report(args.output_dir)
    print(f"Report: {paths['html']}  (markdown: {paths['md']})")
    return paths
