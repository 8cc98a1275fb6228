"""Rows in and out: a `datasets.Dataset` from a local file, a ``save_to_disk`` folder or the Hub, and back."""

from __future__ import annotations

import logging
import os

DATA_EXTENSIONS = ("json", "jsonl", "csv", "parquet", "arrow")


def load_rows(name: str, config: str | None = None, split: str = "train", revision: str | None = None):
    """A `datasets.Dataset` from a local file, a save_to_disk folder, or the Hub (at ``revision``: a branch, tag or
    commit; default: the latest on ``main``)."""
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

    check_revision(name, revision)
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
        quiet = logging.getLogger("datasets.packaged_modules")  # its readers log a failure before raising it;
        level = quiet.level  # the ValueError below says it in one line
        quiet.setLevel(logging.CRITICAL)
        try:
            return load_dataset(builder, data_files=name, split="train")
        except StopIteration:  # datasets' json reader on a file with no rows
            raise ValueError(f"The dataset file {name!r} is empty: there is nothing to score.") from None
        except OSError:  # the disk, the cache folder: not the file's fault; said as it is
            raise
        except Exception as err:
            if ext == "jsonl":  # names the bad line; datasets' own error is a long pyarrow traceback
                check_json_lines(name)
            elif ext == "json":
                check_json_file(name)
            cause = err
            while cause.__cause__ or cause.__context__:
                cause = cause.__cause__ or cause.__context__
            detail = (str(cause).strip().splitlines() or [type(cause).__name__])[0].rstrip(".")
            raise ValueError(f"Cannot read {name!r} as a .{ext} file: {detail}. Fix the file, or save it again "
                             "with the tool that wrote it.") from err
        finally:
            quiet.setLevel(level)
    if os.path.isdir(name):
        if any(os.path.exists(os.path.join(name, f)) for f in ("dataset_info.json", "dataset_dict.json")):
            data = load_from_disk(name)
            if isinstance(data, DatasetDict):
                if split not in data:
                    raise ValueError(f"Split {split!r} not in {name} (splits: {list(data)}); pass --dataset_split.")
                data = data[split]
            return data
        return load_dataset(name, config, split=split)
    if os.sep in name and not name.count("/") == 1 or os.path.splitext(name)[1][1:].lower() in DATA_EXTENSIONS:
        raise FileNotFoundError(f"No file or folder {name!r}, and it is not a Hub dataset id (namespace/name); "
                                "check the path.")
    try:
        return load_dataset(name, config, split=split, revision=revision)
    except ConnectionError as err:  # offline (HF_HUB_OFFLINE=1) or no network: datasets' error is a traceback
        raise FileNotFoundError(f"No file or folder {name!r}, and the Hub could not be reached to look it up as a "
                                f"dataset id ({err}); check the path.") from None


def check_revision(name: str | None, revision: str | None) -> None:
    """Refuse a Hub revision (``--dataset_revision``) for a local file or folder."""
    if revision is not None and name and os.path.exists(name):
        raise ValueError(f"--dataset_revision {revision} is for a Hub dataset; {name!r} is a local "
                         f"{'file' if os.path.isfile(name) else 'folder'}: drop --dataset_revision.")


def check_json_lines(path: str) -> None:
    """Refuse a JSON Lines file with a line that is not one JSON object, naming the line and the parse error
    (``datasets`` reports it as a long pyarrow traceback ending in "An error occurred while generating the
    dataset"). Blank lines are allowed. Called only after ``datasets`` failed to read the file."""
    import json

    with open(path, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path!r} line {number} is not valid JSON ({err.msg} at column {err.colno}): "
                                 f"{line.strip()[:80]!r}. Fix or remove that line; a .jsonl file holds one JSON "
                                 "object per line.") from None
            if not isinstance(value, dict):
                raise ValueError(f"{path!r} line {number} is a JSON {type(value).__name__}, not an object with "
                                 "one field per column: a .jsonl file holds one JSON object per line.")


def check_json_file(path: str) -> None:
    """Refuse a .json file that is not one JSON list of objects (nor JSON Lines), naming the line and column of
    a syntax error or the first item that is not an object. Called only after ``datasets`` failed to read it."""
    import json

    with open(path, encoding="utf-8-sig") as f:
        text = f.read()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        first = text.lstrip().split("\n", 1)[0]
        if err.lineno > 1 and first.startswith("{") and first.rstrip().endswith("}"):
            check_json_lines(path)  # one object per line under a .json name: datasets reads that too
            return  # valid JSON Lines: the caller reports datasets' own reason
        raise ValueError(f"{path!r} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}). A "
                         ".json file holds one JSON list of objects, one per row; or use .jsonl, one object per "
                         "line.") from None
    items = value if isinstance(value, list) else [value]
    bad = next((i for i, item in enumerate(items) if not isinstance(item, dict)), None)
    if bad is not None:
        what = f"item {bad} of its list is" if isinstance(value, list) else "it holds"
        raise ValueError(f"{path!r}: {what} a JSON {type(items[bad]).__name__}, not an object with one field per "
                         "column: a .json file holds one JSON list of objects, one per row.")


def save_rows(dataset, path: str) -> str:
    ext = path.rsplit(".", 1)[-1].lower() if "." in os.path.basename(path) else ""
    if ext in ("jsonl", "json"):
        dataset.to_json(path, lines=ext == "jsonl")
    elif ext == "parquet":
        dataset.to_parquet(path)
    else:
        dataset.save_to_disk(path)
    return path
