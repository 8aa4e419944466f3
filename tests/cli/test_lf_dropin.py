"""LLaMA-Factory's example configs run unchanged but for the model path and the step count.

The YAML below is LLaMA-Factory's examples/train_lora/llama3_lora_{sft,pretrain,reward,dpo,kto,ppo}.yaml as
last published with a PPO example (the parent of commit 95ac3f2), key for key. The run happens in a folder
whose `data/` is LLaMA-Factory's demo data (../shared/data/llamafactory with its dataset_info.json), as in a
LLaMA-Factory checkout, so `dataset: identity,alpaca_en_demo` and `output_dir: saves/...` mean what they mean
there; the reward model the PPO config names is the one the reward config writes.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import yaml
from transformers import AutoTokenizer

from alignkit.config import load_config
from alignkit.stages import get_stage
from alignkit.training.loop import train

pytestmark = pytest.mark.slow  # trains every LLaMA-Factory example config: not in the fast tier

MODEL = """\
### model
model_name_or_path: {model}
trust_remote_code: true
"""
METHOD = {
    "sft": "stage: sft\ndo_train: true\nfinetuning_type: lora\nlora_rank: 8\nlora_target: all\n",
    "pretrain": "stage: pt\ndo_train: true\nfinetuning_type: lora\nlora_rank: 8\nlora_target: all\n",
    "reward": "stage: rm\ndo_train: true\nfinetuning_type: lora\nlora_rank: 8\nlora_target: all\n",
    "dpo": "stage: dpo\ndo_train: true\nfinetuning_type: lora\nlora_rank: 8\nlora_target: all\n"
    "pref_beta: 0.1\npref_loss: sigmoid  # choices: [sigmoid (dpo), orpo, simpo]\n",
    "kto": "stage: kto\ndo_train: true\nfinetuning_type: lora\nlora_rank: 8\nlora_target: all\npref_beta: 0.1\n",
    "ppo": "stage: ppo\ndo_train: true\nfinetuning_type: lora\nlora_rank: 8\nlora_target: all\n",
}
DATASET = {
    "sft": "dataset: identity,alpaca_en_demo\ntemplate: llama3\n",
    "pretrain": "dataset: c4_demo\n",
    "reward": "dataset: dpo_en_demo\ntemplate: llama3\n",
    "dpo": "dataset: dpo_en_demo\ntemplate: llama3\n",
    "kto": "dataset: kto_en_demo\ntemplate: llama3\n",
    "ppo": "dataset: identity,alpaca_en_demo\ntemplate: llama3\n",
}
TAIL = """\
cutoff_len: 2048
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16
dataloader_num_workers: 4

### output
output_dir: saves/llama3-8b/lora/{name}
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
{save_only_model}report_to: none  # choices: [none, wandb, tensorboard, swanlab, mlflow]

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: {lr}
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
{resume}
### eval
# eval_dataset: alpaca_en_demo
# val_size: 0.1
# per_device_eval_batch_size: 1
# eval_strategy: steps
# eval_steps: 500
"""
LR = {
    "sft": "1.0e-4",
    "pretrain": "1.0e-4",
    "reward": "1.0e-4",
    "dpo": "5.0e-6",
    "kto": "5.0e-6",
    "ppo": "1.0e-5",
}
GENERATE = "\n### generate\nmax_new_tokens: 512\ntop_k: 0\ntop_p: 0.9\n"
STEPS = 2  # the one key added: LLaMA-Factory's runs go 3 epochs over up to 1000 rows


def lf_config(name: str, model: str) -> str:
    """LLaMA-Factory's example `llama3_lora_<name>.yaml`, with the model path changed and max_steps added."""
    head = MODEL.format(model=model)
    if name == "ppo":
        head += "reward_model: saves/llama3-8b/lora/reward\n"
    tail = TAIL.format(
        name=name,
        lr=LR[name],
        save_only_model="" if name in ("kto", "ppo") else "save_only_model: false\n",
        resume="" if name in ("kto", "ppo") else "resume_from_checkpoint: null\n",
    )
    text = f"{head}\n### method\n{METHOD[name]}\n### dataset\n{DATASET[name]}{tail}"
    return text + (GENERATE if name == "ppo" else "") + f"max_steps: {STEPS}\n"


@pytest.fixture
def lf_checkout(tmp_path: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder laid out like a LLaMA-Factory checkout: data/ holds dataset_info.json and the demo files."""
    os.symlink(shared_data / "llamafactory", tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _run(name: str, model: str, folder: Path) -> dict:
    path = folder / f"llama3_lora_{name}.yaml"
    path.write_text(lf_config(name, model))
    # max_samples on the command line only keeps the test short (LLaMA-Factory's file says 1000)
    cfg = load_config(str(path), ["disable_tqdm=true", "max_samples=16"])
    record = train(cfg, get_stage(cfg.stage)(cfg))
    assert record["step"] == STEPS and math.isfinite(record["loss"])
    return record


def _adapter_base(folder: Path) -> str:
    return json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]


def test_sft_pretrain_dpo_kto_configs_run_unchanged(lf_checkout: Path, tiny_model: str) -> None:
    """Each config trains a LoRA adapter on the data its names resolve to through data/dataset_info.json."""
    for name in ("sft", "pretrain", "dpo", "kto"):
        _run(name, tiny_model, lf_checkout)
        out = lf_checkout / "saves" / "llama3-8b" / "lora" / name
        assert _adapter_base(out) == tiny_model
        saved = yaml.safe_load((out / "config.yaml").read_text())
        assert (saved["max_length"], saved["lora_r"], saved["lora_alpha"]) == (2048, 8, 16)
        chat_template = AutoTokenizer.from_pretrained(out).chat_template or ""
        # `template: llama3` is saved with the adapter; the pretrain config names no template
        assert ("<|start_header_id|>" in chat_template) == (name != "pretrain")


def test_reward_then_ppo_with_the_lora_reward_model_it_wrote(lf_checkout: Path, tiny_model: str) -> None:
    rm = _run("reward", tiny_model, lf_checkout)
    assert 0.0 <= rm["accuracy"] <= 1.0
    reward = lf_checkout / "saves" / "llama3-8b" / "lora" / "reward"
    assert json.loads((reward / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    ppo = _run("ppo", tiny_model, lf_checkout)
    # the only reward is the LoRA reward model's score: its mean is the reward PPO optimised
    assert math.isfinite(ppo["rewards/reward_model/mean"])
    assert ppo["reward/mean"] == pytest.approx(ppo["rewards/reward_model/mean"])
