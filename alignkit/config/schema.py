"""The run configuration's schema: one flat dataclass per stage and the one table of stages.

Every field is typed as the value it holds once built: `build_dataclass` coerces what YAML and `key=value`
give into that type while the dataclass is built (a field marked `one_or_more` also takes a single value as a
one-element list), so nothing rewrites a field afterwards. The value checks are in `alignkit.config.checks`,
which imports this module; loading and saving are in `alignkit.config`, which imports both.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from alignkit.config.coerce import coerce
from alignkit.errors import UserError, did_you_mean

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
    "messages_preference",
    "unpaired",
    "sharegpt_kto",
    "alpaca_kto",
    "prompt_only",
    "mt_bench",
)


def one_or_more(default: str) -> Any:
    """A `list[str]` field that also takes one string (`loss_type: sigmoid` is `[sigmoid]`)."""
    return field(default_factory=lambda: [default], metadata={"one_or_more": True})


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
    dataset_dir: str = "data"  # where LLaMA-Factory's dataset_info.json is looked up for data set names
    max_samples: int | None = None  # keep the first N rows of each data set
    val_size: float = 0.0  # hold out this fraction (< 1) or number of training rows as eval_dataset
    template: str | None = (
        None  # a chat template by LLaMA-Factory's name (qwen, llama3, ...); None: the tokenizer's
    )
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
    modules_to_save: list[str] | None = (
        None  # trained in full beside LoRA (LLaMA-Factory's additional_target)
    )
    adapter_name_or_path: str | list[str] | None = (
        None  # LoRA adapter(s) on the model: all but the last merged
    )
    merge_adapter: bool = (
        False  # merge the last adapter too (a new one is trained under lora), else continue it
    )
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
    eval_strategy: str | None = None  # no | steps | epoch; None: evaluate every eval_steps when set
    eval_steps: int | None = None
    save_steps: int | None = None  # None: only the final model
    save_total_limit: int | None = None
    resume_from_checkpoint: str | None = (
        None  # "auto" or a checkpoint path ("true": the newest, which must exist)
    )
    deepspeed: str | None = None  # a DeepSpeed JSON config, handed to accelerate's DeepSpeed plugin
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
    padding_free: bool = False  # each micro-batch as one row, position_ids restarting per original row


@dataclass
class PTConfig(SFTConfig):
    """LLaMA-Factory's `stage: pt`: plain language modelling on text (every token trained)."""

    stage: str = "pt"
    dataset_format: str = "text"
    completion_only_loss: bool = False


@dataclass
class RMConfig(BaseConfig):
    stage: str = "rm"
    learning_rate: float = 1e-5
    center_rewards_coefficient: float | None = None  # adds coef * mean((r_c + r_r)^2)
    padding_free: bool = False  # each micro-batch as one row, position_ids restarting per original row


@dataclass
class DPOConfig(BaseConfig):
    """The direct preference family: every loss in `alignkit.losses.preference.DPO_LOSSES`, combinable."""

    stage: str = "dpo"
    learning_rate: float = 1e-6
    beta: float = 0.1
    loss_type: list[str] = one_or_more("sigmoid")  # one loss or several, combined
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
    padding_free: bool = False  # each micro-batch as one row, position_ids restarting per original row
    prefix_sharing: bool = False  # the prompt runs once for both completions (one row, a 4-D mask)


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
    padding_free: bool = False  # each micro-batch as one row, position_ids restarting per original row
    prefix_sharing: bool = False  # the KL completion shares its prompt's pass (one row, a 4-D mask)

    @property
    def auto_weights(self) -> bool:
        """Whether a weight is `auto` (the stage derives it from the label counts)."""
        return "auto" in (self.desirable_weight, self.undesirable_weight)

    def resolved_weights(self, auto_desirable: float, auto_undesirable: float) -> tuple[float, float]:
        """(desirable_weight, undesirable_weight) as numbers: a set weight as set, an `auto` one the given
        value. The stage keeps the result on itself; the config keeps what the user wrote."""
        d, u = self.desirable_weight, self.undesirable_weight
        return (auto_desirable if d == "auto" else float(d), auto_undesirable if u == "auto" else float(u))


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
    reward_model: str | None = (
        None  # a model trained by `stage: rm` (full or LoRA adapter), or any sequence-classification model
    )
    reward_model_type: str = "auto"  # auto | full | lora: auto reads the folder (adapter_config.json: lora)
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


# The one table of stages: `stage:` -> its config class. Every other list of stages derives from it.
CONFIG_CLASSES: dict[str, type[BaseConfig]] = {
    "sft": SFTConfig,
    "pt": PTConfig,
    "rm": RMConfig,
    "dpo": DPOConfig,
    "kto": KTOConfig,
    "ppo": PPOConfig,
    "grpo": GRPOConfig,
}
STAGES = tuple(CONFIG_CLASSES)

T = typing.TypeVar("T")


def build_dataclass(
    cls: type[T],
    raw: dict[str, Any],
    source: str,
    what: str = "",
    suggest: typing.Callable[[str, list[str]], str] = did_you_mean,
) -> T:
    """A config dataclass from a flat mapping: each value coerced to its field's type. Every unknown key is
    reported in one UserError, each with `suggest`'s hint. `train`, `eval` and `compare` configs pass here."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = [key for key in raw if key not in hints]
    if unknown:
        suffix = f" {what}" if what else ""
        if len(unknown) == 1:
            raise UserError(f"{source}: unknown key `{unknown[0]}`{suffix}{suggest(unknown[0], names)}")
        lines = "\n".join(f"  `{key}`{suggest(key, names)}" for key in unknown)
        raise UserError(f"{source}: {len(unknown)} unknown keys{suffix}:\n{lines}")
    several = {f.name for f in dataclasses.fields(cls) if f.metadata.get("one_or_more")}  # type: ignore[arg-type]
    return cls(
        **{
            key: coerce(key, _listed(value) if key in several else value, hints[key])
            for key, value in raw.items()
        }
    )


def _listed(value: Any) -> Any:
    """One value of a `one_or_more` field as a one-element list; a list, a comma list or null as given."""
    if value is None or isinstance(value, list) or (isinstance(value, str) and "," in value):
        return value
    return [value]


def stage_keys(stage: str) -> list[str]:
    return [f.name for f in dataclasses.fields(CONFIG_CLASSES[stage])]
