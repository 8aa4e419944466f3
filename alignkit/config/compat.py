"""Other tools' YAML read with its meaning: LLaMA-Factory's and TRL's key names become alignkit's.

`translate` runs before a config is built. It renames keys that mean the same thing (`cutoff_len` is
`max_length`), rewrites those whose meaning spans several of alignkit's keys (`pref_loss` + `pref_ftx` is
a `loss_type` list with `loss_weights`), and sets aside keys that only tune LLaMA-Factory's own machinery
(named once, in one info line). Unknown keys are left for the builder, which reports them all at once with
`suggest`: a table of known synonyms first, string distance second.
"""

from __future__ import annotations

import logging
from typing import Any

from alignkit.errors import UserError, did_you_mean

log = logging.getLogger("alignkit")

# Same meaning, another name: LLaMA-Factory (LF) and TRL spellings -> alignkit's.
RENAMES: dict[str, str] = {
    # LLaMA-Factory
    "cutoff_len": "max_length",
    "lora_rank": "lora_r",
    "additional_target": "modules_to_save",
    "kto_chosen_weight": "desirable_weight",
    "kto_undesirable_weight": "undesirable_weight",
    "kto_rejected_weight": "undesirable_weight",
    "dpo_label_smoothing": "label_smoothing",
    "ppo_target": "target_kl",
    "ppo_whiten_rewards": "whiten_rewards",
    "ref_model": "ref_model_name_or_path",
    # TRL and Hugging Face
    "max_seq_length": "max_length",
    "num_ppo_epochs": "ppo_epochs",
    "lora_target_modules": "lora_target",
    "lora_modules_to_save": "modules_to_save",
    "dataset_name": "dataset",
    "dataset_train_split": "dataset_split",
    "dtype": "torch_dtype",
    "evaluation_strategy": "eval_strategy",
    "ref_model_path": "ref_model_name_or_path",
}

# Keys that tune LLaMA-Factory's or Trainer's own machinery; accepted, and named once as having no effect.
NO_EFFECT = (
    "do_train",
    "do_eval",
    "overwrite_cache",
    "preprocessing_num_workers",
    "dataloader_num_workers",
    "ddp_timeout",
    "save_only_model",
    "dataloader_pin_memory",
    "print_param_status",
)

# Keys other tools have that alignkit does not take, with what to use instead (shown for unknown keys).
SYNONYMS: dict[str, str] = {
    "epochs": "num_train_epochs",
    "num_epochs": "num_train_epochs",
    "lr": "learning_rate",
    "batch_size": "per_device_train_batch_size",
    "train_batch_size": "per_device_train_batch_size",
    "eval_batch_size": "per_device_eval_batch_size",
    "model": "model_name_or_path",
    "model_name": "model_name_or_path",
    "data_path": "dataset",
    "train_file": "dataset",
    "max_len": "max_length",
    "max_completion_length": "max_new_tokens (online stages) or max_length",
    "response_length": "max_new_tokens",
    "kl_coef": "init_kl_coef (ppo) or beta (grpo)",
    "use_liger_kernel": "nothing (alignkit computes log-probs without the full logits' copies already)",
    "padding_free": "nothing: padding_free is a key of sft, rm, dpo and kto, not of the online stages",
    "ppo_buffer_size": "num_mini_batches",
    "pref_bco_weight": "loss_type: [sigmoid, bco_pair] with loss_weights",
    "mask_history": "completion_only_loss",
}

PREF_LOSSES = {"sigmoid": "sigmoid", "hinge": "hinge", "ipo": "ipo", "orpo": "orpo", "simpo": "simpo"}
FLASH_ATTN = {
    "auto": None,
    "disabled": "eager",
    "sdpa": "sdpa",
    "fa2": "flash_attention_2",
    "fa3": "flash_attention_3",
}


def suggest(key: str, valid: list[str]) -> str:
    """' (use `x`)' from the synonym table, else the closest valid key, else ''."""
    if key in SYNONYMS:
        return f" (use `{SYNONYMS[key]}`)" if " " not in SYNONYMS[key] else f" (use {SYNONYMS[key]})"
    return did_you_mean(key, valid + list(RENAMES))


def translate(raw: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """A flat mapping with other tools' keys rewritten as alignkit's; alignkit's own keys win on a clash."""
    raw = dict(raw)
    ignored = [key for key in NO_EFFECT if key in raw]
    for key in ignored:
        raw.pop(key)
    read = []
    for old, new in RENAMES.items():
        if old in raw:
            value = raw.pop(old)
            if new in raw and raw[new] != value:
                raise UserError(f"{source}: `{old}` and `{new}` are the same key here; keep one")
            raw[new] = value
            read.append(f"{old}->{new}")
    for fn in (_lora, _preference, _trl_switches, _misc):
        read += fn(raw, source)
    if read:
        log.info("read other tools' keys: %s", ", ".join(read))
    if ignored:
        log.info("no effect in alignkit (they tune LLaMA-Factory's own machinery): %s", ", ".join(ignored))
    return raw


def _lora(raw: dict[str, Any], source: str) -> list[str]:
    read = []
    target = raw.get("lora_target")
    # a comma list: `coerce` splits list-typed keys itself, but lora_target may also be one string (`all`)
    if isinstance(target, str) and "," in target:
        raw["lora_target"] = [t.strip() for t in target.split(",") if t.strip()]
    if "lora_r" in raw and "lora_alpha" not in raw:  # LLaMA-Factory's default alpha is twice the rank
        raw["lora_alpha"] = 2 * int(raw["lora_r"])
    method = raw.pop("quantization_method", "bnb")
    if method != "bnb":
        raise UserError(
            f"{source}: `quantization_method: {method}`: alignkit quantises through bitsandbytes only; use bnb"
        )
    bits = raw.pop("quantization_bit", None)
    if bits is not None:
        if int(bits) != 4:
            raise UserError(
                f"{source}: `quantization_bit: {bits}`: alignkit quantises for training in 4 bits only "
                "(QLoRA through bitsandbytes); use 4 or leave the key out"
            )
        raw["finetuning_type"] = "qlora"
        read.append("quantization_bit: 4->finetuning_type: qlora")
    return read


def _preference(raw: dict[str, Any], source: str) -> list[str]:
    """LLaMA-Factory's pref_beta / pref_loss / pref_ftx (and TRL's rpo_alpha) as beta, loss_type, loss_weights."""
    stage = raw.get("stage", "sft")
    keys = [k for k in ("pref_beta", "pref_loss", "pref_ftx", "rpo_alpha") if k in raw]
    if not keys:
        return []
    if stage not in ("dpo", "kto"):
        for key in keys:
            raw.pop(key)
        log.info("no effect for stage %s: %s", stage, ", ".join(keys))
        return []
    beta = raw.pop("pref_beta", None)
    loss = raw.pop("pref_loss", None)
    ftx = raw.pop("pref_ftx", None)
    ftx = raw.pop("rpo_alpha", None) if ftx is None else ftx
    if stage == "kto":
        if loss not in (None, "sigmoid") or (ftx is not None and float(ftx) > 0):
            raise UserError(
                f"{source}: `pref_loss` and `pref_ftx` do not apply to stage kto here; set `loss_type` "
                "(kto | apo_zero_unpaired) instead"
            )
        if beta is not None:
            raw["beta"] = beta
        return ["pref_beta->beta"] if beta is not None else []
    if loss is not None:
        if loss == "kto_pair":
            raise UserError(
                f"{source}: `pref_loss: kto_pair` is not here (TRL removed it); use `stage: kto`, which "
                "trains on preference pairs by splitting them into desirable and undesirable rows"
            )
        if loss not in PREF_LOSSES:
            raise UserError(
                f"{source}: `pref_loss: {loss}` is not a LLaMA-Factory preference loss"
                f"{did_you_mean(str(loss), PREF_LOSSES)}; choose one of {', '.join(PREF_LOSSES)}, "
                "or set alignkit's `loss_type` directly"
            )
        raw["loss_type"] = PREF_LOSSES[loss]
    if beta is not None:  # ORPO's lambda is LLaMA-Factory's pref_beta
        raw["orpo_beta" if raw.get("loss_type") == "orpo" else "beta"] = beta
    if ftx is not None and float(ftx) > 0:
        types = raw.get("loss_type", "sigmoid")
        types = [types] if isinstance(types, str) else list(types)
        weights = list(raw.get("loss_weights") or [1.0] * len(types))
        raw["loss_type"], raw["loss_weights"] = types + ["sft"], weights + [float(ftx)]
    target = {
        "pref_beta": "orpo_beta" if loss == "orpo" else "beta",
        "pref_loss": "loss_type",
        "pref_ftx": "loss_type sft weight",
        "rpo_alpha": "loss_type sft weight",
    }
    return [f"{key}->{target[key]}" for key in keys]


def _trl_switches(raw: dict[str, Any], source: str) -> list[str]:
    read = []
    if "use_peft" in raw:
        if raw.pop("use_peft") in (True, "true", "True") and "finetuning_type" not in raw:
            raw["finetuning_type"] = "lora"
        read.append("use_peft->finetuning_type")
    if "use_vllm" in raw:
        if raw.pop("use_vllm") in (True, "true", "True"):
            raw["rollout_backend"] = "vllm"
        read.append("use_vllm->rollout_backend")
    return read


def _misc(raw: dict[str, Any], source: str) -> list[str]:
    read = []
    if "train_on_prompt" in raw:
        raw["completion_only_loss"] = not _bool(raw.pop("train_on_prompt"), "train_on_prompt", source)
        read.append("train_on_prompt->completion_only_loss")
    if "disable_gradient_checkpointing" in raw:
        off = _bool(raw.pop("disable_gradient_checkpointing"), "disable_gradient_checkpointing", source)
        raw.setdefault("gradient_checkpointing", not off)
        read.append("disable_gradient_checkpointing->gradient_checkpointing")
    if "flash_attn" in raw:
        value = raw.pop("flash_attn")
        if value not in FLASH_ATTN:
            raise UserError(
                f"{source}: `flash_attn: {value}` is not valid; choose one of {', '.join(FLASH_ATTN)}"
            )
        if FLASH_ATTN[value] is not None:
            raw.setdefault("attn_implementation", FLASH_ATTN[value])
        read.append("flash_attn->attn_implementation")
    resume = raw.get("resume_from_checkpoint")
    if isinstance(resume, bool):  # Trainer's `true`: the newest checkpoint, which must exist
        raw["resume_from_checkpoint"] = "true" if resume else None
    return read


def _bool(value: Any, key: str, source: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise UserError(f"{source}: `{key}` must be true or false, got {value!r}")
