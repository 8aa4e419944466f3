"""Scores that need a model's log-probs: KL to a reference, implicit-reward preference accuracy, perplexity.

All go through `logprobs.completion_token_stats`, the function training uses, so a number here is the number
the loss saw."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from alignkit.data.batches import build_pair_rows, build_sft_rows, pad
from alignkit.data.formats import Example
from alignkit.losses.tokens import per_row_sum
from alignkit.modeling.logprobs import completion_token_stats


@torch.no_grad()
def sequence_logps(
    model: nn.Module, ids: list[list[int]], masks: list[list[int]], pad_token_id: int, batch_size: int = 16
) -> tuple[list[float], list[int]]:
    """Sum of log p over the tokens where mask is 1 (each predicted from the one before), and their count,
    for each row."""
    device = next(model.parameters()).device
    sums: list[float] = []
    counts: list[int] = []
    for i in range(0, len(ids), batch_size):
        chunk_ids, chunk_masks = ids[i : i + batch_size], masks[i : i + batch_size]
        input_ids = pad(chunk_ids, pad_token_id).to(device)
        attention = pad([[1] * len(s) for s in chunk_ids], 0).to(device)
        mask = pad(chunk_masks, 0).to(device)
        stats = completion_token_stats(model, input_ids, attention, mask)
        sums += per_row_sum(stats.logps.double(), stats.rows, len(chunk_ids)).tolist()
        counts += mask[:, 1:].sum(1).tolist()
    return sums, counts


def _prompt_completion(prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> tuple[list, list]:
    ids = [p + c for p, c in zip(prompt_ids, completion_ids)]
    masks = [[0] * len(p) + [1] * len(c) for p, c in zip(prompt_ids, completion_ids)]
    return ids, masks


def kl_per_sample(
    model: nn.Module,
    reference: nn.Module,
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    pad_token_id: int,
    batch_size: int = 16,
) -> list[float]:
    """log pi(y|x) - log pi_ref(y|x) for completions y sampled from pi (temperature 1): their mean is the
    sequence-level KL(pi || pi_ref) (the k1 estimator)."""
    ids, masks = _prompt_completion(prompt_ids, completion_ids)
    mine, _ = sequence_logps(model, ids, masks, pad_token_id, batch_size)
    ref, _ = sequence_logps(reference, ids, masks, pad_token_id, batch_size)
    return [a - b for a, b in zip(mine, ref)]


def implicit_reward_margins(
    model: nn.Module,
    reference: nn.Module,
    tokenizer: Any,
    pairs: list[Example],
    beta: float,
    max_length: int,
    batch_size: int = 16,
) -> list[float]:
    """beta * [(log pi - log pi_ref)(chosen) - (log pi - log pi_ref)(rejected)] per pair: DPO's implicit reward
    margin; positive means the model ranks the chosen answer first. Pairs are tokenised as DPO trains on them."""
    rows, _, _ = build_pair_rows(pairs, tokenizer, max_length)
    out = []
    for key in ("chosen_ids", "rejected_ids"):
        ids, masks = _prompt_completion([r["prompt_ids"] for r in rows], [r[key] for r in rows])
        ids, masks = [s[:max_length] for s in ids], [m[:max_length] for m in masks]
        mine, _ = sequence_logps(model, ids, masks, tokenizer.pad_token_id, batch_size)
        ref, _ = sequence_logps(reference, ids, masks, tokenizer.pad_token_id, batch_size)
        out.append([a - b for a, b in zip(mine, ref)])
    return [beta * (c - r) for c, r in zip(*out)]


def nll_per_row(
    model: nn.Module, tokenizer: Any, examples: list[Example], max_length: int, batch_size: int = 16
) -> tuple[list[float], list[int]]:
    """Negative log-likelihood (summed) and token count of the completion tokens of held-out SFT rows: the
    tokens SFT trains on, masked as it masks them."""
    rows, _ = build_sft_rows(examples, tokenizer, max_length)
    sums, counts = sequence_logps(
        model,
        [r["input_ids"] for r in rows],
        [r["completion_mask"] for r in rows],
        tokenizer.pad_token_id,
        batch_size,
    )
    return [-s for s in sums], counts
