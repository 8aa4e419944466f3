"""The online-RL pieces as pure functions over tensors: group advantages, clipped surrogate and value losses, KL
estimators, PPO's per-token rewards, GAE, whitening, DAPO's overlong penalty, and the GRPO family's policy loss
with its registry.
"""

from __future__ import annotations

import torch

from alignkit.modeling.logprobs import per_row_sum


def group_advantages(
    rewards: torch.Tensor, num_generations: int, estimator: str = "grpo", eps: float = 1e-4
) -> torch.Tensor:
    """Advantages relative to each prompt's group of `num_generations` completions; rewards (N,) grouped.

    grpo: (r - mean) / (std + eps) (Shao et al. 2024, DeepSeekMath eq. 3, unbiased std as TRL);
    dr_grpo: r - mean, no std scaling (Liu et al. 2025, "Understanding R1-Zero-like training");
    rloo: r minus the mean of the *other* completions (Ahmadian et al. 2024, eq. 6).
    """
    r = rewards.view(-1, num_generations)
    mean = r.mean(dim=1, keepdim=True)
    if estimator == "grpo":
        adv = (r - mean) / (r.std(dim=1, keepdim=True) + eps)
    elif estimator == "dr_grpo":
        adv = r - mean
    elif estimator == "rloo":
        adv = r - (r.sum(dim=1, keepdim=True) - r) / (num_generations - 1)
    else:
        raise ValueError(f"unknown advantage estimator {estimator}")
    return adv.reshape(-1)


def clipped_surrogate(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped objective as a loss, per element (Schulman et al. 2017, eq. 7), with DAPO's decoupled
    clip range [1 - eps_low, 1 + eps_high] (Yu et al. 2025, eq. 10). Returns (loss, was_clipped)."""
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    loss = -torch.min(ratio * advantages, clipped * advantages)
    was_clipped = (ratio * advantages) > (clipped * advantages)
    return loss, was_clipped


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, cliprange_value: float
) -> torch.Tensor:
    """PPO's clipped value loss, per element: 0.5 * max((V - R)^2, (V_clip - R)^2), V_clip kept within
    `cliprange_value` of the rollout's value (Ziegler et al. 2019; Huang et al. 2024, detail 9)."""
    v_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    return 0.5 * torch.max((values - returns) ** 2, (v_clipped - returns) ** 2)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate exp(ref - pi) - (ref - pi) - 1 >= 0 (Schulman's k3), as GRPO uses."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def dapo_overlong_penalty(
    lengths: torch.Tensor, max_new_tokens: int, buffer_len: int, factor: float = 1.0
) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13): 0 up to L_max - L_cache, then a linear
    ramp down to -1 at L_max (times `factor`)."""
    start = max_new_tokens - buffer_len
    return -factor * torch.clamp((lengths.float() - start) / max(buffer_len, 1), min=0.0, max=1.0)


def pad_right(flat: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """(N,) values of rows of `lengths` tokens, concatenated -> (B, max length), left-aligned, 0 after each row."""
    mask = (
        torch.arange(max(lengths, default=0), device=flat.device)[None, :]
        < torch.tensor(lengths, device=flat.device)[:, None]
    )
    out = flat.new_zeros(mask.shape)
    out[mask] = flat
    return out


def ppo_token_rewards(
    scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO-RLHF's per-token rewards (Ziegler et al. 2019; Ouyang et al. 2022, eq. 2): the KL penalty
    -kl_coef * (log pi - log ref) on every completion token, plus the sequence's score on its last token.

    scores: (B,); logps, ref_logps (the rollout policy's and the reference's), mask: (B, T), completion tokens
    left-aligned, mask 1 on them, every row at least one token. Returns (rewards, per-token KL log pi - log ref),
    both (B, T) and 0 off the mask.
    """
    kl = (logps - ref_logps) * mask
    rewards = -kl_coef * kl
    last = mask.sum(1).long() - 1  # (B,) position of each completion's last token
    rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += scores.to(rewards.dtype)
    return rewards, kl


def ppo_advantages(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
    whiten_advantages: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and value targets of a PPO rollout, all (B, T): GAE over the per-token rewards, returns =
    advantages + values (before whitening: the critic learns the unwhitened return), then the advantages
    whitened over the batch's completion tokens (as TRL's PPO trainers)."""
    adv, returns = gae(rewards, values, mask, gamma, lam)
    if whiten_advantages:
        adv = whiten(adv, mask)
    return adv, returns


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) over response tokens.

    rewards, values, mask: (B, T), mask 1 on response tokens (left-aligned). Returns (advantages, returns),
    0 off the mask.
    """
    b, t = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(b, dtype=rewards.dtype, device=rewards.device)
    for i in reversed(range(t)):
        next_value = values[:, i + 1] * mask[:, i + 1] if i + 1 < t else torch.zeros_like(last)
        delta = rewards[:, i] + gamma * next_value - values[:, i]
        last = (delta + gamma * lam * last * (mask[:, i + 1] if i + 1 < t else 0)) * mask[:, i]
        adv[:, i] = last
    return adv, (adv + values) * mask


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise to unit variance (and zero mean) over the masked elements of the whole batch, 0 off the mask.

    The variance is the unbiased one, as TRL's `masked_whiten` (and `whiten_rewards`, which uses `Tensor.std`).
    """
    n = mask.sum()
    mean = (values * mask).sum() / n.clamp(min=1)
    var = (((values - mean) * mask) ** 2).sum() / (n - 1).clamp(min=1)
    out = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


# loss_type -> (advantage estimator for `group_advantages`, aggregation for `grpo_policy_loss`)
#   seq_mean: mean over each completion's tokens, then over completions (GRPO, Shao et al. 2024, eq. 3)
#   max_len:  sum over tokens / max_new_tokens per completion (Dr. GRPO, Liu et al. 2025: no length bias)
#   token:    sum over all tokens / all tokens (DAPO, Yu et al. 2025, eq. 8)
#   sequence: one importance ratio per completion, exp(mean_t log ratio) (GSPO, Zheng et al. 2025, eq. 7)
#   sequence_sum: the whole completion's probability ratio, exp(sum_t log ratio), clipped, mean over
#             completions; the KL goes into the reward, not the loss (RLOO, Ahmadian et al. 2024; TRL's RLOOTrainer)
GRPO_RECIPES: dict[str, tuple[str, str]] = {
    "grpo": ("grpo", "seq_mean"),
    "dr_grpo": ("dr_grpo", "max_len"),
    "dapo": ("grpo", "token"),
    "gspo": ("grpo", "sequence"),
    "rloo": ("rloo", "sequence_sum"),
}
GRPO_LOSS_TYPES = tuple(GRPO_RECIPES)


def grpo_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    rows: torch.Tensor,
    aggregation: str,
    epsilon_low: float,
    epsilon_high: float,
    max_new_tokens: int,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    kl_bias_correction: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The GRPO family's clipped policy loss, summed over completions (or tokens, for `token`).

    logps, old_logps, ref_logps: (N,) completion-token log-probs, flattened; rows: (N,) completion index of
    each token; advantages: (B,) one per completion. The caller divides by the number of completions (or of
    tokens, for `token`) summed over the whole global batch. With `ref_logps`, beta * k3 KL is added per token,
    weighted by the importance ratio when `kl_bias_correction` (DeepSeek-V3.2, eq. 7: the unbiased gradient
    of the reverse KL when samples come from the old policy; TRL's `use_bias_correction_kl`, on by default).
    Returns (loss sum, was_clipped per token or per completion, per-token k3 KL or None).
    """
    n = advantages.shape[0]
    lengths = per_row_sum(torch.ones_like(logps), rows, n).clamp(min=1)
    if aggregation == "sequence_sum" and ref_logps is not None:
        raise ValueError("sequence_sum (RLOO) takes its KL penalty in the reward, not in the loss")
    if aggregation in ("sequence", "sequence_sum"):
        seq_log_ratio = per_row_sum(logps - old_logps, rows, n)
        if aggregation == "sequence":
            seq_log_ratio = seq_log_ratio / lengths
        seq_loss, clipped = clipped_surrogate(
            seq_log_ratio, torch.zeros_like(seq_log_ratio), advantages, epsilon_low, epsilon_high
        )
        token_loss = torch.zeros_like(logps)
        ratio = torch.exp(seq_log_ratio)[rows]
    else:
        token_loss, clipped = clipped_surrogate(logps, old_logps, advantages[rows], epsilon_low, epsilon_high)
        seq_loss = torch.zeros(n, dtype=logps.dtype, device=logps.device)
        ratio = torch.exp(logps - old_logps)
    kl = None
    if ref_logps is not None:
        kl = k3_kl(logps, ref_logps)
        token_loss = token_loss + beta * (kl * ratio if kl_bias_correction else kl)
    if aggregation in ("seq_mean", "sequence", "sequence_sum"):
        loss = (per_row_sum(token_loss, rows, n) / lengths).sum() + seq_loss.sum()
    elif aggregation == "max_len":
        loss = token_loss.sum() / max_new_tokens
    elif aggregation == "token":
        loss = token_loss.sum()
    else:
        raise ValueError(f"unknown aggregation {aggregation}")
    return loss, clipped, kl
