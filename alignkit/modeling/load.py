"""Load policies, reward models, models to evaluate and tokenizers; apply LoRA / QLoRA / freezing."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from alignkit.config import BaseConfig
from alignkit.errors import UserError
from alignkit.modeling.gguf import local_model
from alignkit.modeling.resolve import (
    ModelSpec,
    check_model_path,
    existing_base,
    is_adapter,
    resolve_model,
    training_spec,
    weights_path,
)

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


def from_pretrained(loader: Any, path: str, **kwargs: Any) -> Any:
    """Call a transformers `from_pretrained`; a missing hub id or no network becomes a UserError."""
    check_model_path(path, adapter_ok=False)  # an adapter folder is resolved first (`resolve_model`)
    path = local_model(path)  # a GGUF file: the folder it is converted into
    try:
        return loader.from_pretrained(path, **kwargs)
    except OSError as exc:
        where = "" if os.path.isdir(path) else " from the Hugging Face hub"
        raise UserError(f"could not load {path}{where}: {exc}".split("\n")[0]) from exc


def merge_adapter(model: nn.Module, adapter: str) -> nn.Module:
    """`model` with the adapter's deltas (and any modules it saved in full, e.g. a reward head) merged in."""
    from peft import PeftConfig, PeftModel

    try:
        config = PeftConfig.from_pretrained(adapter)
        config.task_type = (
            None  # the model's class decides the head: an SFT adapter merges into a reward model
        )
        config.inference_mode = True
        return PeftModel.from_pretrained(model, adapter, config=config).merge_and_unload()
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise UserError(f"could not apply adapter {adapter}: {exc}".split("\n")[0]) from exc


def load_spec(loader: Any, spec: ModelSpec, **kwargs: Any) -> nn.Module:
    """The base through `loader` with every adapter of `spec.merge` merged (`spec.resume` is not applied)."""
    model = from_pretrained(loader, spec.base, **kwargs)
    for adapter in spec.merge:
        model = merge_adapter(model, adapter)
    return model


def checkpoint_dtype(path: str) -> str | None:
    """The dtype a checkpoint's config.json records (`dtype`, or `torch_dtype` before transformers v5)."""
    from transformers import PretrainedConfig

    try:  # the raw dict: no model class (nor remote code) is imported to read one field
        config, _ = PretrainedConfig.get_config_dict(path)
    except (OSError, ValueError):  # loading the model itself reports the problem properly
        return None
    value = config.get("dtype") or config.get("torch_dtype")
    return str(value).removeprefix("torch.") if value else None


def default_device() -> str:
    """Where a model runs when nothing says otherwise: the GPU when there is one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_dtype(cfg: BaseConfig) -> torch.dtype:
    """The dtype every model of the run is loaded in. `auto`: bfloat16 under `bf16: true`, float64 for a
    float64 checkpoint (the policy's), else float32 (half-precision checkpoints train in float32)."""
    if cfg.torch_dtype != "auto":
        return DTYPES[cfg.torch_dtype]
    if cfg.bf16:
        return torch.bfloat16
    if checkpoint_dtype(weights_path(cfg.model_name_or_path)) == "float64":
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
    """A model's tokenizer. An adapter folder's own (alignkit saves it there: it may carry the chat template
    the training used), else its base model's."""
    from transformers import AutoTokenizer

    if is_adapter(path) and not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        path = existing_base(path)
    path = local_model(path)  # a GGUF file carries its tokenizer and chat template
    if os.path.isdir(path):
        tok = _local_tokenizer(AutoTokenizer, path, trust_remote_code)
    else:
        tok = from_pretrained(AutoTokenizer, path, trust_remote_code=trust_remote_code)
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
    """The trainable causal LM, with the finetuning type applied. `model_name_or_path` may be an adapter folder
    and `adapter_name_or_path` may add adapters: see `training_spec` for which are merged and which continued."""
    from transformers import AutoModelForCausalLM

    spec = training_spec(cfg, "CAUSAL_LM", path)
    kwargs: dict[str, Any] = {"dtype": torch_dtype(cfg), "trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    kwargs.update(_quantization(cfg))
    model = load_spec(AutoModelForCausalLM, spec, **kwargs)
    return apply_finetuning(model, cfg, task_type="CAUSAL_LM", spec=spec)


def load_reward_model(cfg: BaseConfig, path: str | None = None, trainable: bool = True) -> nn.Module:
    """A scalar sequence-classification head on a causal-LM backbone (score at the last non-pad token). From an
    SFT adapter: the base's backbone with the adapter merged, a new head (and a new LoRA under lora)."""
    from transformers import AutoModelForSequenceClassification

    spec = training_spec(cfg, "SEQ_CLS", path)
    if not trainable:
        spec = ModelSpec(spec.base, spec.adapters, None)
    tok = load_tokenizer(path or cfg.model_name_or_path, cfg.trust_remote_code)
    kwargs: dict[str, Any] = {
        "dtype": torch_dtype(cfg),
        "trust_remote_code": cfg.trust_remote_code,
        "num_labels": 1,
    }
    if trainable:
        kwargs.update(_quantization(cfg))
    model = load_spec(AutoModelForSequenceClassification, spec, **kwargs)
    model.config.pad_token_id = tok.pad_token_id
    if not trainable:
        return model.eval().requires_grad_(False)
    return apply_finetuning(model, cfg, task_type="SEQ_CLS", spec=spec)


def apply_finetuning(
    model: nn.Module, cfg: BaseConfig, task_type: str, spec: ModelSpec | None = None
) -> nn.Module:
    """Full, freeze, or LoRA / QLoRA: a new adapter from the config, or `spec.resume` continued (trainable)."""
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.finetuning_type in ("lora", "qlora"):
        from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

        if cfg.finetuning_type == "qlora":
            model = prepare_model_for_kbit_training(model, cfg.gradient_checkpointing)
        elif cfg.gradient_checkpointing:
            model.enable_input_require_grads()
        merged = list(spec.merge) if spec else []
        if spec and spec.resume:
            model = PeftModel.from_pretrained(model, spec.resume, is_trainable=True)
            model.alignkit_merged_adapters = merged  # written beside the adapter by save_model
            return model
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
            modules_to_save=cfg.modules_to_save,
        )
        try:
            model = get_peft_model(model, lora)
        except ValueError as exc:
            raise UserError(f"`lora_target: {target}` / `modules_to_save`: {exc}") from exc
        model.alignkit_merged_adapters = merged
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


def _dtype(path: str, torch_dtype: str) -> torch.dtype:
    if torch_dtype != "auto":
        return DTYPES[torch_dtype]
    return torch.float64 if checkpoint_dtype(path) == "float64" else torch.float32


def load_causal_lm(
    path: str, torch_dtype: str = "auto", trust_remote_code: bool = False, device: str | None = None
) -> tuple[nn.Module, Any]:
    """(model in eval mode, tokenizer). An adapter folder is loaded onto its base with peft; its tokenizer is the
    adapter folder's when it has one (alignkit saves it there), else the base's."""
    from transformers import AutoModelForCausalLM

    check_model_path(path)  # no such folder, or a hub id the hub cannot give: said before anything loads
    # an adapter trained on a base with other adapters merged in (merged_adapters.json): those merged first
    spec = resolve_model(path, continue_last=True)
    dtype = _dtype(spec.base, torch_dtype)
    model = load_spec(AutoModelForCausalLM, spec, dtype=dtype, trust_remote_code=trust_remote_code)
    if spec.resume is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, spec.resume)
    tokenizer = load_tokenizer(path, trust_remote_code)  # an adapter folder's own, else its base's
    if device:
        model.to(device)
    return model.eval().requires_grad_(False), tokenizer
