"""Scores that need a model's log-probs: KL to a reference, implicit-reward preference accuracy, perplexity.

Log-probs of given tokens go through `logprobs.completion_token_stats`, the function training uses, so a number
here is the number the loss saw; the KL reads both models' whole next-token distributions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from alignkit.data.batches import build_pair_rows, build_sft_rows, pad
from alignkit.data.formats import Example
from alignkit.losses.tokens import per_row_sum
from alignkit.modeling.logprobs import completion_token_stats, hidden_states


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


@dataclass
class KLSamples:
    """Per sampled answer y of prompt x (N of them)."""

    exact: list[float]  # sum over y's positions t of KL(pi(.|x, y<t) || pi_ref(.|x, y<t)): never negative
    k1: list[float]  # log pi(y|x) - log pi_ref(y|x)
    logp: list[float]  # log pi(y|x), as scored


def _next_token_logps(model: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """(c, H) final hidden states -> (c, V) float64 log-probs of the next token, through the model's own
    output layer (a LoRA-wrapped one included), logit scale and soft-capping."""
    config = getattr(model, "config", None)
    z = model.get_output_embeddings()(h).double()
    scale, softcap = getattr(config, "logit_scale", None), getattr(config, "final_logit_softcapping", None)
    if scale is not None:
        z = z * scale
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    return torch.log_softmax(z, dim=-1)


@torch.no_grad()
def kl_per_sample(
    model: nn.Module,
    reference: nn.Module,
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    pad_token_id: int,
    batch_size: int = 16,
    chunk_size: int = 128,
) -> KLSamples:
    """For answers y sampled from pi (temperature 1), both estimators of the sequence KL(pi || pi_ref):

    - `exact`: sum_t KL(pi(.|x, y<t) || pi_ref(.|x, y<t)) over the whole next-token distributions along y. By
      the chain rule KL(pi || pi_ref) = E_y[sum_t KL_t], so its mean over samples is unbiased; each term is
      >= 0, and it averages over the vocabulary at every position instead of reading one sampled token, so
      its variance is far lower than k1's.
    - `k1`: log pi(y|x) - log pi_ref(y|x), the same expectation from the sampled tokens alone (heavy-tailed:
      most values fall below the mean and a few far above; negative values are common).

    The (c, V) log-probs exist one chunk of `chunk_size` completion positions at a time, in float64."""
    out = KLSamples([], [], [])
    device = next(model.parameters()).device
    for i in range(0, len(prompt_ids), batch_size):
        ids, masks = _prompt_completion(prompt_ids[i : i + batch_size], completion_ids[i : i + batch_size])
        input_ids = pad(ids, pad_token_id).to(device)
        attention = pad([[1] * len(s) for s in ids], 0).to(device)
        target = pad(masks, 0).to(device)[:, 1:].bool()  # (B, T-1): position t predicts completion token t+1
        labels = input_ids[:, 1:][target]  # (N,)
        rows = torch.arange(len(ids), device=device)[:, None].expand_as(target)[target]
        h_pi = hidden_states(model, input_ids, attention)[:, :-1][target]  # (N, H)
        h_ref = hidden_states(reference, input_ids, attention)[:, :-1][target]
        kl, logp, logp_ref = [], [], []
        for c in range(0, labels.shape[0], chunk_size):
            lp = _next_token_logps(model, h_pi[c : c + chunk_size])  # (c, V)
            lq = _next_token_logps(reference, h_ref[c : c + chunk_size])
            kl.append((lp.exp() * (lp - lq)).sum(-1))
            y = labels[c : c + chunk_size, None]
            logp.append(lp.gather(-1, y).squeeze(-1))
            logp_ref.append(lq.gather(-1, y).squeeze(-1))
        per_row = [per_row_sum(torch.cat(v), rows, len(ids)) for v in (kl, logp, logp_ref)]
        out.exact += per_row[0].tolist()
        out.logp += per_row[1].tolist()
        out.k1 += (per_row[1] - per_row[2]).tolist()
    return out


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
