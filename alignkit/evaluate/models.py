"""Models to evaluate: a full model folder, a LoRA adapter folder (its base read from adapter_config.json), or
a hub id. The same loader serves `eval`, `sxs` and `compare`."""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn

from alignkit.errors import UserError
from alignkit.models import _DTYPES, _checkpoint_dtype, _from_pretrained, load_tokenizer


def adapter_base(path: str) -> str | None:
    """The base model an adapter folder names, or None when `path` is not an adapter folder."""
    config = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(config):
        return None
    with open(config, encoding="utf-8") as fh:
        try:
            base = json.load(fh).get("base_model_name_or_path")
        except (json.JSONDecodeError, AttributeError) as exc:
            raise UserError(f"{config} is not a JSON object ({exc}); re-save the adapter with peft") from exc
    if not base:
        raise UserError(
            f"{config}: no `base_model_name_or_path`; set it to the base model the adapter was trained on"
        )
    return base


def _dtype(path: str, torch_dtype: str) -> torch.dtype:
    if torch_dtype != "auto":
        return _DTYPES[torch_dtype]
    return torch.float64 if _checkpoint_dtype(path) == "float64" else torch.float32


def load_causal_lm(
    path: str, torch_dtype: str = "auto", trust_remote_code: bool = False, device: str | None = None
) -> tuple[nn.Module, Any]:
    """(model in eval mode, tokenizer). An adapter folder is loaded onto its base with peft; its tokenizer is the
    adapter folder's when it has one (alignkit saves it there), else the base's."""
    from transformers import AutoModelForCausalLM

    if path and not os.path.exists(path) and path.startswith((".", "/", "~")):
        raise UserError(f"model folder {path} does not exist")
    base = adapter_base(path) if os.path.isdir(path) else None
    weights = base or path
    if base is not None and not os.path.exists(base) and base.startswith((".", "/", "~")):
        raise UserError(
            f"adapter {path} was trained on {base}, which does not exist here; edit `base_model_name_or_path` "
            f"in {os.path.join(path, 'adapter_config.json')} to where the base model is"
        )
    dtype = _dtype(weights, torch_dtype)
    model = _from_pretrained(AutoModelForCausalLM, weights, dtype=dtype, trust_remote_code=trust_remote_code)
    if base is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, path)
    has_tokenizer = os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")
    )
    tokenizer = load_tokenizer(path if has_tokenizer or base is None else base, trust_remote_code)
    if device:
        model.to(device)
    return model.eval().requires_grad_(False), tokenizer
