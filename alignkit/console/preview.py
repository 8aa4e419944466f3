"""A data set as alignkit reads it, for the page: the detected format, the first rows converted, and each
row's conversation rendered by the chosen model's chat template (the text training sees)."""

from __future__ import annotations

from typing import Any

from alignkit.data.formats import Example, Text, describe_format, load_examples
from alignkit.modeling.chat_templates import set_chat_template
from alignkit.modeling.load import load_tokenizer


def _chat(prompt: Text, answer: Text | None) -> list[dict[str, Any]] | None:
    """The conversation of a prompt and an answer, when both are messages (or the answer is text)."""
    if not isinstance(prompt, list):
        return None
    if answer is None:
        return list(prompt)
    return [*prompt, *(answer if isinstance(answer, list) else [{"role": "assistant", "content": answer}])]


def _render(tokenizer: Any, prompt: Text, answer: Text | None) -> str | None:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return None
    messages = _chat(prompt, answer)
    if messages is None:
        return f"{prompt}{'' if answer is None else answer}"
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=answer is None)


def _row(ex: Example, tokenizer: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"kind": ex.kind, "where": ex.where, "prompt": ex.prompt}
    if ex.kind == "pair":
        row.update(chosen=ex.chosen, rejected=ex.rejected)
        row["rendered"] = _render(tokenizer, ex.prompt, ex.chosen)
        row["rendered_rejected"] = _render(tokenizer, ex.prompt, ex.rejected)
    else:
        row.update(completion=ex.completion, label=ex.label)
        row["rendered"] = _render(tokenizer, ex.prompt, ex.completion)
    return row


def preview(
    dataset: str,
    dataset_dir: str | None = None,
    model: str | None = None,
    rows: int = 5,
    template: str | None = None,
) -> dict[str, Any]:
    fmt, count = describe_format(dataset, "train", dataset_dir)
    examples = load_examples(dataset, "auto", "train", dataset_dir)[:rows]
    tokenizer = load_tokenizer(model) if model else None
    if tokenizer is not None and template:
        set_chat_template(tokenizer, template, "template")
    return {
        "dataset": dataset,
        "format": fmt,
        "rows": count,
        "preview": [_row(ex, tokenizer) for ex in examples],
    }
