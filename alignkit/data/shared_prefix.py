"""Shared-prefix and padding-free batches for the preference stages (DPO, KTO). Imports torch only.

A *group* is one prompt and the completions that continue it (DPO: chosen and rejected; KTO: the completion
and its KL completion). With prefix sharing a group is one sequence `prompt + c1 + c2`: each completion's
positions restart at len(prompt), and a 4-D mask lets a completion's tokens see the prompt and their own
earlier tokens, never another completion's, so the prompt runs once. Without it every completion is a group
of its own (`prompt + c`, the plain layout). Padding-free puts all the groups of a micro-batch end to end in
one row (batch dimension 1, the mask block-diagonal over groups); otherwise each group is a right-padded row.

Each completion is a *logical row* (DPO: chosen i -> i, rejected i -> B + i, as in `collate_pairs`). The
batch lists the completion tokens to score, in logical-row then token order: `predict_at` (flat index into
the (R*T) positions whose hidden state predicts the token; a completion's first token is predicted from its
prompt's last token), `labels` and `label_rows`. So `alignkit.modeling.logprobs.token_stats_at` gives the plain
layout's `TokenStats` entry for entry, and the losses and metrics are the plain layout's to float rounding.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from alignkit.errors import UserError

Group = tuple[list[int], list[tuple[int, list[int]]]]  # (prompt ids, [(logical row, completion ids), ...])


def _new_row() -> dict[str, list[int]]:
    return {"ids": [], "pos": [], "seg": [], "branch": []}


def build_layout(
    groups: list[Group], n_logical: int, pad_token_id: int, max_length: int, padding_free: bool
) -> dict[str, torch.Tensor]:
    """Groups -> {"input_ids", "position_ids", "segment_ids", "branch_ids" (R, T), "predict_at", "labels",
    "label_rows" (N,), "logical_rows" (0-d)}. Every prompt + completion is cut at max_length (the
    completion's end goes), as the plain layout cuts each sequence."""
    rows: list[dict[str, list[int]]] = []
    targets: dict[int, list[tuple[int, int, int]]] = {
        i: [] for i in range(n_logical)
    }  # (row, src col, token)
    for prompt, branches in groups:
        if padding_free and rows:
            row = rows[-1]
        else:
            row = _new_row()
            rows.append(row)
        r, seg, start = len(rows) - 1, (row["seg"][-1] if row["seg"] else 0) + 1, len(row["ids"])
        prompt = prompt[:max_length]
        p = len(prompt)
        row["ids"] += prompt
        row["pos"] += range(p)
        row["seg"] += [seg] * p
        row["branch"] += [0] * p
        for k, (logical, completion) in enumerate(branches, 1):
            for j, token in enumerate(completion[: max_length - p]):
                col = len(row["ids"])
                if p + j >= 1:  # the sequence's first token is never predicted
                    targets[logical].append((r, start + p - 1 if j == 0 else col - 1, token))
                row["ids"].append(token)
                row["pos"].append(p + j)
                row["seg"].append(seg)
                row["branch"].append(k)
    width = max(len(row["ids"]) for row in rows)

    def padded(key: str, value: int) -> torch.Tensor:
        return torch.tensor([row[key] + [value] * (width - len(row[key])) for row in rows], dtype=torch.long)

    flat = [
        (r * width + col, token, logical)
        for logical in range(n_logical)
        for r, col, token in targets[logical]
    ]
    columns = [list(c) for c in zip(*flat)] if flat else [[], [], []]
    return {
        "input_ids": padded("ids", pad_token_id),
        "position_ids": padded("pos", 0),
        "segment_ids": padded("seg", 0),
        "branch_ids": padded("branch", 0),
        "predict_at": torch.tensor(columns[0], dtype=torch.long),
        "labels": torch.tensor(columns[1], dtype=torch.long),
        "label_rows": torch.tensor(columns[2], dtype=torch.long),
        "logical_rows": torch.tensor(n_logical),
    }


def _plain_tokens(prompt: list[int], completion: list[int], max_length: int) -> int:
    return min(len(prompt) + len(completion), max_length)


def collate_shared_pairs(
    rows: list[dict], pad_token_id: int, max_length: int, prefix_sharing: bool, padding_free: bool
) -> dict[str, torch.Tensor]:
    """DPO pairs: chosen of pair i is logical row i, rejected B + i. `num_tokens` counts the tokens of the
    plain layout (the prompt once per completion), so the logged token count does not depend on the layout."""
    b = len(rows)
    chosen = [(r["prompt_ids"], [(i, r["chosen_ids"])]) for i, r in enumerate(rows)]
    rejected = [(r["prompt_ids"], [(b + i, r["rejected_ids"])]) for i, r in enumerate(rows)]
    if prefix_sharing:
        groups = [
            (r["prompt_ids"], [(i, r["chosen_ids"]), (b + i, r["rejected_ids"])]) for i, r in enumerate(rows)
        ]
    else:
        groups = chosen + rejected
    batch = build_layout(groups, 2 * b, pad_token_id, max_length, padding_free)
    batch["num_tokens"] = torch.tensor(
        sum(
            _plain_tokens(r["prompt_ids"], r[k], max_length)
            for r in rows
            for k in ("chosen_ids", "rejected_ids")
        )
    )
    if "ref_chosen_logps" in rows[0]:
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            batch[key] = torch.tensor([r[key] for r in rows], dtype=torch.float64)
    return batch


def collate_shared_unpaired(
    rows: list[dict],
    pad_token_id: int,
    max_length: int,
    prefix_sharing: bool,
    padding_free: bool,
    with_kl: bool = True,
) -> dict[str, torch.Tensor]:
    """KTO rows: row i's completion is logical row i, its KL completion (`with_kl`) B + i; with prefix sharing
    both continue one copy of the prompt. `num_tokens` counts the main sequences only (as the plain layout)."""
    b = len(rows)
    main = [(i, r["completion_ids"]) for i, r in enumerate(rows)]
    kl = [(b + i, r["kl_completion_ids"]) for i, r in enumerate(rows)] if with_kl else []
    if prefix_sharing and with_kl:
        groups = [(r["prompt_ids"], [main[i], kl[i]]) for i, r in enumerate(rows)]
    else:
        groups = [(r["prompt_ids"], [m]) for r, m in zip(rows, main)]
        groups += [(r["prompt_ids"], [k]) for r, k in zip(rows, kl)]
    batch = build_layout(groups, 2 * b if with_kl else b, pad_token_id, max_length, padding_free)
    batch["num_tokens"] = torch.tensor(
        sum(_plain_tokens(r["prompt_ids"], r["completion_ids"], max_length) for r in rows)
    )
    batch["label"] = torch.tensor([r["label"] for r in rows], dtype=torch.bool)
    for key in ("ref_logps", "ref_kl_logps"):  # float64, as the cache holds them; the stage casts
        if key in rows[0]:
            batch[key] = torch.tensor([r[key] for r in rows], dtype=torch.float64)
    return batch


def attention_mask_4d(
    segment_ids: torch.Tensor, branch_ids: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """(R, 1, T, T) mask: a query sees earlier keys of its own group that are its prompt or its own completion.

    A padding position sees only itself (a row with nothing to attend gives NaN under SDPA, which the
    backward would spread). Bool (True = attend) when `dtype` is None, else additive (0 or the dtype's min).
    """
    t = segment_ids.shape[1]
    idx = torch.arange(t, device=segment_ids.device)
    causal = idx[None, :] <= idx[:, None]  # (T, T): key <= query
    seg_q, seg_k = segment_ids[:, :, None], segment_ids[:, None, :]
    br_q, br_k = branch_ids[:, :, None], branch_ids[:, None, :]
    allowed = causal & (seg_q == seg_k) & (seg_k > 0) & ((br_k == 0) | (br_k == br_q))
    allowed = (allowed | torch.eye(t, dtype=torch.bool, device=segment_ids.device))[:, None]
    if dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


def _attn_implementation(model: nn.Module) -> str:
    config = getattr(getattr(model, "module", model), "config", None)
    return str(getattr(config, "_attn_implementation", None) or "sdpa")


def model_mask(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The 4-D mask of `batch` in the form the model's attention takes: bool for SDPA, additive for eager."""
    if _attn_implementation(model) == "eager":
        dtype = next(getattr(model, "module", model).parameters()).dtype
        return attention_mask_4d(batch["segment_ids"], batch["branch_ids"], dtype)
    return attention_mask_4d(batch["segment_ids"], batch["branch_ids"])


def _sliding_window(config: Any) -> int | None:
    """The attention window of a model that uses one in some layer, else None."""
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    types = getattr(config, "layer_types", None)
    return None if types is not None and "sliding_attention" not in types else int(window)


def check_layout_support(cfg: Any, model: nn.Module) -> None:
    """prefix_sharing / padding_free pass a 4-D attention mask: SDPA and eager take one, flash kernels do not,
    and a model's sliding window is not applied to it (exact only while no sequence is longer than the window)."""
    if not (getattr(cfg, "prefix_sharing", False) or getattr(cfg, "padding_free", False)):
        return
    impl = _attn_implementation(model)
    if impl not in ("sdpa", "eager"):
        raise UserError(
            f"`prefix_sharing` / `padding_free` pass a 4-D attention mask, which `attn_implementation: {impl}` "
            "does not take; set `attn_implementation: sdpa` (or `eager`), or turn both keys off"
        )
    window = _sliding_window(getattr(getattr(model, "module", model), "config", None))
    if window is not None and cfg.max_length > window:
        raise UserError(
            f"`prefix_sharing` / `padding_free`: this model attends within a sliding window of {window} tokens, "
            f"which their 4-D mask does not apply; lower `max_length` ({cfg.max_length}) to at most {window}, "
            "or turn both keys off"
        )
