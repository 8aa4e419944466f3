"""Every stage runs an optimizer step under `bf16: true` on CPU (full and LoRA), with models saved in other
dtypes than the run's: a finite loss, and weights that moved (alignkit issue 8, finding 10)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_stage, write_jsonl
from tests.generation.test_online import PROMPTS
from tests.stages.test_dpo import CONV as PAIRS
from tests.stages.test_kto import CONV as UNPAIRED

SFT_ROWS = [
    {
        "prompt": [{"role": "user", "content": f"What is {i} + {i + 3}?"}],
        "completion": [{"role": "assistant", "content": f"{2 * i + 3} is the answer"}],
    }
    for i in range(4)
]


def _resave(src: str, dst: Path, loader: str, dtype: torch.dtype) -> str:
    """`src` saved again with its weights in `dtype` (its config then says that dtype too)."""
    import transformers

    model = getattr(transformers, loader).from_pretrained(src, dtype=dtype)
    model.save_pretrained(dst)
    transformers.AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return str(dst)


@pytest.fixture(scope="module")
def rm_bf16(tiny_rm: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny reward model saved in bfloat16 (the policy is float32 on disk)."""
    out = tmp_path_factory.mktemp("rm_bf16") / "model"
    return _resave(tiny_rm, out, "AutoModelForSequenceClassification", torch.bfloat16)


@pytest.fixture(scope="module")
def ref_fp16(tiny_ref: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The nudged reference saved in float16: neither the policy's dtype on disk nor the run's."""
    out = tmp_path_factory.mktemp("ref_fp16") / "model"
    return _resave(tiny_ref, out, "AutoModelForCausalLM", torch.float16)


def _moved(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    """Share of the tensors both hold (same name and shape) whose values differ."""
    common = [k for k in after if k in before and before[k].shape == after[k].shape]
    assert common, "no tensor in common"
    moved = [k for k in common if not torch.equal(before[k].float(), after[k].float())]
    return len(moved) / len(common)


def _train(tmp_path: Path, stage: str, model: str, rows: list[dict], **keys) -> tuple[dict, str]:
    return run_stage(
        tmp_path,
        {
            "stage": stage,
            "model_name_or_path": model,
            "dataset": write_jsonl(tmp_path / "d.jsonl", rows),
            "bf16": True,
            "per_device_train_batch_size": 4,
            "max_steps": 1,
            "logging_steps": 1,
            "learning_rate": 1e-2,
            **keys,
        },
    )


def _check_full(record: dict, out: str, start: str) -> None:
    """A finite loss; the saved weights are bfloat16 (the run's dtype) and most of them moved off the start."""
    assert math.isfinite(record["loss"])
    after = load_file(str(Path(out) / "model.safetensors"))
    assert {t.dtype for t in after.values()} == {torch.bfloat16}
    assert _moved(load_file(str(Path(start) / "model.safetensors")), after) > 0.9


def _check_lora(record: dict, out: str) -> None:
    """A finite loss; LoRA's B matrices start at zero, so any non-zero one was trained."""
    assert math.isfinite(record["loss"])
    adapter = load_file(str(Path(out) / "adapter_model.safetensors"))
    lora_b = [t for k, t in adapter.items() if "lora_B" in k]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)


@pytest.mark.parametrize("finetuning_type", ["full", "lora"])
def test_sft_bf16(finetuning_type: str, tiny_model: str, tmp_path: Path) -> None:
    record, out = _train(tmp_path, "sft", tiny_model, SFT_ROWS, finetuning_type=finetuning_type)
    assert record["loss"] > 0.1  # a token NLL
    _check_full(record, out, tiny_model) if finetuning_type == "full" else _check_lora(record, out)


def test_rm_bf16(tiny_model: str, tmp_path: Path) -> None:
    record, out = _train(tmp_path, "rm", tiny_model, PAIRS)
    assert record["loss"] > 0.01  # -log sigmoid(margin)
    _check_full(record, out, tiny_model)


def test_dpo_bf16_with_a_float16_reference(tiny_model: str, ref_fp16: str, tmp_path: Path) -> None:
    record, out = _train(tmp_path, "dpo", tiny_model, PAIRS, ref_model_name_or_path=ref_fp16)
    assert record["loss"] > 0.01
    _check_full(record, out, tiny_model)
    assert record["rewards/margins"] != 0.0  # the reference differs from the policy: log-ratios are not 0


def test_dpo_bf16_lora_precomputed_reference(tiny_model: str, tmp_path: Path) -> None:
    record, out = _train(
        tmp_path, "dpo", tiny_model, PAIRS, finetuning_type="lora", precompute_ref_log_probs=True
    )
    assert record["loss"] > 0.01
    _check_lora(record, out)


def test_kto_bf16_with_a_float16_reference(tiny_model: str, ref_fp16: str, tmp_path: Path) -> None:
    record, out = _train(tmp_path, "kto", tiny_model, UNPAIRED[:4], ref_model_name_or_path=ref_fp16)
    assert record["loss"] > 0.01
    _check_full(record, out, tiny_model)


# the online stages: the rollout scores completions outside the update's autocast, which is where PPO
# crashed (`expected m1 and m2 to have the same dtype`); the reward model is saved in bfloat16, the reference
# in float16, the policy in float32
ONLINE = {"max_new_tokens": 3, "per_device_train_batch_size": 2}


@pytest.mark.parametrize("finetuning_type", ["full", "lora"])
def test_grpo_bf16_reference_and_reused_rollout(
    finetuning_type: str, tiny_model: str, rm_bf16: str, ref_fp16: str, tmp_path: Path
) -> None:
    """beta > 0 and two updates per rollout: the rollout computes sampling-time and reference log-probs."""
    keys = {"ref_model_name_or_path": ref_fp16} if finetuning_type == "full" else {}
    record, out = _train(
        tmp_path,
        "grpo",
        tiny_model,
        PROMPTS[:2],
        **ONLINE,
        reward_model=rm_bf16,
        num_generations=4,
        beta=0.1,
        num_iterations=2,
        finetuning_type=finetuning_type,
        **keys,
    )
    _check_full(record, out, tiny_model) if finetuning_type == "full" else _check_lora(record, out)
    assert record["clip_ratio"] == 0.0
    # a LoRA adapter starts at zero, so the policy is its reference (the base, adapter off) to the last bit;
    # the full run's reference is the nudged model
    assert record["kl"] == 0.0 if finetuning_type == "lora" else record["kl"] > 1e-4


@pytest.mark.parametrize(
    ("finetuning_type", "torch_dtype"), [("full", "auto"), ("lora", "auto"), ("full", "float32")]
)
def test_ppo_bf16(
    finetuning_type: str, torch_dtype: str, tiny_model: str, rm_bf16: str, ref_fp16: str, tmp_path: Path
) -> None:
    """Policy, critic (from the bfloat16 reward model), reference (float16 on disk) and reward model all run;
    torch_dtype float32 is bf16 autocast over float32 weights. On the first update the policy is the one that
    scored the rollout, so the importance ratio is exactly 1: the rollout's log-probs are the update's."""
    keys = {"ref_model_name_or_path": ref_fp16} if finetuning_type == "full" else {}
    record, out = _train(
        tmp_path,
        "ppo",
        tiny_model,
        PROMPTS[:2],
        **ONLINE,
        reward_model=rm_bf16,
        ppo_epochs=1,
        finetuning_type=finetuning_type,
        torch_dtype=torch_dtype,
        **keys,
    )
    assert record["policy/approxkl"] == 0.0 and record["policy/clipfrac"] == 0.0
    assert math.isfinite(record["value/loss"]) and record["value/loss"] > 0
    if finetuning_type == "lora":
        _check_lora(record, out)
        return
    assert math.isfinite(record["loss"])
    after = load_file(str(Path(out) / "model.safetensors"))
    assert {t.dtype for t in after.values()} == {torch.bfloat16 if torch_dtype == "auto" else torch.float32}
    assert _moved(load_file(str(Path(tiny_model) / "model.safetensors")), after) > 0.9
    critic = load_file(str(Path(out) / "value_model" / "model.safetensors"))
    assert _moved(load_file(str(Path(rm_bf16) / "model.safetensors")), critic) > 0.9
