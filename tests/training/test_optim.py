"""Optimizers by name: the fused AdamW (the default) makes the update the loop-per-tensor one makes."""

from __future__ import annotations

import pytest
import torch

from alignkit.config import build_config
from alignkit.config.schema import OPTIMIZERS as NAMES
from alignkit.errors import UserError
from alignkit.training.optim import OPTIMIZERS, build_optimizer

REQUIRED = {"model_name_or_path": "m", "dataset": "d.jsonl"}


def _train(optim: str, steps: int = 5) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Flatten(), torch.nn.Linear(24, 3))
    cfg = build_config({**REQUIRED, "optim": optim, "learning_rate": 1e-2, "weight_decay": 0.1})
    opt = build_optimizer(list(model.parameters()), cfg)
    for step in range(steps):
        x = torch.randint(0, 50, (4, 3), generator=torch.Generator().manual_seed(step))
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def test_fused_adamw_is_the_default_and_makes_the_same_update() -> None:
    assert build_config(REQUIRED).optim == "adamw_torch_fused"
    assert set(NAMES) == set(OPTIMIZERS)  # the config's choices are the registry's names
    fused, loop = _train("adamw_torch_fused"), _train("adamw_torch")
    start = _train("adamw_torch", steps=0)
    for f, p, s in zip(fused, loop, start, strict=True):
        assert (p - s).abs().max() > 1e-3  # the parameters moved
        torch.testing.assert_close(f, p, rtol=0, atol=1e-6)


def test_weight_decay_skips_vectors() -> None:
    model = torch.nn.Linear(4, 2)
    cfg = build_config({**REQUIRED, "weight_decay": 0.1})
    groups = build_optimizer(list(model.parameters()), cfg).param_groups
    assert [(len(g["params"]), g["weight_decay"]) for g in groups] == [(1, 0.1), (1, 0.0)]
    assert groups[0]["fused"] is True


def test_unknown_optimizer_names_the_choices() -> None:
    with pytest.raises(
        UserError, match=r"`optim: adamw_torch_fuse` is not valid.*did you mean `adamw_torch_fused`"
    ):
        build_config({**REQUIRED, "optim": "adamw_torch_fuse"})
