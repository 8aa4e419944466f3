"""Load policies, reward models and tokenizers; apply LoRA / QLoRA / freezing; save in HF format."""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

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


def _check_model_path(path: str, adapter_ok: bool = True) -> None:
    """A model folder, hub id or (with `adapter_ok`) LoRA adapter folder whose base is there; else UserError."""
    if not path:
        raise UserError("`model_name_or_path` is empty")
    if adapter_ok and is_adapter(path):
        return _check_model_path(_existing_base(path), adapter_ok=False)
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
    _check_model_path(path, adapter_ok=False)  # an adapter folder is resolved first (`resolve_model`)
    try:
        return loader.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise UserError(f"could not load {path}: {exc}".split("\n")[0]) from exc


# --- LoRA adapter folders: where a model is asked for, an adapter folder (adapter_config.json) works too ------

ADAPTER_CONFIG = "adapter_config.json"
# Beside an adapter trained on a base with adapters merged into it: those, in order (its adapter_config.json
# names the bare base); `resolve_model` merges them first wherever the adapter is loaded.
MERGED_ADAPTERS = "merged_adapters.json"


class ModelSpec(NamedTuple):
    """The weights a model is made of: a full model, adapters merged into it in order, one adapter on top that
    training continues (None: a fresh LoRA, or no LoRA)."""

    base: str
    merge: tuple[str, ...]
    resume: str | None

    @property
    def adapters(self) -> tuple[str, ...]:
        return self.merge + ((self.resume,) if self.resume else ())


def is_adapter(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def _adapter_config(path: str) -> dict[str, Any]:
    config = os.path.join(path, ADAPTER_CONFIG)
    with open(config, encoding="utf-8") as fh:
        try:
            data = json.load(fh)
        except json.JSONDecodeError as exc:
            raise UserError(f"{config} is not a JSON object ({exc}); re-save the adapter with peft") from exc
    if not isinstance(data, dict):
        raise UserError(f"{config} is not a JSON object; re-save the adapter with peft")
    return data


def adapter_base(path: str) -> str | None:
    """The base model an adapter folder names, or None when `path` is not an adapter folder."""
    if not is_adapter(path):
        return None
    base = _adapter_config(path).get("base_model_name_or_path")
    if not base:
        raise UserError(
            f"{os.path.join(path, ADAPTER_CONFIG)}: no `base_model_name_or_path`; set it to the base model "
            "the adapter was trained on"
        )
    return base


def adapter_task_type(path: str) -> str | None:
    """peft's task_type of an adapter folder (CAUSAL_LM, SEQ_CLS, ...); None when unknown (a hub id)."""
    return _adapter_config(path).get("task_type") if is_adapter(path) else None


def _existing_base(path: str) -> str:
    """An adapter folder's base; a local base that is not there is a UserError naming adapter_config.json."""
    base = adapter_base(path) or path
    if not os.path.exists(base) and base.startswith((".", "/", "~")):
        raise UserError(
            f"adapter {path} was trained on {base}, which does not exist here; edit `base_model_name_or_path` "
            f"in {os.path.join(path, ADAPTER_CONFIG)} to where the base model is"
        )
    if is_adapter(base):
        raise UserError(
            f"{os.path.join(path, ADAPTER_CONFIG)}: `base_model_name_or_path` {base} is itself an adapter; "
            "name the full base model there"
        )
    return base


def _weights_path(path: str) -> str:
    """Where a model's config.json is: the base of an adapter folder, else the path itself."""
    return (adapter_base(path) or path) if os.path.isdir(path) else path


def _merged_before(adapter: str) -> list[str]:
    """The adapters MERGED_ADAPTERS says were merged into the base under `adapter`."""
    record = os.path.join(adapter, MERGED_ADAPTERS)
    if not os.path.isfile(record):
        return []
    try:
        with open(record, encoding="utf-8") as fh:
            merged = list(json.load(fh)["merged_adapters"])
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{record}: not a list of `merged_adapters` ({exc}); fix or delete the file") from exc
    for path in merged:
        if not os.path.exists(path) and path.startswith((".", "/", "~")):
            raise UserError(
                f"adapter {adapter} was trained on its base with {path} merged in, which does not exist here; "
                f"edit `merged_adapters` in {record} to where that adapter is"
            )
    return merged


def resolve_model(
    path: str,
    adapters: str | list[str] | None = None,
    continue_last: bool = False,
    key: str = "model_name_or_path",
) -> ModelSpec:
    """The one place a model path plus adapters becomes weights to load (LLaMA-Factory's rule): `path` may be an
    adapter folder (its base read from adapter_config.json) and `adapters` (adapter_name_or_path) are applied on
    top; every adapter is merged except the last, which is continued when `continue_last`."""
    from alignkit.data.files import split_sources  # as `dataset`: an existing path is never split

    listed = ([path] if is_adapter(path) else []) + (split_sources(adapters) if adapters else [])
    chain: list[str] = []
    for i, adapter in enumerate(listed):
        where = key if i == 0 and listed[0] == path else "adapter_name_or_path"
        if (os.path.exists(adapter) or adapter.startswith((".", "/", "~"))) and not is_adapter(adapter):
            what = "is not a LoRA adapter folder" if os.path.exists(adapter) else "does not exist"
            raise UserError(
                f"`{where}`: {adapter} {what} (a folder with {ADAPTER_CONFIG}); give a folder a LoRA run "
                "saved, or a full model as `model_name_or_path`"
            )
        for item in [*_merged_before(adapter), adapter]:
            item = os.path.abspath(item) if os.path.exists(item) else item
            if item not in chain:
                chain.append(item)
    base = _existing_base(path) if is_adapter(path) else path
    resume = chain[-1] if continue_last and chain else None
    return ModelSpec(base, tuple(chain[:-1] if resume else chain), resume)


def training_spec(cfg: BaseConfig, task_type: str, path: str | None = None) -> ModelSpec:
    """The weights a trainable model starts from. Under lora / qlora the last adapter is continued (its weights
    trainable) unless `merge_adapter: true`, or it was trained for another head (an SFT adapter under a
    reward model: merged into the backbone, and a fresh LoRA trained); under full / freeze all are merged."""
    lora = cfg.finetuning_type in ("lora", "qlora")
    adapters = cfg.adapter_name_or_path if path is None else None
    spec = resolve_model(path or cfg.model_name_or_path, adapters, lora and not cfg.merge_adapter)
    if spec.resume and adapter_task_type(spec.resume) not in (None, task_type):
        spec = ModelSpec(spec.base, spec.adapters, None)
    heads = [a for a in spec.adapters if task_type == "CAUSAL_LM" and adapter_task_type(a) == "SEQ_CLS"]
    if heads:  # a reward model's adapter (a score head) cannot become part of a language model
        raise UserError(
            f"adapter {heads[0]} is a reward model's (task_type SEQ_CLS); a policy needs a causal LM: give a "
            "full model or an SFT adapter, and the reward model as `reward_model`"
        )
    if cfg.finetuning_type == "qlora" and spec.merge:
        raise UserError(
            f"finetuning_type: qlora cannot merge adapters into 4-bit weights ({', '.join(spec.merge)}); "
            "merge them first (`alignkit export`) and train on the merged model, or use `finetuning_type: lora`"
        )
    return spec


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
    model = _from_pretrained(loader, spec.base, **kwargs)
    for adapter in spec.merge:
        model = merge_adapter(model, adapter)
    return model


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
    if _checkpoint_dtype(_weights_path(cfg.model_name_or_path)) == "float64":
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
        path = _existing_base(path)
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


def is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


def save_model(model: nn.Module, tokenizer: Any, output_dir: str, merged: bool = False) -> None:
    """HF format: full weights as safetensors, or the LoRA adapter (plus `merged/` on request)."""
    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    merged_in = getattr(model, "alignkit_merged_adapters", None) if is_peft(model) else None
    if merged_in:  # the adapter sits on base + these: resolve_model merges them first wherever it is loaded
        with open(os.path.join(output_dir, MERGED_ADAPTERS), "w", encoding="utf-8") as fh:
            json.dump({"merged_adapters": merged_in}, fh, indent=2)
    if merged and is_peft(model):
        from alignkit.training.checkpoint import merged_copy

        merged_model = merged_copy(model, output_dir)
        merged_model.save_pretrained(os.path.join(output_dir, "merged"), safe_serialization=True)
        tokenizer.save_pretrained(os.path.join(output_dir, "merged"))
