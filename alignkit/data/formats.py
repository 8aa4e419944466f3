"""Raw rows of every known format -> one `Example` type.

This is the only module that knows about Alpaca, ShareGPT, TRL's standard and conversational forms, or
LLaMA-Factory's KTO tags (its dataset_info.json names and message shapes are read in `registry.py`, tools
and media in `files.py`). Downstream code sees `Example` alone. A field holding a plain string is
*standard* text (tokenised as is, as TRL does); a field holding a list of messages is *conversational*
(rendered with the tokenizer's chat template).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from alignkit.config.coerce import split_sources
from alignkit.data.files import DROPPED, MEDIA, Dropped, parse_tools, read_rows, strip_placeholders
from alignkit.data.registry import LFDataset, Messages, content_of, locate, messages_of, sharegpt_turns
from alignkit.errors import UserError

log = logging.getLogger("alignkit")

Text = str | Messages

SFT_FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")
PAIR_FORMATS = ("preference", "sharegpt_preference", "alpaca_preference", "messages_preference")
UNPAIRED_FORMATS = ("unpaired", "sharegpt_kto", "alpaca_kto")
PROMPT_FORMATS = ("prompt_only", "mt_bench")


@dataclass
class Example:
    """One training row, whatever file format it came from.

    prompt:     the context (standard string or messages); "" / [] when there is none.
    completion: SFT target or KTO completion; in conversational form, the messages after the prompt
                (loss falls on the assistant messages among them).
    chosen / rejected: the pair for preference data (same form as the prompt).
    label:      KTO desirable (True) / undesirable (False).
    margin:     optional reward-model margin.
    extra:      every other column, passed through (e.g. the `answer` a reward function checks).
    where:      "file line N" for error messages.
    tools:      function schemas ({"type": "function", "function": {...}}) the chat template is given.
    """

    prompt: Text = ""
    completion: Text | None = None
    chosen: Text | None = None
    rejected: Text | None = None
    label: bool | None = None
    margin: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    where: str = ""
    tools: list[dict] | None = None

    @property
    def kind(self) -> str:
        if self.chosen is not None:
            return "pair"
        if self.label is not None:
            return "unpaired"
        if self.completion is not None:
            return "sft"
        return "prompt"

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list) or isinstance(self.completion or self.chosen, list)


# ---------------------------------------------------------------------------------------------- detecting
def detect_format(row: dict, where: str = "") -> str:
    """Name the format of a row from its columns."""
    keys = set(row)
    if len(keys & {"chosen", "rejected"}) == 1:
        have, lack = ("chosen", "rejected") if "chosen" in keys else ("rejected", "chosen")
        raise UserError(
            f"{where}: has `{have}` but no `{lack}`; preference rows need both "
            f"(found fields: {', '.join(sorted(keys))})"
        )
    if {"chosen_messages", "rejected_messages"} <= keys:  # LLaMA-Factory v1
        return "messages_preference"
    if {"chosen", "rejected"} <= keys:
        if "conversations" in keys:
            return "sharegpt_preference"
        if "instruction" in keys:
            return "alpaca_preference"
        return "preference"
    if "conversations" in keys:
        return "sharegpt_kto" if "kto_tag" in keys else "sharegpt"
    if keys & {"label", "kto_tag"} and ({"prompt", "completion"} <= keys or "messages" in keys):
        return "unpaired"
    if "instruction" in keys and "output" in keys:
        return "alpaca_kto" if "kto_tag" in keys else "alpaca"
    if "messages" in keys:
        msgs = row["messages"]
        if (
            isinstance(msgs, list)
            and msgs
            and isinstance(msgs[-1], dict)
            and msgs[-1].get("role") == "assistant"
        ):
            return "messages"
        return "prompt_only"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    if isinstance(row.get("turns"), list):
        return "mt_bench"
    if keys & {"prompt", "question", "problem"}:
        return "prompt_only"
    raise UserError(
        f"{where}: cannot tell the data format from the columns {sorted(keys)}. Known forms: "
        "messages | conversations (ShareGPT) | instruction/input/output (Alpaca) | prompt/completion | text "
        "| prompt/chosen/rejected | chosen_messages/rejected_messages | prompt/completion/label "
        "| prompt, question or problem (prompt-only). Rename the columns, set `dataset_format`, or name "
        "the file in LLaMA-Factory's dataset_info.json (`columns`)."
    )


# --------------------------------------------------------------------------------------------- converting
def _need(row: dict, keys: tuple[str, ...], where: str, fmt: str) -> None:
    missing = [k for k in keys if k not in row or row[k] is None]
    if missing:
        raise UserError(
            f"{where}: missing field `{missing[0]}` needed by the `{fmt}` format "
            f"(found fields: {', '.join(sorted(row))})"
        )


def _text_or_messages(value: Any, where: str, name: str) -> Text:
    if isinstance(value, str):
        return value
    return messages_of(value, where, name)


def _alpaca_prompt(row: dict) -> Messages:
    msgs: Messages = []
    if row.get("system"):
        msgs.append({"role": "system", "content": str(row["system"])})
    for turn in row.get("history") or []:
        msgs += [{"role": "user", "content": str(turn[0])}, {"role": "assistant", "content": str(turn[1])}]
    query = "\n".join(str(row[k]) for k in ("instruction", "input") if row.get(k))  # "instruction\ninput"
    msgs.append({"role": "user", "content": query})
    return msgs


def _split_implicit_prompt(chosen: Text, rejected: Text) -> tuple[Text, Text, Text]:
    """Implicit-prompt pairs hold the whole conversation: their shared beginning is the prompt.

    The split point is TRL's (`extract_prompt`), so that both give the same token ids: the first position
    where chosen and rejected differ (message by message, or character by character for strings), moved
    back by one when it follows a space; when one is a prefix of the other, the last shared position.
    """
    if isinstance(chosen, list) != isinstance(rejected, list):
        raise ValueError("chosen and rejected must both be strings or both be message lists")
    n = min(len(chosen), len(rejected))
    idx = n - 1
    for i in range(n):
        if chosen[i] != rejected[i]:
            idx = i - 1 if i > 0 and chosen[i - 1] == " " else i
            break
    idx = max(idx, 0)
    return chosen[:idx], chosen[idx:], rejected[idx:]


def _check_completion(value: Text | None, where: str, name: str) -> None:
    if value is None:
        return
    if isinstance(value, str):
        empty = not value.strip()
    else:
        empty = not value or all(
            not m["content"].strip() and not m.get("tool_calls") for m in value if m["role"] == "assistant"
        )
        if value and not any(m["role"] == "assistant" for m in value):
            raise UserError(f"{where}: `{name}` has no assistant message to train on")
    if empty:
        raise UserError(f"{where}: `{name}` is empty; remove the row or fill it in")


def parse_label(value: Any, where: str, key: str) -> bool:
    if isinstance(value, bool):
        return value
    raise UserError(f"{where}: `{key}` must be true or false (a boolean), got {value!r}")


_USED = {
    "messages": ("messages",),
    "sharegpt": ("conversations", "system"),
    "alpaca": ("instruction", "input", "output", "system", "history"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
    "preference": ("prompt", "chosen", "rejected", "margin"),
    "sharegpt_preference": ("conversations", "chosen", "rejected", "system", "margin"),
    "alpaca_preference": ("instruction", "input", "chosen", "rejected", "system", "history", "margin"),
    "messages_preference": ("chosen_messages", "rejected_messages", "margin"),
    "unpaired": ("prompt", "completion", "messages", "label", "kto_tag"),
    "sharegpt_kto": ("conversations", "kto_tag", "system"),
    "alpaca_kto": ("instruction", "input", "output", "system", "history", "kto_tag"),
    "prompt_only": ("prompt", "messages", "question", "problem"),
    "mt_bench": (),  # `turns` stays among the extra columns: `eval` asks the later turns as follow-ups
}


def _system(row: dict) -> Messages:
    return [{"role": "system", "content": str(row["system"])}] if row.get("system") else []


def _ex_messages(row: dict, where: str, ex: Example) -> None:
    _need(row, ("messages",), where, "messages")
    ex.prompt, ex.completion = [], messages_of(row["messages"], where, "messages")


def _ex_sharegpt(row: dict, where: str, ex: Example) -> None:
    _need(row, ("conversations",), where, "sharegpt")
    ex.prompt, ex.completion = [], _system(row) + sharegpt_turns(row["conversations"], where, "conversations")


def _ex_alpaca(row: dict, where: str, ex: Example) -> None:
    _need(row, ("instruction", "output"), where, "alpaca")
    ex.prompt, ex.completion = _alpaca_prompt(row), [{"role": "assistant", "content": str(row["output"])}]


def _ex_prompt_completion(row: dict, where: str, ex: Example) -> None:
    _need(row, ("prompt", "completion"), where, "prompt_completion")
    ex.prompt = _text_or_messages(row["prompt"], where, "prompt")
    ex.completion = _text_or_messages(row["completion"], where, "completion")


def _ex_text(row: dict, where: str, ex: Example) -> None:
    _need(row, ("text",), where, "text")
    ex.prompt, ex.completion = "", content_of(row["text"], where, "`text`")[0]


def _ex_preference(row: dict, where: str, ex: Example) -> None:
    _need(row, ("chosen", "rejected"), where, "preference")
    chosen = _text_or_messages(row["chosen"], where, "chosen")
    rejected = _text_or_messages(row["rejected"], where, "rejected")
    if "prompt" in row and row["prompt"] is not None:
        ex.prompt = _text_or_messages(row["prompt"], where, "prompt")
        ex.chosen, ex.rejected = chosen, rejected
        return
    try:
        ex.prompt, ex.chosen, ex.rejected = _split_implicit_prompt(chosen, rejected)
    except ValueError as exc:
        raise UserError(f"{where}: {exc}") from exc


def _ex_sharegpt_preference(row: dict, where: str, ex: Example) -> None:
    _need(row, ("conversations", "chosen", "rejected"), where, "sharegpt_preference")
    ex.prompt = _system(row) + sharegpt_turns(row["conversations"], where, "conversations")
    ex.chosen = sharegpt_turns(row["chosen"], where, "chosen")
    ex.rejected = sharegpt_turns(row["rejected"], where, "rejected")


def _ex_alpaca_preference(row: dict, where: str, ex: Example) -> None:
    _need(row, ("instruction", "chosen", "rejected"), where, "alpaca_preference")
    ex.prompt = _alpaca_prompt(row)
    ex.chosen = [{"role": "assistant", "content": str(row["chosen"])}]
    ex.rejected = [{"role": "assistant", "content": str(row["rejected"])}]


def _ex_messages_preference(row: dict, where: str, ex: Example) -> None:
    """LLaMA-Factory v1 pairs: `chosen_messages` / `rejected_messages`, each the whole conversation."""
    _need(row, ("chosen_messages", "rejected_messages"), where, "messages_preference")
    chosen = {"chosen": row["chosen_messages"], "rejected": row["rejected_messages"]}
    _ex_preference(chosen, where, ex)


def _ex_unpaired(row: dict, where: str, ex: Example) -> None:
    key = "label" if "label" in row else "kto_tag"
    _need(row, (key,), where, "unpaired")
    ex.label = parse_label(row[key], where, key)
    if "messages" in row:
        msgs = messages_of(row["messages"], where, "messages")
        if not msgs or msgs[-1]["role"] != "assistant":
            raise UserError(f"{where}: `messages` must end with the assistant turn that `label` judges")
        ex.prompt, ex.completion = msgs[:-1], msgs[-1:]
    else:
        _need(row, ("prompt", "completion"), where, "unpaired")
        ex.prompt = _text_or_messages(row["prompt"], where, "prompt")
        ex.completion = _text_or_messages(row["completion"], where, "completion")


def _ex_sharegpt_kto(row: dict, where: str, ex: Example) -> None:
    _need(row, ("conversations", "kto_tag"), where, "sharegpt_kto")
    msgs = sharegpt_turns(row["conversations"], where, "conversations")
    if not msgs or msgs[-1]["role"] != "assistant":
        raise UserError(f"{where}: `conversations` must end with the assistant turn that `kto_tag` judges")
    ex.prompt, ex.completion = _system(row) + msgs[:-1], msgs[-1:]
    ex.label = parse_label(row["kto_tag"], where, "kto_tag")


def _ex_alpaca_kto(row: dict, where: str, ex: Example) -> None:
    _need(row, ("instruction", "output", "kto_tag"), where, "alpaca_kto")
    _ex_alpaca(row, where, ex)
    ex.label = parse_label(row["kto_tag"], where, "kto_tag")


def _ex_prompt_only(row: dict, where: str, ex: Example) -> None:
    key = next((k for k in ("prompt", "question", "problem") if row.get(k) is not None), None)
    if key == "prompt":
        ex.prompt = _text_or_messages(row["prompt"], where, "prompt")
    elif key is not None:  # GSM8K / MATH style: a question to pose as a user turn
        ex.prompt = [{"role": "user", "content": str(row[key])}]
    else:
        _need(row, ("messages",) if "messages" in row else ("prompt",), where, "prompt_only")
        ex.prompt = messages_of(row["messages"], where, "messages")


def _ex_mt_bench(row: dict, where: str, ex: Example) -> None:
    """MT-Bench's question file (`question_id`, `category`, `turns`): the first turn is the prompt."""
    turns = row["turns"]
    if not turns or not all(isinstance(t, str) for t in turns):
        raise UserError(f"{where}: `turns` must be a non-empty list of strings (the user's turns)")
    ex.prompt = [{"role": "user", "content": turns[0]}]


# dataset_format -> the function that fills an Example from one raw row of that format
_CONVERTERS: dict[str, Callable[[dict, str, Example], None]] = {
    "messages": _ex_messages,
    "sharegpt": _ex_sharegpt,
    "alpaca": _ex_alpaca,
    "prompt_completion": _ex_prompt_completion,
    "text": _ex_text,
    "preference": _ex_preference,
    "sharegpt_preference": _ex_sharegpt_preference,
    "alpaca_preference": _ex_alpaca_preference,
    "messages_preference": _ex_messages_preference,
    "unpaired": _ex_unpaired,
    "sharegpt_kto": _ex_sharegpt_kto,
    "alpaca_kto": _ex_alpaca_kto,
    "prompt_only": _ex_prompt_only,
    "mt_bench": _ex_mt_bench,
}


def to_example(row: dict, fmt: str, where: str) -> Example:
    """Convert one raw row of format `fmt` into an Example, or raise a UserError naming the row.

    A `tools` column becomes `Example.tools`; media columns (images, videos, audios) are dropped, with their
    placeholders in the text, and counted for the warning of `load_examples`."""
    if fmt not in _CONVERTERS:
        raise UserError(f"unknown dataset_format `{fmt}`")
    skip = (*_USED[fmt], "tools", *MEDIA)
    ex = Example(where=where, extra={k: v for k, v in row.items() if k not in skip})
    _CONVERTERS[fmt](row, where, ex)
    ex.tools = parse_tools(row.get("tools"), where)
    if "margin" in row and row["margin"] is not None and fmt in PAIR_FORMATS:
        ex.margin = float(row["margin"])
    dropped = DROPPED.get() or Dropped()
    if dropped.media(row):
        _strip_media(ex)
    for name in ("completion", "chosen", "rejected"):
        _check_completion(getattr(ex, name), where, name)
    return ex


def last_answer(ex: Example) -> Example:
    """A whole conversation (messages, ShareGPT: no prompt, every turn in `completion`) as the turns before
    its last assistant answer (the prompt) and that answer (the completion); any other row as it is."""
    turns = ex.completion
    if ex.prompt or not isinstance(turns, list) or len(turns) < 2 or turns[-1]["role"] != "assistant":
        return ex
    return dataclasses.replace(ex, prompt=turns[:-1], completion=turns[-1:])


def _strip_media(ex: Example) -> None:
    for name in ("prompt", "completion", "chosen", "rejected"):
        value = getattr(ex, name)
        if isinstance(value, str):
            setattr(ex, name, strip_placeholders(value))
        elif isinstance(value, list):
            setattr(ex, name, [{**m, "content": strip_placeholders(m["content"])} for m in value])


def load_examples(
    sources: str | list[str],
    dataset_format: str = "auto",
    split: str = "train",
    dataset_dir: str | None = None,
    stage: str | None = None,
) -> list[Example]:
    """Read every source and convert every row. The format is detected per file from its first row.

    `sources`: paths, hub ids, or names of `<dataset_dir>/dataset_info.json` (LLaMA-Factory's registry;
    `dataset_dir` None is its default, `data`); a string is split on commas unless it is an existing path.
    A registered name is read by its entry's `formatting`/`columns`/`tags`, not by `dataset_format`, save
    that `dataset_format: text` or `stage: pt` reads its first user turn as plain text. Media and non-text
    content parts are dropped, with one warning per call."""
    dropped = Dropped()
    token = DROPPED.set(dropped)
    try:
        examples: list[Example] = []
        for source in split_sources(sources):
            entry = locate(source, dataset_dir)
            if entry is not None:
                examples += _load_registered(entry, split, text=stage == "pt" or dataset_format == "text")
                continue
            rows, where = read_rows(source, split)
            if not rows:
                raise UserError(f"dataset {source} has no rows")
            fmt = detect_format(rows[0], where[0]) if dataset_format == "auto" else dataset_format
            examples += [to_example(row, fmt, w) for row, w in zip(rows, where)]
    finally:
        DROPPED.reset(token)
    message = dropped.message()
    if message:
        log.warning(message)
    return examples


def _load_registered(entry: LFDataset, split: str, text: bool) -> list[Example]:
    rows, where = entry.read(split)
    if not rows:
        raise UserError(f"dataset {entry.name} ({entry.source}, from {entry.info_path}) has no rows")
    examples = []
    for row, w in zip(rows, where):
        canon, fmt, rest = entry.to_canonical(row, w, text)
        ex = to_example(canon, fmt, w)
        ex.extra = {**rest, **ex.extra}
        examples.append(ex)
    return examples


def describe_format(
    source: str, split: str = "train", dataset_dir: str | None = None, stage: str | None = None
) -> tuple[str, int]:
    """(the format of a source, its number of rows); a registered name is described by its entry."""
    entry = locate(source, dataset_dir)
    rows, where = read_rows(source, split) if entry is None else entry.read(split)
    if not rows:
        raise UserError(f"dataset {source} has no rows")
    if entry is not None:
        return entry.to_canonical(rows[0], where[0], stage == "pt")[1], len(rows)
    return detect_format(rows[0], where[0]), len(rows)
