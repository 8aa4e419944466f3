"""Examples -> token ids -> padded (or packed) tensor batches.

Tokenisation follows TRL 1.16 so that numbers can be compared with it token for token:
- standard (string) fields are tokenised with `tokenizer(text=...)`, an EOS is appended to an SFT
  completion that does not already end with one;
- conversational fields are rendered and tokenised by the tokenizer's chat template; the completion
  starts where the tokenised prompt (with the generation prompt) and the tokenised prompt+completion
  diverge. In multi-turn data every assistant message is a completion span (found the same way, turn by
  turn), and only those spans carry loss.
Truncation keeps the end of the prompt and cuts the end of the completion.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch

from alignkit.data.formats import Example, Messages
from alignkit.errors import UserError

IGNORE = -100


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_text(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text=text)["input_ids"])


def tokenize_chat(
    tokenizer: Any, messages: Messages, add_generation_prompt: bool = False, tools: list[dict] | None = None
) -> list[int]:
    """Token ids of `messages` rendered by the chat template; `tools` (function schemas) go to the template
    too, only when there are some (a tokenizer without tool support is never handed the argument)."""
    extra = {"tools": tools} if tools else {}
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt, **extra
    )
    return list(out["input_ids"])


def _with_eos(text: str, tokenizer: Any) -> str:
    eos = tokenizer.eos_token
    return text if eos is None or text.endswith(eos) else text + eos


@dataclass
class TruncationStats:
    """How many rows truncation touched; reported after tokenisation."""

    total: int = 0
    truncated: int = 0
    dropped: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def add(self, truncated: bool, dropped: bool) -> None:
        self.total += 1
        self.truncated += int(truncated and not dropped)
        self.dropped += int(dropped)

    def message(self) -> str:
        return (
            f"{self.total} rows tokenised: {self.truncated} truncated to max_length, "
            f"{self.dropped} dropped (no completion token left)"
        )


def _budget(
    prompt_len: int, completion_len: int, max_length: int, max_prompt_length: int | None
) -> tuple[int, int]:
    """Tokens to keep of (prompt, completion): the prompt keeps its end, the completion its start."""
    if max_prompt_length is not None and prompt_len > max_prompt_length:
        prompt_len = max_prompt_length
    if prompt_len + completion_len <= max_length:
        return prompt_len, completion_len
    keep_prompt = min(prompt_len, max(max_length - completion_len, max_length // 2))
    return keep_prompt, max(0, min(completion_len, max_length - keep_prompt))


# ------------------------------------------------------------------------------------------------ SFT
def _assistant_spans(
    tokenizer: Any, messages: Messages, first: int, tools: list[dict] | None = None
) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of the whole conversation and the [start, end) span of each assistant message at index >= first.

    An assistant message that calls tools (`tool_calls`, empty content) is a model output: it is a span too;
    tool results (role `tool`) are not."""
    ids = tokenize_chat(tokenizer, messages, tools=tools)
    spans = []
    for i, msg in enumerate(messages):
        if i < first or msg["role"] != "assistant":
            continue
        before = tokenize_chat(tokenizer, messages[:i], True, tools) if i > 0 else []
        upto = ids if i == len(messages) - 1 else tokenize_chat(tokenizer, messages[: i + 1], tools=tools)
        start = common_prefix_length(before, upto)
        end = common_prefix_length(upto, ids) if upto is not ids else len(ids)
        spans.append((start, end))
    return ids, spans


def encode_sft(ex: Example, tokenizer: Any) -> dict[str, list[int]]:
    """-> {"input_ids", "completion_mask"} (1 where the token is trained on)."""
    if isinstance(ex.completion, str):
        if not ex.prompt:  # plain language-modelling text: every token is a target
            ids = tokenize_text(tokenizer, _with_eos(ex.completion, tokenizer))
            return {"input_ids": ids, "completion_mask": [1] * len(ids)}
        prompt_ids = tokenize_text(tokenizer, str(ex.prompt))
        ids = tokenize_text(tokenizer, str(ex.prompt) + _with_eos(ex.completion, tokenizer))
        n = common_prefix_length(prompt_ids, ids)
        return {"input_ids": ids, "completion_mask": [0] * n + [1] * (len(ids) - n)}
    prompt = ex.prompt if isinstance(ex.prompt, list) else [{"role": "user", "content": ex.prompt}]
    ids, spans = _assistant_spans(tokenizer, prompt + list(ex.completion or []), len(prompt), ex.tools)
    mask = [0] * len(ids)
    for start, end in spans:
        mask[start:end] = [1] * (end - start)
    return {"input_ids": ids, "completion_mask": mask}


def truncate_sft(
    row: dict[str, list[int]], max_length: int, max_prompt_length: int | None
) -> tuple[dict, bool]:
    ids, mask = row["input_ids"], row["completion_mask"]
    if len(ids) <= max_length and max_prompt_length is None:
        return row, False
    first = mask.index(1) if 1 in mask else len(ids)
    keep_p, keep_c = _budget(first, len(ids) - first, max_length, max_prompt_length)
    new_ids = ids[first - keep_p : first + keep_c]
    new_mask = mask[first - keep_p : first + keep_c]
    return {"input_ids": new_ids, "completion_mask": new_mask}, len(new_ids) < len(ids)


def build_sft_rows(
    examples: list[Example], tokenizer: Any, max_length: int, max_prompt_length: int | None = None
) -> tuple[list[dict], TruncationStats]:
    stats, rows = TruncationStats(), []
    for ex in examples:
        row, truncated = truncate_sft(encode_sft(ex, tokenizer), max_length, max_prompt_length)
        dropped = 1 not in row["completion_mask"][1:]  # the first token is never a target
        stats.add(truncated, dropped)
        if not dropped:
            rows.append(row)
    if not rows:
        raise UserError(
            f"every row was truncated away (max_length={max_length}); raise `max_length` or "
            "lower `max_prompt_length`"
        )
    return rows, stats


def pack_rows(rows: list[dict], max_length: int, seed: int = 0) -> list[dict]:
    """Best-fit-decreasing packing into sequences of at most max_length tokens.

    Each packed row keeps `position_ids` that restart at 0 for every original row; the model builds a
    block-diagonal causal mask from them, so packed rows never attend to one another.
    """
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["input_ids"]))
    bins: list[list[int]] = []
    space: list[int] = []
    for i in order:
        n = len(rows[i]["input_ids"])
        best = min((b for b in range(len(bins)) if space[b] >= n), key=lambda b: space[b], default=None)
        if best is None:
            bins.append([i])
            space.append(max_length - n)
        else:
            bins[best].append(i)
            space[best] -= n
    random.Random(seed).shuffle(bins)
    packed = []
    for b in bins:
        ids, mask, pos = [], [], []
        for i in b:
            ids += rows[i]["input_ids"]
            mask += [0] + rows[i]["completion_mask"][
                1:
            ]  # the first token is not predicted from the row before
            pos += list(range(len(rows[i]["input_ids"])))
        packed.append({"input_ids": ids, "completion_mask": mask, "position_ids": pos})
    return packed


# --------------------------------------------------------------------------------------------- pairs
def full_ids(tokenizer: Any, prompt: Any, completion: Any, tools: list[dict] | None = None) -> list[int]:
    """Token ids of prompt + completion as one sequence (string concatenation + EOS, or the whole chat)."""
    if isinstance(completion, str):
        return tokenize_text(tokenizer, str(prompt) + _with_eos(completion, tokenizer))
    prompt = prompt if isinstance(prompt, list) else ([{"role": "user", "content": prompt}] if prompt else [])
    return tokenize_chat(tokenizer, prompt + completion, tools=tools)


def encode_rm_pair(ex: Example, tokenizer: Any) -> dict[str, Any]:
    """Reward-model pair: each side is the whole sequence (prompt + completion), scored at its last token."""
    return {
        "chosen_ids": full_ids(tokenizer, ex.prompt, ex.chosen, ex.tools),
        "rejected_ids": full_ids(tokenizer, ex.prompt, ex.rejected, ex.tools),
        "margin": ex.margin,
    }


def build_rm_rows(
    examples: list[Example], tokenizer: Any, max_length: int
) -> tuple[list[dict], TruncationStats]:
    """Pairs longer than max_length are dropped, not cut: a cut completion would be scored as if whole."""
    stats, rows = TruncationStats(), []
    for ex in examples:
        row = encode_rm_pair(ex, tokenizer)
        dropped = max(len(row["chosen_ids"]), len(row["rejected_ids"])) > max_length
        stats.add(False, dropped)
        if not dropped:
            rows.append(row)
    if not rows:
        raise UserError(f"every pair is longer than max_length={max_length} tokens; raise `max_length`")
    return rows, stats


def collate_rm(rows: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """One right-padded batch of 2B sequences: all chosen, then all rejected."""
    seqs = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
    batch = {"input_ids": pad(seqs, pad_token_id), "attention_mask": pad([[1] * len(s) for s in seqs], 0)}
    if any(r.get("margin") is not None for r in rows):
        batch["margin"] = torch.tensor([float(r.get("margin") or 0.0) for r in rows])
    return batch


def _prompt_ids(
    tokenizer: Any, prompt: Any, conversational: bool, tools: list[dict] | None = None
) -> list[int]:
    if not conversational:
        return tokenize_text(tokenizer, str(prompt))
    prompt = prompt if isinstance(prompt, list) else ([{"role": "user", "content": prompt}] if prompt else [])
    return tokenize_chat(tokenizer, prompt, add_generation_prompt=True, tools=tools)


def encode_dpo_pair(ex: Example, tokenizer: Any) -> dict[str, Any]:
    """TRL's split: the prompt is the longest token prefix that prompt, prompt+chosen and prompt+rejected share.

    Chosen and rejected keep their own ids after it, so the prompt can be run once for both (prefix sharing).
    """
    full_c = full_ids(tokenizer, ex.prompt, ex.chosen, ex.tools)
    full_r = full_ids(tokenizer, ex.prompt, ex.rejected, ex.tools)
    p = _prompt_ids(tokenizer, ex.prompt, not isinstance(ex.chosen, str), ex.tools)
    n = min(common_prefix_length(p, full_c), common_prefix_length(p, full_r))
    return {"prompt_ids": p[:n], "chosen_ids": full_c[n:], "rejected_ids": full_r[n:]}


def build_pair_rows(
    examples: list[Example], tokenizer: Any, max_length: int, max_prompt_length: int | None = None
) -> tuple[list[dict], TruncationStats, int]:
    """Tokenised pairs; pairs whose chosen equals rejected are skipped (counted), prompts that fill
    max_length are dropped, `max_prompt_length` keeps the end of the prompt. Returns (rows, stats, identical)."""
    stats, rows, identical = TruncationStats(), [], 0
    for ex in examples:
        if ex.chosen == ex.rejected:
            identical += 1
            continue
        row = encode_dpo_pair(ex, tokenizer)
        truncated = False
        if max_prompt_length is not None and len(row["prompt_ids"]) > max_prompt_length:
            row["prompt_ids"] = row["prompt_ids"][-max_prompt_length:]
            truncated = True
        longest = len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"]))
        dropped = len(row["prompt_ids"]) >= max_length
        stats.add(truncated or longest > max_length, dropped)
        if not dropped:
            row["where"] = ex.where
            rows.append(row)
    if not rows:
        what = (
            "every pair has chosen identical to rejected"
            if identical
            else f"every prompt fills max_length={max_length}"
        )
        raise UserError(f"no usable pairs: {what}; check the data or raise `max_length`")
    return rows, stats, identical


def collate_pairs(rows: list[dict], pad_token_id: int, max_length: int) -> dict[str, torch.Tensor]:
    """2B sequences, all prompt+chosen then all prompt+rejected, cut at max_length (the completion's end goes)."""
    seqs, masks = [], []
    for key in ("chosen_ids", "rejected_ids"):
        for r in rows:
            ids = (r["prompt_ids"] + r[key])[:max_length]
            seqs.append(ids)
            masks.append(([0] * len(r["prompt_ids"]) + [1] * len(r[key]))[:max_length])
    batch = {
        "input_ids": pad(seqs, pad_token_id),
        "attention_mask": pad([[1] * len(s) for s in seqs], 0),
        "completion_mask": pad(masks, 0),
    }
    if "ref_chosen_logps" in rows[0]:
        # float64, as stored: the stage casts them to the policy's dtype (a float64 run keeps every digit)
        batch["ref_chosen_logps"] = torch.tensor([r["ref_chosen_logps"] for r in rows], dtype=torch.float64)
        batch["ref_rejected_logps"] = torch.tensor(
            [r["ref_rejected_logps"] for r in rows], dtype=torch.float64
        )
    return batch


# ------------------------------------------------------------------------------------------ unpaired
def encode_unpaired(ex: Example, tokenizer: Any) -> dict[str, Any]:
    """Prompt / completion split at the longest shared token prefix (as for pairs), plus the label."""
    full = full_ids(tokenizer, ex.prompt, ex.completion, ex.tools)
    p = _prompt_ids(tokenizer, ex.prompt, not isinstance(ex.completion, str), ex.tools)
    n = common_prefix_length(p, full)
    return {"prompt_ids": p[:n], "completion_ids": full[n:], "label": bool(ex.label)}


def assign_kl_partners(rows: list[dict], chunk: int) -> None:
    """Give every row a mismatched completion for KTO's reference point z0.

    Rows are taken in consecutive chunks of the per-device batch size (as TRL does): row i of a chunk gets
    row i-1's completion, the chunk's first row its last. A chunk of one row (batch size 1, or a short
    last chunk) takes the completion of the row before it in the file, or after it for the first row,
    so that the pair is always mismatched.
    """
    n = len(rows)
    for start in range(0, n, chunk):
        idx = list(range(start, min(start + chunk, n)))
        if len(idx) == 1:
            other = idx[0] - 1 if idx[0] > 0 else (idx[0] + 1) % n
            rows[idx[0]]["kl_completion_ids"] = rows[other]["completion_ids"]
            continue
        for pos, i in enumerate(idx):
            rows[i]["kl_completion_ids"] = rows[idx[pos - 1]]["completion_ids"]


def build_unpaired_rows(
    examples: list[Example], tokenizer: Any, max_length: int, max_prompt_length: int | None, kl_chunk: int
) -> tuple[list[dict], TruncationStats]:
    stats, rows = TruncationStats(), []
    for ex in examples:
        row = encode_unpaired(ex, tokenizer)
        truncated = False
        if max_prompt_length is not None and len(row["prompt_ids"]) > max_prompt_length:
            row["prompt_ids"], truncated = row["prompt_ids"][-max_prompt_length:], True
        dropped = len(row["prompt_ids"]) >= max_length
        stats.add(truncated or len(row["prompt_ids"]) + len(row["completion_ids"]) > max_length, dropped)
        if not dropped:
            rows.append(row)
    if not rows:
        raise UserError(f"every row was truncated away: each prompt fills max_length={max_length}")
    assign_kl_partners(rows, kl_chunk)
    return rows, stats


def _sequences(rows: list[dict], key: str, pad_token_id: int, max_length: int) -> dict[str, torch.Tensor]:
    seqs = [(r["prompt_ids"] + r[key])[:max_length] for r in rows]
    masks = [([0] * len(r["prompt_ids"]) + [1] * len(r[key]))[:max_length] for r in rows]
    return {
        "input_ids": pad(seqs, pad_token_id),
        "attention_mask": pad([[1] * len(s) for s in seqs], 0),
        "completion_mask": pad(masks, 0),
    }


def collate_unpaired(rows: list[dict], pad_token_id: int, max_length: int) -> dict[str, torch.Tensor]:
    """Main sequences (prompt + completion) and KL sequences (prompt + another row's completion)."""
    batch = _sequences(rows, "completion_ids", pad_token_id, max_length)
    batch.update(
        {f"kl_{k}": v for k, v in _sequences(rows, "kl_completion_ids", pad_token_id, max_length).items()}
    )
    batch["label"] = torch.tensor([r["label"] for r in rows], dtype=torch.bool)
    for key in ("ref_logps", "ref_kl_logps"):  # float64, as the cache holds them; the stage casts
        if key in rows[0]:
            batch[key] = torch.tensor([r[key] for r in rows], dtype=torch.float64)
    return batch


def pad(seqs: list[list[int]], value: int, side: str = "right") -> torch.Tensor:
    width = max(len(s) for s in seqs)
    if side == "right":
        return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)
    return torch.tensor([[value] * (width - len(s)) + s for s in seqs], dtype=torch.long)


def collate_sft(rows: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; labels are -100 off the completion (the model's causal shift is done in the loss)."""
    input_ids = pad([r["input_ids"] for r in rows], pad_token_id)
    mask = pad([r["completion_mask"] for r in rows], 0)
    attention = pad([[1] * len(r["input_ids"]) for r in rows], 0)
    labels = input_ids.masked_fill(mask == 0, IGNORE)
    batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
    if "position_ids" in rows[0]:
        # packed rows: no attention mask, the position ids carry the sequence boundaries
        batch["position_ids"] = pad([r["position_ids"] for r in rows], 0)
        batch.pop("attention_mask")
    return batch
