"""The online-RL pieces as pure functions over tensors: clipped surrogate and value losses, KL estimators, PPO's
per-token rewards, GAE, whitening, DAPO's overlong penalty; and the GRPO family as two registries, advantage
estimators and objectives (`GRPO_LOSSES`), with the policy loss that calls an objective's pieces.
"""

from __future__ import annotations

from collections.abc import Callable, KeysView
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

from alignkit.losses.tokens import per_row_sum


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


# ================================================================================ the GRPO family
# Two registries in verl's shape (`register_adv_est`, `register_policy_loss` in verl/trainer/ppo/core_algos.py):
# advantage estimators by name, and GRPO-family objectives by name, each a frozen spec of pure functions and
# the facts the stage reads. A new variant is one spec (one function if it needs a new piece), one registry
# line, one test; nothing else branches on its name.
#
# Shapes: N completion tokens of a micro-batch, flattened row by row; B completions; `rows` (N,) gives each
# token's completion index.

AdvantageEstimator = Callable[[torch.Tensor, int], torch.Tensor]
"""(rewards (N,) in consecutive groups of `num_generations`, num_generations) -> advantages (N,)."""

ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {}


def register_adv_est(name: str) -> Callable[[AdvantageEstimator], AdvantageEstimator]:
    """Decorator: make an advantage estimator available under `name` (each name is registered once)."""

    def add(fn: AdvantageEstimator) -> AdvantageEstimator:
        if name in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"advantage estimator `{name}` is already registered")
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn

    return add


@register_adv_est("grpo")
def grpo_advantages(rewards: torch.Tensor, num_generations: int, eps: float = 1e-4) -> torch.Tensor:
    """(r - mean) / (std + eps) within each group (Shao et al. 2024, DeepSeekMath eq. 3), the unbiased std as
    TRL. rewards (N,) -> (N,)."""
    r = rewards.view(-1, num_generations)  # (groups, G)
    mean = r.mean(dim=1, keepdim=True)
    return ((r - mean) / (r.std(dim=1, keepdim=True) + eps)).reshape(-1)


@register_adv_est("dr_grpo")
def dr_grpo_advantages(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """r - mean within each group, no std scaling (Liu et al. 2025, "Understanding R1-Zero-like training",
    sec. 3.1: dividing by the std favours groups that are nearly all right or all wrong). (N,) -> (N,)."""
    r = rewards.view(-1, num_generations)  # (groups, G)
    return (r - r.mean(dim=1, keepdim=True)).reshape(-1)


@register_adv_est("rloo")
def rloo_advantages(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """r minus the mean of the *other* completions of its group (Ahmadian et al. 2024, eq. 6). (N,) -> (N,)."""
    r = rewards.view(-1, num_generations)  # (groups, G)
    return (r - (r.sum(dim=1, keepdim=True) - r) / (num_generations - 1)).reshape(-1)


def group_advantages(rewards: torch.Tensor, num_generations: int, estimator: str = "grpo") -> torch.Tensor:
    """The registered advantage estimator `estimator` over rewards (N,) grouped by prompt -> (N,)."""
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(
            f"unknown advantage estimator {estimator}; registered: {', '.join(ADVANTAGE_ESTIMATORS)}"
        )
    return ADVANTAGE_ESTIMATORS[estimator](rewards, num_generations)


class PolicyTerms(NamedTuple):
    """A micro-batch's clipped surrogate at one importance-ratio level."""

    token_loss: torch.Tensor  # (N,) per token; 0 where the ratio is taken per completion
    seq_loss: torch.Tensor  # (B,) per completion; 0 where the ratio is taken per token
    clipped: torch.Tensor  # (N,) or (B,) bool, at the ratio's level: where the clip was active
    ratio: torch.Tensor  # (N,) each token's importance ratio (its completion's, at sequence level)


ImportanceRatio = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float, float], PolicyTerms
]
"""(logps (N,), old_logps (N,), advantages (B,), rows (N,), epsilon_low, epsilon_high) -> PolicyTerms."""


def _lengths(tokens: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    """(B,) completion tokens per row, at least 1 (a divisor)."""
    return per_row_sum(torch.ones_like(tokens), rows, n).clamp(min=1)


def token_ratio(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    rows: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
) -> PolicyTerms:
    """One ratio pi / pi_old per token, clipped per token (GRPO, Shao et al. 2024, eq. 3, as PPO)."""
    token_loss, clipped = clipped_surrogate(logps, old_logps, advantages[rows], epsilon_low, epsilon_high)
    seq_loss = torch.zeros(advantages.shape[0], dtype=logps.dtype, device=logps.device)  # (B,)
    return PolicyTerms(token_loss, seq_loss, clipped, torch.exp(logps - old_logps))


def _sequence_terms(
    seq_log_ratio: torch.Tensor,
    logps: torch.Tensor,
    advantages: torch.Tensor,
    rows: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
) -> PolicyTerms:
    """The surrogate of one log-ratio (B,) per completion, clipped as a whole; its tokens carry no loss."""
    seq_loss, clipped = clipped_surrogate(
        seq_log_ratio, torch.zeros_like(seq_log_ratio), advantages, epsilon_low, epsilon_high
    )
    return PolicyTerms(torch.zeros_like(logps), seq_loss, clipped, torch.exp(seq_log_ratio)[rows])


def sequence_mean_ratio(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    rows: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
) -> PolicyTerms:
    """One ratio per completion, the geometric mean of its token ratios, exp(mean_t log ratio) (GSPO,
    Zheng et al. 2025, eq. 7): the length-normalised sequence likelihood ratio."""
    n = advantages.shape[0]
    seq_log_ratio = per_row_sum(logps - old_logps, rows, n) / _lengths(logps, rows, n)  # (B,)
    return _sequence_terms(seq_log_ratio, logps, advantages, rows, epsilon_low, epsilon_high)


def sequence_sum_ratio(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    rows: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
) -> PolicyTerms:
    """The whole completion's probability ratio, exp(sum_t log ratio), clipped as a whole (RLOO as TRL's
    RLOOTrainer; Ahmadian et al. 2024 treat the completion as one action)."""
    seq_log_ratio = per_row_sum(logps - old_logps, rows, advantages.shape[0])  # (B,)
    return _sequence_terms(seq_log_ratio, logps, advantages, rows, epsilon_low, epsilon_high)


Aggregation = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
"""(token_loss (N,), seq_loss (B,), rows (N,), max_new_tokens) -> the micro-batch's loss sum (scalar). A
per-completion loss counts as its value on each of the completion's tokens. The loop divides the sum by the
completions (or tokens, as the spec's `average_over` says) of the whole global batch. Named as verl's
`loss_agg_mode`s."""


def seq_mean_token_mean(
    token_loss: torch.Tensor, seq_loss: torch.Tensor, rows: torch.Tensor, max_new_tokens: int
) -> torch.Tensor:
    """Each completion's mean over its tokens, summed over completions (GRPO, Shao et al. 2024, eq. 3:
    1/G sum_i 1/|o_i| sum_t)."""
    n = seq_loss.shape[0]
    return (per_row_sum(token_loss, rows, n) / _lengths(token_loss, rows, n)).sum() + seq_loss.sum()


def seq_mean_token_sum_norm(
    token_loss: torch.Tensor, seq_loss: torch.Tensor, rows: torch.Tensor, max_new_tokens: int
) -> torch.Tensor:
    """Each completion's token sum over the constant `max_new_tokens`, summed over completions (Dr. GRPO,
    Liu et al. 2025, sec. 3.1: dividing by |o_i| favours short right answers and long wrong ones)."""
    lengths = _lengths(token_loss, rows, seq_loss.shape[0])
    return (token_loss.sum() + (seq_loss * lengths).sum()) / max_new_tokens


def token_mean(
    token_loss: torch.Tensor, seq_loss: torch.Tensor, rows: torch.Tensor, max_new_tokens: int
) -> torch.Tensor:
    """Summed over every token of the micro-batch, the loop dividing by the global batch's tokens (DAPO,
    Yu et al. 2025, eq. 8: the token-level policy gradient loss, long completions weigh more)."""
    return token_loss.sum() + (seq_loss * _lengths(token_loss, rows, seq_loss.shape[0])).sum()


@dataclass(frozen=True)
class GRPOLossSpec:
    """A GRPO-family objective: its pieces (pure functions) and the facts the stage reads, which never branches
    on a loss's name."""

    # group rewards (N,) -> advantages (N,), one per completion
    advantages: AdvantageEstimator
    # the level the importance ratio is taken and clipped at: token, sequence mean or sequence sum
    importance_ratio: ImportanceRatio
    # per-token and per-completion losses -> the micro-batch's loss sum
    aggregation: Aggregation
    # what the loop divides that sum by, counted over the whole global batch
    average_over: Literal["completions", "tokens"] = "completions"
    # beta * each sequence's KL comes off its reward before the advantages (not beta * k3 per token in the loss)
    kl_in_reward: bool = False
    # DAPO's dynamic sampling (refill groups whose rewards are all equal) is on unless the config says otherwise
    dynamic_sampling: bool = False


GRPO_LOSSES: dict[str, GRPOLossSpec] = {
    # Shao et al. 2024 (DeepSeekMath), eq. 3
    "grpo": GRPOLossSpec(grpo_advantages, token_ratio, seq_mean_token_mean),
    # Liu et al. 2025: neither the std nor the completion length divides
    "dr_grpo": GRPOLossSpec(dr_grpo_advantages, token_ratio, seq_mean_token_sum_norm),
    # Yu et al. 2025: token-level loss, dynamic sampling (clip-higher and the overlong penalty are config keys)
    "dapo": GRPOLossSpec(
        grpo_advantages, token_ratio, token_mean, average_over="tokens", dynamic_sampling=True
    ),
    # Zheng et al. 2025: one length-normalised ratio per completion
    "gspo": GRPOLossSpec(grpo_advantages, sequence_mean_ratio, seq_mean_token_mean),
    # Ahmadian et al. 2024 as TRL's RLOOTrainer: leave-one-out baseline, the KL in the reward
    "rloo": GRPOLossSpec(rloo_advantages, sequence_sum_ratio, seq_mean_token_mean, kl_in_reward=True),
}
# the valid `loss_type`s: a live view, so that a variant registered after the config module bound this name is
# valid at once (a tuple would go stale)
GRPO_LOSS_TYPES: KeysView[str] = GRPO_LOSSES.keys()


def register_policy_loss(name: str, spec: GRPOLossSpec) -> GRPOLossSpec:
    """Make a GRPO-family objective available as `loss_type: <name>` (each name is registered once)."""
    if name in GRPO_LOSSES:
        raise ValueError(f"GRPO-family loss `{name}` is already registered")
    GRPO_LOSSES[name] = spec
    return spec


SAMPLER_CORRECTIONS = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def sampler_correction(
    old_logps: torch.Tensor,
    sampler_logps: torch.Tensor,
    rows: torch.Tensor,
    n_rows: int,
    mode: str,
    clip_max: float | None,
    clip_min: float | None = None,
) -> torch.Tensor:
    """Importance weights (N,) that correct for the sampler (vLLM) and the trainer disagreeing on the
    log-probs of the same tokens: ratio = pi_trainer_old / pi_sampler, per token or per completion (the sum
    of its tokens' log-ratios), then truncated to [clip_min, clip_max] (TIS, Yao et al. 2025, "Your efficient
    RL framework secretly brings you off-policy RL training") or zeroed outside it (masked IS, as TRL's
    `*_mask` modes). A token the sampler gave no log-prob (NaN) counts as agreeing (ratio 1), as in TRL.

    old_logps, sampler_logps, rows: (N,) per completion token, flattened; the weights carry no gradient."""
    if mode not in SAMPLER_CORRECTIONS:
        raise ValueError(f"unknown sampler correction {mode!r}; valid: {', '.join(SAMPLER_CORRECTIONS)}")
    diff = torch.nan_to_num(old_logps.detach() - sampler_logps, nan=0.0)  # (N,)
    if mode.startswith("sequence"):
        diff = per_row_sum(diff, rows, n_rows)[rows]  # each token carries its completion's log-ratio
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    lo = clip_min if clip_min is not None else 0.0
    hi = clip_max if clip_max is not None else float("inf")
    return ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)


def grpo_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    rows: torch.Tensor,
    spec: GRPOLossSpec,
    epsilon_low: float,
    epsilon_high: float,
    max_new_tokens: int,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    kl_bias_correction: bool = True,
    sampler_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A GRPO-family clipped policy loss, summed: the caller divides by the completions (or tokens, as
    `spec.average_over` says) of the whole global batch.

    logps, old_logps, ref_logps: (N,) completion-token log-probs, flattened; rows: (N,) completion index of
    each token; advantages: (B,) one per completion. With `ref_logps`, beta * k3 KL is added per token,
    weighted by the importance ratio when `kl_bias_correction` (DeepSeek-V3.2, eq. 7: the unbiased gradient
    of the reverse KL when samples come from the old policy; TRL's `use_bias_correction_kl`, on by default).
    `sampler_weights` (N,) (`sampler_correction`) multiply the policy term before the KL is added, as TRL; a
    loss whose ratio is per completion (GSPO, RLOO) takes its completion's mean weight.
    Returns (loss sum, was_clipped per token or per completion, per-token k3 KL or None).
    """
    if spec.kl_in_reward and ref_logps is not None:
        raise ValueError("this loss takes its KL penalty in the reward, not in the loss")
    terms = spec.importance_ratio(logps, old_logps, advantages, rows, epsilon_low, epsilon_high)
    token_loss, seq_loss, kl = terms.token_loss, terms.seq_loss, None  # (N,), (B,)
    if sampler_weights is not None:
        n = advantages.shape[0]
        token_loss = token_loss * sampler_weights
        seq_loss = seq_loss * per_row_sum(sampler_weights, rows, n) / _lengths(sampler_weights, rows, n)
    if ref_logps is not None:
        kl = k3_kl(logps, ref_logps)  # (N,)
        token_loss = token_loss + beta * (kl * terms.ratio if kl_bias_correction else kl)
    return spec.aggregation(token_loss, seq_loss, rows, max_new_tokens), terms.clipped, kl
