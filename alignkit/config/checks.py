"""Value checks on a built config: impossible values are errors at load time, not surprises at step 300.

Each names the key and, where one is close, suggests the valid value (`did_you_mean`). The checks only read:
a field's value is normalised while the dataclass is built (`alignkit.config.schema`), never here.
"""

from __future__ import annotations

import os

from alignkit.config.schema import (
    DATASET_FORMATS,
    FINETUNING_TYPES,
    REPORT_TO,
    SCHEDULERS,
    STAGES,
    BaseConfig,
    DPOConfig,
    GRPOConfig,
    KTOConfig,
    OnlineConfig,
    PPOConfig,
)
from alignkit.errors import UserError, did_you_mean

_CHOICES: dict[str, tuple[str, ...]] = {
    "stage": STAGES,
    "finetuning_type": FINETUNING_TYPES,
    "report_to": REPORT_TO,
    "lr_scheduler_type": SCHEDULERS,
    "dataset_format": DATASET_FORMATS,
    "torch_dtype": ("auto", "float32", "bfloat16", "float16", "float64"),
    "f_divergence_type": ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"),
    "eval_strategy": ("no", "steps", "epoch"),
    "reward_model_type": ("auto", "full", "lora"),
}
_POSITIVE = (
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "gradient_accumulation_steps",
    "max_length",
    "logging_steps",
    "lora_r",
)
_NON_NEGATIVE = (
    "learning_rate",
    "warmup_steps",
    "weight_decay",
    "max_grad_norm",
    "num_train_epochs",
    "lora_dropout",
    "freeze_trainable_layers",
)


def validate(cfg: BaseConfig, source: str = "config") -> None:
    """Impossible values are errors at load time, not surprises at step 300."""
    for key, choices in _CHOICES.items():
        value = getattr(cfg, key, None)
        if value is not None and value not in choices:
            raise UserError(
                f"{source}: `{key}: {value}` is not valid{did_you_mean(str(value), choices)}; "
                f"choose one of: {', '.join(choices)}"
            )
    for key in _POSITIVE:
        if hasattr(cfg, key) and getattr(cfg, key) <= 0:
            raise UserError(f"{source}: `{key}` must be > 0, got {getattr(cfg, key)}")
    for key in _NON_NEGATIVE:
        if hasattr(cfg, key) and getattr(cfg, key) is not None and getattr(cfg, key) < 0:
            raise UserError(f"{source}: `{key}` must be >= 0, got {getattr(cfg, key)}")
    _validate_data(cfg, source)
    if not 0.0 <= cfg.warmup_ratio <= 1.0:
        raise UserError(f"{source}: `warmup_ratio` must be in [0, 1], got {cfg.warmup_ratio}")
    if not cfg.model_name_or_path:
        raise UserError(f"{source}: `model_name_or_path` is required (a local directory or a hub id)")
    if not cfg.dataset:
        raise UserError(f"{source}: `dataset` is required (a file, a list of files, or a hub id)")
    if cfg.bf16 and cfg.fp16:
        raise UserError(f"{source}: `bf16` and `fp16` are both true; choose one")
    if cfg.torch_dtype == "float64" and (cfg.bf16 or cfg.fp16):  # autocast would compute in half precision
        half = "bf16" if cfg.bf16 else "fp16"
        raise UserError(f"{source}: `torch_dtype: float64` with `{half}: true` computes in {half}; drop one")
    if isinstance(cfg, (DPOConfig, KTOConfig)) and cfg.beta <= 0:
        raise UserError(f"{source}: `beta` must be > 0, got {cfg.beta}")
    if isinstance(cfg, GRPOConfig) and cfg.beta < 0:
        raise UserError(f"{source}: `beta` must be >= 0, got {cfg.beta}")
    if isinstance(cfg, DPOConfig):
        _validate_dpo(cfg, source)
    if isinstance(cfg, OnlineConfig):
        _validate_online(cfg, source)
    if isinstance(cfg, GRPOConfig):
        _validate_grpo(cfg, source)
    if isinstance(cfg, PPOConfig):
        _validate_ppo(cfg, source)
    if isinstance(cfg, KTOConfig):
        _validate_kto(cfg, source)
    if cfg.max_prompt_length is not None and cfg.max_prompt_length >= cfg.max_length:
        raise UserError(
            f"{source}: `max_prompt_length` ({cfg.max_prompt_length}) must be smaller than "
            f"`max_length` ({cfg.max_length})"
        )


def _validate_data(cfg: BaseConfig, source: str) -> None:
    """The keys that pick and split rows (LLaMA-Factory's max_samples and val_size among them)."""
    if cfg.max_samples is not None and cfg.max_samples < 1:
        raise UserError(f"{source}: `max_samples` must be >= 1, got {cfg.max_samples}")
    if cfg.val_size < 0 or (cfg.val_size >= 1 and cfg.val_size != int(cfg.val_size)):
        raise UserError(
            f"{source}: `val_size` must be a fraction in [0, 1) or a whole number of rows, got {cfg.val_size}"
        )
    if cfg.val_size and cfg.eval_dataset:
        raise UserError(f"{source}: `val_size` and `eval_dataset` both set the eval rows; keep one")
    if cfg.eval_strategy in ("steps", "epoch") and not (cfg.eval_dataset or cfg.val_size):
        raise UserError(f"{source}: `eval_strategy: {cfg.eval_strategy}` needs `eval_dataset` or `val_size`")
    if getattr(cfg, "reward_model_type", "auto") != "auto" and not getattr(cfg, "reward_model", None):
        raise UserError(f"{source}: `reward_model_type` is set but `reward_model` is not")
    if cfg.deepspeed is not None and not os.path.isfile(cfg.deepspeed):
        raise UserError(
            f"{source}: `deepspeed: {cfg.deepspeed}` is not a file (give a DeepSpeed JSON config)"
        )


def _validate_dpo(cfg: DPOConfig, source: str) -> None:
    from alignkit.losses.preference import DPO_LOSSES

    types_ = cfg.loss_type  # a list: `loss_type` is built as one (a single name is a list of one)
    for name in types_:
        if name not in DPO_LOSSES:
            raise UserError(
                f"{source}: `loss_type: {name}` does not exist{did_you_mean(name, DPO_LOSSES)}; "
                f"valid loss types: {', '.join(DPO_LOSSES)}"
            )
        spec = DPO_LOSSES[name]
        if spec.needs_smoothing and not 0 < cfg.label_smoothing < 0.5:
            raise UserError(f"{source}: `loss_type: {name}` needs 0 < label_smoothing < 0.5")
        if cfg.f_divergence_type != "reverse_kl" and not spec.f_divergence:
            raise UserError(
                f"{source}: `f_divergence_type: {cfg.f_divergence_type}` does not apply to `{name}`"
            )
    if cfg.loss_weights is not None and len(cfg.loss_weights) != len(types_):
        raise UserError(
            f"{source}: `loss_weights` has {len(cfg.loss_weights)} values for {len(types_)} loss types"
        )
    if not 0.0 <= cfg.label_smoothing < 0.5:
        raise UserError(f"{source}: `label_smoothing` must be in [0, 0.5), got {cfg.label_smoothing}")


def _validate_kto(cfg: KTOConfig, source: str) -> None:
    from alignkit.losses.preference import KTO_LOSSES  # imports torch: only when a kto config is checked

    if cfg.loss_type not in KTO_LOSSES:
        raise UserError(
            f"{source}: `loss_type: {cfg.loss_type}` does not exist for stage kto"
            f"{did_you_mean(cfg.loss_type, KTO_LOSSES)}; valid: {', '.join(KTO_LOSSES)}"
        )
    for key in ("desirable_weight", "undesirable_weight"):
        value = getattr(cfg, key)
        if isinstance(value, str) and value != "auto":
            raise UserError(f"{source}: `{key}` must be a number or `auto`, got {value!r}")
        if not isinstance(value, str) and value <= 0:
            raise UserError(f"{source}: `{key}` must be > 0, got {value}")


def _validate_grpo(cfg: GRPOConfig, source: str) -> None:
    from alignkit.losses.rl import GRPO_LOSS_TYPES

    if cfg.loss_type not in GRPO_LOSS_TYPES:
        raise UserError(
            f"{source}: `loss_type: {cfg.loss_type}` does not exist for stage grpo"
            f"{did_you_mean(cfg.loss_type, GRPO_LOSS_TYPES)}; valid: {', '.join(GRPO_LOSS_TYPES)}"
        )
    if cfg.num_generations < 2:
        raise UserError(
            f"{source}: `num_generations` must be >= 2 for group-relative advantages "
            f"(got {cfg.num_generations}); a group of one has no baseline"
        )
    if cfg.overlong_buffer_len is not None and not 0 < cfg.overlong_buffer_len <= cfg.max_new_tokens:
        raise UserError(f"{source}: `overlong_buffer_len` must be in (0, max_new_tokens]")
    if cfg.num_iterations < 1:
        raise UserError(f"{source}: `num_iterations` must be >= 1")
    if cfg.epsilon < 0 or (cfg.epsilon_high is not None and cfg.epsilon_high < 0):
        raise UserError(f"{source}: `epsilon` and `epsilon_high` must be >= 0")
    if cfg.max_refill_rounds < 0:
        raise UserError(f"{source}: `max_refill_rounds` must be >= 0, got {cfg.max_refill_rounds}")


def _validate_online(cfg: OnlineConfig, source: str) -> None:
    """What GRPO and PPO share: rewards, the rollout backend, the sampling distribution."""
    if not cfg.reward_funcs and not cfg.reward_model:
        raise UserError(
            f"{source}: give `reward_funcs` (e.g. [math_accuracy]) and/or a `reward_model` "
            "(e.g. one trained with `stage: rm`)"
        )
    n_rewards = len(cfg.reward_funcs or []) + (1 if cfg.reward_model else 0)
    if cfg.reward_weights is not None and len(cfg.reward_weights) != n_rewards:
        raise UserError(
            f"{source}: `reward_weights` has {len(cfg.reward_weights)} values for {n_rewards} rewards "
            "(one per reward function, then one for the reward model)"
        )
    if cfg.rollout_backend not in ("hf", "vllm"):
        raise UserError(
            f"{source}: `rollout_backend: {cfg.rollout_backend}` is not valid"
            f"{did_you_mean(cfg.rollout_backend, ('hf', 'vllm'))}; choose hf or vllm"
        )
    if cfg.temperature <= 0:
        raise UserError(f"{source}: `temperature` must be > 0 for sampling, got {cfg.temperature}")
    if not 0 < cfg.top_p <= 1:
        raise UserError(f"{source}: `top_p` must be in (0, 1], got {cfg.top_p}")
    if cfg.top_k < 0 or cfg.max_new_tokens < 1:
        raise UserError(f"{source}: `top_k` must be >= 0 and `max_new_tokens` >= 1")
    if cfg.stop_strings is not None and not all(cfg.stop_strings):
        raise UserError(f"{source}: `stop_strings` must not contain an empty string")


def _validate_ppo(cfg: PPOConfig, source: str) -> None:
    if cfg.ppo_epochs < 1 or cfg.num_mini_batches < 1:
        raise UserError(f"{source}: `ppo_epochs` and `num_mini_batches` must be >= 1")
    if cfg.target_kl is not None and cfg.target_kl <= 0:
        raise UserError(f"{source}: `target_kl` must be > 0 (or left out for a fixed coefficient)")
    if cfg.kl_horizon < 1:
        raise UserError(f"{source}: `kl_horizon` must be >= 1, got {cfg.kl_horizon}")
    if not (0 <= cfg.gamma <= 1 and 0 <= cfg.lam <= 1):
        raise UserError(f"{source}: `gamma` and `lam` must be in [0, 1], got {cfg.gamma} and {cfg.lam}")
    for key in ("init_kl_coef", "cliprange", "cliprange_value", "vf_coef", "entropy_coef"):
        if getattr(cfg, key) < 0:
            raise UserError(f"{source}: `{key}` must be >= 0, got {getattr(cfg, key)}")
    if cfg.reward_clip is not None and cfg.reward_clip <= 0:
        raise UserError(f"{source}: `reward_clip` must be > 0, got {cfg.reward_clip}")
    if cfg.num_mini_batches > cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps:
        raise UserError(
            f"{source}: `num_mini_batches` ({cfg.num_mini_batches}) is larger than the rollout batch "
            f"({cfg.per_device_train_batch_size} x {cfg.gradient_accumulation_steps} prompts per process)"
        )
