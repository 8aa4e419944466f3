"""`auto_find_batch_size`: the micro-batch is sized from measured memory and the update is the fixed batch's."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignkit.errors import UserError
from alignkit.training import micro_batch
from alignkit.training.micro_batch import Probe, fit_micro_batch
from tests.conftest import run_stage, write_jsonl
from tests.training.test_loop import _metrics, _rows, _sft


def test_the_largest_divisor_that_fits_is_taken() -> None:
    probe = Probe(fixed=100.0, per_row=10.0)
    assert fit_micro_batch(8, probe, optimizer_bytes=50.0, budget=250.0) == 8  # 100 + 50 + 80
    assert fit_micro_batch(8, probe, optimizer_bytes=50.0, budget=229.0) == 4  # 7 and 6 do not divide 8
    assert fit_micro_batch(12, probe, optimizer_bytes=50.0, budget=211.0) == 6
    assert fit_micro_batch(8, probe, optimizer_bytes=50.0, budget=10.0) == 1  # never below one row


def test_auto_micro_batch_makes_the_fixed_batch_update(
    tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """With memory for about 2 rows the batch of 8 runs as 2 x 4 accumulation (or 1 x 8): the same losses,
    gradient norm and weights as 8 rows at once; the probe's forward and backward leave no trace."""
    data = write_jsonl(tmp_path / "d.jsonl", _rows(16))
    _, fixed = run_stage(tmp_path / "a", _sft(tiny_model, data, per_device_train_batch_size=8, max_steps=2))
    seen: dict[str, float] = {}

    def fit(bs: int, probe: Probe, optimizer_bytes: float, budget: float) -> int:
        seen.update(per_row=probe.per_row, fixed=probe.fixed, optimizer=optimizer_bytes)
        budget = probe.fixed + optimizer_bytes + 2.5 * probe.per_row  # room for two rows and a half
        return fit_micro_batch(bs, probe, optimizer_bytes, budget)

    monkeypatch.setattr(micro_batch, "fit_micro_batch", fit)
    with caplog.at_level(logging.INFO, logger="alignkit"):
        keys = _sft(tiny_model, data, per_device_train_batch_size=8, max_steps=2, auto_find_batch_size=True)
        _, auto = run_stage(tmp_path / "b", keys)
    assert "auto_find_batch_size: 2 rows per micro-batch" in caplog.text
    assert "2 x 4 accumulation = 8 rows per device" in caplog.text
    params = sum(p.numel() for p in load_file(os.path.join(tiny_model, "model.safetensors")).values())
    assert seen["optimizer"] == pytest.approx(2 * 4 * params, rel=0.01)  # AdamW's two fp32 tensors
    assert seen["per_row"] > 0
    la, lb = _metrics(fixed), _metrics(auto)
    assert [r["loss"] for r in la] == pytest.approx([r["loss"] for r in lb], abs=1e-5)
    assert la[0]["grad_norm"] == pytest.approx(lb[0]["grad_norm"], rel=1e-5)
    wa, wb = (
        load_file(os.path.join(fixed, "model.safetensors")),
        load_file(os.path.join(auto, "model.safetensors")),
    )
    for key in wa:  # as test_accumulation_equals_large_batch: Adam amplifies summation-order rounding
        torch.testing.assert_close(wa[key], wb[key], atol=1e-4, rtol=0)
        assert ((wa[key] - wb[key]).abs() > 1e-5).float().mean().item() <= 1e-3, key


def test_an_online_stage_is_refused(tiny_model: str, tmp_path: Path) -> None:
    data = write_jsonl(
        tmp_path / "p.jsonl", [{"prompt": [{"role": "user", "content": "1 + 1?"}], "answer": "2"}] * 4
    )
    keys = {
        "stage": "grpo",
        "model_name_or_path": tiny_model,
        "dataset": data,
        "reward_funcs": ["exact_match"],
        "auto_find_batch_size": True,
        "max_steps": 1,
    }
    with pytest.raises(UserError, match="auto_find_batch_size: stage grpo samples its own batches"):
        run_stage(tmp_path, keys)
