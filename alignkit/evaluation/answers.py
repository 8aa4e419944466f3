"""The answers an eval scores: sampled through the one rollout engine (`rollout.complete`), with transformers
or, under `rollout_backend: vllm`, vLLM."""

from __future__ import annotations

import os
from typing import Any

from alignkit.data.formats import Example
from alignkit.evaluation.settings import EvalConfig
from alignkit.generation.rollout import VLLMEngine, complete
from alignkit.modeling.resolve import adapter_base


def _messages(prompt: Any) -> list[dict]:
    return list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]


def vllm_engine(cfg: EvalConfig, path: str, model: Any, tokenizer: Any) -> Any:
    """A vLLM engine for `path` (GPU machines). An adapter folder is served as its base with the adapter merged
    in (the same weights push RL uses), so vLLM needs no LoRA support of its own."""

    base = adapter_base(path) if os.path.isdir(path) else None
    engine = VLLMEngine(base or path, tokenizer, gpu_memory_utilization=cfg.vllm_gpu_memory_utilization)
    if base is not None:
        engine.push_weights(model)
    return engine


def generate(
    model: Any, tokenizer: Any, examples: list[Example], cfg: EvalConfig, engine: Any = None
) -> tuple[list[list[str]], list[list[int]], list[list[dict]]]:
    """(texts (P, k), completion token counts (P, k), conversations (P,)). MT-Bench rows ask their later
    turns as follow-ups to sample 0's answers, one turn at a time across rows."""
    k = cfg.num_samples
    settings: dict[str, Any] = dict(
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        stop_strings=cfg.stop_strings,
        batch_size=cfg.batch_size,
        engine=engine,
    )
    samples = complete(model, tokenizer, [ex.prompt for ex in examples], num_samples=k, **settings)
    texts = [samples.texts[i * k : (i + 1) * k] for i in range(len(examples))]
    lengths = [[len(c) for c in samples.completion_ids[i * k : (i + 1) * k]] for i in range(len(examples))]
    conversations = [
        _messages(ex.prompt) + [{"role": "assistant", "content": t[0]}] for ex, t in zip(examples, texts)
    ]
    turns = [ex.extra.get("turns") or [] for ex in examples]
    for t in range(1, max((len(ts) for ts in turns), default=0)):
        rows = [i for i, ts in enumerate(turns) if len(ts) > t]
        follow = [conversations[i] + [{"role": "user", "content": turns[i][t]}] for i in rows]
        answers = complete(model, tokenizer, follow, num_samples=1, **settings).texts
        for i, msgs, answer in zip(rows, follow, answers):
            conversations[i] = msgs + [{"role": "assistant", "content": answer}]
    return texts, lengths, conversations


def sample_for_kl(
    model: Any, tokenizer: Any, examples: list[Example], cfg: EvalConfig, engine: Any = None
) -> Any:
    """The model's own samples at temperature 1 with no top-p / top-k: the KL is of the model, not of a
    tempered or truncated copy of it. Each answer is the tokens drawn, EOS included."""
    return complete(
        model,
        tokenizer,
        [ex.prompt for ex in examples],
        num_samples=cfg.num_samples,
        max_new_tokens=cfg.max_new_tokens,
        temperature=1.0,
        batch_size=cfg.batch_size,
        engine=engine,
    )


def turn_prefixes(conversation: list[dict]) -> list[list[dict]]:
    """The conversation up to each assistant turn: MT-Bench grades every turn, each with what came before."""
    return [conversation[: i + 1] for i, m in enumerate(conversation) if m.get("role") == "assistant"]
