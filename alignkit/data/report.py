"""`alignkit data inspect`: what a data set holds before a run spends hours on it."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from alignkit.data.batches import tokenize_chat
from alignkit.data.formats import Example, Text, describe_format, load_examples
from alignkit.losses.unpaired import kto_weights
from alignkit.modeling.load import load_tokenizer


def _render(value: Text | None) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return "\n".join(f"{m['role']}: {m['content']}" for m in value)


def _percentiles(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    s = sorted(values)

    def pick(q: float) -> int:
        return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]

    return {
        "min": s[0],
        "p50": pick(0.5),
        "p90": pick(0.9),
        "p99": pick(0.99),
        "max": s[-1],
        "mean": round(sum(s) / len(s), 1),
    }


class _Counter:
    """Token counts with the model's tokenizer (chat template applied), or whitespace words without one."""

    def __init__(self, model: str | None) -> None:
        self.tokenizer = None
        if model:
            self.tokenizer = load_tokenizer(model)
        self.unit = "tokens" if self.tokenizer is not None else "words (no --model given)"

    def __call__(self, value: Text | None, prompt: bool = False) -> int:
        if value is None:
            return 0
        if self.tokenizer is None:
            return len(_render(value).split())
        if isinstance(value, str):
            return len(self.tokenizer(text=value, add_special_tokens=prompt)["input_ids"])
        if prompt:
            return (
                len(tokenize_chat(self.tokenizer, value, add_generation_prompt=bool(value))) if value else 0
            )
        return len(
            self.tokenizer(_render_chat_tail(self.tokenizer, value), add_special_tokens=False)["input_ids"]
        )


def _render_chat_tail(tokenizer: Any, messages: list[dict]) -> str:
    """Completion messages as the template renders them after a prompt."""
    full = tokenizer.apply_chat_template([{"role": "user", "content": "x"}] + messages, tokenize=False)
    head = tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True
    )
    return full[len(head) :] if full.startswith(head) else full


def inspect_examples(
    examples: list[Example], model: str | None = None, max_length: int = 1024
) -> dict[str, Any]:
    count = _Counter(model)
    kinds = Counter(ex.kind for ex in examples)
    prompts = [count(ex.prompt, prompt=True) for ex in examples]
    report: dict[str, Any] = {
        "rows": len(examples),
        "kinds": dict(kinds),
        "length_unit": count.unit,
        "max_length": max_length,
        "lengths": {"prompt": _percentiles(prompts)},
    }
    prompt_keys = Counter(json.dumps(ex.prompt, sort_keys=True) for ex in examples if ex.prompt)
    report["duplicate_prompts"] = sum(c - 1 for c in prompt_keys.values() if c > 1)
    if any(ex.kind == "pair" for ex in examples):
        pairs = [ex for ex in examples if ex.kind == "pair"]
        chosen = [count(ex.chosen) for ex in pairs]
        rejected = [count(ex.rejected) for ex in pairs]
        p = [count(ex.prompt, prompt=True) for ex in pairs]
        report["lengths"].update(chosen=_percentiles(chosen), rejected=_percentiles(rejected))
        report["would_truncate"] = sum(pp + max(c, r) > max_length for pp, c, r in zip(p, chosen, rejected))
        report["chosen_longer_share"] = round(sum(c > r for c, r in zip(chosen, rejected)) / len(pairs), 4)
        report["identical_pairs"] = sum(ex.chosen == ex.rejected for ex in pairs)
    else:
        comp = [count(ex.completion) for ex in examples if ex.completion is not None]
        if comp:
            report["lengths"]["completion"] = _percentiles(comp)
            report["would_truncate"] = sum(
                pp + cc > max_length
                for pp, cc, ex in zip(prompts, comp, examples)
                if ex.completion is not None
            )
    if any(ex.kind == "unpaired" for ex in examples):
        n_d = sum(ex.label is True for ex in examples)
        n_u = sum(ex.label is False for ex in examples)
        w_d, w_u, why = kto_weights(n_d, n_u)
        report["kto"] = {
            "desirable": n_d,
            "undesirable": n_u,
            "desirable_weight": w_d,
            "undesirable_weight": w_u,
            "why": why,
        }
    return report


def inspect_data(
    source: str,
    model: str | None = None,
    max_length: int = 1024,
    split: str = "train",
    dataset_format: str = "auto",
    dataset_dir: str | None = None,
) -> dict[str, Any]:
    """The report of `source` (a path, a hub id, or a name of `<dataset_dir>/dataset_info.json`)."""
    auto = dataset_format == "auto"
    fmt, _ = describe_format(source, split, dataset_dir) if auto else (dataset_format, 0)
    examples = load_examples(source, fmt, split, dataset_dir)
    return {"source": source, "format": fmt, **inspect_examples(examples, model, max_length)}


def render_report(r: dict[str, Any]) -> str:
    lines = [
        f"{r['source']}: format `{r['format']}`, {r['rows']} rows ({', '.join(f'{v} {k}' for k, v in r['kinds'].items())})",
        f"lengths in {r['length_unit']}:",
    ]
    for name, p in r["lengths"].items():
        if p:
            lines.append(
                f"  {name:<10} min {p['min']:>6}  p50 {p['p50']:>6}  p90 {p['p90']:>6}  p99 {p['p99']:>6}  "
                f"max {p['max']:>6}  mean {p['mean']:>8}"
            )
    if "would_truncate" in r:
        lines.append(f"rows longer than max_length={r['max_length']}: {r['would_truncate']}")
    lines.append(f"duplicate prompts: {r['duplicate_prompts']}")
    if "chosen_longer_share" in r:
        lines.append(
            f"pairs where chosen is longer than rejected: {100 * r['chosen_longer_share']:.1f}% "
            "(far from 50% means DPO can learn length instead of quality)"
        )
        lines.append(f"pairs with chosen identical to rejected: {r['identical_pairs']}")
    if "kto" in r:
        k = r["kto"]
        lines.append(
            f"KTO labels: {k['desirable']} desirable, {k['undesirable']} undesirable; recommended "
            f"desirable_weight {k['desirable_weight']}, undesirable_weight {k['undesirable_weight']} ({k['why']})"
        )
    return "\n".join(lines)
