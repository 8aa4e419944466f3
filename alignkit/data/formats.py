"""Raw rows of every known format -> one `Example` type.

This is the only module that knows about Alpaca, ShareGPT, TRL's standard and conversational forms, or
LLaMA-Factory's KTO tags. Downstream code sees `Example` alone. A field holding a plain string is
*standard* text (tokenised as is, as TRL does); a field holding a list of messages is *conversational*
(rendered with the tokenizer's chat template).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from alignkit.data.files import read_rows
from alignkit.errors import UserError

Messages = list[dict[str, str]]
Text = str | Messages

SFT_FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")
PAIR_FORMATS = ("preference", "sharegpt_preference", "alpaca_preference")
UNPAIRED_FORMATS = ("unpaired", "sharegpt_kto")
PROMPT_FORMATS = ("prompt_only", "mt_bench")

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
    """

    prompt: Text = ""
    completion: Text | None = None
    chosen: Text | None = None
    rejected: Text | None = None
    label: bool | None = None
    margin: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    where: str = ""

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
    if {"chosen", "rejected"} <= keys:
        if "conversations" in keys:
            return "sharegpt_preference"
        if "instruction" in keys:
            return "alpaca_preference"
        return "preference"
    if "conversations" in keys:
        return "sharegpt_kto" if "kto_tag" in keys else "sharegpt"
    if "label" in keys and ({"prompt", "completion"} <= keys or "messages" in keys):
        return "unpaired"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
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
        "| prompt/chosen/rejected | prompt/completion/label | prompt, question or problem (prompt-only). "
        "Rename the columns or set `dataset_format`."
    )


# --------------------------------------------------------------------------------------------- converting
def _need(row: dict, keys: tuple[str, ...], where: str, fmt: str) -> None:
    missing = [k for k in keys if k not in row or row[k] is None]
    if missing:
        raise UserError(
            f"{where}: missing field `{missing[0]}` needed by the `{fmt}` format "
            f"(found fields: {', '.join(sorted(row))})"
        )


def _messages(value: Any, where: str, name: str) -> Messages:
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise UserError(f"{where}: field `{name}` must be a list of {{role, content}} messages")
    out = []
    for i, m in enumerate(value):
        if "role" not in m or "content" not in m:
            raise UserError(
                f"{where}: message {i} of `{name}` needs `role` and `content` (found: {', '.join(sorted(m))})"
            )
        out.append({"role": str(m["role"]), "content": "" if m["content"] is None else str(m["content"])})
    return out


def _sharegpt(value: Any, where: str, name: str) -> Messages:
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise UserError(f"{where}: field `{name}` must be a list of {{from, value}} turns")
    out = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise UserError(f"{where}: turn {i} of `{name}` needs `from` and `value`")
        role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise UserError(
                f"{where}: turn {i} of `{name}` has unknown speaker `{turn['from']}` "
                f"(known: {', '.join(SHAREGPT_ROLES)})"
            )
        out.append({"role": role, "content": str(turn["value"])})
    return out


def _text_or_messages(value: Any, where: str, name: str) -> Text:
    if isinstance(value, str):
        return value
    return _messages(value, where, name)


def _alpaca_prompt(row: dict) -> Messages:
    msgs: Messages = []
    if row.get("system"):
        msgs.append({"role": "system", "content": str(row["system"])})
    for turn in row.get("history") or []:
        msgs += [{"role": "user", "content": str(turn[0])}, {"role": "assistant", "content": str(turn[1])}]
    query = str(row["instruction"])
    if row.get("input"):
        query = f"{query}\n{row['input']}"
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
        empty = not value or all(not m["content"].strip() for m in value if m["role"] == "assistant")
        if value and not any(m["role"] == "assistant" for m in value):
            raise UserError(f"{where}: `{name}` has no assistant message to train on")
    if empty:
        raise UserError(f"{where}: `{name}` is empty; remove the row or fill it in")


def _label(value: Any, where: str, key: str) -> bool:
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
    "unpaired": ("prompt", "completion", "messages", "label"),
    "sharegpt_kto": ("conversations", "kto_tag", "system"),
    "prompt_only": ("prompt", "messages", "question", "problem"),
    "mt_bench": (),  # `turns` stays among the extra columns: `eval` asks the later turns as follow-ups
}


def _system(row: dict) -> list[dict[str, str]]:
    return [{"role": "system", "content": str(row["system"])}] if row.get("system") else []


def _ex_messages(row: dict, where: str, ex: Example) -> None:
    _need(row, ("messages",), where, "messages")
    ex.prompt, ex.completion = [], _messages(row["messages"], where, "messages")


def _ex_sharegpt(row: dict, where: str, ex: Example) -> None:
    _need(row, ("conversations",), where, "sharegpt")
    ex.prompt, ex.completion = [], _system(row) + _sharegpt(row["conversations"], where, "conversations")


def _ex_alpaca(row: dict, where: str, ex: Example) -> None:
    _need(row, ("instruction", "output"), where, "alpaca")
    ex.prompt, ex.completion = _alpaca_prompt(row), [{"role": "assistant", "content": str(row["output"])}]


def _ex_prompt_completion(row: dict, where: str, ex: Example) -> None:
    _need(row, ("prompt", "completion"), where, "prompt_completion")
    ex.prompt = _text_or_messages(row["prompt"], where, "prompt")
    ex.completion = _text_or_messages(row["completion"], where, "completion")


def _ex_text(row: dict, where: str, ex: Example) -> None:
    _need(row, ("text",), where, "text")
    ex.prompt, ex.completion = "", str(row["text"])


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
    ex.prompt = _system(row) + _sharegpt(row["conversations"], where, "conversations")
    ex.chosen = _sharegpt(row["chosen"], where, "chosen")
    ex.rejected = _sharegpt(row["rejected"], where, "rejected")


def _ex_alpaca_preference(row: dict, where: str, ex: Example) -> None:
    _need(row, ("instruction", "chosen", "rejected"), where, "alpaca_preference")
    ex.prompt = _alpaca_prompt(row)
    ex.chosen = [{"role": "assistant", "content": str(row["chosen"])}]
    ex.rejected = [{"role": "assistant", "content": str(row["rejected"])}]


def _ex_unpaired(row: dict, where: str, ex: Example) -> None:
    _need(row, ("label",), where, "unpaired")
    ex.label = _label(row["label"], where, "label")
    if "messages" in row:
        msgs = _messages(row["messages"], where, "messages")
        if not msgs or msgs[-1]["role"] != "assistant":
            raise UserError(f"{where}: `messages` must end with the assistant turn that `label` judges")
        ex.prompt, ex.completion = msgs[:-1], msgs[-1:]
    else:
        _need(row, ("prompt", "completion"), where, "unpaired")
        ex.prompt = _text_or_messages(row["prompt"], where, "prompt")
        ex.completion = _text_or_messages(row["completion"], where, "completion")


def _ex_sharegpt_kto(row: dict, where: str, ex: Example) -> None:
    _need(row, ("conversations", "kto_tag"), where, "sharegpt_kto")
    msgs = _sharegpt(row["conversations"], where, "conversations")
    if not msgs or msgs[-1]["role"] != "assistant":
        raise UserError(f"{where}: `conversations` must end with the assistant turn that `kto_tag` judges")
    ex.prompt, ex.completion = _system(row) + msgs[:-1], msgs[-1:]
    ex.label = _label(row["kto_tag"], where, "kto_tag")


def _ex_prompt_only(row: dict, where: str, ex: Example) -> None:
    key = next((k for k in ("prompt", "question", "problem") if row.get(k) is not None), None)
    if key == "prompt":
        ex.prompt = _text_or_messages(row["prompt"], where, "prompt")
    elif key is not None:  # GSM8K / MATH style: a question to pose as a user turn
        ex.prompt = [{"role": "user", "content": str(row[key])}]
    else:
        _need(row, ("messages",) if "messages" in row else ("prompt",), where, "prompt_only")
        ex.prompt = _messages(row["messages"], where, "messages")


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
    "unpaired": _ex_unpaired,
    "sharegpt_kto": _ex_sharegpt_kto,
    "prompt_only": _ex_prompt_only,
    "mt_bench": _ex_mt_bench,
}


def to_example(row: dict, fmt: str, where: str) -> Example:
    """Convert one raw row of format `fmt` into an Example, or raise a UserError naming the row."""
    if fmt not in _CONVERTERS:
        raise UserError(f"unknown dataset_format `{fmt}`")
    ex = Example(where=where, extra={k: v for k, v in row.items() if k not in _USED[fmt]})
    _CONVERTERS[fmt](row, where, ex)
    if "margin" in row and row["margin"] is not None and fmt in PAIR_FORMATS:
        ex.margin = float(row["margin"])
    for name in ("completion", "chosen", "rejected"):
        _check_completion(getattr(ex, name), where, name)
    return ex


def load_examples(
    sources: str | list[str], dataset_format: str = "auto", split: str = "train"
) -> list[Example]:
    """Read every source and convert every row. The format is detected per file from its first row."""
    if isinstance(sources, str):
        sources = [sources]
    examples: list[Example] = []
    for source in sources:
        rows, where = read_rows(source, split)
        if not rows:
            raise UserError(f"dataset {source} has no rows")
        fmt = detect_format(rows[0], where[0]) if dataset_format == "auto" else dataset_format
        examples += [to_example(row, fmt, w) for row, w in zip(rows, where)]
    return examples


def describe_format(source: str, split: str = "train") -> tuple[str, int]:
    rows, where = read_rows(source, split)
    if not rows:
        raise UserError(f"dataset {source} has no rows")
    return detect_format(rows[0], where[0]), len(rows)
