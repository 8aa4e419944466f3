"""The keys every stage shares (`BaseConfig`, with the checks of their values) and how a config dataclass is
built from a flat mapping.

Every field is typed as the value it holds once built: `build_dataclass` coerces what YAML and `key=value`
give into that type while the dataclass is built (a field marked `one_or_more` also takes a single value as a
one-element list), so nothing rewrites a field afterwards. A config checks its own values (`check`: it only
reads); each stage's class in `alignkit.config.stages` adds its keys and their checks.
"""

from __future__ import annotations

import dataclasses
import os
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


OPTIMIZERS = ("adamw_torch_fused", "adamw_torch")  # alignkit.training.optim builds them
TORCH_DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")
# keys every stage has, and the values they may take
CHOICES: dict[str, tuple[str, ...]] = {
    "finetuning_type": FINETUNING_TYPES,
    "report_to": REPORT_TO,
    "lr_scheduler_type": SCHEDULERS,
    "dataset_format": DATASET_FORMATS,
    "torch_dtype": TORCH_DTYPES,
    "optim": OPTIMIZERS,
    "eval_strategy": ("no", "steps", "epoch"),
}
POSITIVE = (
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "gradient_accumulation_steps",
    "max_length",
    "logging_steps",
    "lora_r",
)
NON_NEGATIVE = (
    "learning_rate",
    "warmup_steps",
    "weight_decay",
    "max_grad_norm",
    "num_train_epochs",
    "lora_dropout",
    "freeze_trainable_layers",
)


def check_choice(source: str, key: str, value: Any, choices: tuple[str, ...]) -> None:
    """`value` is one of `choices` (None passes), else a UserError naming the key, with a suggestion."""
    if value is not None and value not in choices:
        raise UserError(
            f"{source}: `{key}: {value}` is not valid{did_you_mean(str(value), choices)}; "
            f"choose one of: {', '.join(choices)}"
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
    optim: str = "adamw_torch_fused"  # or adamw_torch (a loop per tensor: more memory at the step)
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
    auto_find_batch_size: bool = False  # micro-batches sized to the free memory, the update unchanged
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

    def check(self, source: str = "config") -> None:
        """Impossible values are errors at load time, not surprises at step 300. Stages extend this (calling
        super) with their own keys; a check only reads."""
        for key, choices in CHOICES.items():
            check_choice(source, key, getattr(self, key), choices)
        for key in POSITIVE:
            if getattr(self, key) <= 0:
                raise UserError(f"{source}: `{key}` must be > 0, got {getattr(self, key)}")
        for key in NON_NEGATIVE:
            if getattr(self, key) is not None and getattr(self, key) < 0:
                raise UserError(f"{source}: `{key}` must be >= 0, got {getattr(self, key)}")
        check_data_keys(self, source)
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise UserError(f"{source}: `warmup_ratio` must be in [0, 1], got {self.warmup_ratio}")
        if not self.model_name_or_path:
            raise UserError(f"{source}: `model_name_or_path` is required (a local directory or a hub id)")
        if not self.dataset:
            raise UserError(f"{source}: `dataset` is required (a file, a list of files, or a hub id)")
        if self.bf16 and self.fp16:
            raise UserError(f"{source}: `bf16` and `fp16` are both true; choose one")
        if self.torch_dtype == "float64" and (self.bf16 or self.fp16):  # autocast computes in half precision
            half = "bf16" if self.bf16 else "fp16"
            raise UserError(
                f"{source}: `torch_dtype: float64` with `{half}: true` computes in {half}; drop one"
            )
        if self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            raise UserError(
                f"{source}: `max_prompt_length` ({self.max_prompt_length}) must be smaller than "
                f"`max_length` ({self.max_length})"
            )


def check_data_keys(cfg: BaseConfig, source: str) -> None:
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
