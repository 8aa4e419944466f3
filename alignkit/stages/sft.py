"""Supervised fine-tuning: next-token loss on completion (assistant) tokens."""

from __future__ import annotations

import logging

import torch
from torch import nn

from alignkit.config import PTConfig, SFTConfig
from alignkit.data.batches import IGNORE, build_sft_rows, collate_sft, pack_rows
from alignkit.data.packed import concat_sft_rows
from alignkit.losses.tokens import token_nll
from alignkit.modeling.load import load_policy
from alignkit.modeling.logprobs import TokenStats, completion_token_stats, fused_head_applies
from alignkit.stages.base import Stage, StepOutput

log = logging.getLogger("alignkit")


def sft_token_stats(model: nn.Module, batch: dict[str, torch.Tensor]) -> TokenStats:
    """Log-prob and top-1 hit of every labelled token (labels != -100, predicted from the position before).

    The output layer runs on those positions only, in checkpointed chunks (`completion_token_stats`): the
    (B, T, V) logits of the whole batch never exist. Packed and padding-free batches carry `position_ids`
    and no attention mask; the model keeps their rows apart."""
    extra = {"position_ids": batch["position_ids"]} if "position_ids" in batch else {}
    return completion_token_stats(
        model, batch["input_ids"], batch.get("attention_mask"), batch["labels"] != IGNORE, **extra
    )


def chunked_head_applies(model: nn.Module) -> bool:
    """Whether the step runs the output layer on the labelled tokens only (`completion_token_stats`): where
    it is the fused head (`alignkit.modeling.logprobs.fused_head_applies`: a plain output layer of a real model's
    vocabulary). A small vocabulary (the tiny models) keeps the whole logits, whose float32 rounding the
    quickstart's recipes were tuned on; a LoRA adapter on the output layer needs the module's own forward."""
    return fused_head_applies(model)


def full_logits_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
    """The step through the model's whole (B, T, V) logits: the fallback for an output layer that the
    chunked head does not cover."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits  # (B, T, V)
    labels = batch["labels"]
    losses = token_nll(logits, labels)  # (B, T-1)
    mask = labels[:, 1:] != IGNORE
    with torch.no_grad():
        correct = (logits[:, :-1].argmax(-1) == labels[:, 1:]) & mask
    return StepOutput(
        loss_sum=losses.sum(),
        metrics={"mean_token_accuracy": (correct.sum().float(), mask.sum().float())},
    )


class SFTStage(Stage):
    name = "sft"
    config_class = SFTConfig
    batch_unit = "examples"
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
        if self.cfg.padding_free:  # one row, no padding: position ids keep the rows apart
            rows = [concat_sft_rows(rows)]
        return collate_sft(rows, self.tokenizer.pad_token_id)

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def num_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        if "attention_mask" in batch:
            return int(batch["attention_mask"].sum())
        return int(batch["input_ids"].numel())

    def step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        if not chunked_head_applies(model):
            return full_logits_step(model, batch)
        stats = sft_token_stats(model, batch)
        n = torch.tensor(float(stats.logps.numel()))
        return StepOutput(
            loss_sum=-stats.logps.sum(),
            metrics={"mean_token_accuracy": (stats.is_top1.sum().float(), n)},
        )


class PTStage(SFTStage):
    """LLaMA-Factory's `stage: pt`: SFT on plain text, every token trained (its config's defaults)."""

    name = "pt"
    config_class = PTConfig
