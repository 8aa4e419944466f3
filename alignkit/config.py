"""Run configuration: one flat dataclass per stage, read from YAML plus `key=value` overrides.

Keys use the names users of Hugging Face tools already know (TRL, LLaMA-Factory). Everything is
validated at load time: an unknown key, a wrong type or an impossible value is a `UserError` that
names the key and, where one is close, suggests the valid one.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass
from typing import Any

import yaml

from alignkit.coerce import coerce, flatten, parse_overrides
from alignkit.errors import UserError, did_you_mean

STAGES = ("sft", "rm", "dpo", "kto", "ppo", "grpo")
FINETUNING_TYPES = ("full", "lora", "qlora", "freeze")
REPORT_TO = ("none", "tensorboard", "wandb", "mlflow")
SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "warmup_stable_decay",
)
DATASET_FORMATS = (
    "auto",
    "messages",
    "sharegpt",
    "alpaca",
    "prompt_completion",
    "text",
    "preference",
    "sharegpt_preference",
    "alpaca_preference",
    "unpaired",
    "sharegpt_kto",
    "prompt_only",
)


@dataclass
class BaseConfig:
    """Keys every stage shares."""

    stage: str = "sft"
    model_name_or_path: str = ""
    output_dir: str = "output"
    overwrite_output_dir: bool = False  # a finished or started run in output_dir is replaced only when true
    # data
    dataset: str | list[str] = ""  # a path, a list of paths, or a hub id
    eval_dataset: str | list[str] | None = None
    dataset_format: str = "auto"
    dataset_split: str = "train"
    max_length: int = 1024
    max_prompt_length: int | None = None  # None: only max_length applies
    shuffle: bool = True
    # model
    torch_dtype: str = "auto"
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    finetuning_type: str = "full"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target: str | list[str] = "all-linear"
    save_merged: bool = False  # lora: also write the merged full model
    freeze_trainable_layers: int = 2  # freeze: train the last N decoder layers
    # optimisation
    learning_rate: float = 5e-5
    lr_scheduler_type: str = "linear"
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    num_train_epochs: float = 1.0
    max_steps: int = -1
    seed: int = 42
    bf16: bool = False
    fp16: bool = False
    gradient_checkpointing: bool = False
    # logging and checkpoints
    logging_steps: int = 10
    eval_steps: int | None = None
    save_steps: int | None = None  # None: only the final model
    save_total_limit: int | None = None
    resume_from_checkpoint: str | None = None  # "auto" or a checkpoint path
    report_to: str = "none"
    run_name: str | None = None
    disable_tqdm: bool = False
    plot_loss: bool = True


@dataclass
class SFTConfig(BaseConfig):
    stage: str = "sft"
    learning_rate: float = 2e-5
    packing: bool = False  # several rows in one sequence, attention kept apart by position_ids
    completion_only_loss: bool = True  # loss only on completion/assistant tokens


@dataclass
class RMConfig(BaseConfig):
    stage: str = "rm"
    learning_rate: float = 1e-5
    center_rewards_coefficient: float | None = None  # adds coef * mean((r_c + r_r)^2)


@dataclass
class DPOConfig(BaseConfig):
    """The direct preference family: every loss in `alignkit.losses.DPO_LOSSES`, combinable."""

    stage: str = "dpo"
    learning_rate: float = 1e-6
    beta: float = 0.1
    loss_type: str | list[str] = "sigmoid"
    loss_weights: list[float] | None = None  # one per loss_type (MPO-style mixes); default all 1
    label_smoothing: float = 0.0  # cDPO with `sigmoid`; epsilon of robust / exo_pair / aot
    reference_free: bool = False  # reference log-probs taken as 0
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    discopop_tau: float = 0.05
    simpo_gamma: float = 0.5  # SimPO target margin (in units of beta)
    cpo_alpha: float = 1.0  # weight of the NLL term in CPO / SimPO
    orpo_beta: float = 0.1  # lambda of ORPO's odds-ratio term
    ref_model_name_or_path: str | None = None  # default: the starting policy
    precompute_ref_log_probs: bool = False
    ref_cache_dir: str | None = None  # default: output_dir/ref_logps


@dataclass
class KTOConfig(BaseConfig):
    """Kahneman-Tversky Optimisation on unpaired good/bad labels (paired data is split automatically)."""

    stage: str = "kto"
    learning_rate: float = 1e-6
    beta: float = 0.1
    loss_type: str = "kto"  # kto | apo_zero_unpaired
    desirable_weight: float | str = 1.0  # lambda_D, or `auto` (from the label counts, KTO paper sec. 4.2)
    undesirable_weight: float | str = 1.0  # lambda_U, or `auto`
    allow_single_label: bool = False  # train although every row has the same label
    ref_model_name_or_path: str | None = None
    precompute_ref_log_probs: bool = False
    ref_cache_dir: str | None = None


@dataclass
class OnlineConfig(BaseConfig):
    """Keys of the online stages (rollouts, rewards)."""

    learning_rate: float = 1e-6
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_strings: list[str] | None = None
    rollout_backend: str = "hf"  # hf | vllm
    reward_funcs: list[str] | None = None  # math_accuracy, exact_match, format, length, or module:function
    reward_weights: list[float] | None = None  # one per reward function (and a last one for reward_model)
    reward_model: str | None = None  # a model trained by `stage: rm`, or any sequence-classification model
    format_pattern: str = r"<think>.*</think>.*"
    length_target: int = 512  # `length` reward: penalty for characters past this
    missing_eos_penalty: float | None = None  # subtracted from the reward of truncated completions
    ref_model_name_or_path: str | None = None
    per_device_eval_batch_size: int = 64


@dataclass
class GRPOConfig(OnlineConfig):
    stage: str = "grpo"
    num_generations: int = 8
    loss_type: str = "grpo"  # grpo | dr_grpo | dapo | gspo | rloo
    beta: float = 0.0  # KL to the reference; 0 loads no reference model
    use_bias_correction_kl: bool = (
        True  # weight the k3 KL by the importance ratio (DeepSeek-V3.2; TRL's default)
    )
    epsilon: float = 0.2  # clip range (epsilon_low)
    epsilon_high: float | None = None  # DAPO clip-higher; default: epsilon
    num_iterations: int = 1  # updates per rollout (importance ratios against the sampling log-probs)
    dynamic_sampling: bool | None = (
        None  # DAPO: refill groups whose rewards are all equal; default on for dapo
    )
    max_refill_rounds: int = 3
    overlong_buffer_len: int | None = None  # DAPO soft overlong punishment over the last N tokens
    overlong_penalty_factor: float = 1.0


@dataclass
class PPOConfig(OnlineConfig):
    """RLHF with PPO: actor, critic (value head), frozen reference, reward model and/or verifiable rewards."""

    stage: str = "ppo"
    value_model_name_or_path: str | None = None  # default: the reward model, else the policy
    init_kl_coef: float = 0.05
    target_kl: float | None = None  # adaptive KL controller target; None keeps init_kl_coef fixed
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    entropy_coef: float = 0.0
    ppo_epochs: int = 4
    num_mini_batches: int = 1
    whiten_advantages: bool = True
    whiten_rewards: bool = False
    reward_clip: float | None = None


CONFIG_CLASSES: dict[str, type[BaseConfig]] = {
    "ppo": PPOConfig,
    "sft": SFTConfig,
    "rm": RMConfig,
    "dpo": DPOConfig,
    "kto": KTOConfig,
    "grpo": GRPOConfig,
}

_CHOICES: dict[str, tuple[str, ...]] = {
    "stage": STAGES,
    "finetuning_type": FINETUNING_TYPES,
    "report_to": REPORT_TO,
    "lr_scheduler_type": SCHEDULERS,
    "dataset_format": DATASET_FORMATS,
    "torch_dtype": ("auto", "float32", "bfloat16", "float16"),
    "f_divergence_type": ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"),
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


def register_stage_config(stage: str, cls: type[BaseConfig]) -> None:
    """Later stages add their config class here (one line each)."""
    CONFIG_CLASSES[stage] = cls


def build_config(raw: dict[str, Any], source: str = "config") -> BaseConfig:
    """Validate a flat mapping of keys and build the stage's config dataclass."""
    raw = flatten(raw)
    stage = raw.get("stage", "sft")
    if stage not in CONFIG_CLASSES:
        raise UserError(
            f"{source}: `stage: {stage}` is not a stage{did_you_mean(str(stage), STAGES)}; "
            f"valid stages: {', '.join(CONFIG_CLASSES)}"
        )
    cls = CONFIG_CLASSES[stage]
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in hints:
            raise UserError(f"{source}: unknown key `{key}` for stage `{stage}`{did_you_mean(key, names)}")
        values[key] = coerce(key, value, hints[key])
    cfg = cls(**values)
    validate(cfg, source)
    return cfg


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
    if not 0.0 <= cfg.warmup_ratio <= 1.0:
        raise UserError(f"{source}: `warmup_ratio` must be in [0, 1], got {cfg.warmup_ratio}")
    if not cfg.model_name_or_path:
        raise UserError(f"{source}: `model_name_or_path` is required (a local directory or a hub id)")
    if not cfg.dataset:
        raise UserError(f"{source}: `dataset` is required (a file, a list of files, or a hub id)")
    if cfg.bf16 and cfg.fp16:
        raise UserError(f"{source}: `bf16` and `fp16` are both true; choose one")
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
        from alignkit.losses import KTO_LOSSES

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
    if cfg.max_prompt_length is not None and cfg.max_prompt_length >= cfg.max_length:
        raise UserError(
            f"{source}: `max_prompt_length` ({cfg.max_prompt_length}) must be smaller than "
            f"`max_length` ({cfg.max_length})"
        )


def _validate_dpo(cfg: DPOConfig, source: str) -> None:
    from alignkit.losses import DPO_LOSSES

    types_ = [cfg.loss_type] if isinstance(cfg.loss_type, str) else list(cfg.loss_type)
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
    cfg.loss_type = types_


def _validate_grpo(cfg: GRPOConfig, source: str) -> None:
    from alignkit.losses import GRPO_LOSS_TYPES

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


def load_config(path: str | None, overrides: list[str] | None = None) -> BaseConfig:
    """Read YAML (if given), apply `key=value` overrides (they win), validate."""
    raw: dict[str, Any] = {}
    source = path or "command line"
    if path is not None:
        if not os.path.isfile(path):
            raise UserError(f"config file {path} does not exist")
        with open(path, encoding="utf-8") as fh:
            try:
                loaded = yaml.safe_load(fh)
            except yaml.YAMLError as exc:
                mark = getattr(exc, "problem_mark", None)
                where = f" line {mark.line + 1}" if mark is not None else ""
                raise UserError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise UserError(f"{path}: expected a mapping of keys to values at the top level")
        raw.update(flatten(loaded))
    raw.update(parse_overrides(overrides or []))
    return build_config(raw, source)


def config_to_dict(cfg: BaseConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: BaseConfig, path: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(config_to_dict(cfg), fh, sort_keys=False)


def stage_keys(stage: str) -> list[str]:
    return [f.name for f in dataclasses.fields(CONFIG_CLASSES[stage])]


__all__ = [
    "BaseConfig",
    "SFTConfig",
    "RMConfig",
    "CONFIG_CLASSES",
    "load_config",
    "build_config",
    "save_config",
    "register_stage_config",
]
