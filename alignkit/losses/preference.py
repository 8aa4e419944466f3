"""The paired-preference losses as pure functions over tensors: the reward model's Bradley-Terry loss and the
DPO family (DPO and its variants, SimPO, CPO, ORPO) in one registry. Unpaired labels (KTO) are in
`alignkit.losses.unpaired`, SFT's NLL in `alignkit.losses.tokens`, the online-RL pieces in `alignkit.losses.rl`.

Conventions: inputs are tensors and keyword hyperparameters; outputs are *per-item* losses (per token
or per example) so that the loop can average over the whole accumulated batch, across processes, and
get the same update whatever the split into micro-batches and processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from alignkit.losses.registry import Registered, registry


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


# ------------------------------------------------------------------------------------ preference losses
@dataclass(frozen=True)
class PairLogps:
    """Summed completion log-probs per pair, (B,) each. Reference values are 0 when reference-free."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    chosen_len: torch.Tensor  # completion tokens per row (for length-normalised losses)
    rejected_len: torch.Tensor
    chosen_nll_tokens: torch.Tensor  # (B,) summed token NLL of chosen, for the `sft` term
    batch_chosen_tokens: torch.Tensor  # scalar: chosen completion tokens in the whole micro-batch


def f_divergence_scores(delta: torch.Tensor, f_divergence_type: str, alpha: float) -> torch.Tensor:
    """Map a log-ratio to the score the f-divergence DPO uses (Wang et al. 2023, "Beyond reverse KL", tab. 1)."""
    if f_divergence_type == "reverse_kl":
        return delta
    if f_divergence_type == "forward_kl":
        return 1 - torch.exp(-delta)
    if f_divergence_type == "js_divergence":
        return math.log(2) + F.logsigmoid(delta)
    if f_divergence_type == "alpha_divergence":
        if abs(alpha - 1) < 1e-6:
            return delta
        return (torch.exp(torch.clamp((alpha - 1) * delta, max=80)) - 1) / (alpha - 1)
    raise ValueError(f"unknown f_divergence_type {f_divergence_type}")


def _scores(p: PairLogps, f_divergence_type: str, f_alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        f_divergence_scores(p.chosen - p.ref_chosen, f_divergence_type, f_alpha),
        f_divergence_scores(p.rejected - p.ref_rejected, f_divergence_type, f_alpha),
    )


def _smoothed(logits: torch.Tensor, eps: float) -> torch.Tensor:
    """-(1-eps) log s(x) - eps log s(-x): the conservative-label form (cDPO, Mitchell 2023)."""
    return -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)


def dpo_sigmoid(
    p: PairLogps,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha: float = 0.5,
) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, eq. 7); with label_smoothing > 0, conservative DPO (cDPO)."""
    s_c, s_r = _scores(p, f_divergence_type, f_alpha)
    return _smoothed(beta * (s_c - s_r), label_smoothing)


def dpo_hinge(
    p: PairLogps, *, beta: float, f_divergence_type: str = "reverse_kl", f_alpha: float = 0.5
) -> torch.Tensor:
    """SLiC-HF hinge (Zhao et al. 2023): relu(1 - beta * margin)."""
    s_c, s_r = _scores(p, f_divergence_type, f_alpha)
    return torch.relu(1 - beta * (s_c - s_r))


def dpo_ipo(
    p: PairLogps, *, beta: float, f_divergence_type: str = "reverse_kl", f_alpha: float = 0.5
) -> torch.Tensor:
    """IPO (Azar et al. 2023, eq. 17), log-ratios averaged over completion tokens as TRL does; beta is tau."""
    s_c, s_r = _scores(p, f_divergence_type, f_alpha)
    return (s_c / p.chosen_len.clamp(min=1) - s_r / p.rejected_len.clamp(min=1) - 1 / (2 * beta)) ** 2


def dpo_exo_pair(
    p: PairLogps,
    *,
    beta: float,
    label_smoothing: float = 1e-3,
    f_divergence_type: str = "reverse_kl",
    f_alpha: float = 0.5,
) -> torch.Tensor:
    """EXO (Ji et al. 2024, eq. 12, pairwise): reverse KL between the model's and the smoothed label distribution."""
    s_c, s_r = _scores(p, f_divergence_type, f_alpha)
    z = beta * (s_c - s_r)
    eps = label_smoothing
    return torch.sigmoid(z) * (F.logsigmoid(z) - math.log(1 - eps)) + torch.sigmoid(-z) * (
        F.logsigmoid(-z) - math.log(eps)
    )


def dpo_nca_pair(p: PairLogps, *, beta: float) -> torch.Tensor:
    """NCA (Chen et al. 2024, eq. 11, pairwise)."""
    c, r = beta * (p.chosen - p.ref_chosen), beta * (p.rejected - p.ref_rejected)
    return -F.logsigmoid(c) - 0.5 * F.logsigmoid(-c) - 0.5 * F.logsigmoid(-r)


def dpo_robust(
    p: PairLogps,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha: float = 0.5,
) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024, eq. 8): unbiased under label-flip rate epsilon."""
    s_c, s_r = _scores(p, f_divergence_type, f_alpha)
    z, eps = beta * (s_c - s_r), label_smoothing
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


def dpo_bco_pair(p: PairLogps, *, beta: float) -> torch.Tensor:
    """BCO, pairwise (Jung et al. 2024) without the running-mean shift, as TRL 1.16 implements it."""
    return -F.logsigmoid(beta * (p.chosen - p.ref_chosen)) - F.logsigmoid(
        -beta * (p.rejected - p.ref_rejected)
    )


def dpo_sppo_hard(p: PairLogps, *, beta: float) -> torch.Tensor:
    """SPPO with hard labels (Wu et al. 2024, eq. 4.7): winner ratio to +1/(2 beta), loser to -1/(2 beta)."""
    return (p.chosen - p.ref_chosen - 0.5 / beta) ** 2 + (p.rejected - p.ref_rejected + 0.5 / beta) ** 2


def dpo_aot(p: PairLogps, *, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """AOT, paired (Melnyk et al. 2024): match the sorted policy and reference margins over the batch."""
    delta = torch.sort(p.chosen - p.rejected)[0] - torch.sort(p.ref_chosen - p.ref_rejected)[0]
    return _smoothed(beta * delta, label_smoothing)


def dpo_aot_unpaired(p: PairLogps, *, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """AOT, unpaired: sorted chosen log-ratios against sorted rejected log-ratios."""
    delta = torch.sort(p.chosen - p.ref_chosen)[0] - torch.sort(p.rejected - p.ref_rejected)[0]
    return _smoothed(beta * delta, label_smoothing)


def dpo_apo_zero(p: PairLogps, *, beta: float) -> torch.Tensor:
    """APO-zero (D'Oosterlinck et al. 2024): raise chosen likelihood, lower rejected."""
    return (
        1
        - torch.sigmoid(beta * (p.chosen - p.ref_chosen))
        + torch.sigmoid(beta * (p.rejected - p.ref_rejected))
    )


def dpo_apo_down(p: PairLogps, *, beta: float) -> torch.Tensor:
    """APO-down: lower both, rejected more."""
    c, r = p.chosen - p.ref_chosen, p.rejected - p.ref_rejected
    return torch.sigmoid(beta * c) + 1 - torch.sigmoid(beta * (c - r))


def dpo_discopop(
    p: PairLogps,
    *,
    beta: float,
    discopop_tau: float = 0.05,
    f_divergence_type: str = "reverse_kl",
    f_alpha: float = 0.5,
) -> torch.Tensor:
    """DiscoPOP (Chris Lu et al. 2024): log-ratio-modulated mix of the logistic and exponential losses."""
    s_c, s_r = _scores(p, f_divergence_type, f_alpha)
    z = beta * (s_c - s_r)
    mix = torch.sigmoid(z / discopop_tau)
    return -F.logsigmoid(z) * (1 - mix) + torch.exp(-z) * mix


def dpo_sft(p: PairLogps) -> torch.Tensor:
    """NLL of the chosen completions, token-mean over the micro-batch, spread evenly over its pairs (RPO mixes)."""
    return _nll_term(p)


def dpo_sigmoid_norm(
    p: PairLogps, *, beta: float, f_divergence_type: str = "reverse_kl", f_alpha: float = 0.5
) -> torch.Tensor:
    """DPO on log-ratios averaged over completion tokens."""
    s_c, s_r = _scores(p, f_divergence_type, f_alpha)
    return -F.logsigmoid(beta * (s_c / p.chosen_len.clamp(min=1) - s_r / p.rejected_len.clamp(min=1)))


def _nll_term(p: PairLogps) -> torch.Tensor:
    """The chosen completions' token-mean NLL over the micro-batch, written as per-pair shares that sum to B x it."""
    return p.chosen_nll_tokens * p.chosen.shape[0] / p.batch_chosen_tokens.clamp(min=1)


def simpo(
    p: PairLogps, *, beta: float, simpo_gamma: float = 0.5, label_smoothing: float = 0.0
) -> torch.Tensor:
    """SimPO (Meng et al. 2024, eq. 6): reference-free, length-normalised, with target margin gamma.

    -log s(beta (avg_c - avg_r) - gamma), avg the mean token log-prob; label smoothing as in TRL's CPO trainer.
    """
    avg_c, avg_r = p.chosen / p.chosen_len.clamp(min=1), p.rejected / p.rejected_len.clamp(min=1)
    return _smoothed(beta * (avg_c - avg_r) - simpo_gamma, label_smoothing)


def cpo(p: PairLogps, *, beta: float, cpo_alpha: float = 1.0, label_smoothing: float = 0.0) -> torch.Tensor:
    """CPO (Xu et al. 2024, eq. 7): reference-free DPO on summed log-probs plus cpo_alpha x NLL on chosen."""
    return _smoothed(beta * (p.chosen - p.rejected), label_smoothing) + cpo_alpha * _nll_term(p)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, the two-branch form that stays accurate near 0 and for large |x|."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo(p: PairLogps, *, orpo_beta: float = 0.1) -> torch.Tensor:
    """ORPO (Hong et al. 2024, eq. 6-7): NLL on chosen minus lambda log s(log odds ratio), on mean token log-probs."""
    avg_c, avg_r = p.chosen / p.chosen_len.clamp(min=1), p.rejected / p.rejected_len.clamp(min=1)
    log_odds = (avg_c - avg_r) - (log1mexp(avg_c) - log1mexp(avg_r))
    return _nll_term(p) - orpo_beta * F.logsigmoid(log_odds.float())


@dataclass(frozen=True)
class LossSpec(Registered):
    """A loss and what it needs; stages read these flags and never branch on a loss's name."""

    needs_reference: bool = True
    paired: bool = True
    f_divergence: bool = False  # accepts a non-default f_divergence_type
    needs_smoothing: bool = False  # label_smoothing must be > 0


DPO_LOSSES: dict[str, LossSpec] = registry(
    {
        "sigmoid": LossSpec(dpo_sigmoid, f_divergence=True),
        "hinge": LossSpec(dpo_hinge, f_divergence=True),
        "ipo": LossSpec(dpo_ipo, f_divergence=True),
        "exo_pair": LossSpec(dpo_exo_pair, f_divergence=True, needs_smoothing=True),
        "nca_pair": LossSpec(dpo_nca_pair),
        "robust": LossSpec(dpo_robust, f_divergence=True),
        "bco_pair": LossSpec(dpo_bco_pair),
        "sppo_hard": LossSpec(dpo_sppo_hard),
        "aot": LossSpec(dpo_aot),
        "aot_unpaired": LossSpec(dpo_aot_unpaired),
        "apo_zero": LossSpec(dpo_apo_zero),
        "apo_down": LossSpec(dpo_apo_down),
        "discopop": LossSpec(dpo_discopop, f_divergence=True),
        "sft": LossSpec(dpo_sft, needs_reference=False, f_divergence=True),
        "sigmoid_norm": LossSpec(dpo_sigmoid_norm, f_divergence=True),
        # reference-free: no reference model is ever loaded for these
        "simpo": LossSpec(simpo, needs_reference=False),
        "cpo": LossSpec(cpo, needs_reference=False),
        "orpo": LossSpec(orpo, needs_reference=False),
    }
)
