"""Batched generation from chat prompts with the KV cache (transformers `generate`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from alignkit.data.formats import Messages


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: list[Messages],
    max_new_tokens: int = 16,
    batch_size: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
) -> list[str]:
    """Completions (text, special tokens removed) for each chat prompt; left-padded batches."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    out: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            texts = [
                tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                for p in prompts[i : i + batch_size]
            ]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            kwargs: dict[str, Any] = {"do_sample": do_sample}
            if do_sample:
                kwargs["temperature"] = temperature
            ids = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                **kwargs,
            )
            out += tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out
