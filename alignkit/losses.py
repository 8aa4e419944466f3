"""Every loss as a pure function over tensors. Imports torch only.

Conventions: inputs are tensors and keyword hyperparameters; outputs are *per-item* losses (per token
or per example) so that the loop can average over the whole accumulated batch, across processes, and
get the same update whatever the split into micro-batches and processes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_nll(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Next-token negative log-likelihood per position.

    logits (B, T, V), labels (B, T) aligned with the inputs (the shift happens here: position t predicts
    token t+1). Returns (B, T-1) losses, 0 where the label is ignored.
    """
    shift_logits = logits[:, :-1, :].float()  # (B, T-1, V)
    shift_labels = labels[:, 1:]  # (B, T-1)
    losses = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=ignore_index,
        reduction="none",
    )
    return losses.view_as(shift_labels)


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_rewards_coefficient: float | None = None,
) -> torch.Tensor:
    """Reward-model pairwise loss per pair: -log sigmoid(r_c - r_r - margin).

    Bradley-Terry (Ouyang et al. 2022, eq. 1); the margin term is Llama 2's (Touvron et al. 2023, eq. 2);
    the centring term (Eisenstein et al. 2023) adds coef * (r_c + r_r)^2 to keep rewards near zero.
    Inputs (B,), output (B,).
    """
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff)
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * (chosen_rewards + rejected_rewards) ** 2
    return loss
