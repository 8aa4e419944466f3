"""Supervised fine-tuning: next-token loss on completion (assistant) tokens."""

from __future__ import annotations

import logging

import torch
from torch import nn

from alignkit.data.batches import IGNORE, build_sft_rows, collate_sft, pack_rows
from alignkit.losses import token_nll
from alignkit.models import load_policy
from alignkit.stages.base import Stage, StepOutput

log = logging.getLogger("alignkit")


class SFTStage(Stage):
    name = "sft"
    kinds = ("sft",)

    def load_model(self) -> nn.Module:
        return load_policy(self.cfg)

    def rows(self, sources: str | list[str]) -> list[dict]:
        cfg = self.cfg
        rows, stats = build_sft_rows(
            self.load_examples(sources), self.tokenizer, cfg.max_length, cfg.max_prompt_length
        )
        if not cfg.completion_only_loss:
            rows = [{**r, "completion_mask": [1] * len(r["input_ids"])} for r in rows]
        log.info("%s", stats.message())
        if cfg.packing:
            rows = pack_rows(rows, cfg.max_length, cfg.seed)
            log.info("packed into %d sequences of at most %d tokens", len(rows), cfg.max_length)
        return rows

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        return collate_sft(rows, self.tokenizer.pad_token_id)

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def num_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        if "attention_mask" in batch:
            return int(batch["attention_mask"].sum())
        return int(batch["input_ids"].numel())

    def step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs, use_cache=False).logits  # (B, T, V)
        labels = batch["labels"]
        losses = token_nll(logits, labels)  # (B, T-1)
        mask = labels[:, 1:] != IGNORE
        with torch.no_grad():
            correct = (logits[:, :-1].argmax(-1) == labels[:, 1:]) & mask
            n = mask.sum()
        return StepOutput(
            loss_sum=losses.sum(),
            metrics={"mean_token_accuracy": (correct.sum().float(), n.float())},
        )
