"""Invariances of the training loop: accumulation, processes, resume, divergence, saving."""

from __future__ import annotations

import json
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
    # Adam divides each gradient by its own running scale, so an element whose gradient is ~eps amplifies the
    # summation-order rounding of the two runs (measured: 1 of 16384 elements 1.5e-5 apart on one machine,
    # none on another). All elements agree to 1e-4 (5% of the 2-step update bound, 2 x lr) and all but
    # 0.1% to 1e-5; a broken accumulation moves most elements by ~lr and fails both.
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-4, rtol=0)
        assert ((wa[key] - wb[key]).abs() > 1e-5).float().mean().item() <= 1e-3, key
    # and training did move the weights
    base = load_file(os.path.join(tiny_model, "model.safetensors"))
    assert not torch.allclose(base["model.embed_tokens.weight"], wa["model.embed_tokens.weight"])


def test_shuffle_is_seeded_and_off_keeps_file_order() -> None:
    from alignkit.stages.base import epoch_order, micro_batches

    assert epoch_order(6, 0, 1, shuffle=False) == list(range(6))
    assert epoch_order(50, 0, 1, True) == epoch_order(50, 0, 1, True)
    assert epoch_order(50, 0, 1, True) != epoch_order(50, 1, 1, True)
    order = list(range(8))
    # 2 processes x batch 2 cover the same global batch as 1 process x batch 4
    two = micro_batches(order, 0, 2, 2, 1, 0) + micro_batches(order, 0, 2, 2, 1, 1)
    assert sorted(sum(two, [])) == micro_batches(order, 0, 4, 1, 1, 0)[0]


@pytest.mark.parametrize("world,bs,accum", [(2, 2, 1), (2, 2, 2), (3, 1, 2), (2, 4, 1)])
def test_short_last_batch_deals_each_row_once(world: int, bs: int, accum: int) -> None:
    """The short last global batch of 13 rows is split over the processes, each row once (no filler row is
    trained); every process still gets `accum` micro-batches, an empty one being a weight-0 filler."""
    from alignkit.stages.base import micro_batches

    order = list(range(13))
    size = world * bs * accum
    last = (len(order) - 1) // size
    plans = [micro_batches(order, last, bs, world, accum, rank) for rank in range(world)]
    assert sorted(i for plan in plans for chunk in plan for i in chunk) == order[last * size :]
    assert [len(plan) for plan in plans] == [accum] * world
    assert micro_batches(order, last, bs, 1, accum, 0) == [
        c for c in (order[last * bs * accum :][j * bs : (j + 1) * bs] for j in range(accum)) if c
    ]


def _launch_two(
    cfg_keys: dict, tmp_path: Path, port: int, entry: list[str] | None = None, paths: tuple[str, ...] = ()
) -> list[dict]:
    """Run `accelerate launch --multi_gpu --num_processes 2` on the config; return its metrics records.
    `entry` replaces `-m alignkit` (a script that takes the same arguments); `paths` join PYTHONPATH."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = tmp_path / "two.yaml"
    out = tmp_path / "two"
    keys = {**cfg_keys, "output_dir": str(out), "disable_tqdm": True, "plot_loss": False}
    cfg.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in keys.items()))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *paths])}
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
        *(entry or ["-m", "alignkit"]),
        "train",
        str(cfg),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _metrics(str(out))


def _pref_keys(tiny_model: str, tiny_ref: str, data: str) -> dict:
    return {
        "stage": "dpo",
        "model_name_or_path": tiny_model,
        "ref_model_name_or_path": tiny_ref,
        "dataset": data,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "num_train_epochs": 1,
        "shuffle": False,
        "torch_dtype": "float32",
    }


def _launch(cfg: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "alignkit", "train", str(cfg)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
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
    from alignkit.training.loop import TrainingDiverged

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


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under root with its bytes (None for a folder)."""
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in root.rglob("*")}


def _fail(self, model, batch):  # noqa: ANN001, ANN202 - stands in for a stage's step
    raise RuntimeError("out of memory (simulated)")


def _fails_at_call(n: int, real_step):  # noqa: ANN001, ANN202
    """A stage step that raises on its n-th call and runs `real_step` otherwise."""
    calls = []

    def step(self, model, batch):  # noqa: ANN001, ANN202
        calls.append(1)
        return _fail(self, model, batch) if len(calls) == n else real_step(self, model, batch)

    return step


def test_failed_run_leaves_output_dir_as_it_was(
    tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that raises in its first step takes back what it wrote: a user's file stays, a folder the run
    made goes, an earlier run overwritten under `overwrite_output_dir` is as it was; then the same config
    runs without `overwrite_output_dir`."""
    from alignkit.stages.sft import SFTStage

    data = write_jsonl(tmp_path / "d.jsonl", _rows(8))
    keys = _sft(tiny_model, data, per_device_train_batch_size=4, max_steps=2, report_to="tensorboard")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file")
    (out / "runs").mkdir()
    before = _tree(out)
    real_step = SFTStage.step
    monkeypatch.setattr(SFTStage, "step", _fail)
    with pytest.raises(RuntimeError, match="simulated"):
        run_stage(tmp_path, keys)
    assert _tree(out) == before
    with pytest.raises(RuntimeError, match="simulated"):
        run_stage(tmp_path / "new", keys)
    assert not (tmp_path / "new").exists()

    monkeypatch.setattr(SFTStage, "step", real_step)
    record, _ = run_stage(tmp_path, keys)  # accepted: nothing of the failed run is left to refuse
    assert record["step"] == 2 and (out / "notes.txt").read_text() == "the user's own file"
    finished = _tree(out)
    assert "metrics.jsonl" in finished and any(k.startswith("runs/events") for k in finished)

    monkeypatch.setattr(SFTStage, "step", _fail)
    with pytest.raises(RuntimeError, match="simulated"):
        run_stage(tmp_path, {**keys, "overwrite_output_dir": True, "learning_rate": 5e-4})
    assert _tree(out) == finished


def test_failed_run_keeps_its_checkpoint_for_resume(
    tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that fails after a checkpoint keeps it; `resume_from_checkpoint: auto` then finishes the run
    with the losses of an uninterrupted one."""
    from alignkit.stages.sft import SFTStage

    data = write_jsonl(tmp_path / "d.jsonl", _rows(8))
    keys = _sft(tiny_model, data, per_device_train_batch_size=4, max_steps=4, save_steps=2)
    run_stage(tmp_path / "full", keys)
    real_step = SFTStage.step
    monkeypatch.setattr(SFTStage, "step", _fails_at_call(3, real_step))
    with pytest.raises(RuntimeError, match="simulated"):
        run_stage(tmp_path, keys)
    assert sorted(os.listdir(tmp_path / "out")) == ["checkpoint-2", "config.yaml", "metrics.jsonl"]
    monkeypatch.setattr(SFTStage, "step", real_step)
    run_stage(tmp_path, {**keys, "resume_from_checkpoint": "auto"})
    resumed, full = _metrics(str(tmp_path / "out")), _metrics(str(tmp_path / "full" / "out"))
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in full], abs=1e-6)


def test_failed_run_after_some_steps_keeps_its_files_aside_and_spares_a_shared_parent(
    tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure after some optimizer steps but before a checkpoint keeps the run's metrics for diagnosis, in
    `failed-<time>/`, where they block no re-run; a parent folder made for it that another run also writes
    into is not removed; a failure after the final model is written keeps the model."""
    from alignkit.stages.sft import SFTStage
    from alignkit.training.tracking import MetricsWriter

    data = write_jsonl(tmp_path / "d.jsonl", _rows(8))
    keys = _sft(tiny_model, data, per_device_train_batch_size=4, max_steps=3)
    real_step = SFTStage.step
    monkeypatch.setattr(SFTStage, "step", _fails_at_call(3, real_step))
    with pytest.raises(RuntimeError, match="simulated"):
        run_stage(tmp_path, keys)
    out = tmp_path / "out"
    (aside,) = [p for p in out.iterdir()]
    assert aside.name.startswith("failed-") and {"config.yaml", "metrics.jsonl"} <= set(os.listdir(aside))
    assert [r["step"] for r in _metrics(str(aside))] == [1, 2]
    monkeypatch.setattr(SFTStage, "step", real_step)
    record, _ = run_stage(tmp_path, keys)  # not refused
    assert record["step"] == 3

    def sibling_then_fail(self, model, batch):  # noqa: ANN001, ANN202
        sibling = tmp_path / "sweep" / "b"
        sibling.mkdir(parents=True, exist_ok=True)
        (sibling / "model.safetensors").write_text("another run's model")
        return _fail(self, model, batch)

    monkeypatch.setattr(SFTStage, "step", sibling_then_fail)
    with pytest.raises(RuntimeError, match="simulated"):
        run_stage(tmp_path / "sweep" / "a", keys)
    assert not (tmp_path / "sweep" / "a").exists()
    assert (tmp_path / "sweep" / "b" / "model.safetensors").read_text() == "another run's model"

    monkeypatch.setattr(SFTStage, "step", real_step)

    def close_fails(self, failed: bool = False) -> None:  # noqa: ANN001
        raise RuntimeError("tracker upload failed (simulated)")

    monkeypatch.setattr(MetricsWriter, "close", close_fails)
    with pytest.raises(RuntimeError, match="simulated"):
        run_stage(tmp_path / "late", keys)
    assert (tmp_path / "late" / "out" / "model.safetensors").is_file()


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
