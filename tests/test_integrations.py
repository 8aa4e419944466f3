"""What the README names beside the losses: LoRA / QLoRA / freeze and the trackers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_stage, write_jsonl
from tests.test_loop import _metrics, _rows, _sft


# ---------------------------------------------------------------- finetuning types
def test_lora_saves_adapter_loadable_by_peft(tiny_model: str, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "d.jsonl", _rows(8))
    _, out = run_stage(
        tmp_path,
        _sft(
            tiny_model,
            data,
            finetuning_type="lora",
            lora_r=4,
            max_steps=2,
            per_device_train_batch_size=4,
            learning_rate=1e-2,
            save_merged=True,
        ),
    )
    assert os.path.isfile(os.path.join(out, "adapter_model.safetensors"))
    assert not os.path.isfile(os.path.join(out, "model.safetensors"))
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    peft_model = PeftModel.from_pretrained(base, out)
    merged = AutoModelForCausalLM.from_pretrained(os.path.join(out, "merged"))
    x = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x).logits, merged(x).logits, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(
            AutoModelForCausalLM.from_pretrained(tiny_model)(x).logits, merged(x).logits
        )


def test_freeze_trains_only_last_layers(tiny_model: str, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", _rows(8))
    _, out = run_stage(
        tmp_path,
        _sft(
            tiny_model,
            data,
            finetuning_type="freeze",
            freeze_trainable_layers=1,
            max_steps=2,
            per_device_train_batch_size=4,
        ),
    )
    before, after = (
        load_file(os.path.join(tiny_model, "model.safetensors")),
        load_file(os.path.join(out, "model.safetensors")),
    )
    assert torch.equal(
        before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"]
    )
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    assert not torch.equal(
        before["model.layers.1.mlp.up_proj.weight"], after["model.layers.1.mlp.up_proj.weight"]
    )


def test_qlora_on_cpu_is_a_clear_error(tiny_model: str, tmp_path: Path) -> None:
    from alignkit.errors import UserError

    if torch.cuda.is_available():
        pytest.skip("this checks the CPU message")
    data = write_jsonl(tmp_path / "d.jsonl", _rows(4))
    with pytest.raises(UserError, match="qlora needs a CUDA GPU"):
        run_stage(tmp_path, _sft(tiny_model, data, finetuning_type="qlora", max_steps=1))


def test_tensorboard_reporting_writes_events(tiny_model: str, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = write_jsonl(tmp_path / "d.jsonl", _rows(8))
    _, out = run_stage(
        tmp_path, _sft(tiny_model, data, per_device_train_batch_size=4, max_steps=2, report_to="tensorboard")
    )
    acc = EventAccumulator(os.path.join(out, "runs"))
    acc.Reload()
    losses = [e.value for e in acc.Scalars("loss")]
    assert losses == pytest.approx([r["loss"] for r in _metrics(out)], rel=1e-6)
