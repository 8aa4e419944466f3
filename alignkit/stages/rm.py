"""Reward model: a scalar head trained with the pairwise Bradley-Terry loss."""

from __future__ import annotations

import logging

import torch
from torch import nn

from alignkit.data.batches import build_rm_rows, collate_rm
from alignkit.losses import bradley_terry_loss
from alignkit.models import load_reward_model
from alignkit.stages.base import Stage, StepOutput

log = logging.getLogger("alignkit")


def sequence_scores(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(N,) scalar scores, read by the model at the last non-padding token of each row."""
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.squeeze(-1)


class RewardStage(Stage):
    name = "rm"
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
        return collate_rm(rows, self.tokenizer.pad_token_id)

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].shape[0] // 2

    def step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        rewards = sequence_scores(model, batch["input_ids"], batch["attention_mask"]).float()
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
