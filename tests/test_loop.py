"""Invariances of the training loop: accumulation, processes, resume, divergence, saving."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, run_stage, write_jsonl


def _rows(n: int = 16) -> list[dict]:
    return [
        {
            "prompt": [{"role": "user", "content": f"What is {i} + {i + 3}?"}],
            "completion": [{"role": "assistant", "content": str(2 * i + 3) + " is the answer" * (i % 3)}],
        }
        for i in range(n)
    ]


def _sft(tiny_model: str, data: str, **kw) -> dict:
    return {
        "stage": "sft",
        "model_name_or_path": tiny_model,
        "dataset": data,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "torch_dtype": "float32",
        **kw,
    }


def _metrics(out: str) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def test_accumulation_equals_large_batch(tiny_model: str, tmp_path: Path) -> None:
    """batch 1 x accumulation 8 == batch 8 x accumulation 1: same losses, same weights (rows differ in length)."""
    data = write_jsonl(tmp_path / "d.jsonl", _rows(16))
    _, a = run_stage(tmp_path / "a", _sft(tiny_model, data, per_device_train_batch_size=8, max_steps=2))
    _, b = run_stage(
        tmp_path / "b",
        _sft(tiny_model, data, per_device_train_batch_size=1, gradient_accumulation_steps=8, max_steps=2),
    )
    la, lb = _metrics(a), _metrics(b)
    assert [r["loss"] for r in la] == pytest.approx([r["loss"] for r in lb], abs=1e-5)
    assert la[0]["grad_norm"] == pytest.approx(lb[0]["grad_norm"], rel=1e-5)
    wa, wb = load_file(os.path.join(a, "model.safetensors")), load_file(os.path.join(b, "model.safetensors"))
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-5, rtol=1e-5)
    # and training did move the weights
    base = load_file(os.path.join(tiny_model, "model.safetensors"))
    assert not torch.allclose(base["model.embed_tokens.weight"], wa["model.embed_tokens.weight"])


def test_shuffle_is_seeded_and_off_keeps_file_order() -> None:
    from alignkit.loop import epoch_order, micro_batches

    assert epoch_order(6, 0, 1, shuffle=False) == list(range(6))
    assert epoch_order(50, 0, 1, True) == epoch_order(50, 0, 1, True)
    assert epoch_order(50, 0, 1, True) != epoch_order(50, 1, 1, True)
    order = list(range(8))
    # 2 processes x batch 2 cover the same global batch as 1 process x batch 4
    two = micro_batches(order, 0, 2, 2, 1, 0) + micro_batches(order, 0, 2, 2, 1, 1)
    assert sorted(sum(two, [])) == micro_batches(order, 0, 4, 1, 1, 0)[0]


def _launch_two(cfg_keys: dict, tmp_path: Path, port: int) -> list[dict]:
    """Run `accelerate launch --multi_gpu --num_processes 2` on the config; return its metrics records."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = tmp_path / "two.yaml"
    out = tmp_path / "two"
    keys = {**cfg_keys, "output_dir": str(out), "disable_tqdm": True, "plot_loss": False}
    cfg.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in keys.items()))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--main_process_port",
        str(port),
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "alignkit",
        "train",
        str(cfg),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _metrics(str(out))


def test_two_processes_equal_one(tiny_model: str, tmp_path: Path) -> None:
    """2 processes (gloo) x batch 2 == 1 process x batch 4 (per-step loss within 1e-5).

    On a machine without GPUs, `accelerate launch --multi_gpu --num_processes 2` starts the processes through
    torchrun (accelerate 1.x's `--cpu` launcher starts one process unless mpirun is given).
    """
    data = write_jsonl(tmp_path / "d.jsonl", _rows(16))
    one, _ = run_stage(tmp_path / "one", _sft(tiny_model, data, per_device_train_batch_size=4, max_steps=3))
    ours = _launch_two(_sft(tiny_model, data, per_device_train_batch_size=2, max_steps=3), tmp_path, 29517)
    single = _metrics(str(tmp_path / "one" / "out"))
    assert len(ours) == 3 and ours[0]["epoch"] == single[0]["epoch"]  # same global batch: 4 steps an epoch
    assert [r["loss"] for r in ours] == pytest.approx([r["loss"] for r in single], abs=1e-5)
    assert ours[-1]["num_tokens"] == single[-1]["num_tokens"]
    assert one["loss"] == pytest.approx(single[-1]["loss"])


def test_two_processes_dpo_and_kto(tiny_model: str, tiny_ref: str, tmp_path: Path) -> None:
    """DPO's per-pair loss splits over processes exactly; KTO runs with z0 averaged over processes."""
    from tests.test_dpo import CONV
    from tests.test_kto import CONV as KTO_ROWS

    pairs = write_jsonl(tmp_path / "p.jsonl", CONV * 2)
    keys = {
        "stage": "dpo",
        "model_name_or_path": tiny_model,
        "ref_model_name_or_path": tiny_ref,
        "dataset": pairs,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "max_steps": 2,
        "torch_dtype": "float32",
    }
    one, _ = run_stage(tmp_path / "one", {**keys, "per_device_train_batch_size": 4})
    two = _launch_two({**keys, "per_device_train_batch_size": 2}, tmp_path / "dpo", 29518)
    single = _metrics(str(tmp_path / "one" / "out"))
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in single], abs=1e-5)
    assert two[0]["rewards/margins"] == pytest.approx(single[0]["rewards/margins"], abs=1e-5)

    unpaired = write_jsonl(tmp_path / "k.jsonl", KTO_ROWS * 2)
    kto = _launch_two(
        {**keys, "stage": "kto", "dataset": unpaired, "per_device_train_batch_size": 2},
        tmp_path / "kto",
        29519,
    )
    assert len(kto) == 2 and all(math.isfinite(r["loss"]) and r["kl"] >= 0 for r in kto)


def _launch(cfg: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "alignkit", "train", str(cfg)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_resume_after_kill_is_exact(tiny_model: str, tmp_path: Path) -> None:
    """kill -9 right after the step-4 checkpoint; `resume_from_checkpoint: auto` continues with identical losses."""
    data = write_jsonl(tmp_path / "d.jsonl", _rows(24))
    keys = _sft(
        tiny_model,
        data,
        per_device_train_batch_size=4,
        max_steps=60,
        save_steps=4,
        lr_scheduler_type="cosine",
        warmup_steps=2,
        disable_tqdm=True,
        plot_loss=False,
    )
    full, full_dir = run_stage(tmp_path / "full", keys)
    ref = _metrics(full_dir)

    out = tmp_path / "killed"
    cfg = tmp_path / "k.yaml"
    cfg.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in {**keys, "output_dir": str(out)}.items()))
    proc = _launch(cfg)
    deadline = time.time() + 120
    while not (out / "checkpoint-4").is_dir() and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "checkpoint-4").is_dir()
    assert not (out / "model.safetensors").exists(), "the run was supposed to die before finishing"
    # a half-written checkpoint (as a crash mid-save leaves) must be ignored
    shutil.copytree(out / "checkpoint-4", out / ".tmp-checkpoint-99")
    (out / ".tmp-checkpoint-99" / "trainer_state.json").unlink()

    cfg.write_text(cfg.read_text() + '\nresume_from_checkpoint: "auto"')
    proc = _launch(cfg)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    resumed = _metrics(str(out))
    assert [r["step"] for r in resumed] == list(range(1, 61))
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in ref], abs=1e-6)
    assert [r["learning_rate"] for r in resumed] == pytest.approx([r["learning_rate"] for r in ref], rel=1e-9)
    wa, wb = load_file(str(out / "model.safetensors")), load_file(os.path.join(full_dir, "model.safetensors"))
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-6, rtol=1e-6)


def test_checkpoints_are_pruned_and_loadable(tiny_model: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "d.jsonl", _rows(16))
    _, out = run_stage(
        tmp_path,
        _sft(tiny_model, data, per_device_train_batch_size=2, max_steps=7, save_steps=2, save_total_limit=2),
    )
    names = sorted(n for n in os.listdir(out) if n.startswith("checkpoint-"))
    assert names == ["checkpoint-4", "checkpoint-6"]
    assert not [n for n in os.listdir(out) if n.startswith(".tmp")]
    model = AutoModelForCausalLM.from_pretrained(os.path.join(out, "checkpoint-6"))
    assert model.config.num_hidden_layers == 2
    for name in ("optimizer.pt", "scheduler.pt", "rng_state_0.pth", "trainer_state.json"):
        assert os.path.isfile(os.path.join(out, "checkpoint-6", name))


def test_metrics_file_and_final_model(tiny_model: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = write_jsonl(tmp_path / "d.jsonl", _rows(16))
    _, out = run_stage(
        tmp_path,
        {
            **_sft(tiny_model, data, per_device_train_batch_size=4, max_steps=4, logging_steps=2),
            "plot_loss": True,
        },
    )
    records = _metrics(out)
    assert [r["step"] for r in records] == [2, 4]
    for key in ("step", "epoch", "loss", "learning_rate", "grad_norm", "num_tokens", "mean_token_accuracy"):
        assert key in records[0]
    assert records[1]["num_tokens"] > records[0]["num_tokens"] > 0
    for key in ("train_runtime", "train_tokens_per_second", "peak_memory_mb"):
        assert records[-1][key] > 0
    assert os.path.getsize(os.path.join(out, "loss.png")) > 1000
    with open(os.path.join(out, "config.yaml")) as fh:
        assert "learning_rate: 0.001" in fh.read()
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and model.config.vocab_size == len(tok)


def test_nan_loss_stops_with_step_and_keeps_checkpoint(tiny_model: str, tmp_path: Path) -> None:
    from alignkit.loop import TrainingDiverged

    data = write_jsonl(tmp_path / "d.jsonl", _rows(16))
    with pytest.raises(TrainingDiverged, match=r"step [34]: the loss is (nan|inf).*learning rate") as info:
        run_stage(
            tmp_path,
            _sft(
                tiny_model,
                data,
                per_device_train_batch_size=4,
                max_steps=6,
                save_steps=2,
                learning_rate=1e30,
                max_grad_norm=0.0,
                warmup_steps=2,
            ),
        )
    assert "checkpoint" in str(info.value)
    assert (tmp_path / "out" / "checkpoint-2" / "trainer_state.json").is_file()
    assert not (tmp_path / "out" / "model.safetensors").exists()


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


def test_eval_every_eval_steps_independent_of_logging(tiny_model: str, tmp_path: Path) -> None:
    rows = _rows(16)
    data = write_jsonl(tmp_path / "d.jsonl", rows[:12])
    held = write_jsonl(tmp_path / "e.jsonl", rows[12:])
    _, out = run_stage(
        tmp_path,
        _sft(
            tiny_model,
            data,
            eval_dataset=held,
            per_device_train_batch_size=4,
            max_steps=6,
            logging_steps=4,
            eval_steps=3,
        ),
    )
    records = _metrics(out)
    assert [r["step"] for r in records] == [3, 4, 6]
    assert "eval_loss" in records[0] and "loss" not in records[0]
    assert "loss" in records[1] and "eval_loss" not in records[1]
    assert records[2]["eval_loss"] < records[0]["eval_loss"]  # training on the task lowers held-out loss
    assert 0.0 <= records[2]["eval_mean_token_accuracy"] <= 1.0


def test_bf16_autocast_on_cpu_runs_close_to_fp32(tiny_model: str, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", _rows(8))
    fp32, _ = run_stage(tmp_path / "a", _sft(tiny_model, data, per_device_train_batch_size=4, max_steps=1))
    bf16, _ = run_stage(
        tmp_path / "b", _sft(tiny_model, data, per_device_train_batch_size=4, max_steps=1, bf16=True)
    )
    assert bf16["loss"] != fp32["loss"]  # it really ran in bf16
    assert bf16["loss"] == pytest.approx(fp32["loss"], rel=0.02)


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
