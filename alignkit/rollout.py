"""The rollout engine shared by the online stages: batched sampling with the KV cache.

`transformers` generation by default; `rollout_backend: vllm` is optional (GPU machines) and its absence is
a clear message when asked for, never an import error at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from alignkit.data.batches import pad
from alignkit.errors import UserError


@dataclass
class Samples:
    """N = prompts x num_generations completions, grouped: rows [i*G, (i+1)*G) share prompt i."""

    prompt_ids: list[list[int]]  # (N,) the prompt of each completion
    completion_ids: list[list[int]]  # (N,) sampled tokens, ending with EOS unless truncated
    truncated: list[bool]  # no EOS (nor stop string) within max_new_tokens
    texts: list[str]  # decoded completions, special tokens removed


@torch.no_grad()
def sample_hf(
    model: nn.Module,
    tokenizer: Any,
    prompt_ids: list[list[int]],
    num_generations: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop_strings: list[str] | None = None,
) -> Samples:
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    ids = pad(prompt_ids, tokenizer.pad_token_id, side="left").to(device)
    mask = pad([[1] * len(p) for p in prompt_ids], 0, side="left").to(device)
    kwargs: dict[str, Any] = {
        "do_sample": True,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k or None,
        "max_new_tokens": max_new_tokens,
        "num_return_sequences": num_generations,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if stop_strings:
        kwargs.update(stop_strings=stop_strings, tokenizer=tokenizer)
    try:
        out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    finally:
        model.train(was_training)
    new = out[:, ids.shape[1] :].tolist()
    completions, truncated = [], []
    for seq in new:
        if tokenizer.eos_token_id in seq:
            seq = seq[: seq.index(tokenizer.eos_token_id) + 1]
            truncated.append(False)
        else:
            seq = [t for t in seq if t != tokenizer.pad_token_id]
            text = tokenizer.decode(seq)
            truncated.append(not (stop_strings and any(text.endswith(s) for s in stop_strings)))
        completions.append(seq)
    prompts = [p for p in prompt_ids for _ in range(num_generations)]
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    return Samples(prompts, completions, truncated, texts)


class VLLMEngine:
    """vLLM sampling with the policy's weights pushed in after each update (GPU machines)."""

    def __init__(self, model_path: str, tokenizer: Any, gpu_memory_utilization: float = 0.3) -> None:
        try:
            from vllm import LLM
        except ImportError as exc:
            raise UserError(
                "rollout_backend: vllm needs vLLM, which is not installed (pip install vllm; it needs "
                "a CUDA GPU); or use rollout_backend: hf"
            ) from exc
        self.tokenizer = tokenizer
        self.llm = LLM(
            model=model_path, gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=True
        )

    def push_weights(self, model: nn.Module) -> None:
        state = [(k, v) for k, v in model.state_dict().items()]
        self.llm.collective_rpc(lambda worker: worker.model_runner.model.load_weights(state))

    def sample(
        self,
        prompt_ids: list[list[int]],
        num_generations: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int,
        stop_strings: list[str] | None,
    ) -> Samples:
        from vllm import SamplingParams

        params = SamplingParams(
            n=num_generations,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k or -1,
            max_tokens=max_new_tokens,
            stop=stop_strings or None,
        )
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False)
        completions, truncated = [], []
        for out in outputs:
            for c in out.outputs:
                completions.append(list(c.token_ids))
                truncated.append(c.finish_reason == "length")
        prompts = [p for p in prompt_ids for _ in range(num_generations)]
        return Samples(
            prompts,
            completions,
            truncated,
            self.tokenizer.batch_decode(completions, skip_special_tokens=True),
        )


def sequences(
    prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Right-padded prompt+completion rows with a completion mask, for scoring log-probs."""
    seqs = [p + c for p, c in zip(prompt_ids, completion_ids)]
    masks = [[0] * len(p) + [1] * len(c) for p, c in zip(prompt_ids, completion_ids)]
    return {
        "input_ids": pad(seqs, pad_token_id),
        "attention_mask": pad([[1] * len(s) for s in seqs], 0),
        "completion_mask": pad(masks, 0),
    }
