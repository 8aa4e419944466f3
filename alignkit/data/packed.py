"""Padding-free batches: a micro-batch's rows end to end in one row (batch dimension 1), no padding.

`position_ids` restart at 0 for every original row and no attention mask is passed: transformers then finds
the row boundaries from the position ids (`masking_utils.find_packed_sequence_indices`) and builds a
block-diagonal causal mask (SDPA and eager; flash-attention reads the same position ids), so no token
attends across rows. Each row gets the positions, and hence the values, it has in a padded batch.
"""

from __future__ import annotations

import torch


def concat_sft_rows(rows: list[dict]) -> dict[str, list[int]]:
    """SFT rows ({"input_ids", "completion_mask", optional "position_ids"}) as one row.

    A row's first token is never a target (it would be predicted from the previous row's last token), and
    already packed rows keep their own position ids, which restart per original row."""
    ids: list[int] = []
    mask: list[int] = []
    pos: list[int] = []
    for r in rows:
        ids += r["input_ids"]
        mask += [0] + list(r["completion_mask"][1:])
        pos += r.get("position_ids") or list(range(len(r["input_ids"])))
    return {"input_ids": ids, "completion_mask": mask, "position_ids": pos}


def segment_index(position_ids: torch.Tensor) -> torch.Tensor:
    """(L,) or (1, L) position ids that restart at 0 per original row -> (L,) index of that row (0, 1, ...)."""
    return (position_ids.reshape(-1) == 0).long().cumsum(0) - 1


def score_position(seq: list[int], pad_token_id: int | None) -> int:
    """Where a sequence-classification model reads a sequence's score: its rightmost token that is not the pad
    token (0 when every token is), as transformers does in a right-padded batch."""
    if pad_token_id is None:
        return len(seq) - 1
    return next((i for i in range(len(seq) - 1, -1, -1) if seq[i] != pad_token_id), 0)


def collate_rm_padding_free(rows: list[dict], pad_token_id: int | None) -> dict[str, torch.Tensor]:
    """Reward-model pairs as one row: every chosen sequence, then every rejected one, end to end.

    `score_index` (2B,) is where each sequence's score is read in that row, in the order of `collate_rm`."""
    seqs = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
    ids: list[int] = []
    pos: list[int] = []
    where: list[int] = []
    for s in seqs:
        where.append(len(ids) + score_position(s, pad_token_id))
        ids += s
        pos += range(len(s))
    batch = {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "position_ids": torch.tensor([pos], dtype=torch.long),
        "score_index": torch.tensor(where, dtype=torch.long),
    }
    if any(r.get("margin") is not None for r in rows):
        batch["margin"] = torch.tensor([float(r.get("margin") or 0.0) for r in rows])
    return batch


def length_groups(lengths: list[int], waste: float = 0.125) -> list[list[int]]:
    """Row indices in groups of similar length, longest first: each group, padded to its longest row, holds at
    most `waste` more tokens than its rows (a row alone always fits). Running each group as its own batch cut
    to its longest row does the padded batch's work without most of its padding, and needs no block mask (the
    alternative, `padding_free`, attends through one that SDPA computes densely)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    real = 0
    for i in order:
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= (1 + waste) * (real + lengths[i]):
            groups[-1].append(i)
            real += lengths[i]
        else:
            groups.append([i])
            real = lengths[i]
    return groups
