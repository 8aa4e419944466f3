"""Past one device: FSDP2 and DeepSpeed ZeRO-2 / ZeRO-3 give DDP's numbers (ZeRO where DeepSpeed is installed),
and the ZeRO configs fail clearly without DeepSpeed.

Two processes on CPU (gloo) are launched twice: `accelerate launch --multi_gpu` (DDP) and `accelerate launch
--config_file configs/accelerate/fsdp2.yaml` (FSDP2: full shard, one unit per decoder layer, rank 0 loads
the weights and broadcasts them). Each launch trains SFT and then DPO, 3 logged steps each on the same
global batch (2 processes x batch 2).

accelerate 1.15 alone would not shard here: its AcceleratorState turns ACCELERATE_USE_FSDP into
DistributedType.FSDP only for GPU-like process groups (MULTI_GPU, MULTI_NPU, MULTI_XPU, ...), never for
MULTI_CPU, so on a machine without a GPU the FSDP launch silently trained plain DDP. torch 2.13's
`fully_shard` does run on gloo, and alignkit.training.launch switches the state to FSDP2 there (`_fsdp_on_cpu`);
the test checks the model really was sharded (the run logs it, and saving needed the gather: a sharded
model saved by the main process alone fails in `save_pretrained` on a DTensor collective). DeepSpeed has a CPU
accelerator (gloo), and accelerate gates it the same way: `_deepspeed_on_cpu` switches the state to DEEPSPEED,
and the ZeRO launches (configs/accelerate/zero2.yaml, zero3.yaml) train SFT and DPO beside the others.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import REPO, free_port, write_jsonl

pytestmark = pytest.mark.slow  # two-process runs: not in the fast tier

ACCEL = REPO / "configs" / "accelerate"
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None

# The entry both launches run: train each config named on the command line, one after the other, in the
# same processes (one start-up for SFT and DPO).
ENTRY = """
import sys
from alignkit.cli import main

for config in sys.argv[1:]:
    try:
        main(["train", config])
    except SystemExit as exc:
        if exc.code:
            raise
"""


def _rows(n: int) -> list[dict]:
    return [
        {
            "prompt": [{"role": "user", "content": f"What is {i} + {i + 3}?"}],
            "completion": [{"role": "assistant", "content": str(2 * i + 3) + " is the answer" * (i % 3)}],
        }
        for i in range(n)
    ]


def _metrics(out: Path) -> list[dict]:
    with open(out / "metrics.jsonl") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _write(path: Path, keys: dict) -> str:
    path.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in keys.items()))
    return str(path)


def _launch(how: list[str], configs: list[str], entry: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *how, "--num_processes", "2"]
    cmd += ["--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no"]
    cmd += ["--dynamo_backend", "no", str(entry), *configs]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


@pytest.fixture(scope="module")
def runs(tiny_model: str, tiny_ref: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Output folders of SFT and DPO under DDP and under FSDP2, each 3 steps of 2 processes x batch 2."""
    from tests.stages.test_dpo import CONV

    root = tmp_path_factory.mktemp("fsdp")
    common = {"learning_rate": 1e-3, "logging_steps": 1, "max_steps": 3, "shuffle": False}
    common |= {"per_device_train_batch_size": 2, "torch_dtype": "float32", "disable_tqdm": True}
    common |= {"plot_loss": False, "model_name_or_path": tiny_model}
    sft = {**common, "stage": "sft", "dataset": write_jsonl(root / "sft.jsonl", _rows(12)), "save_steps": 2}
    dpo = {**common, "stage": "dpo", "dataset": write_jsonl(root / "dpo.jsonl", (CONV * 4)[:12])}
    dpo["ref_model_name_or_path"] = tiny_ref
    out: dict[str, Path] = {"tiny_model": Path(tiny_model)}
    entry = root / "entry.py"
    entry.write_text(ENTRY)
    launchers = {"ddp": ["--multi_gpu"], "fsdp": ["--config_file", str(ACCEL / "fsdp2.yaml")]}
    if HAS_DEEPSPEED:
        launchers |= {f"zero{n}": ["--config_file", str(ACCEL / f"zero{n}.yaml")] for n in (2, 3)}
    procs = {}
    for kind, how in launchers.items():  # both at once: half the wait
        port = free_port()
        configs = []
        lora = {**sft, "finetuning_type": "lora", "lora_target": "all", "save_merged": True}
        # under ZeRO, SFT runs batch 1 x accumulation 2, which must give DDP's batch 2 (the engine told each
        # step's boundary by the loop), and is resumed so
        accumulated = {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 2}
        full = {**sft, **accumulated} if kind.startswith("zero") else sft
        runs = [("sft", full), ("dpo", dpo), ("lora", lora)]
        if kind != "ddp":  # SFT and LoRA again from the sharded runs' checkpoint-2: their step 3 once more
            for name, keys in (("sft", full), ("lora", lora)):
                resume = str(root / kind / name / "checkpoint-2")
                runs.append((f"{name}-resumed", {**keys, "resume_from_checkpoint": resume}))
        for name, keys in runs:
            out[f"{kind}-{name}"] = root / kind / name
            configs.append(
                _write(root / f"{kind}-{name}.yaml", {**keys, "output_dir": str(root / kind / name)})
            )
        procs[kind] = _launch(how, configs, entry, port)
    logs = {kind: proc.communicate(timeout=400)[1] for kind, proc in procs.items()}
    for kind, proc in procs.items():
        assert proc.returncode == 0, logs[kind][-4000:]
    # the model really was sharded (accelerate alone would have run DDP on CPU)
    assert "FSDP2 over 2 CPU processes" in logs["fsdp"], logs["fsdp"][-3000:]
    for n in (2, 3) if HAS_DEEPSPEED else ():  # and ZeRO really ran (accelerate alone would run DDP on CPU)
        assert f"DeepSpeed ZeRO-{n} over 2 CPU processes" in logs[f"zero{n}"], logs[f"zero{n}"][-3000:]
    return out


@pytest.mark.parametrize("kind", ["fsdp", "zero2", "zero3"])
@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_sharded_runs_match_ddp(runs: dict[str, Path], stage: str, kind: str) -> None:
    """Same per-step loss (and gradient norm, and for DPO the reward margins) over 3 steps within 1e-5, and the
    same final weights; the sharded run's model folder loads with AutoModelForCausalLM."""
    from transformers import AutoModelForCausalLM

    _need(kind)
    ddp, fsdp = _metrics(runs[f"ddp-{stage}"]), _metrics(runs[f"{kind}-{stage}"])
    assert [r["step"] for r in fsdp] == [r["step"] for r in ddp] == [1, 2, 3]
    assert [r["loss"] for r in fsdp] == pytest.approx([r["loss"] for r in ddp], abs=1e-5)
    assert [r["grad_norm"] for r in fsdp] == pytest.approx([r["grad_norm"] for r in ddp], rel=1e-5)
    assert [r["num_tokens"] for r in fsdp] == [r["num_tokens"] for r in ddp]
    if stage == "dpo":
        margins = [r["rewards/margins"] for r in fsdp]
        assert margins == pytest.approx([r["rewards/margins"] for r in ddp], abs=1e-5)
    assert ddp[0]["loss"] != pytest.approx(ddp[-1]["loss"], abs=1e-3)  # training moved the loss
    want = load_file(str(runs[f"ddp-{stage}"] / "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(str(runs[f"{kind}-{stage}"]), dtype=torch.float32)
    got = model.state_dict()
    assert set(want) <= set(got)
    for key, value in want.items():
        if kind == "fsdp":
            torch.testing.assert_close(got[key], value, atol=1e-5, rtol=0, msg=key)
            continue
        # ZeRO sums gradients in its own buckets: Adam amplifies that rounding where a gradient is ~eps (as in
        # test_loop's accumulation test; measured 1.2e-5 on 1 element of 8192): 1e-4 all, 1e-5 all but 0.1%
        torch.testing.assert_close(got[key], value, atol=1e-4, rtol=0, msg=key)
        assert ((got[key] - value).abs() > 1e-5).float().mean().item() <= 1e-3, key


def _need(kind: str) -> None:
    if kind.startswith("zero") and not HAS_DEEPSPEED:
        pytest.skip("DeepSpeed is not installed (pip install deepspeed): ZeRO on CPU not run")


@pytest.mark.parametrize("kind", ["fsdp", "zero2", "zero3"])
def test_sharded_lora_saves_the_adapter_and_the_merged_model(runs: dict[str, Path], kind: str) -> None:
    """LoRA under FSDP2 / ZeRO: the adapter (gathered) and `merged/` (rebuilt from the saved adapter, since a
    sharded model cannot be deep-copied) equal the DDP run's, and the merged model loads."""
    from transformers import AutoModelForCausalLM

    _need(kind)
    ddp, sharded = runs["ddp-lora"], runs[f"{kind}-lora"]
    want_losses = [r["loss"] for r in _metrics(ddp)]
    assert [r["loss"] for r in _metrics(sharded)] == pytest.approx(want_losses, abs=1e-5)
    for name in ("adapter_model.safetensors", "merged/model.safetensors"):
        want, got = load_file(str(ddp / name)), load_file(str(sharded / name))
        assert set(got) == set(want) and want, name
        for key, value in want.items():
            torch.testing.assert_close(got[key], value, atol=1e-5, rtol=0, msg=key)
    base = load_file(str(Path(runs["tiny_model"]) / "model.safetensors"))
    merged = AutoModelForCausalLM.from_pretrained(str(sharded / "merged"), dtype=torch.float32).state_dict()
    key = "model.layers.0.self_attn.q_proj.weight"  # the adapter's delta is in the merged weights
    assert (merged[key] - base[key]).abs().max() > 1e-4


@pytest.mark.parametrize("kind", ["fsdp", "zero2", "zero3"])
@pytest.mark.parametrize("run", ["sft", "lora"])
def test_sharded_checkpoint_resumes_exactly(runs: dict[str, Path], kind: str, run: str) -> None:
    """A checkpoint written under FSDP2 (weights and optimizer state gathered from the shards) or ZeRO
    (DeepSpeed's own checkpoint of each process's partition, in checkpoint-2/deepspeed/) resumes to the same
    step 3 and the same final weights (LoRA: the same adapter) as the run that went on."""
    _need(kind)
    whole, resumed = _metrics(runs[f"{kind}-{run}"]), _metrics(runs[f"{kind}-{run}-resumed"])
    assert [r["step"] for r in resumed] == [3]
    assert resumed[0]["loss"] == pytest.approx(whole[-1]["loss"], abs=1e-6)
    assert resumed[0]["grad_norm"] == pytest.approx(whole[-1]["grad_norm"], rel=1e-6)
    weights = "adapter_model.safetensors" if run == "lora" else "model.safetensors"
    want = load_file(str(runs[f"{kind}-{run}"] / weights))
    got = load_file(str(runs[f"{kind}-{run}-resumed"] / weights))
    assert set(got) == set(want) and want
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, atol=1e-6, rtol=0, msg=key)
    # under ZeRO the optimizer's state is DeepSpeed's, one partition per process
    if kind.startswith("zero") and run == "sft":
        written = {p.name for p in (runs[f"{kind}-sft"] / "checkpoint-2" / "deepspeed" / "state").iterdir()}
        assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= written, written
        assert not (runs[f"{kind}-sft"] / "checkpoint-2" / "optimizer.pt").exists()


@pytest.mark.parametrize("kind", ["zero2", "zero3"])
def test_zero_accumulation_equals_the_larger_batch(runs: dict[str, Path], kind: str) -> None:
    """ZeRO's SFT run is batch 1 x accumulation 2 (the engine steps once per step, at the last micro-batch), and
    `test_sharded_runs_match_ddp` finds DDP's batch-2 losses, gradient norms and weights in it; here, that it
    was: two micro-batches of one row per process and step, and as many tokens per step as DDP's."""
    _need(kind)
    config = yaml.safe_load((runs[f"{kind}-sft"] / "config.yaml").read_text())
    assert (config["per_device_train_batch_size"], config["gradient_accumulation_steps"]) == (1, 2)
    ddp, accum = _metrics(runs["ddp-sft"]), _metrics(runs[f"{kind}-sft"])
    assert [r["num_tokens"] for r in accum] == [r["num_tokens"] for r in ddp]
    assert [r["loss"] for r in accum] == pytest.approx([r["loss"] for r in ddp], abs=1e-5)


def test_accelerate_configs() -> None:
    """The configs the README launches with: FSDP2 full shard per decoder layer, gathered to one HF folder;
    ZeRO-2 / ZeRO-3, the latter saving 16-bit weights gathered (else no HF folder comes out)."""
    fsdp = yaml.safe_load((ACCEL / "fsdp2.yaml").read_text())
    assert fsdp["distributed_type"] == "FSDP"
    assert fsdp["fsdp_config"]["fsdp_version"] == 2
    assert fsdp["fsdp_config"]["fsdp_reshard_after_forward"] is True
    assert fsdp["fsdp_config"]["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_config"]["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    for stage in (2, 3):
        ds = yaml.safe_load((ACCEL / f"zero{stage}.yaml").read_text())
        assert ds["distributed_type"] == "DEEPSPEED"
        assert ds["deepspeed_config"]["zero_stage"] == stage
    assert yaml.safe_load((ACCEL / "zero3.yaml").read_text())["deepspeed_config"]["zero3_save_16bit_model"]


def test_zero_launch_without_deepspeed_is_a_user_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, no_deepspeed: None
) -> None:
    """A run started with a DeepSpeed accelerate config (the launcher sets ACCELERATE_USE_DEEPSPEED) stops
    with alignkit's error naming the fix when DeepSpeed is missing. (`deepspeed: FILE` is checked in
    tests/config/test_lf_config.py.)"""
    from alignkit.config import build_config
    from alignkit.errors import UserError
    from alignkit.training.launch import make_accelerator

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    cfg = build_config(
        {"stage": "sft", "model_name_or_path": "m", "dataset": "d", "output_dir": str(tmp_path)}
    )
    with pytest.raises(
        UserError, match="accelerate DeepSpeed config.*needs DeepSpeed.*pip install deepspeed"
    ):
        make_accelerator(cfg)


def test_deepspeed_takes_the_loops_batch_and_clipping(tmp_path: Path) -> None:
    """Under DeepSpeed the loop's per-device batch, one backward per step and max_grad_norm go into the
    engine's config (accelerate would look for a dataloader's batch size and stop); the probe of
    `auto_find_batch_size` is refused.
    A stand-in accelerator carries the config (the runs above train under DeepSpeed where it is installed)."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from alignkit.config import build_config
    from alignkit.errors import UserError
    from alignkit.training.launch import _fit_deepspeed

    keys = {"stage": "sft", "model_name_or_path": "m", "dataset": "d", "output_dir": str(tmp_path)}
    ds: dict = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}
    fake = SimpleNamespace(
        distributed_type=DistributedType.DEEPSPEED,
        num_processes=4,
        state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=ds)),
    )
    _fit_deepspeed(fake, build_config({**keys, "per_device_train_batch_size": 3, "max_grad_norm": 0.5}))
    assert ds == {
        "train_micro_batch_size_per_gpu": 3,
        "train_batch_size": 12,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.5,
    }
    _fit_deepspeed(fake, build_config({**keys, "gradient_accumulation_steps": 2}))
    assert ds["gradient_accumulation_steps"] == 1  # the loop tells the engine each step's boundary
    with pytest.raises(UserError, match="auto_find_batch_size: true.*DeepSpeed.*per_device_train_batch_size"):
        _fit_deepspeed(fake, build_config({**keys, "auto_find_batch_size": True}))


def test_a_checkpoint_resumes_only_where_its_optimizer_state_is(tmp_path: Path) -> None:
    """A checkpoint written under DeepSpeed (its optimizer state is DeepSpeed's partitions) resumed without
    DeepSpeed, and a plain one resumed under DeepSpeed, stop with an error naming the way back, before any
    weight is touched. Stand-in accelerators: the runs above resume for real where DeepSpeed is installed."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from alignkit.errors import UserError
    from alignkit.training.checkpoint import load_checkpoint

    def touched(*args: object) -> None:
        raise AssertionError("weights loaded before the checkpoint was checked")

    written_by_ds = tmp_path / "checkpoint-2"
    (written_by_ds / "deepspeed" / "state").mkdir(parents=True)
    plain = SimpleNamespace(distributed_type=DistributedType.NO, process_index=0)
    with pytest.raises(UserError, match="written under DeepSpeed.*same DeepSpeed config"):
        load_checkpoint(plain, None, touched, None, None, str(written_by_ds))
    written_plain = tmp_path / "checkpoint-4"
    written_plain.mkdir()
    (written_plain / "optimizer.pt").write_bytes(b"")
    ds = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, process_index=0)
    with pytest.raises(UserError, match="not written under DeepSpeed.*without sharding, or under FSDP2"):
        load_checkpoint(ds, SimpleNamespace(load_checkpoint=touched), touched, None, None, str(written_plain))


@pytest.mark.parametrize("task", ["CAUSAL_LM", "SEQ_CLS"])
def test_a_lora_checkpoint_goes_back_under_the_models_parameter_names(tmp_path: Path, task: str) -> None:
    """The sharded resume of a LoRA run reads the saved adapter under the model's own names: LoRA's matrices
    and, for a reward model, the score head peft saves as `score.weight` (`score.modules_to_save.default`)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from alignkit.training.checkpoint import _adapter_weights

    sizes = {"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
    heads = {"num_attention_heads": 2, "num_key_value_heads": 2}
    config = LlamaConfig(**sizes, **heads, num_labels=1, pad_token_id=0)
    cls = LlamaForCausalLM if task == "CAUSAL_LM" else LlamaForSequenceClassification
    torch.manual_seed(0)
    model = get_peft_model(cls(config), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type=task))
    for p in model.parameters():
        if p.requires_grad:  # away from their starting values (LoRA's B starts at 0)
            p.data.normal_()
    model.save_pretrained(str(tmp_path))
    got = _adapter_weights(model, str(tmp_path))
    want = {k: v for k, v in model.state_dict().items() if "lora_" in k or "modules_to_save" in k}
    assert set(got) == set(want) and len(got) == (5 if task == "SEQ_CLS" else 4)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, atol=0, rtol=0, msg=key)


def test_a_deepspeed_resume_loads_strictly_unless_weights_are_frozen(tmp_path: Path) -> None:
    """Frozen weights (LoRA's base, `finetuning_type: freeze`) are left out of DeepSpeed's checkpoint, so its
    module is loaded strictly only when every weight trains. A stand-in engine records the call."""
    from types import SimpleNamespace

    from alignkit.training.checkpoint import _load_deepspeed

    (tmp_path / "deepspeed" / "state").mkdir(parents=True)
    calls: list[dict] = []

    def load_checkpoint(folder: str, **kw: object) -> tuple[str, dict]:
        calls.append(kw)
        return folder, {}

    for frozen in (False, True):
        module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
        module[0].requires_grad_(not frozen)
        _load_deepspeed(SimpleNamespace(module=module, load_checkpoint=load_checkpoint), str(tmp_path))
        assert calls[-1]["load_module_strict"] is (not frozen)
        assert calls[-1]["tag"] == "state" and calls[-1]["load_lr_scheduler_states"] is False
