"""Errors at the door: bad inputs to the CLI and the public API, each with the one-line message the user gets.

Every case in `CASES` runs in its own empty folder (the working directory while it runs), fails before any
training, and must give one line that names the problem (the bad value, file, line or column) and the fix. The
same cases render docs/bad_inputs.md, and a test keeps that page equal to what the code prints now. Rewrite it
after changing a message:

    PYTHONPATH=src python tests/test_bad_inputs.py
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shlex
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset

from hf_gradfilter import (
    GradFilterConfig,
    GradientRecord,
    InstructionFormat,
    near_duplicates,
    select_top,
    tokenize_dataset,
)
from hf_gradfilter.cli import main

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad_inputs.md"
ROW = json.dumps({"instruction": "Name a drink.", "output": "tea"})


@dataclass(frozen=True)
class Case:
    id: str
    did: str  # what the user did, in the page's words
    build: Callable[[], object]  # CLI: writes its input into the cwd, returns the argv of `main`; API: the call
    problem: str  # the part of the message that names the bad value / file / line
    fix: str  # the part that says what to do
    call: str = ""  # API cases: the call as the page shows it
    error: type[Exception] = ValueError  # API cases: what the call raises


def write(name: str, text: str | bytes) -> str:
    path = Path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return name


def scored() -> str:
    """A scored dataset folder: a gsnr column and a task column, as `select` reads it."""
    Dataset.from_dict({"gsnr": [0.3, 0.1, 0.2, 0.5], "task": ["code", "math", "code", "chat"]}).save_to_disk("scored")
    return "scored"


def tiny_tokenizer():
    from hf_gradfilter.demo.tiny import train_tokenizer

    return train_tokenizer(["Name a drink. tea coffee " * 4], vocab_size=300)


def proxy() -> str:
    """A tiny proxy model folder, so `score` gets as far as the data checks of the trainer (no download)."""
    from hf_gradfilter.demo.tiny import tiny_gpt2

    tokenizer = tiny_tokenizer()
    tiny_gpt2(tokenizer, n_layer=1, n_embd=16, n_head=2).save_pretrained("proxy")
    tokenizer.save_pretrained("proxy")
    return "proxy"


def score_file(name: str, text: str, *flags: str) -> list[str]:
    return ["score", "--dataset_name", write(name, text), "--model_name_or_path", proxy(), *flags]


def select(*flags: str, column: str = "gsnr") -> list[str]:
    return ["select", "--scored", scored(), "--score_column", column, *flags]


def mkdir(name: str) -> str:
    Path(name).mkdir()
    return name


def finished_score_stage(folder: str) -> str:
    """A run folder whose score stage finished with other inputs (another dataset and proxy model)."""
    Path(folder, "score").mkdir(parents=True)
    Path(folder, "score", "stage.json").write_text(json.dumps({
        "stage": "score", "fingerprint": "0" * 16, "complete": True, "seconds": 5400,
        "inputs": {"dataset": {"path": "alpaca.jsonl"}, "model": "gpt2"}}))
    return folder


CASES = [
    # ---- the data file
    Case("jsonl_bad_line", "A .jsonl file with a line that is not JSON (a missing quote)",
         lambda: ["select", "--scored", write("rows.jsonl", ROW + '\n{"instruction: "x"}\n')],
         "'rows.jsonl' line 2 is not valid JSON", "Fix or remove that line"),
    Case("jsonl_list_line", "A .jsonl line that is a JSON list, not an object",
         lambda: ["select", "--scored", write("rows.jsonl", ROW + '\n["Name a drink.", "tea"]\n')],
         "'rows.jsonl' line 2 is a JSON list", "one JSON object per line"),
    Case("json_not_list", "A .json file holding one string instead of a list of rows",
         lambda: ["select", "--scored", write("rows.json", '"Name a drink."')],
         "'rows.json': it holds a JSON str", "one JSON list of objects, one per row"),
    Case("json_cut_off", "A .json file cut off in the middle",
         lambda: ["select", "--scored", write("rows.json", f'[{ROW},\n {{"instruction": "x"')],
         "'rows.json' is not valid JSON (Expecting ',' delimiter at line 2, column 21)", "or use .jsonl"),
    Case("json_item_not_object", "A .json list with a number among the rows",
         lambda: ["select", "--scored", write("rows.json", f"[{ROW}, 7]")],
         "item 1 of its list is a JSON int", "one JSON list of objects"),
    Case("csv_ragged", "A .csv row with more fields than the header",
         lambda: ["select", "--scored", write("rows.csv", "instruction,output\nName a drink.,tea\nx,y,z\n")],
         "'rows.csv' as a .csv file: Error tokenizing data. C error: Expected 2 fields in line 3, saw 3",
         "Fix the file"),
    Case("latin1_csv", "A .csv file saved as Latin-1, not UTF-8",
         lambda: ["select", "--scored", write("rows.csv", b"instruction,output\nName a drink.,caf\xe9\n")],
         "is not valid UTF-8 (first bad byte at line 2, byte offset 36)", "iconv -f latin1 -t utf-8"),
    Case("parquet_not_parquet", "A .parquet file that is not Parquet",
         lambda: ["select", "--scored", write("rows.parquet", ROW)],
         "'rows.parquet' as a .parquet file: Parquet magic bytes not found", "save it again"),
    Case("unknown_extension", "A data file with an extension it cannot read (.txt)",
         lambda: ["select", "--scored", write("rows.txt", ROW)],
         "Cannot read 'rows.txt'", "use a .json, .jsonl, .csv or .parquet file"),
    Case("missing_file", "A data file name with a typo",
         lambda: ["score", "--dataset_name", "trian.jsonl"],
         "No file or folder 'trian.jsonl'", "check the path"),
    Case("missing_folder", "`select --scored` of a folder that does not exist",
         lambda: ["select", "--scored", "runs/out/scored"],
         "No file or folder 'runs/out/scored'", "check the path"),
    # ---- score
    Case("demo_and_file", "`score --demo` together with `--dataset_name`",
         lambda: ["score", "--demo", "--dataset_name", write("rows.jsonl", ROW)],
         "got both: --dataset_name rows.jsonl", "Pass either --demo or --dataset_name"),
    Case("revision_of_local_file", "`--dataset_revision` with a local file (a Hub dataset's branch, tag or commit)",
         lambda: ["score", "--dataset_name", write("rows.jsonl", ROW + "\n"), "--dataset_revision", "v1.0"],
         "--dataset_revision v1.0 is for a Hub dataset; 'rows.jsonl' is a local file", "drop --dataset_revision"),
    Case("no_format", "Columns that fit no instruction format",
         lambda: score_file("rows.jsonl", '{"question": "Name a drink.", "answer": "tea"}\n'),
         "Cannot tell the dataset format from its columns ['answer', 'question']", "pass the column names"),
    Case("missing_column", "`--output_column` naming a column the file lacks",
         lambda: score_file("rows.jsonl", ROW, "--dataset_format", "alpaca", "--output_column", "answer"),
         "needs column(s) ['answer']", "pass the matching --*_column option"),
    Case("list_in_text", "A list where the instruction text should be",
         lambda: score_file("rows.jsonl", '{"instruction": ["Name", "a drink."], "output": "tea"}\n'),
         "Column 'instruction' of example id 0 holds a list", "Convert the column to strings"),
    Case("messages_string", "A `messages` column holding plain strings",
         lambda: score_file("rows.jsonl", '{"messages": "Name a drink."}\n'),
         "Column 'messages' of example id 0 holds a str", "a list of {'role': ..., 'content': ...} dicts"),
    Case("all_empty", "Every response empty",
         lambda: score_file("rows.jsonl", '{"instruction": "Name a drink.", "output": ""}\n'),
         "1 row(s) have an empty response", "fill in the responses"),
    Case("missing_model", "`--model_name_or_path` of a folder that does not exist",
         lambda: ["score", "--dataset_name", write("rows.jsonl", ROW), "--model_name_or_path", "./models/proxy"],
         "No model folder './models/proxy'", "a folder saved with save_pretrained or a Hub model id"),
    Case("late_epoch", "`--late_epoch 3` with 2 training epochs",
         lambda: ["score", "--dataset_name", write("rows.jsonl", ROW), "--late_epoch", "3"],
         "late_epoch=3 is outside the 2 epoch(s) trained", "raise num_train_epochs"),
    Case("fractional_epochs", "`--num_train_epochs 1.5`",
         lambda: ["score", "--dataset_name", write("rows.jsonl", ROW), "--num_train_epochs", "1.5"],
         "num_train_epochs=1.5", "use an integer >= 1"),
    Case("sketch_epoch", "`--sketch_epochs 3` with 2 training epochs",
         lambda: ["score", "--dataset_name", write("rows.jsonl", ROW), "--sketch_dim", "256", "--sketch_epochs", "3"],
         "sketch_epochs=[3]", "give distinct epochs in 1..2"),
    # ---- select
    Case("unknown_score_column", "`--score_column` that is not a column",
         lambda: select(column="g_snr"), "Score column 'g_snr' is not in the dataset",
         "score it first or pick another column"),
    Case("text_score_column", "`--score_column` naming a text column",
         lambda: select(column="task"), "Score column 'task' holds string values",
         "rank by a numeric column"),
    Case("ratio_outside", "`--ratio 1.5`", lambda: select("--ratio", "1.5"),
         "ratio/fraction=1.5 is outside (0, 1]", "use e.g. 0.1 for the top 10%"),
    Case("ratio_and_top_k", "Both `--ratio` and `--top_k`", lambda: select("--ratio", "0.5", "--top_k", "2"),
         "not both", "Pass either --ratio or --top_k"),
    Case("bad_cosine", "`--drop_near_duplicates 2` (not a cosine)", lambda: select("--drop_near_duplicates", "2"),
         "--drop_near_duplicates 2.0", "give a cosine in (0, 1], e.g. 0.98"),
    Case("no_sketch_columns", "`--drop_near_duplicates` on data scored without sketches",
         lambda: select("--drop_near_duplicates", "0.98"), "needs the column sketch_nearest_cos",
         "score --sketch_dim 1024"),
    Case("bad_jaccard", "`--drop_text_duplicates 2` (not a Jaccard similarity)", lambda: select(
        "--drop_text_duplicates", "2"), "--drop_text_duplicates 2.0", "give a Jaccard similarity in (0, 1], e.g. 0.7"),
    Case("no_text_columns", "`--drop_text_duplicates` on data without instruction, prompt or messages columns",
         lambda: select("--drop_text_duplicates", "0.7"), "Cannot tell the dataset format", "Rename the columns"),
    Case("quota_syntax", "`--quota code:2` (a colon, not =)",
         lambda: select("--group_column", "task", "--group_mode", "quota", "--quota", "code:2"),
         "Bad quota 'code:2'", "write GROUP=N"),
    Case("quota_unknown_group", "A quota for a group that is not in the data",
         lambda: select("--group_column", "task", "--group_mode", "quota", "--quota", "poetry=2"),
         "Quota for unknown group 'poetry'", "the groups are ['chat', 'code', 'math']"),
    Case("unknown_group_column", "`--group_column` that is not a column",
         lambda: select("--group_column", "source"), "Group column 'source' is not in the dataset",
         "pick the column that names each row's task or source"),
    Case("group_mode_alone", "`--group_mode per_group` without `--group_column`",
         lambda: select("--group_mode", "per_group"), "--group_mode per_group needs --group_column",
         "e.g. task or source"),
    Case("clusters_without_record", "`--diversity_clusters` on scored data away from its score run",
         lambda: select("--diversity_clusters", "2"), "No gradient_record.safetensors in <tmp>",
         "pass --proxy_dir"),
    Case("unknown_features", "`--features pixels`", lambda: select("--features", "pixels", "--diversity_clusters", "2"),
         "features='pixels'", "use one of sketch, embedding"),
    Case("embeddings_without_proxy", "`--features embedding` on scored data away from its score run",
         lambda: select("--features", "embedding", "--diversity_clusters", "2"),
         "holds no gradfilter_config.json", "give the output_dir of `hf-gradfilter score` (--proxy_dir)"),
    Case("flag_typo", "A flag with a typo (`--ratoi`)", lambda: select("--ratoi", "0.1"),
         "has no flag --ratoi (did you mean --ratio?)", "`hf-gradfilter select --help` lists its flags"),
    # ---- run, report, sweep, push
    Case("config_missing", "`run --config` of a file that does not exist", lambda: ["run", "--config", "run.yml"],
         "No config file 'run.yml'", "--config takes a YAML file of run flags"),
    Case("config_not_mapping", "`run --config` of a YAML list",
         lambda: ["run", "--config", write("run.yaml", "- demo\n")],
         "Config file 'run.yaml' must be a YAML mapping", "of flag names to values"),
    Case("config_bad_yaml", "`run --config` of a file that is not YAML (a bad indent)",
         lambda: ["run", "--config", write("run.yaml", "demo: true\n  ratio: 0.1\n")],
         "is not valid YAML (mapping values are not allowed here at line 2, column 8)", "one `flag_name: value`"),
    Case("config_unknown_key", "A `run --config` key that is not a flag",
         lambda: ["run", "--config", write("run.yaml", "demo: true\nratios: [0.1]\n")],
         "has the key 'ratios'", "did you mean ratio?"),
    Case("run_ratio", "`run --ratio 10` (a percentage)", lambda: ["run", "--demo", "--ratio", "10"],
         "ratio=10.0 is outside (0, 1]", "use e.g. --ratio 0.05 0.1 0.15"),
    Case("run_target_missing", "`run --target_model` of a folder that does not exist (checked before scoring)",
         lambda: ["run", "--dataset_name", write("rows.jsonl", ROW), "--target_model", "./models/llama"],
         "No model folder './models/llama': --target_model takes", "a Hub model id"),
    Case("run_target_no_config", "`run --target_model` of a folder that holds no model",
         lambda: ["run", "--dataset_name", write("rows.jsonl", ROW), "--target_model", mkdir("llama")],
         "The folder 'llama' (--target_model) holds no config.json", "pass a folder saved with save_pretrained"),
    Case("run_other_runs_folder", "`run --output_dir` of a folder holding another run's finished scoring",
         lambda: ["run", "--dataset_name", write("rows.jsonl", ROW), "--skip_finetune", "true",
                  "--output_dir", finished_score_stage("out")],
         "--output_dir out holds the score stage of another run (canaries, dataset", "it took 5400 s): pass "
         "another --output_dir, or delete"),
    Case("run_same_ratio_folder", "`run --ratio 0.12 0.124` (two ratios, one folder name)",
         lambda: ["run", "--demo", "--ratio", "0.12", "0.124"],
         "--ratio 0.12 0.124 name the same selection folder (top 12%)", "give ratios at least 0.01 apart"),
    Case("report_not_a_run", "`report` of a folder that is not a run output",
         lambda: ["report", mkdir("notes")],
         "'notes' is not a `hf-gradfilter run` output dir (no run_args.json)", "pass the --output_dir of"),
    Case("sweep_no_record", "`sweep --record` of a folder without a record",
         lambda: ["sweep", "--record", mkdir("out")],
         "No gradient record at out/gradient_record.safetensors", "run `hf-gradfilter score` first"),
    Case("sweep_damaged_record", "`sweep --record` of a damaged record file",
         lambda: ["sweep", "--record", write("gradient_record.safetensors", "cut"), "--score", "gsnr"],
         "is not a readable gradient record (Error while deserializing header", "run it again"),
    Case("push_repo_id", "`push --repo_id` without a namespace",
         lambda: ["push", "--what", "proxy", "--repo_id", "alpaca-top10", "--path", "."],
         "repo_id 'alpaca-top10' is invalid", "Use e.g. 'your-username/alpaca-gsnr-top10'"),
    # ---- the Python API
    Case("api_fraction_and_k", "`select_top` with both a fraction and k",
         lambda: select_top(Dataset.from_dict({"gsnr": [1.0, 2.0]}), "gsnr", fraction=0.5, k=1),
         "Pass exactly one of fraction", "(e.g. 0.1) or k (a row count)",
         call="select_top(ds, 'gsnr', fraction=0.5, k=1)"),
    Case("api_members", "A config with no ensemble members",
         lambda: GradFilterConfig(output_dir="out", num_members=0), "num_members=0",
         "needs at least 1 member", call="GradFilterConfig(output_dir='out', num_members=0)"),
    Case("api_format", "An instruction format that does not exist",
         lambda: InstructionFormat(kind="chatml").resolve(["messages"]), "Unknown dataset format 'chatml'",
         "choose one of", call="InstructionFormat(kind='chatml').resolve(ds.column_names)"),
    Case("api_dict_in_text", "A dict in a text column, to `tokenize_dataset`",
         lambda: tokenize_dataset(Dataset.from_dict({"instruction": ["a", "b"],
                                                             "output": [None, {"text": "y"}]}), tiny_tokenizer()),
         "Column 'output' of example id 1 holds a dict", "Convert the column to strings",
         call="tokenize_dataset(ds, tokenizer)  # ds['output'] == [None, {'text': 'y'}]"),
    Case("api_record_missing", "`GradientRecord.load` of a folder without a record",
         lambda: GradientRecord.load(mkdir("out")), "No gradient record at out/gradient_record.safetensors",
         "run `hf-gradfilter score` first", call="GradientRecord.load('out')  # out/ exists, no record",
         error=FileNotFoundError),
    Case("api_search_without_faiss", "Approximate near-duplicate search without the optional faiss",
         lambda: without_faiss(lambda: near_duplicates(np.ones((4, 8)), 0.98, search="approx")),
         "search='approx' needs faiss", "pip install 'hf-gradfilter[ann]'",
         call="near_duplicates(sketches, 0.98, search='approx')  # faiss not installed", error=ImportError),
    Case("api_search_name", "A near-duplicate search that does not exist",
         lambda: near_duplicates(np.ones((4, 8)), 0.98, search="fast"), "search='fast'",
         "choose one of auto, exact, approx", call="near_duplicates(sketches, 0.98, search='fast')"),
]


def without_faiss(call):
    """``call()`` with ``import faiss`` failing, as where the optional extra is not installed."""
    saved = sys.modules.get("faiss")
    sys.modules["faiss"] = None
    try:
        return call()
    finally:
        if saved is None:
            del sys.modules["faiss"]
        else:
            sys.modules["faiss"] = saved


@contextlib.contextmanager
def quiet_progress():
    """Progress bars off (they are not part of the message); the log records and warnings a run would print,
    collected (the warnings when the block ends)."""
    import datasets
    import transformers

    bars = datasets.is_progress_bar_enabled(), transformers.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)

    def keep(record):  # a record of a library logger that propagates reaches the handler twice
        if record not in records:
            records.append(record)

    handler.emit = keep
    loggers = [logging.getLogger(name) for name in ("datasets", "transformers", "")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # each warning counts as a line, as one run of the CLI would print it
            yield records
        records.extend(logging.makeLogRecord({"msg": f"{w.category.__name__}: {w.message}"}) for w in caught)
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
        if bars[0]:
            datasets.enable_progress_bars()
        if bars[1]:
            transformers.utils.logging.enable_progress_bar()


def run_case(case: Case, where: Path) -> tuple[str, list[str], object]:
    """Run ``case`` in the folder ``where``: ``(the command or call as shown, the lines printed on stderr, the exit
    code or the exception)``, with ``where`` written ``<tmp>``."""
    here = os.getcwd()
    os.chdir(where)
    try:
        with quiet_progress() as records:
            if case.call:
                shown, outcome, lines = case.call, None, []
                try:
                    case.build()
                except Exception as err:  # noqa: BLE001 - the test checks its type
                    outcome, lines = err, f"{type(err).__name__}: {err}".splitlines()
            else:
                argv = case.build()
                shown, err = "hf-gradfilter " + shlex.join(argv), io.StringIO()
                with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                    outcome = main(argv)
                lines = err.getvalue().splitlines()
        lines += [f"[log] {r.getMessage()}" for r in records]
    finally:
        os.chdir(here)
    for path in {str(where), os.path.realpath(where)}:
        lines = [line.replace(path, "<tmp>") for line in lines]
    return shown, lines, outcome


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gets_one_line_naming_the_problem_and_the_fix(case, tmp_path):
    shown, lines, outcome = run_case(case, tmp_path)
    assert len(lines) == 1, lines  # one line: no traceback, no log noise
    message = lines[0]
    if case.call:
        assert isinstance(outcome, case.error), (outcome, message)
    else:
        assert outcome == 2, message
        assert message.startswith(f"hf-gradfilter {shown.split()[1]}: error: "), message
    assert case.problem in message, message
    assert case.fix in message, message
    assert "Traceback" not in message


def cell(text: str) -> str:
    """``text`` as a Markdown table cell in a code span (backticks inside are kept: the span uses two)."""
    text = text.replace("|", "\\|")
    return f"`` {text} ``" if "`" in text else f"`{text}`"


PAGE_HEAD = """# Bad inputs and what they print

What `hf-gradfilter` and the Python API say when an input is wrong: each row is a mistake a user can make, the
command or call, and the whole message: one line on stderr with exit code 2, or the exception raised. Every
message names the bad value, file, line or column and what to do, before any training starts.

Each row is a test in `tests/test_bad_inputs.py` (`CASES`), run in an empty folder (written `<tmp>`) holding
only the input the row describes (and, where `--model_name_or_path proxy` is passed, a tiny model folder, so
`score` reaches its data checks without a download); progress bars are turned off. A test keeps this page equal
to what the code prints; after changing a message, rewrite it with `PYTHONPATH=src python tests/test_bad_inputs.py`.

"""


def render_table() -> str:
    rows = ["| # | What the user did | Command or call | Message |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for number, case in enumerate(CASES, 1):
            where = Path(tmp) / case.id
            where.mkdir()
            shown, lines, _ = run_case(case, where)
            rows.append(f"| {number} | {case.did} | {cell(shown)} | {cell(' '.join(lines))} |")
    return PAGE_HEAD + "\n".join(rows) + "\n"


def test_the_page_shows_what_the_code_prints_now():
    assert DOC.read_text() == render_table(), "stale: rewrite it with PYTHONPATH=src python tests/test_bad_inputs.py"


if __name__ == "__main__":
    DOC.write_text(render_table())
    print(f"Wrote {DOC} ({len(CASES)} cases)")
