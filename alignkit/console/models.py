"""What a model is, before anything runs: architecture, parameters, context, chat template, and for a LoRA
adapter its base and rank. Read from the config (the weights are not loaded: the parameters are counted on
the meta device) and the tokenizer."""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from alignkit.errors import UserError
from alignkit.modeling.load import load_tokenizer
from alignkit.modeling.resolve import (
    ADAPTER_CONFIG,
    adapter_base,
    check_model_path,
    existing_base,
    weights_path,
)


def model_info(path: str) -> dict[str, Any]:
    check_model_path(path)
    info: dict[str, Any] = {"path": path}
    base = weights_path(path)  # an adapter's base, a GGUF file's converted folder
    if adapter_base(path) is not None:
        base = existing_base(path)
        with open(os.path.join(path, ADAPTER_CONFIG), encoding="utf-8") as fh:
            adapter = json.load(fh)
        info["adapter"] = {
            "base": base,
            "r": adapter.get("r"),
            "lora_alpha": adapter.get("lora_alpha"),
            "target_modules": adapter.get("target_modules"),
        }
    try:
        config = AutoConfig.from_pretrained(base)
    except (OSError, ValueError) as exc:
        raise UserError(f"{base}: no model config could be read ({str(exc).splitlines()[0]})") from exc
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    tokenizer = load_tokenizer(path)
    info.update(
        architecture=(config.architectures or [type(model).__name__])[0],
        model_type=config.model_type,
        parameters=sum(p.numel() for p in model.parameters()),
        layers=getattr(config, "num_hidden_layers", None),
        hidden_size=getattr(config, "hidden_size", None),
        vocab_size=getattr(config, "vocab_size", None),
        context=getattr(config, "max_position_embeddings", None),
        dtype=str(getattr(config, "dtype", None) or "float32").removeprefix("torch."),
        chat_template=bool(getattr(tokenizer, "chat_template", None)),
    )
    return info
