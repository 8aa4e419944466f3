"""Save a trained model in Hugging Face format (weights or adapter, tokenizer, merged copy) and read such a
folder's weights back into a model (checkpoints)."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from alignkit.errors import UserError
from alignkit.modeling.load import load_spec
from alignkit.modeling.resolve import MERGED_ADAPTERS, adapter_task_type, is_peft, resolve_model


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
        merged_model = merged_copy(model, output_dir)
        merged_model.save_pretrained(os.path.join(output_dir, "merged"), safe_serialization=True)
        tokenizer.save_pretrained(os.path.join(output_dir, "merged"))


def merged_copy(model: nn.Module, output_dir: str) -> nn.Module:
    """The adapter merged into a copy of its base, for `merged/`. A sharded model (FSDP, DeepSpeed: saved
    through `full_weights`, which hands it the gathered weights as its own `state_dict`) cannot be
    deep-copied; it is rebuilt from the adapter just written to `output_dir` (resolve_model adds the
    adapters it was trained on top of)."""
    from torch.distributed.tensor import DTensor

    gathered = "state_dict" in vars(model)  # the instance's own state_dict: full_weights' gathered copy
    if not gathered and not any(isinstance(p, DTensor) for p in model.parameters()):
        import copy

        return copy.deepcopy(model).merge_and_unload()
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs: dict[str, Any] = {"dtype": next(model.parameters()).dtype}
    loader = AutoModelForCausalLM
    if adapter_task_type(output_dir) == "SEQ_CLS":
        loader, kwargs["num_labels"] = AutoModelForSequenceClassification, model.config.num_labels
    with _loads_whole():
        merged = load_spec(loader, resolve_model(output_dir), **kwargs)
    merged.config.pad_token_id = model.config.pad_token_id
    return merged


@contextlib.contextmanager
def _loads_whole() -> Iterator[None]:
    """While a DeepSpeed ZeRO-3 run is set up, transformers' from_pretrained partitions every model it loads
    over the processes (a collective); a copy the main process builds alone for saving is loaded whole. The
    config transformers holds (a weak reference) is put back as it was."""
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    active = ref() if ref is not None else None
    if active is None or not hf_deepspeed.is_deepspeed_zero3_enabled():
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(active)


def load_weights(model: nn.Module, path: str) -> None:
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(os.path.join(path, "adapter_model.safetensors")))
        return
    missing, unexpected = model.load_state_dict(read_weights(path), strict=False)
    # tied output embeddings are not saved separately
    missing = [k for k in missing if not (k.endswith("lm_head.weight") and model.config.tie_word_embeddings)]
    if unexpected or missing:
        raise UserError(
            f"checkpoint {path} does not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """A Hugging Face folder's full weights (model.safetensors, or every shard its index names)."""
    from safetensors.torch import load_file

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):  # sharded: load every shard the index names
        with open(index, encoding="utf-8") as fh:
            shards = sorted(set(json.load(fh)["weight_map"].values()))
    else:
        shards = ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(load_file(os.path.join(path, shard)))
    return state
