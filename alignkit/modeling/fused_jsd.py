"""Distillation's generalized JSD over the two models' output layers in chunks, without the (N, V) logits.

A distillation step compares the student's and the teacher's whole next-token distributions at every
completion token. Made whole, each model's logits are N x V floats (2,366 tokens x 151,936 entries: 1.4 GB
per float32 copy), and autograd keeps several copies. Here both output layers run over `chunk_size` tokens
at a time (128: a chunk's few (128, V) blocks are small beside the models; 512 took 2x the peak memory of
128 at the benchmark's shape for 5% less time): the forward keeps per token only the JSD, the two log-normalisers and the tokens' log-probs; the
backward recomputes a chunk's two blocks of logits and applies the JSD's gradient in closed form
(`alignkit.losses.distill.generalized_jsd_grad`), then the two GEMMs of the student's output layer. Values
and gradients equal `generalized_jsd` on the full logits (tests/modeling/test_fused_jsd.py, float64).

Used for plain linear heads of at least `FUSED_MIN_VOCAB` entries (every real model's), as `_FusedHead`."""

from __future__ import annotations

import torch
from torch import nn

from alignkit.losses.distill import generalized_jsd, generalized_jsd_grad
from alignkit.modeling.logprobs import HeadGrads, _head_transform, _logits, fused_head_applies


def fused_jsd_applies(student: nn.Module, teacher: nn.Module) -> bool:
    return fused_head_applies(student) and fused_head_applies(teacher)


def chunked_jsd(
    student: nn.Module,
    h_student: torch.Tensor,
    teacher: nn.Module,
    h_teacher: torch.Tensor,
    labels: torch.Tensor,
    beta: float,
    chunk_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per completion token: the generalized JSD (differentiable in the student), and the student's and the
    teacher's log-prob of the token itself (detached). `h_*`: the hidden states that predict the tokens (N, H);
    both heads are cut to the narrower vocabulary (padded vocabularies of one tokenizer)."""
    (ws, bs, fs), (wt, bt, ft) = (_linear(m) for m in (student, teacher))
    width = min(ws.shape[0], wt.shape[0])
    if h_student.shape[0] == 0:  # no completion token: nothing to compare
        empty = h_student.new_zeros(0, dtype=torch.promote_types(h_student.dtype, torch.float32))
        return empty + 0 * h_student.sum(), empty, empty
    return _FusedJSD.apply(
        h_student, ws, bs, h_teacher.detach(), wt, bt, labels, beta, fs, ft, width, chunk_size
    )


def _linear(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    head, _, scale = _head_transform(getattr(model, "module", model))
    return head.weight, getattr(head, "bias", None), 1.0 if scale is None else float(scale)


def _block(h, w, b, factor, width):  # noqa: ANN001, ANN202
    return _logits(h, w[:width], None if b is None else b[:width], factor)


class _FusedJSD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, labels, beta, fs, ft, width, chunk):  # noqa: ANN001, ANN205
        jsd, lp_s, lp_t = [], [], []
        for start in range(0, hs.shape[0], chunk):
            y = labels[start : start + chunk, None]
            zs = _block(hs[start : start + chunk], ws, bs, fs, width)
            zt = _block(ht[start : start + chunk], wt, bt, ft, width)
            jsd.append(generalized_jsd(zs, zt, beta))
            lp_s.append((zs.gather(-1, y) - torch.logsumexp(zs, -1, keepdim=True)).squeeze(-1))
            lp_t.append((zt.gather(-1, y) - torch.logsumexp(zt, -1, keepdim=True)).squeeze(-1))
            del zs, zt  # freed before the next chunk's blocks are made
        ctx.save_for_backward(hs, ws, bs, ht, wt, bt)
        ctx.beta, ctx.factors, ctx.width, ctx.chunk = beta, (fs, ft), width, chunk
        dev = hs.device.type  # under autocast the forward's linears ran in its dtype: so do the backward's
        ctx.dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else ws.dtype
        lp_s, lp_t = torch.cat(lp_s), torch.cat(lp_t)
        ctx.mark_non_differentiable(lp_s, lp_t)
        return torch.cat(jsd), lp_s, lp_t

    @staticmethod
    def backward(ctx, g_jsd, _g_s, _g_t):  # noqa: ANN001, ANN205
        hs, ws, bs, ht, wt, bt = ctx.saved_tensors
        (fs, ft), width, chunk, dtype = ctx.factors, ctx.width, ctx.chunk, ctx.dtype
        w, wt = ws[:width].to(dtype), wt[:width].to(dtype)  # one cast for every chunk
        b, bt = (None if x is None else x[:width].to(dtype) for x in (bs, bt))
        grads = HeadGrads(ctx.needs_input_grad[:3], hs, ws, bs)
        for start in range(0, hs.shape[0], chunk):
            end = min(start + chunk, hs.shape[0])
            hc = hs[start:end].to(dtype)
            zs = _block(hc, w, b, fs, width)
            zt = _block(ht[start:end].to(dtype), wt, bt, ft, width)
            gz = generalized_jsd_grad(zs, zt, ctx.beta).mul_(g_jsd[start:end, None].to(zs.dtype) * fs)
            del zs, zt
            grads.add(gz.to(dtype), hc, w, start, end)
            del gz
        return grads.h, grads.w, grads.b, None, None, None, None, None, None, None, None, None
