"""LLaMA-Factory's data, read unchanged: the names of `dataset_info.json`, and the messages of its files.

A data source that is not an existing file or folder but a key of `<dataset_dir>/dataset_info.json` is read
through that entry: `file_name` (or `hf_hub_url`), `formatting` (alpaca | sharegpt | openai), `ranking`,
`columns` (LLaMA-Factory's column names -> the file's) and `tags` (the keys and speaker names of ShareGPT
turns). Each row is rewritten into the canonical row of one of alignkit's formats (`instruction`/`input`/
`output`, `conversations` with `human`/`gpt`/`observation`/`function_call`/`system` speakers, `chosen`/
`rejected`, `kto_tag`, `tools`, `images`...), which `formats.py` converts as it converts any file.

Messages of every file are read here too: ShareGPT turns and {role, content} messages, whose content may be
a list of parts (text parts are joined; `tool_call` parts and `function_call` turns become `tool_calls`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from alignkit.data.files import (
    MEDIA,
    READERS,
    drop_part,
    load_with_datasets,
    looks_like_hub_id,
    parse_tool_calls,
    read_rows,
)
from alignkit.errors import UserError, did_you_mean

# a message: {"role", "content": str}, and "tool_calls" on an assistant message that calls tools
Messages = list[dict[str, Any]]

DATASET_INFO = "dataset_info.json"
FORMATTINGS = ("alpaca", "sharegpt", "openai")
COLUMNS = (
    "prompt",
    "query",
    "response",
    "history",
    "messages",
    "system",
    "tools",
    "images",
    "videos",
    "audios",
    "chosen",
    "rejected",
    "kto_tag",
)
DEFAULT_COLUMNS = {
    "alpaca": {"prompt": "instruction", "query": "input", "response": "output"},
    "sharegpt": {"messages": "conversations"},
}
DEFAULT_TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}
# the speaker a tag's value becomes in alignkit's canonical ShareGPT row
SPEAKERS = {
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
    "observation": "tool",
    "tool": "tool",
    "function_call": "assistant",
}


# ------------------------------------------------------------------------------------------- messages
def content_of(value: Any, where: str, what: str) -> tuple[str, list[dict]]:
    """(text, tool calls) of a message's content: a string, or a list of parts joined as LLaMA-Factory v1
    joins them (text parts end to end, `tool_call` parts become tool calls; other parts are dropped)."""
    if value is None:
        return "", []
    if not isinstance(value, list):
        return str(value), []
    text, calls = [], []
    for j, part in enumerate(value):
        kind = part.get("type", "text") if isinstance(part, dict) else None
        if kind == "text" and ("text" in part or "value" in part):
            value = part["text"] if "text" in part else part["value"]
            text.append("" if value is None else str(value))
        elif kind == "tool_call":
            calls += parse_tool_calls(part.get("value", part.get("text")), where, f"part {j} of {what}")
        elif isinstance(kind, str) and kind != "text":
            drop_part(kind)
        else:
            raise UserError(
                f'{where}: part {j} of {what} must be {{"type": "text", "text": ...}} (or "value"), got {part!r}'
            )
    return "".join(text), calls


def _message(role: str, content: Any, where: str, what: str, tool_calls: Any = None) -> dict[str, Any]:
    text, calls = content_of(content, where, what)
    if tool_calls:
        calls += parse_tool_calls(tool_calls, where, f"`tool_calls` of {what}")
    return {"role": role, "content": text, **({"tool_calls": calls} if calls else {})}


def messages_of(value: Any, where: str, name: str) -> Messages:
    """A list of {role, content} messages (OpenAI style; content a string or a list of parts) -> Messages."""
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise UserError(f"{where}: field `{name}` must be a list of {{role, content}} messages")
    out = []
    for i, m in enumerate(value):
        if "role" not in m or ("content" not in m and not m.get("tool_calls")):
            raise UserError(
                f"{where}: message {i} of `{name}` needs `role` and `content` (found: {', '.join(sorted(m))})"
            )
        out.append(
            _message(str(m["role"]), m.get("content"), where, f"message {i} of `{name}`", m.get("tool_calls"))
        )
    return out


def sharegpt_turns(value: Any, where: str, name: str) -> Messages:
    """ShareGPT {from, value} turns (one turn or a list) -> Messages; `function_call` turns become tool calls."""
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise UserError(f"{where}: field `{name}` must be a list of {{from, value}} turns")
    out = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise UserError(f"{where}: turn {i} of `{name}` needs `from` and `value`")
        speaker = str(turn["from"]).lower()
        role = SHAREGPT_ROLES.get(speaker)
        if role is None:
            raise UserError(
                f"{where}: turn {i} of `{name}` has unknown speaker `{turn['from']}` "
                f"(known: {', '.join(SHAREGPT_ROLES)})"
            )
        if speaker == "function_call":  # the model's call: an assistant message with tool_calls
            out.append(
                _message(
                    role, None, where, "", parse_tool_calls(turn["value"], where, f"turn {i} of `{name}`")
                )
            )
        else:
            out.append(_message(role, turn["value"], where, f"turn {i} of `{name}`"))
    return out


# ------------------------------------------------------------------------------------ dataset_info.json
def read_dataset_info(dataset_dir: str | None) -> tuple[dict | None, str]:
    """(the entries of `<dataset_dir>/dataset_info.json`, or None when there is no such file; its path)."""
    path = os.path.join(dataset_dir or "data", DATASET_INFO)
    if not os.path.isfile(path):
        return None, path
    with open(path, encoding="utf-8") as fh:
        try:
            info = json.load(fh)
        except json.JSONDecodeError as exc:
            raise UserError(
                f"{path} line {exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})"
            ) from exc
    if not isinstance(info, dict):
        raise UserError(f"{path}: expected a JSON object of data set names -> entries")
    return info, path


def locate(source: str, dataset_dir: str | None) -> LFDataset | None:
    """The dataset_info.json entry that `source` names; None when `source` is a path or a hub id."""
    if os.path.exists(source):
        return None
    info, path = read_dataset_info(dataset_dir)
    if info is not None and source in info:
        return LFDataset.from_entry(source, info[source], path)
    if looks_like_hub_id(source):
        return None
    if os.sep in source or os.path.splitext(source)[1].lower() in READERS:  # meant as a path
        raise UserError(f"dataset {source} does not exist (no such file or folder)")
    if info is None:
        where = f"{path} does not exist (set `dataset_dir` to the folder of LLaMA-Factory's {DATASET_INFO})"
    else:
        where = f"not a name in {path}{did_you_mean(source, info)}"
    raise UserError(
        f"dataset {source} does not exist: not a file or folder, {where}; give a .json/.jsonl/.csv/.parquet "
        "file, a folder, a hub id such as `trl-lib/ultrafeedback_binarized`, or a name of dataset_info.json"
    )


def _names(value: Any, known: tuple[str, ...] | dict, what: str, name: str, path: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{path}: `{what}` of `{name}` must be an object")
    for key, column in value.items():
        if key not in known:
            raise UserError(
                f"{path}: `{what}` of `{name}` has an unknown key `{key}`{did_you_mean(key, known)}; "
                f"known: {', '.join(known)}"
            )
        if not isinstance(column, str):
            raise UserError(f"{path}: `{what}.{key}` of `{name}` must be a string, got {column!r}")
    return dict(value)


@dataclass
class LFDataset:
    """One entry of dataset_info.json, resolved: where its rows are and how to read their columns."""

    name: str
    source: str  # a local file or folder, or a hub id
    info_path: str
    hub: bool = False  # `source` is a Hugging Face hub id (`hf_hub_url`)
    formatting: str = "alpaca"
    ranking: bool = False
    subset: str | None = None
    split: str | None = None  # None: the split the caller asks for
    folder: str | None = None
    columns: dict[str, str] = field(default_factory=dict)  # LLaMA-Factory's column -> the row's key
    tags: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_entry(cls, name: str, entry: Any, path: str) -> LFDataset:
        if not isinstance(entry, dict):
            raise UserError(
                f"{path}: the entry `{name}` must be an object (file_name, formatting, columns...)"
            )
        source, hub = _entry_source(name, entry, path)
        formatting = entry.get("formatting", "alpaca")
        if formatting not in FORMATTINGS:
            raise UserError(
                f"{path}: `formatting` of `{name}` is `{formatting}`{did_you_mean(str(formatting), FORMATTINGS)}; "
                f"known: {', '.join(FORMATTINGS)}"
            )
        columns = {**DEFAULT_COLUMNS["alpaca" if formatting == "alpaca" else "sharegpt"]}
        columns.update(_names(entry.get("columns"), COLUMNS, "columns", name, path))
        tags = {**DEFAULT_TAGS, **_names(entry.get("tags"), tuple(DEFAULT_TAGS), "tags", name, path)}
        return cls(
            name=name,
            source=source,
            info_path=path,
            hub=hub,
            formatting=formatting,
            ranking=bool(entry.get("ranking", False)),
            subset=entry.get("subset"),
            split=entry.get("split"),
            folder=entry.get("folder"),
            columns=columns,
            tags=tags,
        )

    def read(self, split: str) -> tuple[list[dict], list[str]]:
        if self.hub:
            return load_with_datasets(self.source, self.split or split, self.subset, self.folder)
        return read_rows(self.source, self.split or split, self.subset, self.folder)

    def to_canonical(self, row: dict, where: str, text: bool) -> tuple[dict, str, dict]:
        """(the row in alignkit's canonical keys, its format, the row's other columns). `text`: language
        modelling (`stage: pt`), the text is the first user turn, as LLaMA-Factory's pre-training takes it."""
        if self.formatting == "alpaca":
            canon, fmt = self._alpaca(row, where, text)
        else:
            canon, fmt = self._sharegpt(row, where, text)
        for key in ("tools", *MEDIA):
            if self._col(row, key) is not None:
                canon[key] = self._col(row, key)
        used = set(self.columns.values())
        return canon, fmt, {k: v for k, v in row.items() if k not in used}

    def _col(self, row: dict, key: str) -> Any:
        column = self.columns.get(key)
        return None if column is None else row.get(column)

    def _need(self, row: dict, key: str, where: str) -> Any:
        value = self._col(row, key)
        if value is None:
            raise UserError(
                f"{where}: no column `{self.columns.get(key, key)}` (LLaMA-Factory's `{key}` column of "
                f"`{self.name}` in {self.info_path}); found: {', '.join(sorted(row))}. Fix `columns` there"
            )
        return value

    def _alpaca(self, row: dict, where: str, text: bool) -> tuple[dict, str]:
        history = self._col(row, "history") if isinstance(self._col(row, "history"), list) else []
        query = [str(v) for v in (self._col(row, "prompt"), self._col(row, "query")) if v]
        if text:
            first = str(history[0][0]) if history else "\n".join(query)
            return {"text": first}, "text"
        canon: dict[str, Any] = {"instruction": "\n".join(query), "input": ""}
        if self._col(row, "system"):
            canon["system"] = self._col(row, "system")
        canon["history"] = history
        if self.ranking:
            canon["chosen"], canon["rejected"] = (
                self._need(row, "chosen", where),
                self._need(row, "rejected", where),
            )
            return canon, "alpaca_preference"
        canon["output"] = self._need(row, "response", where)
        if self._col(row, "kto_tag") is not None:
            canon["kto_tag"] = self._col(row, "kto_tag")
            return canon, "alpaca_kto"
        if not history:
            return canon, "alpaca"
        # as LLaMA-Factory: the answers in the history are trained on too
        turns = [{"from": s, "value": v} for pair in history for s, v in zip(("human", "gpt"), pair)]
        turns += [{"from": "human", "value": canon["instruction"]}, {"from": "gpt", "value": canon["output"]}]
        return {"conversations": turns, "system": canon.get("system")}, "sharegpt"

    def _sharegpt(self, row: dict, where: str, text: bool) -> tuple[dict, str]:
        raw = self._need(row, "messages", where)
        if not isinstance(raw, list):
            raise UserError(f"{where}: column `{self.columns['messages']}` must be a list of turns")
        turns = [self._turn(t, where, f"turn {i} of `{self.columns['messages']}`") for i, t in enumerate(raw)]
        system = self._col(row, "system")
        if turns and turns[0]["from"] == "system":  # a leading system turn wins over the system column
            system, turns = turns[0]["value"], turns[1:]
        if text:
            return {"text": turns[0]["value"] if turns else ""}, "text"
        canon: dict[str, Any] = {"conversations": turns}
        if system:
            canon["system"] = system
        if self.ranking:
            for key in ("chosen", "rejected"):
                side = self._need(row, key, where)
                sides = side if isinstance(side, list) else [side]
                canon[key] = [self._turn(t, where, f"`{self.columns[key]}`") for t in sides]
            return canon, "sharegpt_preference"
        if self._col(row, "kto_tag") is not None:
            canon["kto_tag"] = self._col(row, "kto_tag")
            return canon, "sharegpt_kto"
        return canon, "sharegpt"

    def _turn(self, turn: Any, where: str, what: str) -> dict:
        """One turn with this entry's tags -> {"from": canonical speaker, "value": content}."""
        role_tag, content_tag = self.tags["role_tag"], self.tags["content_tag"]
        if not isinstance(turn, dict) or role_tag not in turn:
            raise UserError(f"{where}: {what} needs the key `{role_tag}` (tags.role_tag of `{self.name}`)")
        speakers = {self.tags[tag]: speaker for tag, speaker in SPEAKERS.items()}
        speaker = speakers.get(turn[role_tag])
        if speaker is None:
            raise UserError(
                f"{where}: {what} has speaker `{turn[role_tag]}`, which is none of the tags of `{self.name}` in "
                f"{self.info_path} ({', '.join(f'{t}={self.tags[t]}' for t in SPEAKERS)})"
            )
        if turn.get("tool_calls") and speaker in ("gpt", "function_call"):  # formatting: openai
            return {"from": "function_call", "value": turn["tool_calls"]}
        if content_tag not in turn:
            raise UserError(
                f"{where}: {what} needs the key `{content_tag}` (tags.content_tag of `{self.name}`)"
            )
        return {"from": speaker, "value": turn[content_tag]}


def _entry_source(name: str, entry: dict, path: str) -> tuple[str, bool]:
    """(the file, folder or hub id of an entry, whether it is a hub id), with LLaMA-Factory's precedence:
    hub, script, file."""
    if entry.get("hf_hub_url"):
        return str(entry["hf_hub_url"]), True
    for key, hub in (
        ("ms_hub_url", "ModelScope"),
        ("om_hub_url", "OpenMind"),
        ("cloud_file_name", "cloud storage"),
    ):
        if entry.get(key):
            raise UserError(
                f"{path}: `{name}` is only on {hub} (`{key}`); alignkit reads local files and folders and "
                "Hugging Face hub ids: download it, then point `file_name` at it (or add `hf_hub_url`)"
            )
    key = "script_url" if entry.get("script_url") else "file_name"
    if not entry.get(key):
        raise UserError(f"{path}: `{name}` names no data: give `file_name` (in this folder) or `hf_hub_url`")
    local = os.path.join(os.path.dirname(path), str(entry[key]))
    if not os.path.exists(local):
        raise UserError(f"{path}: `{name}` points at {local} (`{key}`), which does not exist")
    return local, False
