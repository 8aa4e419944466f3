"""KTO and its family on unpaired good / bad labels, as pure functions over tensors, in a registry; and the
class weights the KTO paper recommends for unbalanced labels."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignkit.losses.registry import Registered, registry

KTO_RATIO_RANGE = (
    1.0,
    4.0 / 3.0,
)  # Ethayarajh et al. 2024, sec. 4.2: lambda_D n_D / (lambda_U n_U) in [1, 4/3]


def kto_weights(
    n_desirable: int, n_undesirable: int, target: float | None = None
) -> tuple[float, float, str]:
    """(desirable_weight, undesirable_weight, why) for the KTO paper's range of lambda_D n_D / (lambda_U n_U).

    The paper recommends a ratio in [1, 4/3]. By default the weight of the larger class stays 1 and the
    other moves just enough to bring the ratio into the range (no change when it already is). With
    `target` (a ratio inside the range) the smaller class's weight is set to reach exactly that ratio.
    """
    if n_desirable == 0 or n_undesirable == 0:
        return 1.0, 1.0, "only one label class present: weights cannot balance it"
    ratio = n_desirable / n_undesirable
    lo, hi = KTO_RATIO_RANGE
    if target is not None:
        if not lo <= target <= hi:
            raise ValueError(f"target ratio {target} is outside [1, 4/3]")
        if ratio < target:
            w = round(target / ratio, 4)
            return w, 1.0, f"n_D/n_U = {ratio:.3f}: desirable_weight = {w} sets the ratio to {target:.3f}"
        w = round(ratio / target, 4)
        return 1.0, w, f"n_D/n_U = {ratio:.3f}: undesirable_weight = {w} sets the ratio to {target:.3f}"
    if lo <= ratio <= hi:
        return 1.0, 1.0, f"n_D/n_U = {ratio:.3f} is already in [1, 4/3]"
    if ratio < lo:  # fewer desirable rows: up-weight them
        w = round(n_undesirable / n_desirable * lo, 4)
        return w, 1.0, f"n_D/n_U = {ratio:.3f} < 1: desirable_weight = n_U/n_D = {w} brings the ratio to 1"
    w = round(n_desirable / (n_undesirable * hi), 4)  # more desirable rows: up-weight the undesirable ones
    return (
        1.0,
        w,
        f"n_D/n_U = {ratio:.3f} > 4/3: undesirable_weight = 3 n_D / (4 n_U) = {w} brings the ratio to 4/3",
    )


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
class UnpairedLossSpec(Registered):
    uses_kl: bool = True  # needs the mismatched-pair reference point z0


KTO_LOSSES: dict[str, UnpairedLossSpec] = registry(
    {
        "kto": UnpairedLossSpec(kto_loss, uses_kl=True),
        "apo_zero_unpaired": UnpairedLossSpec(apo_zero_unpaired_loss, uses_kl=False),
    }
)
