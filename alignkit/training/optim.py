"""Optimizers by name (`optim:`, the names of transformers' `TrainingArguments.optim`).

The default is `adamw_torch_fused`, as in transformers on torch >= 2.8: one kernel updates every parameter in
place. PyTorch's loop-per-tensor AdamW (`adamw_torch`) builds temporaries the size of each parameter: with a
150k-entry vocabulary the embedding's are ~300 MB at the optimizer step, the run's peak on CPU
(docs/benchmarks.md, the reward model's profile). The two compute the same update up to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from alignkit.config import BaseConfig
from alignkit.errors import UserError

ParamGroups = list[dict]


def _adamw(fused: bool) -> Callable[[ParamGroups, BaseConfig], torch.optim.Optimizer]:
    def make(groups: ParamGroups, cfg: BaseConfig) -> torch.optim.Optimizer:
        betas = (cfg.adam_beta1, cfg.adam_beta2)
        kw = {"fused": True} if fused else {"foreach": False}
        return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=betas, eps=cfg.adam_epsilon, **kw)

    return make


OPTIMIZERS: dict[str, Callable[[ParamGroups, BaseConfig], torch.optim.Optimizer]] = {
    "adamw_torch_fused": _adamw(fused=True),
    "adamw_torch": _adamw(fused=False),
}


def build_optimizer(params: list[torch.nn.Parameter], cfg: BaseConfig) -> torch.optim.Optimizer:
    """`cfg.optim` over `params`: weight decay on matrices only (biases and norms decay at 0)."""
    if not params:
        raise UserError("no trainable parameters (check `finetuning_type` and `freeze_trainable_layers`)")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return OPTIMIZERS[cfg.optim](groups, cfg)
