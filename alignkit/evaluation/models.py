"""Models to evaluate: a full model folder, a LoRA adapter folder (its base read from adapter_config.json), or
a hub id. The same loader serves `eval`, `sxs` and `compare`."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from alignkit.errors import UserError
from alignkit.modeling.load import (  # noqa: F401 - adapter_base: imported from here by export, chat, answers
    _DTYPES,
    _checkpoint_dtype,
    adapter_base,
    load_spec,
    load_tokenizer,
    resolve_model,
)


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
