"""Reward model: a scalar head trained with the pairwise Bradley-Terry loss."""

from __future__ import annotations

import logging

import torch
from torch import nn

from alignkit.config import RMConfig
from alignkit.data.batches import build_rm_rows, collate_rm
from alignkit.data.packed import collate_rm_padding_free, length_groups
from alignkit.errors import UserError
from alignkit.losses.preference import bradley_terry_loss
from alignkit.modeling.load import load_reward_model
from alignkit.stages.base import Stage, StepOutput

log = logging.getLogger("alignkit")


def sequence_scores(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(N,) scalar scores, read by the model at the last non-padding token of each row."""
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.squeeze(-1)


def grouped_scores(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """`sequence_scores` of a right-padded batch, run as groups of rows of similar length (`length_groups`),
    each cut to its longest row: the same scores, without most of the padding's work and activations.

    The batch's embeddings are looked up once and each group's forward takes its rows' slice of them (a hook
    replaces the embedding's output), so the embedding's backward, a dense vocabulary-sized gradient per
    lookup, runs once however many groups there are. Where the embedding cannot be called outside the model's
    forward (FSDP2 shards it), the batch runs as one."""
    lengths = attention_mask.sum(1)
    groups = length_groups(lengths.tolist())
    embed = _own_embedding(model)
    if len(groups) == 1 or embed is None:
        width = int(lengths.max())
        return sequence_scores(model, input_ids[:, :width], attention_mask[:, :width])
    table = embed(input_ids)
    current: list[torch.Tensor] = []
    handle = embed.register_forward_hook(lambda module, args, output: current[-1])
    parts, order = [], []
    try:
        for rows in groups:
            width = int(lengths[rows[0]])  # the group's longest
            index = torch.tensor(rows, device=input_ids.device)
            current.append(table[index, :width])
            parts.append(sequence_scores(model, input_ids[index, :width], attention_mask[index, :width]))
            order += rows
    finally:
        handle.remove()
    back = torch.argsort(torch.tensor(order, device=input_ids.device))  # the groups' rows back in batch order
    return torch.cat(parts)[back]


def _own_embedding(model: nn.Module) -> nn.Module | None:
    """The model's input embedding (through DDP's and peft's wrappers), or None when FSDP2 shards it."""
    from torch.distributed.tensor import DTensor

    embed = getattr(model, "module", model).get_input_embeddings()
    return None if isinstance(getattr(embed, "weight", None), DTensor) else embed


def score_head(model: nn.Module) -> nn.Module:
    """The scalar head of a sequence-classification model, through DDP and peft wrappers (under LoRA it is
    peft's trainable copy, `modules_to_save`)."""
    inner = getattr(model, "module", model)
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    for name in ("score", "classifier"):
        head = getattr(inner, name, None)
        if isinstance(head, nn.Module):
            return head
    raise UserError(
        f"padding_free: the reward model ({type(inner).__name__}) has no `score` head to read scores with; "
        "set `padding_free: false`"
    )


def packed_scores(
    model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor, score_index: torch.Tensor
) -> torch.Tensor:
    """(N,) scores of N sequences laid end to end in one row (`collate_rm_padding_free`).

    The model's own forward runs (so DDP / peft see the call) with no attention mask: the restarting
    position ids keep the sequences apart. Its pooled score is of the whole row, so the head is applied here
    to the final hidden state at each sequence's `score_index`."""
    out = model(input_ids=input_ids, position_ids=position_ids, use_cache=False, output_hidden_states=True)
    hidden = out.hidden_states[-1][0, score_index]  # (N, H)
    return score_head(model)(hidden).squeeze(-1)


class RewardStage(Stage):
    name = "rm"
    config_class = RMConfig
    batch_unit = "pairs"
    kinds = ("pair",)

    def load_model(self) -> nn.Module:
        return load_reward_model(self.cfg)

    def rows(self, sources: str | list[str]) -> list[dict]:
        rows, stats = build_rm_rows(self.load_examples(sources), self.tokenizer, self.cfg.max_length)
        log.info(
            "%s", stats.message().replace("no completion token left", f"longer than {self.cfg.max_length}")
        )
        return rows

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        if self.cfg.padding_free:
            return collate_rm_padding_free(rows, self.tokenizer.pad_token_id)
        return collate_rm(rows, self.tokenizer.pad_token_id)

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        if "score_index" in batch:
            return batch["score_index"].shape[0] // 2
        return batch["input_ids"].shape[0] // 2

    def num_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        if "attention_mask" in batch:
            return int(batch["attention_mask"].sum())
        return int(batch["input_ids"].numel())

    def scores(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(2B,) rewards, all chosen then all rejected, padded or padding-free."""
        if "score_index" in batch:
            return packed_scores(model, batch["input_ids"], batch["position_ids"], batch["score_index"])
        if self.cfg.length_groups:
            return grouped_scores(model, batch["input_ids"], batch["attention_mask"])
        return sequence_scores(model, batch["input_ids"], batch["attention_mask"])

    def step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        rewards = self.scores(model, batch).float()
        chosen, rejected = rewards.chunk(2)  # (B,), (B,)
        losses = bradley_terry_loss(
            chosen, rejected, batch.get("margin"), self.cfg.center_rewards_coefficient
        )
        n = torch.tensor(float(chosen.numel()))
        c, r = chosen.detach(), rejected.detach()
        metrics = {
            "accuracy": ((c > r).float().sum(), n),  # share of pairs ranked right
            "margin": ((c - r).sum(), n),
            "mean_reward": (c.sum() + r.sum(), 2 * n),
        }
        return StepOutput(loss_sum=losses.sum(), metrics=metrics)
