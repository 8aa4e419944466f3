"""LLaMA-Factory's and TRL's YAML keys read with their meaning (alignkit/config/compat.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from alignkit.config import DPOConfig, KTOConfig, PPOConfig, PTConfig, build_config, load_config
from alignkit.errors import UserError

# LLaMA-Factory's examples/train_lora/qwen3_lora_dpo.yaml (commit ff6d4d1) as published: the model path is
# the only change, and the step count
LF_DPO = """
model_name_or_path: MODEL
trust_remote_code: true
stage: dpo
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all
pref_beta: 0.1
pref_loss: sigmoid  # choices: [sigmoid (dpo), orpo, simpo]
dataset: dpo_en_demo
template: qwen3_nothink
cutoff_len: 2048
max_samples: 1000
preprocessing_num_workers: 16
dataloader_num_workers: 4
output_dir: saves/qwen3-4b/lora/dpo
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: none  # choices: [none, wandb, tensorboard, swanlab, mlflow]
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 5.0e-6
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
resume_from_checkpoint: null
max_steps: 2
"""


def _lf(text: str = LF_DPO, **changes: object) -> dict:
    raw = yaml.safe_load(text)
    raw.update(changes)
    return {k: v for k, v in raw.items() if v is not ...}


def test_lf_dpo_config_reads_every_key_with_its_meaning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="alignkit"):
        cfg = build_config(_lf())
    assert isinstance(cfg, DPOConfig)
    assert (cfg.max_length, cfg.lora_r, cfg.lora_alpha, cfg.lora_target) == (2048, 8, 16, "all")
    assert (cfg.beta, cfg.loss_type, cfg.loss_weights) == (0.1, ["sigmoid"], None)
    assert (cfg.template, cfg.max_samples, cfg.dataset, cfg.resume_from_checkpoint) == (
        "qwen3_nothink",
        1000,
        "dpo_en_demo",
        None,
    )
    read = [r.getMessage() for r in caplog.records if "other tools' keys" in r.getMessage()]
    assert len(read) == 1 and "pref_beta->beta" in read[0] and "pref_loss->loss_type" in read[0]
    no_effect = [r.getMessage() for r in caplog.records if "no effect" in r.getMessage()]
    assert len(no_effect) == 1  # one line names them all
    for key in (
        "do_train",
        "preprocessing_num_workers",
        "dataloader_num_workers",
        "ddp_timeout",
        "save_only_model",
    ):
        assert key in no_effect[0]


def test_lora_rank_sets_alpha_to_twice_the_rank_unless_given() -> None:
    assert build_config(_lf(lora_rank=16)).lora_alpha == 32
    assert build_config(_lf(lora_rank=16, lora_alpha=8)).lora_alpha == 8
    cfg = build_config(_lf(lora_target="q_proj,v_proj", additional_target="embed_tokens,lm_head"))
    assert (cfg.lora_target, cfg.modules_to_save) == (["q_proj", "v_proj"], ["embed_tokens", "lm_head"])


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"pref_loss": "orpo", "pref_beta": 0.2}, {"loss_type": ["orpo"], "orpo_beta": 0.2, "beta": 0.1}),
        ({"pref_loss": "simpo", "pref_beta": 2.0, "simpo_gamma": 0.3}, {"loss_type": ["simpo"], "beta": 2.0}),
        ({"pref_loss": "hinge"}, {"loss_type": ["hinge"]}),
        ({"pref_loss": "ipo", "pref_beta": 0.5}, {"loss_type": ["ipo"], "beta": 0.5}),
        ({"pref_ftx": 0.5}, {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]}),
        ({"pref_ftx": 0.0}, {"loss_type": ["sigmoid"], "loss_weights": None}),
        ({"pref_loss": ..., "rpo_alpha": 1.0}, {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 1.0]}),
        ({"dpo_label_smoothing": 0.1}, {"label_smoothing": 0.1}),
    ],
)
def test_preference_keys(changes: dict, expected: dict) -> None:
    cfg = build_config(_lf(**changes))
    for key, value in expected.items():
        assert getattr(cfg, key) == value, key
    if "simpo_gamma" in changes:
        assert cfg.simpo_gamma == 0.3


def test_kto_keys_and_kto_pair() -> None:
    cfg = build_config(
        _lf(stage="kto", pref_loss=..., pref_beta=0.2, kto_chosen_weight=1.5, kto_rejected_weight=0.5)
    )
    assert isinstance(cfg, KTOConfig)
    assert (cfg.beta, cfg.desirable_weight, cfg.undesirable_weight) == (0.2, 1.5, 0.5)
    with pytest.raises(UserError, match="stage: kto"):
        build_config(_lf(pref_loss="kto_pair"))
    with pytest.raises(UserError, match="pref_loss: sigmod.*did you mean `sigmoid`"):
        build_config(_lf(pref_loss="sigmod"))


def test_every_unknown_key_is_reported_at_once_with_its_suggestion() -> None:
    raw = _lf(epochs=3, lr=1e-5, max_sample=10, frobnicate=True)
    with pytest.raises(UserError) as info:
        build_config(raw)
    text = str(info.value)
    assert "4 unknown keys" in text
    assert "`epochs` (use `num_train_epochs`)" in text
    assert "`lr` (use `learning_rate`)" in text
    assert "`max_sample` (did you mean `max_samples`?)" in text
    assert "`frobnicate`" in text and "frobnicate` (" not in text  # nothing close: no suggestion
    # the wrong way round suggestions of the past (pref_beta -> orpo_beta, deepspeed -> seed, ...) cannot come
    # back: those keys are read now
    for key in ("pref_beta", "pref_loss", "deepspeed", "max_samples", "cutoff_len"):
        assert f"\n  `{key}`" not in text


def test_trl_names() -> None:
    cfg = build_config(
        {
            "stage": "dpo",
            "model_name_or_path": "m",
            "dataset_name": "d.jsonl",
            "max_seq_length": 512,
            "use_peft": True,
            "lora_target_modules": ["q_proj"],
            "dtype": "float32",
            "rpo_alpha": 0.5,
        }
    )
    assert (cfg.dataset, cfg.max_length, cfg.finetuning_type, cfg.lora_target, cfg.torch_dtype) == (
        "d.jsonl",
        512,
        "lora",
        ["q_proj"],
        "float32",
    )
    assert (cfg.loss_type, cfg.loss_weights) == (["sigmoid", "sft"], [1.0, 0.5])
    ppo = build_config(
        {"stage": "ppo", "model_name_or_path": "m", "dataset": "d", "reward_model": "r", "num_ppo_epochs": 2}
    )
    assert isinstance(ppo, PPOConfig) and ppo.ppo_epochs == 2


def test_stage_pt_and_quantization_bit() -> None:
    cfg = build_config(_lf(stage="pt", pref_beta=..., pref_loss=..., dataset="c4_demo", template=...))
    assert isinstance(cfg, PTConfig)
    assert (cfg.dataset_format, cfg.completion_only_loss) == ("text", False)
    assert build_config(_lf(quantization_bit=4)).finetuning_type == "qlora"
    assert build_config(_lf(quantization_bit=4, quantization_method="bnb")).finetuning_type == "qlora"
    with pytest.raises(UserError, match="quantization_method: hqq"):
        build_config(_lf(quantization_bit=4, quantization_method="hqq"))
    with pytest.raises(UserError, match="quantization_bit: 8"):
        build_config(_lf(quantization_bit=8))


def test_eval_keys() -> None:
    from alignkit.training.loop import eval_every

    cfg = build_config(_lf(val_size=0.1, eval_strategy="steps", eval_steps=500))
    assert (cfg.val_size, eval_every(cfg, 37)) == (0.1, 500)
    assert eval_every(build_config(_lf(val_size=0.1, eval_strategy="steps")), 37) == 10  # logging_steps
    assert eval_every(build_config(_lf(val_size=0.1, eval_strategy="epoch")), 37) == 37
    assert eval_every(build_config(_lf(val_size=0.1, eval_strategy="no", eval_steps=5)), 37) is None
    assert eval_every(build_config(_lf(eval_dataset="x", eval_steps=5)), 37) == 5
    with pytest.raises(UserError, match="val_size.*eval_dataset"):
        build_config(_lf(val_size=0.1, eval_dataset="dpo_en_demo"))
    with pytest.raises(UserError, match="eval_strategy: steps.*needs"):
        build_config(_lf(eval_strategy="steps"))
    with pytest.raises(UserError, match="val_size"):
        build_config(_lf(val_size=2.5))


def test_resume_from_checkpoint_true_means_the_newest(tmp_path: Path) -> None:
    from alignkit.training.checkpoint import STATE_FILE, resolve_resume

    cfg = build_config(_lf(resume_from_checkpoint=True))
    assert cfg.resume_from_checkpoint == "true"
    assert build_config(_lf(resume_from_checkpoint=False)).resume_from_checkpoint is None
    with pytest.raises(UserError, match="no checkpoint"):
        resolve_resume(str(tmp_path), "true")
    for n in (2, 10):
        (tmp_path / f"checkpoint-{n}").mkdir()
        (tmp_path / f"checkpoint-{n}" / STATE_FILE).write_text("{}")
    assert resolve_resume(str(tmp_path), "true") == str(tmp_path / "checkpoint-10")


def test_deepspeed_key(tmp_path: Path, no_deepspeed: None) -> None:
    from alignkit.training.launch import _deepspeed

    with pytest.raises(UserError, match="deepspeed: nowhere.json.*not a file"):
        build_config(_lf(deepspeed="nowhere.json"))
    ds = tmp_path / "ds_z3_config.json"
    ds.write_text('{"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto"}')
    cfg = build_config(_lf(deepspeed=str(ds)))
    with pytest.raises(UserError, match="needs DeepSpeed.*pip install deepspeed"):
        _deepspeed(cfg)


def test_lf_yaml_file_through_load_config(tmp_path: Path) -> None:
    path = tmp_path / "qwen3_lora_dpo.yaml"
    path.write_text(LF_DPO)
    cfg = load_config(str(path), ["pref_beta=0.3"])
    assert cfg.beta == 0.3 and cfg.max_length == 2048
