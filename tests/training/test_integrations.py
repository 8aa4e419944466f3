"""What the README names beside the losses, each tested where it can run: LoRA / QLoRA / freeze, gradient
checkpointing, fp16, and the trackers (TensorBoard, W&B offline, MLflow with a local store).

The GPU-only parts (QLoRA, fp16) skip with their reason on a machine without CUDA; the test session hides
GPUs unless CUDA_VISIBLE_DEVICES is set (conftest), so run them there with e.g. CUDA_VISIBLE_DEVICES=0.
"""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_stage, write_jsonl
from tests.training.test_loop import _fail, _metrics, _rows, _sft

GPU = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU (none visible: tests hide GPUs unless CUDA_VISIBLE_DEVICES is set)",
)


def _train(tmp_path: Path, keys: dict) -> tuple[dict, object]:
    """`run_stage`, returning the stage too (to look at the model it trained)."""
    from alignkit.config import build_config
    from alignkit.stages import get_stage
    from alignkit.training.loop import train

    cfg = build_config(
        {"output_dir": str(tmp_path / "out"), "disable_tqdm": True, "plot_loss": False, **keys}
    )
    stage = get_stage(cfg.stage)(cfg)
    return train(cfg, stage), stage


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


@GPU
def test_qlora_sft_steps_on_gpu(tiny_model: str, tmp_path: Path) -> None:
    """Two QLoRA SFT steps on one batch: 4-bit base layers, a trained adapter, a falling loss."""
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes: pip install 'alignkit[qlora]'")
    data = write_jsonl(tmp_path / "d.jsonl", _rows(4))
    keys = _sft(tiny_model, data, finetuning_type="qlora", lora_r=8, per_device_train_batch_size=4)
    _, stage = _train(tmp_path, {**keys, "max_steps": 2, "learning_rate": 1e-2, "bf16": True})
    assert any(type(m).__name__ == "Linear4bit" for m in stage.model.modules())
    losses = [r["loss"] for r in _metrics(str(tmp_path / "out"))]
    assert len(losses) == 2 and all(x == x for x in losses) and losses[1] < losses[0]
    adapter = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: training moved it


# ---------------------------------------------------------------- gradient checkpointing
@pytest.mark.parametrize("stage,finetuning", [("sft", "full"), ("sft", "lora"), ("dpo", "full")])
def test_gradient_checkpointing_same_loss_and_gradients(
    tiny_model: str,
    tiny_ref: str,
    tmp_path: Path,
    stage: str,
    finetuning: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One step with `gradient_checkpointing: true` has the loss, gradient norm (1e-6) and every parameter's
    gradient (1e-5) of one without."""
    from tests.stages.test_dpo import CONV

    rows = _rows(8) if stage == "sft" else CONV
    keys = {
        **_sft(tiny_model, write_jsonl(tmp_path / "d.jsonl", rows)),
        "stage": stage,
        "finetuning_type": finetuning,
        "max_steps": 1,
        "per_device_train_batch_size": 4,
        "shuffle": False,
    }
    if stage == "dpo":
        keys["ref_model_name_or_path"] = tiny_ref
    grads: list[list[torch.Tensor]] = []  # each run's gradients, as the optimizer sees them at its first step
    adamw_step = torch.optim.AdamW.step

    def recording_step(self: torch.optim.AdamW, *args: object, **kwargs: object) -> object:
        grads.append(
            [p.grad.detach().clone() for g in self.param_groups for p in g["params"] if p.grad is not None]
        )
        return adamw_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    plain, plain_stage = _train(tmp_path / "plain", keys)
    ckpt, ckpt_stage = _train(tmp_path / "ckpt", {**keys, "gradient_checkpointing": True})
    assert len(grads) == 2 and len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-8)

    def checkpointing(model: torch.nn.Module) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())

    assert checkpointing(ckpt_stage.model) and not checkpointing(plain_stage.model)
    assert ckpt["loss"] == pytest.approx(plain["loss"], rel=1e-6)
    assert ckpt["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-6)


# ---------------------------------------------------------------- precision
def test_fp16_on_cpu_is_a_clear_error(tiny_model: str, tmp_path: Path) -> None:
    """accelerate runs fp16 (autocast and loss scaler) on GPUs only: on CPU it would train in float32."""
    from alignkit.errors import UserError

    if torch.cuda.is_available():
        pytest.skip("this checks the CPU message")
    data = write_jsonl(tmp_path / "d.jsonl", _rows(4))
    with pytest.raises(UserError, match="fp16 needs a GPU"):
        run_stage(tmp_path, _sft(tiny_model, data, fp16=True, max_steps=1))
    assert not (tmp_path / "out").exists()


@GPU
def test_fp16_on_gpu_runs_close_to_fp32(tiny_model: str, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", _rows(8))
    keys = _sft(tiny_model, data, per_device_train_batch_size=4, max_steps=2)
    fp32, _ = run_stage(tmp_path / "a", keys)
    fp16, _ = run_stage(tmp_path / "b", {**keys, "fp16": True})
    assert fp16["loss"] != fp32["loss"]  # it really ran in fp16
    assert fp16["loss"] == pytest.approx(fp32["loss"], rel=0.02)
    assert fp16["grad_norm"] == pytest.approx(fp32["grad_norm"], rel=0.05)


# ---------------------------------------------------------------- trackers
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


def _wandb_records(path: Path) -> list:
    """The records of an offline W&B run file (`run-*.wandb`: a LevelDB-style log of protobuf records in
    32 KiB blocks, each piece behind a 7-byte header: crc32, length, type 1 full / 2 first / 3 middle /
    4 last), so that the test reads what `wandb sync` would upload."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, piece, out = 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # the rest of a block is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):  # a record the writer has not flushed yet
            break
        if kind == 0:
            pos += left
            continue
        piece += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(piece)
            out.append(record)
            piece = b""
    return out


def test_wandb_offline_run_holds_the_logged_values(
    tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("wandb", reason="pip install wandb (in the dev extra)")
    for key, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DIR": str(tmp_path / "wandb"),
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb" / "config"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb" / "cache"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb" / "data"),
    }.items():
        monkeypatch.setenv(key, value)
    data = write_jsonl(tmp_path / "d.jsonl", _rows(8))
    _, out = run_stage(
        tmp_path, _sft(tiny_model, data, per_device_train_batch_size=4, max_steps=3, report_to="wandb")
    )
    [run_file] = Path(out).glob("wandb/offline-run-*/run-*.wandb")
    # `run.finish()` returns once wandb's service has the exit record; its writer may flush the file a moment
    # later (seen once in CI under load: the file held the first records only), so wait for the exit record
    deadline = time.monotonic() + 60
    while "exit" not in (kinds := [r.WhichOneof("record_type") for r in _wandb_records(run_file)]):
        assert time.monotonic() < deadline, kinds
        time.sleep(0.2)
    records = _wandb_records(run_file)
    history = {
        r.history.step.num: {
            (i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item
        }
        for r in records
        if r.WhichOneof("record_type") == "history"
    }
    exits = [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"]
    ours = _metrics(out)
    assert sorted(history) == [r["step"] for r in ours] == [1, 2, 3] and exits == [0]
    for record in ours:
        for key in ("loss", "learning_rate", "grad_norm", "num_tokens", "mean_token_accuracy"):
            assert history[record["step"]][key] == pytest.approx(record[key], rel=1e-12), key


def test_mlflow_local_store_holds_the_metrics(
    tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Metrics and parameters reach a local MLflow store; a failed run ends as FAILED (not left active, which
    would refuse the next run in the same process); a tracking URI MLflow cannot use is a UserError."""
    mlflow = pytest.importorskip("mlflow", reason="pip install mlflow-skinny (in the dev extra)")
    from alignkit.errors import UserError
    from alignkit.stages.sft import SFTStage

    data = write_jsonl(tmp_path / "d.jsonl", _rows(8))
    keys = _sft(tiny_model, data, per_device_train_batch_size=4, max_steps=3, report_to="mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuch://tracker")
    with pytest.raises(UserError, match="mlflow could not start a run at nosuch://tracker"):
        run_stage(tmp_path / "bad_uri", keys)
    assert not (tmp_path / "bad_uri").exists()

    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 wants a database otherwise
    real_step = SFTStage.step
    monkeypatch.setattr(SFTStage, "step", _fail)
    with pytest.raises(RuntimeError, match="simulated"):
        run_stage(tmp_path / "failed", keys)
    monkeypatch.setattr(SFTStage, "step", real_step)
    _, out = run_stage(tmp_path, keys)

    client = mlflow.tracking.MlflowClient(uri)
    runs = client.search_runs(["0"], order_by=["attributes.start_time ASC"])
    assert [r.info.status for r in runs] == ["FAILED", "FINISHED"]
    run = runs[-1]
    assert run.data.params["learning_rate"] == "0.001"
    ours = _metrics(out)
    for key in ("loss", "learning_rate", "grad_norm", "num_tokens", "mean_token_accuracy"):
        logged = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert logged == [(r["step"], pytest.approx(r[key], rel=1e-12)) for r in ours], key
