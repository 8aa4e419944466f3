"""Per-token log-probs of the completion tokens, without the full `[B, T, V]` logits. Imports torch only.

The backbone returns hidden states (B, T, H); only the positions that predict a completion token are kept
(N of them), and the output layer runs over those in chunks of `chunk_size` rows: the forward keeps one
(chunk, V) block at a time and the backward recomputes it (`_FusedHead` from `FUSED_MIN_VOCAB` entries on,
activation checkpointing below it and for LoRA-wrapped or softcapped heads). With a 150k vocabulary the
logits are the largest tensor of a step; here they never exist whole. Values equal the straightforward
`log_softmax(lm_head(h))` to float32 rounding, and so do the gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class TokenStats:
    """Per completion token (flattened over the batch in row order), N entries each."""

    logps: torch.Tensor  # (N,) log p(token | prefix), differentiable
    mean_logits: torch.Tensor  # (N,) vocab-mean logit (TRL's `logits/*` metrics), detached
    entropy: torch.Tensor  # (N,) entropy of the next-token distribution (differentiable)
    is_top1: torch.Tensor  # (N,) the token is the argmax, detached
    rows: torch.Tensor  # (N,) which batch row each token belongs to


# The fused head is used from this vocabulary size on (every real model's): below it the logits are small and
# the plain chunked path is kept, whose float32 rounding the tiny models' recipes (the quickstart) were tuned on.
FUSED_MIN_VOCAB = 16_384


def _head_transform(model: nn.Module) -> tuple[nn.Module, float | None, float | None]:
    config = getattr(model, "config", None)
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    return model.get_output_embeddings(), softcap, scale


def _head_logits(
    hidden: torch.Tensor, head: nn.Module, softcap: float | None, scale: float | None
) -> torch.Tensor:
    """The output layer on hidden states (N, H) -> logits (N, V) in float32 (float64 kept), scaled and soft-capped
    as the model's own forward does."""
    # a LoRA-wrapped head applies its adapter through its forward, and ZeRO-3 gathers a head's weight only for
    # its module's call; a plain one is read as weight and bias (the module call segfaulted under FSDP2 on CPU,
    # torch 2.13)
    call = hasattr(head, "base_layer") or _partitioned(head)
    logits = head(hidden) if call else F.linear(hidden, head.weight, getattr(head, "bias", None))
    logits = logits if logits.dtype == torch.float64 else logits.float()  # half -> fp32; float64 kept
    if scale is not None:
        logits = logits * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _chunk_logps(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    head: nn.Module,
    softcap: float | None,
    scale: float | None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, ...]:
    logits = _head_logits(hidden, head, softcap, scale)  # (c, V)
    if temperature != 1.0:  # the distribution an online rollout sampled from: the model's logits / T
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logps = logp_all.gather(-1, labels[:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)  # differentiable: PPO's entropy bonus
    with torch.no_grad():
        top1 = logits.argmax(-1) == labels
        mean_logits = logits.mean(-1)
    return logps, mean_logits, entropy, top1


def hidden_states(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs: Any
) -> torch.Tensor:
    """Final (normed) hidden states (B, T, H), through the model's own forward (so DDP / FSDP wrappers see
    the call) with the output layer applied to the last position only (`logits_to_keep=1`)."""
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        use_cache=False,
        output_hidden_states=True,
        logits_to_keep=1,
        **kwargs,
    )
    return out.hidden_states[-1]


def completion_logits(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor
) -> torch.Tensor:
    """The whole next-token distribution's logits (N, V) at every token t >= 1 with completion_mask[t] == 1
    (predicted from position t - 1), in row order: what a distillation loss compares token by token."""
    head, softcap, scale = _head_transform(getattr(model, "module", model))  # DDP: the wrapped model
    return _head_logits(
        completion_hidden(model, input_ids, attention_mask, completion_mask), head, softcap, scale
    )


def completion_hidden(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor
) -> torch.Tensor:
    """The hidden states (N, H) that predict each token t >= 1 with completion_mask[t] == 1, in row order."""
    hidden = hidden_states(model, input_ids, attention_mask)  # (B, T, H)
    return hidden[:, :-1][completion_mask[:, 1:].bool()]


def completion_token_stats(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    chunk_size: int | None = None,
    temperature: float = 1.0,
    **model_kwargs: Any,
) -> TokenStats:
    """Stats of every token t >= 1 with completion_mask[t] == 1, predicted from position t - 1.

    input_ids, attention_mask, completion_mask: (B, T). Returns flattened (N,) tensors in row order.
    `model_kwargs` go to the model's forward (e.g. `position_ids` of packed rows).
    """
    hidden = hidden_states(model, input_ids, attention_mask, **model_kwargs)  # (B, T, H)
    target = completion_mask[:, 1:].bool()  # (B, T-1): token t+1 is a completion token
    h = hidden[:, :-1][target]  # (N, H)
    labels = input_ids[:, 1:][target]  # (N,)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(target)[target]
    return head_stats(model, h, labels, rows, chunk_size, temperature)


def token_stats_at(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    predict_at: torch.Tensor,
    labels: torch.Tensor,
    rows: torch.Tensor,
    chunk_size: int | None = None,
    temperature: float = 1.0,
    **model_kwargs: Any,
) -> TokenStats:
    """Stats of explicit (predictor position, token) pairs: token `labels[i]` predicted from the hidden state
    at flat position `predict_at[i]` of the (B*T) positions, counted in row `rows[i]`.

    For layouts where a token's predictor is not the position before it (a shared prompt whose last token
    predicts the first token of each completion; see `alignkit.data.shared_prefix`). `attention_mask` may be
    2-D or 4-D; `model_kwargs` go to the forward (e.g. `position_ids`)."""
    hidden = hidden_states(model, input_ids, attention_mask, **model_kwargs)  # (B, T, H)
    return head_stats(model, hidden.flatten(0, 1)[predict_at], labels, rows, chunk_size, temperature)


def head_stats(
    model: nn.Module,
    h: torch.Tensor,
    labels: torch.Tensor,
    rows: torch.Tensor,
    chunk_size: int | None = None,
    temperature: float = 1.0,
) -> TokenStats:
    """The output layer over hidden states `h` (N, H) in chunks: the stats of `labels` (N,).

    A plain linear head of at least `FUSED_MIN_VOCAB` entries runs through `_FusedHead` (512-token chunks):
    one pass per chunk forward, and a backward that recomputes the chunk's logits and writes their gradient
    directly. A smaller, LoRA-wrapped or softcapped head runs in 1024-token chunks under activation
    checkpointing instead."""
    head, softcap, scale = _head_transform(getattr(model, "module", model))  # unwrap DDP for the weight
    if h.shape[0] == 0:
        empty = h.new_zeros(0, dtype=torch.promote_types(h.dtype, torch.float32))
        return TokenStats(empty, empty, empty, empty.bool(), rows)
    if fused_head_applies(model):
        chunk_size = chunk_size or 512
        factor = (1.0 if scale is None else float(scale)) / temperature
        bias = getattr(head, "bias", None)
        logps, entropy, mean_logits, top1 = _FusedHead.apply(h, head.weight, bias, labels, factor, chunk_size)
        return TokenStats(logps, mean_logits, entropy, top1, rows)
    chunk_size = chunk_size or 1024
    parts = []
    for start in range(0, h.shape[0], chunk_size):
        args = (h[start : start + chunk_size], labels[start : start + chunk_size], head, softcap, scale)
        if torch.is_grad_enabled() and h.requires_grad:
            parts.append(checkpoint(_chunk_logps, *args, temperature, use_reentrant=False))
        else:
            parts.append(_chunk_logps(*args, temperature))
    logps, mean_logits, entropy, top1 = (torch.cat(p) for p in zip(*parts))
    return TokenStats(logps, mean_logits, entropy, top1, rows)


def fused_head_applies(model: nn.Module) -> bool:
    """Whether `head_stats` runs the fused head: a plain linear output layer (no LoRA on it, no softcap) of
    at least `FUSED_MIN_VOCAB` entries."""
    head, softcap, _ = _head_transform(getattr(model, "module", model))
    plain = (
        head is not None and softcap is None and not hasattr(head, "base_layer") and not _partitioned(head)
    )
    return plain and head.weight.shape[0] >= FUSED_MIN_VOCAB


def _partitioned(head: nn.Module) -> bool:
    """DeepSpeed ZeRO-3 keeps the weight partitioned outside its module's call (`ds_id` marks such a tensor)."""
    return hasattr(getattr(head, "weight", None), "ds_id")


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, factor: float) -> torch.Tensor:
    z = F.linear(h, weight, bias)
    z = z if z.dtype == torch.float64 else z.float()  # half -> fp32; float64 kept
    return z if factor == 1.0 else z.mul_(factor)  # z is the linear's own output: scaled in place


class _FusedHead(torch.autograd.Function):
    """logps and entropy (differentiable), mean logit and top-1 (not) of z = factor * (h @ W.T + b), chunked.

    Forward keeps per token only log Z and E[z] (the entropy is log Z - E[z]); backward recomputes a chunk's
    logits z and applies d logp / dz = onehot - p and d H / dz = -p (z - E[z]) in place, then the two GEMMs.
    The straightforward autograd of `log_softmax(lm_head(h))` gives the same values and gradients."""

    @staticmethod
    def forward(ctx, h, weight, bias, labels, factor, chunk_size):  # noqa: ANN001, ANN205
        out = [[] for _ in range(4)]  # logps, entropy, mean logits, top1
        lse_all, ez_all = [], []
        for start in range(0, h.shape[0], chunk_size):
            z = _logits(h[start : start + chunk_size], weight, bias, factor)
            y = labels[start : start + chunk_size, None]
            lse = torch.logsumexp(z, dim=-1)
            ez = (z - lse[:, None]).exp_().mul_(z).sum(-1)  # E[z] under softmax(z): one block beside z
            out[0].append(z.gather(-1, y).squeeze(-1) - lse)
            out[1].append(lse - ez)
            out[2].append(z.mean(-1))
            out[3].append(z.argmax(-1) == y.squeeze(-1))
            lse_all.append(lse)
            ez_all.append(ez)
            del z  # freed before the next chunk's block is made
        ctx.save_for_backward(h, weight, bias, labels, torch.cat(lse_all), torch.cat(ez_all))
        ctx.factor, ctx.chunk_size = factor, chunk_size
        dev = h.device.type  # under autocast the forward's linear ran in its dtype: so does the backward's
        ctx.dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
        logps, entropy, mean_logits, top1 = (torch.cat(o) for o in out)
        ctx.mark_non_differentiable(mean_logits, top1)
        return logps, entropy, mean_logits, top1

    @staticmethod
    def backward(ctx, g_logps, g_entropy, _g_mean, _g_top1):  # noqa: ANN001, ANN205
        h, weight, bias, labels, lse, ez = ctx.saved_tensors
        factor, chunk, dtype = ctx.factor, ctx.chunk_size, ctx.dtype
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        grads = HeadGrads(ctx.needs_input_grad[:3], h, weight, bias)
        for start in range(0, h.shape[0], chunk):
            end = min(start + chunk, h.shape[0])
            hc = h[start:end].to(dtype)
            gz = _logit_grad(
                _logits(hc, w, b, factor),
                lse[start:end],
                ez[start:end],
                labels[start:end],
                g_logps,
                g_entropy,
                start,
                end,
            )
            grads.add((gz.mul_(factor) if factor != 1.0 else gz).to(dtype), hc, w, start, end)
            del gz  # freed before the next chunk's block is made
        return grads.h, grads.w, grads.b, None, None, None


class HeadGrads:
    """An output layer's gradients (of its input h, weight and bias, each where needed), accumulated chunk by
    chunk from each chunk's gradient on its logits."""

    def __init__(
        self, needed: tuple[bool, ...], h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> None:
        self.h = torch.zeros_like(h) if needed[0] else None
        self.w = torch.zeros_like(weight) if needed[1] else None
        self.b = torch.zeros_like(bias) if needed[2] and bias is not None else None

    def add(self, gz: torch.Tensor, hc: torch.Tensor, w: torch.Tensor, start: int, end: int) -> None:
        """gz: (c, V') on rows start:end, whose inputs are hc (c, H) and whose logits came from `w`, the
        weight's first V' rows (a narrower vocabulary leaves the rest without gradient)."""
        width = gz.shape[1]
        if self.h is not None:
            self.h[start:end] = gz @ w
        if self.w is not None:
            if gz.dtype == self.w.dtype:
                self.w[:width].addmm_(gz.t(), hc)  # no weight-sized temporary
            else:
                self.w[:width].add_(gz.t() @ hc)
        if self.b is not None:
            self.b[:width].add_(gz.sum(0))


def _logit_grad(z, lse, ez, labels, g_logps, g_entropy, start, end):  # noqa: ANN001, ANN202
    """The gradient on one chunk's logits z (overwritten): g_logp (onehot - p) - g_H p (z - E[z]). With no
    entropy gradient p is made in z's own storage; with one, p is the only other (chunk, V) block."""
    g = g_logps[start:end, None].to(z.dtype) if g_logps is not None else None
    if g_entropy is None:
        gz = z.sub_(lse[:, None]).exp_().mul_(-g)  # p, in place
    else:
        p = (z - lse[:, None]).exp_()  # softmax
        z.sub_(ez[:, None]).mul_(-g_entropy[start:end, None].to(z.dtype))
        gz = p.mul_(z if g is None else z.sub_(g))
        del z
    if g is not None:
        gz.scatter_add_(-1, labels[:, None], g)
    return gz
