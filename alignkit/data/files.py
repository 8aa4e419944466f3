"""Data files -> raw rows (dicts), each with where it came from ("file line N") for error messages.

JSON, JSON lines and CSV are read as bytes and decoded here, so that a file saved in another encoding is
named with the line of its first bad byte. A folder or a hub id goes through `datasets`; when that fails
on a local folder, the folder's files are read one by one to name the file at fault (not UTF-8, not valid
JSON, or columns that differ from the first file's).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import tempfile
from collections import Counter
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from alignkit.config.cache import user_cache_dir
from alignkit.errors import UserError


def decode_utf8(data: bytes, path: str, first_line: int = 1) -> str:
    """`data` as text, or a UserError naming the line (counted from `first_line`) of the first bad byte.

    A leading byte-order mark (Excel's "CSV UTF-8", Notepad) is dropped: it would otherwise become part of
    the first column's name or break the first JSON line."""
    data = data.removeprefix(b"\xef\xbb\xbf")  # not decoded as utf-8-sig: its error offsets skip the mark
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = first_line + data.count(b"\n", 0, exc.start)
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1  # in bytes
        # the fixed copy ends in .utf8 until it replaces the file: `datasets` reads every data file of a folder
        fix = f"iconv -f latin1 -t utf-8 {path} > {path}.utf8 && mv {path}.utf8 {path}"
        raise UserError(
            f"{path} line {line}: not UTF-8 (byte 0x{data[exc.start]:02x} at column {column}); re-save the "
            f"file as UTF-8, e.g. `{fix}` if it is Latin-1"
        ) from exc


def _read_jsonl(path: str) -> tuple[list[dict], list[str]]:
    rows, where = [], []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            line = decode_utf8(raw, path, lineno)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(
                    f"{path} line {lineno}: not valid JSON ({exc.msg} at column {exc.colno}); "
                    "each line of a .jsonl file must be one JSON object"
                ) from exc
            if not isinstance(row, dict):
                raise UserError(f"{path} line {lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
            where.append(f"{path} line {lineno}")
    return rows, where


def _read_json(path: str) -> tuple[list[dict], list[str]]:
    with open(path, "rb") as fh:
        text = decode_utf8(fh.read(), path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # a JSON-lines file named .json
            return _read_jsonl(path)
        raise UserError(
            f"{path} line {exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})"
        ) from exc
    if isinstance(data, dict):  # {"train": [...]} or a dict of columns
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(data) == 1 and lists:
            data = lists[0]
        elif lists and all(isinstance(v, list) and len(v) == len(lists[0]) for v in data.values()):
            data = [dict(zip(data.keys(), vals)) for vals in zip(*data.values())]
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of objects (one per row)")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise UserError(f"{path} row {i + 1}: expected a JSON object, got {type(row).__name__}")
    return data, [f"{path} row {i + 1}" for i in range(len(data))]


def _read_csv(path: str) -> tuple[list[dict], list[str]]:
    with open(path, "rb") as fh:
        text = decode_utf8(fh.read(), path)
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    for row in rows:  # CSV has no booleans: read the usual spellings of a label
        if isinstance(row.get("label"), str) and row["label"].strip().lower() in ("true", "false"):
            row["label"] = row["label"].strip().lower() == "true"
    return rows, [f"{path} line {i + 2}" for i in range(len(rows))]  # line 1 is the header


def _read_parquet(path: str) -> tuple[list[dict], list[str]]:
    import datasets

    ds = datasets.Dataset.from_parquet(path)
    return ds.to_list(), [f"{path} row {i + 1}" for i in range(len(ds))]


READERS: dict[str, Callable[[str], tuple[list[dict], list[str]]]] = {
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
}


def looks_like_hub_id(name: str) -> bool:
    """`owner/name` without a file extension: what `datasets.load_dataset` takes as a hub data set."""
    parts = name.split("/")
    return (
        len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~")) and "." not in parts[1][-6:]
    )


def read_rows(
    source: str, split: str = "train", subset: str | None = None, folder: str | None = None
) -> tuple[list[dict], list[str]]:
    """Rows of a local file (JSON, JSONL, CSV, Parquet), a local data-set folder or a hub data set.

    `subset` and `folder` (a hub data set's configuration name and sub-folder) go to `datasets.load_dataset`
    as `name=` and `data_dir=`."""
    if os.path.isfile(source):
        ext = os.path.splitext(source)[1].lower()
        if ext not in READERS:
            raise UserError(f"{source}: unknown file type `{ext}`; use .json, .jsonl, .csv or .parquet")
        return READERS[ext](source)
    if os.path.isdir(source) or looks_like_hub_id(source):
        return load_with_datasets(source, split, subset, folder)
    raise UserError(
        f"dataset {source} does not exist (give a .json/.jsonl/.csv/.parquet file, a folder, "
        "or a hub id such as `trl-lib/ultrafeedback_binarized`)"
    )


def load_with_datasets(
    source: str, split: str, subset: str | None = None, folder: str | None = None
) -> tuple[list[dict], list[str]]:
    """A hub id or a local folder, through `datasets.load_dataset` (the same call for both)."""
    import datasets

    try:
        ds = datasets.load_dataset(source, name=subset, data_dir=folder, split=split)
        rows = ds.to_list()  # pyarrow lets bytes that are not UTF-8 through to here
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetGenerationError) as exc:
        if os.path.isdir(source):
            check_folder(source)  # names the file at fault, when it is one of the mistakes it knows
        raise UserError(
            f"dataset {source} (split `{split}`{f', subset `{subset}`' if subset else ''}) could not be loaded: {_root_cause(exc)}"
        ) from exc
    return rows, [f"{source} row {i + 1}" for i in range(len(rows))]


def _root_cause(exc: BaseException) -> str:
    """The innermost exception's message on one line (`datasets` wraps the useful one)."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return " ".join(str(exc).split())[:400]


def _data_files(folder: str) -> list[str]:
    """The files `datasets` may read from a folder (those with a data extension), sorted by path."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [
            os.path.join(root, f)
            for f in files
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in READERS
        ]
    return sorted(found)


def _columns(path: str) -> list[str]:
    if path.lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        return sorted(pq.read_schema(path).names)
    rows, _ = READERS[os.path.splitext(path)[1].lower()](path)
    return sorted({key for row in rows for key in row if isinstance(key, str)})


def check_folder(folder: str) -> None:
    """Raise a UserError naming the file of `folder` that is not UTF-8 or not valid JSON, or two files
    whose columns differ (`datasets` reads every file of a folder, every split too, as one table)."""
    first: tuple[str, list[str]] | None = None
    for path in _data_files(folder):
        columns = _columns(path)
        if first is None:
            first = (path, columns)
        elif columns != first[1]:
            raise UserError(
                f"dataset folder {folder}: {first[0]} has columns {', '.join(first[1])} but {path} has "
                f"columns {', '.join(columns)}; `datasets` reads every file of a folder (every split too) "
                "as one table, so give the files the same columns or point `dataset` at one file"
            )


# ----------------------------------------------------------------------- values inside rows: tools, media
MEDIA = ("images", "videos", "audios")
PLACEHOLDERS = ("<image>", "<video>", "<audio>")


def parse_tools(value: Any, where: str) -> list[dict] | None:
    """A `tools` column (JSON text or a list) -> [{"type": "function", "function": {name, ...}}], or None."""
    data = value
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            data = json.loads(value)
        except json.JSONDecodeError as exc:
            raise UserError(
                f"{where}: `tools` is not valid JSON ({exc.msg} at column {exc.colno}); give a JSON list of "
                "{name, description, parameters} function schemas"
            ) from exc
    if data is None:
        return None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise UserError(f"{where}: `tools` must be a list of function schemas, got {type(data).__name__}")
    out = []
    for i, tool in enumerate(data):
        if (
            isinstance(tool, dict)
            and tool.get("type") == "function"
            and isinstance(tool.get("function"), dict)
        ):
            out.append(tool)
        elif isinstance(tool, dict) and "name" in tool:
            out.append({"type": "function", "function": tool})
        else:
            raise UserError(
                f"{where}: tool {i} of `tools` needs a `name` (a function schema: name, parameters)"
            )
    return out or None


def parse_tool_calls(value: Any, where: str, what: str) -> list[dict]:
    """A function call (JSON text, a dict or a list of them; LLaMA-Factory's `function_call` turn or an
    OpenAI `tool_calls` list) -> [{"type": "function", "function": {"name", "arguments"}}]."""
    data = value
    if isinstance(value, str):
        try:
            data = json.loads(value)
        except json.JSONDecodeError:
            data = None
    calls = data if isinstance(data, list) else [data]
    out = []
    for call in calls:
        if isinstance(call, dict) and isinstance(call.get("function"), dict):
            call = call["function"]
        if not isinstance(call, dict) or "name" not in call or "arguments" not in call:
            shown = value if isinstance(value, str) else json.dumps(value, default=str)
            raise UserError(
                f'{where}: {what} must be JSON {{"name": ..., "arguments": {{...}}}} (or a list of them), '
                f"got {shown[:120]!r}; fix the row or drop it"
            )
        args = call["arguments"]
        if isinstance(args, str):  # OpenAI sends the arguments as JSON text
            try:
                parsed = json.loads(args)
            except json.JSONDecodeError:
                parsed = None
            args = parsed if isinstance(parsed, dict) else args
        out.append({"type": "function", "function": {"name": str(call["name"]), "arguments": args}})
    if not out:
        raise UserError(f"{where}: {what} holds no function call")
    return out


@dataclass
class Dropped:
    """What one `load_examples` call dropped from the rows (alignkit trains text models)."""

    rows: Counter = field(default_factory=Counter)  # "images" -> rows that had any
    files: Counter = field(default_factory=Counter)  # "images" -> how many files those rows named
    parts: Counter = field(default_factory=Counter)  # content part type -> how many

    def media(self, row: dict) -> bool:
        """Count the media of one row; True when it had any."""
        found = False
        for key in MEDIA:
            value = row.get(key)
            n = len(value) if isinstance(value, list) else int(bool(value))
            if n:
                self.rows[key] += 1
                self.files[key] += n
                found = True
        return found

    def message(self) -> str | None:
        said = [f"{self.rows[k]} rows had {k} ({self.files[k]} files)" for k in MEDIA if self.rows[k]]
        if self.parts:
            kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(self.parts.items()))
            said.append(f"{sum(self.parts.values())} non-text content parts ({kinds})")
        if not said:
            return None
        placeholders = (
            "; their <image>/<video>/<audio> placeholders were taken out of the text" if self.rows else ""
        )
        return f"{', '.join(said)}: dropped; alignkit trains text models{placeholders}"


DROPPED: ContextVar[Dropped | None] = ContextVar("alignkit_dropped", default=None)


def drop_part(kind: str) -> None:
    """Count one non-text content part left out of a message."""
    dropped = DROPPED.get()
    if dropped is not None:
        dropped.parts[kind] += 1


def strip_placeholders(text: str) -> str:
    """`text` without LLaMA-Factory's media placeholders (and the spaces they leave at either end)."""
    out = text
    for tag in PLACEHOLDERS:
        out = out.replace(tag, "")
    return out.strip() if out != text else text


def rows_file(rows: Any, what: str = "dataset") -> str:
    """A data set handed over in memory (a `datasets.Dataset`, or a list of dicts in any format alignkit reads)
    as a JSONL file in the user cache, named by its content: the run's config records a path that reproduces
    it, and the same rows always give the same file (so compare's fingerprints stay equal)."""
    if hasattr(rows, "to_list"):  # datasets.Dataset
        rows = rows.to_list()
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise UserError(
            f"`{what}`: give a file path, a datasets.Dataset or a list of dicts (got {type(rows).__name__})"
        )
    if not rows:
        raise UserError(f"`{what}`: the list of rows is empty")
    try:
        text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
    except TypeError as exc:
        raise UserError(f"`{what}`: rows must hold JSON values (text, numbers, lists, dicts): {exc}") from exc
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]
    folder = os.path.join(user_cache_dir(), "datasets")
    path = os.path.join(folder, f"{digest}.jsonl")
    if not os.path.isfile(path):
        os.makedirs(folder, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")  # one per writer: threads never share it
        with os.fdopen(handle, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    return path


def write_json_atomic(path: str, value: Any) -> None:
    """`value` as indented JSON, written beside `path` and renamed over it (replaced whole or not at all)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(value, fh, indent=2, ensure_ascii=False)
        fh.write("\n")
    os.replace(tmp, path)


def write_jsonl_atomic(path: str, rows: list[dict]) -> None:
    """Write beside `path` and rename over it: an existing file is replaced whole or not at all."""
    if os.path.isdir(path):
        raise UserError(f"--output {path} is a folder; give a file path such as {path}/kto.jsonl")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        mode = os.stat(path).st_mode & 0o777 if os.path.exists(path) else 0o644
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise UserError(f"--output {path}: cannot write there ({exc.strerror})") from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
