"""Distillation losses as pure functions over next-token logits.

The generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024, "On-policy distillation of language
models", eq. 1 and sec. 3.1), per token, with TRL's convention for `beta`: the mixture is
m = beta * p_teacher + (1 - beta) * p_student and

    JSD_beta = beta * KL(p_teacher || m) + (1 - beta) * KL(p_student || m),

whose ends (taken exactly, not as the limit, which goes to 0) are beta = 0: forward KL(p_teacher || p_student)
(mode covering, as supervised KD) and beta = 1: reverse KL(p_student || p_teacher) (mode seeking).
"""

from __future__ import annotations

import math

import torch


def _float(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()  # half -> fp32; float64 kept


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row of (N, V) log-probabilities: sum_v p (log p - log q), (N,)."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-token generalized JSD between the student's and the teacher's next-token distributions.

    student_logits, teacher_logits: (N, V), one row per completion token; returns (N,). Gradients flow
    through the student only when the teacher's logits are detached (the stage computes them under no_grad).
    """
    log_s = torch.log_softmax(_float(student_logits), dim=-1)  # (N, V)
    log_t = torch.log_softmax(_float(teacher_logits), dim=-1)
    if beta == 0.0:
        return _kl(log_t, log_s)
    if beta == 1.0:
        return _kl(log_s, log_t)
    log_m = torch.logsumexp(torch.stack([log_s + math.log(1 - beta), log_t + math.log(beta)]), dim=0)
    return beta * _kl(log_t, log_m) + (1 - beta) * _kl(log_s, log_m)


def generalized_jsd_grad(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float
) -> torch.Tensor:
    """d generalized_jsd / d student_logits, (N, V), without autograd: what a chunked output layer applies.

    With s, t the two log-softmaxes and p_s = exp(s): beta = 0 (KL(t || s)): p_s - p_t; beta = 1 (KL(s || t)):
    p_s * ((s - t) - KL(s || t)); otherwise, with log m the mixture's log-probs and r = s - log m:
    (1 - beta) * p_s * (r - sum_v p_s r) (the teacher's terms do not depend on the student but through m,
    whose terms cancel)."""
    s = torch.log_softmax(_float(student_logits), dim=-1)
    t = torch.log_softmax(_float(teacher_logits), dim=-1)
    if beta == 0.0:
        return s.exp_().sub_(t.exp_())
    if beta == 1.0:
        r = s - t
    else:
        r = s - torch.logaddexp(s + math.log(1 - beta), t + math.log(beta))
    del t
    p = s.exp_()
    r.sub_((p * r).sum(-1, keepdim=True))
    return r.mul_(p) if beta == 1.0 else r.mul_(p).mul_(1 - beta)
