"""Token-level pieces: the next-token NLL of SFT, and sums of per-token values by row."""

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


def per_row_sum(values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """(N,) token values -> (B,) sums per row, accumulated in float64 and rounded once to `values.dtype`.

    index_add adds a row's ~1,000 token log-probs one by one; in float32 a sum of thousands drifts by several
    ulps (~5e-4), all of which lands in a DPO margin, a small difference of such sums (1e-4 of it, measured)."""
    wide = torch.float32 if values.device.type == "mps" else torch.float64  # MPS has no float64
    total = torch.zeros(n_rows, dtype=wide, device=values.device)
    return total.index_add(0, rows, values.to(wide)).to(values.dtype)
