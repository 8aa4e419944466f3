"""Every offline loss as a pure function over tensors (SFT, reward model, paired and unpaired preferences);
the online-RL pieces are in `alignkit.losses.rl`.

Conventions: inputs are tensors and keyword hyperparameters; outputs are *per-item* losses (per token
or per example) so that the loop can average over the whole accumulated batch, across processes, and
get the same update whatever the split into micro-batches and processes.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

from alignkit.errors import did_you_mean


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


@functools.cache
def reads(loss: Callable[..., torch.Tensor]) -> frozenset[str]:
    """The hyperparameters a loss reads: its keyword-only parameters (the signature is the declaration)."""
    params = inspect.signature(loss).parameters.values()
    return frozenset(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)


@dataclass(frozen=True)
class _Registered:
    """A loss in a registry, called as `spec.fn(*inputs, **hyper)` with the hyperparameters of the whole
    registry: the loss gets those it reads; a keyword no loss of the registry reads is a TypeError (a
    misspelling is never dropped silently)."""

    loss: Callable[..., torch.Tensor]
    known: frozenset[str] | None = field(
        default=None, kw_only=True
    )  # set by `registry`; None: the loss's own

    def fn(self, *inputs: Any, **hyper: Any) -> torch.Tensor:
        own = reads(self.loss)
        known = own if self.known is None else self.known
        unknown = [key for key in hyper if key not in known]
        if unknown:
            raise TypeError(
                f"{self.loss.__name__}: unknown loss keyword `{unknown[0]}`{did_you_mean(unknown[0], known)}; "
                f"known: {', '.join(sorted(known))}"
            )
        return self.loss(*inputs, **{key: value for key, value in hyper.items() if key in own})


S = TypeVar("S", bound=_Registered)


def registry(specs: dict[str, S]) -> dict[str, S]:
    """The specs, each told every hyperparameter some loss among them reads."""
    known = frozenset().union(*(reads(spec.loss) for spec in specs.values()))
    return {name: dataclasses.replace(spec, known=known) for name, spec in specs.items()}


@dataclass(frozen=True)
class LossSpec(_Registered):
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


# ------------------------------------------------------------------------------------- unpaired losses
def kto_loss(
    logratios: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> torch.Tensor:
    """KTO (Ethayarajh et al. 2024, eq. 8) per row.

    logratios (B,) policy minus reference log-prob of each completion; desirable (B,) bool; kl the detached
    reference point z0 (scalar). Desirable rows: w_D (1 - s(beta (r - z0))); undesirable: w_U (1 - s(beta (z0 - r))).
    """
    good = desirable_weight * (1 - torch.sigmoid(beta * (logratios - kl)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratios)))
    return torch.where(desirable, good, bad)


def apo_zero_unpaired_loss(
    logratios: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> torch.Tensor:
    """APO-zero for unpaired labels (D'Oosterlinck et al. 2024): push desirable up, undesirable down; no z0."""
    good = desirable_weight * (1 - torch.sigmoid(beta * logratios))
    bad = undesirable_weight * torch.sigmoid(beta * logratios)
    return torch.where(desirable, good, bad)


@dataclass(frozen=True)
class UnpairedLossSpec(_Registered):
    uses_kl: bool = True  # needs the mismatched-pair reference point z0


KTO_LOSSES: dict[str, UnpairedLossSpec] = registry(
    {
        "kto": UnpairedLossSpec(kto_loss, uses_kl=True),
        "apo_zero_unpaired": UnpairedLossSpec(apo_zero_unpaired_loss, uses_kl=False),
    }
)
