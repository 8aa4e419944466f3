"""Load policies, reward models and tokenizers; apply LoRA / QLoRA / freezing; save in HF format."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from alignkit.config import BaseConfig
from alignkit.errors import UserError

_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


def _check_model_path(path: str) -> None:
    if not path:
        raise UserError("`model_name_or_path` is empty")
    if os.path.exists(path):
        if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
            raise UserError(
                f"model path {path} is not a Hugging Face model folder (no config.json in it); "
                "make one with `alignkit tiny DIR` or give a hub id"
            )
        return
    parts = path.split("/")
    if path.startswith((".", "/", "~")) or len(parts) != 2:
        raise UserError(
            f"model path {path} does not exist (give a local model folder or a hub id such as "
            "`Qwen/Qwen2.5-0.5B-Instruct`)"
        )


def _from_pretrained(loader: Any, path: str, **kwargs: Any) -> Any:
    """Call a transformers `from_pretrained`; a missing hub id or no network becomes a UserError."""
    _check_model_path(path)
    try:
        return loader.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise UserError(f"could not load {path}: {exc}".split("\n")[0]) from exc


def _checkpoint_dtype(path: str) -> str | None:
    """The dtype a checkpoint's config.json records (`dtype`, or `torch_dtype` before transformers v5)."""
    from transformers import PretrainedConfig

    try:  # the raw dict: no model class (nor remote code) is imported to read one field
        config, _ = PretrainedConfig.get_config_dict(path)
    except (OSError, ValueError):  # loading the model itself reports the problem properly
        return None
    value = config.get("dtype") or config.get("torch_dtype")
    return str(value).removeprefix("torch.") if value else None


def torch_dtype(cfg: BaseConfig) -> torch.dtype:
    """The dtype every model of the run is loaded in. `auto`: bfloat16 under `bf16: true`, float64 for a
    float64 checkpoint (the policy's), else float32 (half-precision checkpoints train in float32)."""
    if cfg.torch_dtype != "auto":
        return _DTYPES[cfg.torch_dtype]
    if cfg.bf16:
        return torch.bfloat16
    if _checkpoint_dtype(cfg.model_name_or_path) == "float64":
        return torch.float64
    return torch.float32


# What a saved tokenizer is made of: fast (tokenizer.json), settings, sentencepiece, BPE / WordPiece vocab.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
)


def _local_tokenizer(loader: Any, path: str, trust_remote_code: bool) -> Any:
    """A folder's tokenizer. It needs the tokenizer files, not config.json (`data inspect --model` may name a
    tokenizer alone); weights saved without them are the usual cause of their absence."""
    fix = (
        "copy them from the base model the weights came from "
        f"(e.g. `AutoTokenizer.from_pretrained(BASE).save_pretrained('{path}')`)"
    )
    try:  # loading comes first: a tokenizer may live in files not listed above (spm.model, *.tiktoken, ...)
        return loader.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        present = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(path, f))]
        if not present:
            raise UserError(
                f"model folder {path} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); {fix}"
            ) from exc
        reason = " ".join(str(exc).split())[:400]
        raise UserError(
            f"model folder {path}: no tokenizer could be made from its tokenizer files "
            f"({', '.join(present)}): {reason}; if files are missing, {fix}"
        ) from exc


def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    if os.path.isdir(path):
        tok = _local_tokenizer(AutoTokenizer, path, trust_remote_code)
    else:
        tok = _from_pretrained(AutoTokenizer, path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:  # Llama-style tokenizers ship without one; padding is always masked out
        tok.pad_token = tok.eos_token
    return tok


def _quantization(cfg: BaseConfig) -> dict[str, Any]:
    if cfg.finetuning_type != "qlora":
        return {}
    if not torch.cuda.is_available():
        raise UserError(
            "finetuning_type: qlora needs a CUDA GPU (4-bit weights through bitsandbytes); "
            "on CPU use `finetuning_type: lora`"
        )
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as exc:
        raise UserError("finetuning_type: qlora needs bitsandbytes: pip install 'alignkit[qlora]'") from exc
    compute = torch.bfloat16 if cfg.bf16 else torch.float16
    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        ),
        "device_map": {"": torch.cuda.current_device()},
    }


def load_policy(cfg: BaseConfig, path: str | None = None) -> nn.Module:
    """The trainable causal LM, with the finetuning type applied."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": torch_dtype(cfg), "trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    kwargs.update(_quantization(cfg))
    model = _from_pretrained(AutoModelForCausalLM, path or cfg.model_name_or_path, **kwargs)
    return apply_finetuning(model, cfg, task_type="CAUSAL_LM")


def load_reward_model(cfg: BaseConfig, path: str | None = None, trainable: bool = True) -> nn.Module:
    """A scalar sequence-classification head on a causal-LM backbone (score at the last non-pad token)."""
    from transformers import AutoModelForSequenceClassification

    path = path or cfg.model_name_or_path
    tok = load_tokenizer(path, cfg.trust_remote_code)
    kwargs: dict[str, Any] = {
        "dtype": torch_dtype(cfg),
        "trust_remote_code": cfg.trust_remote_code,
        "num_labels": 1,
    }
    if trainable:
        kwargs.update(_quantization(cfg))
    model = _from_pretrained(AutoModelForSequenceClassification, path, **kwargs)
    model.config.pad_token_id = tok.pad_token_id
    if not trainable:
        return model.eval().requires_grad_(False)
    return apply_finetuning(model, cfg, task_type="SEQ_CLS")


def apply_finetuning(model: nn.Module, cfg: BaseConfig, task_type: str) -> nn.Module:
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.finetuning_type in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if cfg.finetuning_type == "qlora":
            model = prepare_model_for_kbit_training(model, cfg.gradient_checkpointing)
        elif cfg.gradient_checkpointing:
            model.enable_input_require_grads()
        target = cfg.lora_target
        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            task_type=task_type,
            target_modules=target
            if isinstance(target, list)
            else ("all-linear" if target == "all" else target),
            # a scalar head (reward model, critic) is trained in full (peft's modules_to_save), never adapted
            exclude_modules=["score", "classifier"] if task_type != "CAUSAL_LM" else None,
        )
        try:
            model = get_peft_model(model, lora)
        except ValueError as exc:
            raise UserError(f"`lora_target: {target}`: {exc}") from exc
    elif cfg.finetuning_type == "freeze":
        freeze_but_last_layers(model, cfg.freeze_trainable_layers)
    return model


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    for module in model.modules():
        if (
            isinstance(module, nn.ModuleList)
            and len(module) > 0
            and module is getattr(getattr(model, model.base_model_prefix, model), "layers", None)
        ):
            return module
    raise UserError("finetuning_type: freeze could not find the decoder layers of this model")


def freeze_but_last_layers(model: nn.Module, n: int) -> None:
    """Train only the last `n` decoder layers (and a classification head if there is one)."""
    layers = _decoder_layers(model)
    if n > len(layers):
        raise UserError(f"`freeze_trainable_layers: {n}` but the model has only {len(layers)} layers")
    model.requires_grad_(False)
    for layer in layers[len(layers) - n :]:
        layer.requires_grad_(True)
    head = getattr(model, "score", None)
    if head is not None:
        head.requires_grad_(True)


def is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


def save_model(model: nn.Module, tokenizer: Any, output_dir: str, merged: bool = False) -> None:
    """HF format: full weights as safetensors, or the LoRA adapter (plus `merged/` on request)."""
    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    if merged and is_peft(model):
        import copy

        merged_model = copy.deepcopy(model).merge_and_unload()
        merged_model.save_pretrained(os.path.join(output_dir, "merged"), safe_serialization=True)
        tokenizer.save_pretrained(os.path.join(output_dir, "merged"))
