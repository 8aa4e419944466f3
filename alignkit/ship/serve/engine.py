"""The served models and the generation pass the batcher runs: a model folder (or a LoRA adapter folder) and
any number of LoRA adapters on it, each its own model id, sampled through the one rollout engine."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from alignkit.errors import UserError
from alignkit.generation.rollout import RowsDone, VLLMEngine, sample_hf
from alignkit.modeling.gguf import local_model
from alignkit.modeling.load import load_causal_lm, load_tokenizer
from alignkit.modeling.resolve import is_peft
from alignkit.ship.serve.batcher import Job, on_step_for
from alignkit.ship.serve.logprobs import StepLogprobs

log = logging.getLogger("alignkit")


def parse_adapters(specs: list[str]) -> dict[str, str]:
    """`--adapter NAME=DIR` (or `DIR`, named after its folder) -> {name: dir}."""
    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = os.path.basename(os.path.normpath(spec)), spec
        if not name or not path:
            raise UserError(f"--adapter {spec!r}: write NAME=DIR, e.g. --adapter dpo=out/dpo-lora")
        if not os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise UserError(
                f"--adapter {spec}: {path} has no adapter_config.json; give a LoRA adapter folder"
            )
        if name in adapters:
            raise UserError(f"--adapter: the name `{name}` is given twice; name each adapter once")
        adapters[name] = path
    return adapters


class ModelPool:
    """The model, its tokenizer and the model id of each way to run it (the model itself or one adapter)."""

    def __init__(
        self,
        model_path: str,
        adapters: dict[str, str],
        served_name: str | None = None,
        dtype: str = "auto",
        device: str | None = None,
        trust_remote_code: bool = False,
        weights: bool = True,
    ) -> None:

        if weights:
            self.model, self.tokenizer = load_causal_lm(model_path, dtype, trust_remote_code, device)
            self.model.eval()
        else:  # another engine (vLLM) holds the weights: the config says the context and the EOS tokens
            self.model, self.tokenizer = _config_only(model_path, trust_remote_code)
        base_id = served_name or model_path
        # model id -> adapter name (None: the model without any adapter)
        self.ids: dict[str, str | None] = {base_id: "default" if is_peft(self.model) else None}
        self.paths = {base_id: model_path}
        for name, path in adapters.items():
            if name in self.ids:
                raise UserError(f"--adapter {name}: that model id is already --served-model-name; rename it")
            self._load_adapter(name, path)
            self.ids[name] = name
            self.paths[name] = path
        if getattr(self.tokenizer, "chat_template", None) is None:
            log.warning(
                "%s has no chat template: /v1/chat/completions will answer 400; /v1/completions works",
                model_path,
            )
        self.context = int(getattr(self.model.config, "max_position_embeddings", 0) or 0) or None
        self.eos = _eos_ids(self.model, self.tokenizer)

    def _load_adapter(self, name: str, path: str) -> None:
        from peft import PeftModel

        try:
            if is_peft(self.model):
                self.model.load_adapter(path, adapter_name=name)
            else:
                self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise UserError(
                f"--adapter {name}={path} does not fit the model ({exc}); give an adapter trained on it"
            ) from exc
        self.model.eval()

    @contextmanager
    def active(self, model_id: str) -> Iterator[nn.Module]:
        """The model with `model_id`'s adapter switched on (or every adapter off)."""
        adapter = self.ids[model_id]
        if adapter is None:
            has_adapters = hasattr(self.model, "disable_adapter")
            with self.model.disable_adapter() if has_adapters else nullcontext():
                yield self.model
            return
        self.model.set_adapter(adapter)
        yield self.model


def _config_only(path: str, trust_remote_code: bool) -> tuple[Any, Any]:
    """A stand-in with the model's `config` and `generation_config`, and the tokenizer, without weights."""
    from types import SimpleNamespace

    from transformers import AutoConfig, GenerationConfig

    path = local_model(path)  # a GGUF file: the folder it is converted into
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    try:
        generation = GenerationConfig.from_pretrained(path)
    except OSError:  # no generation_config.json: the tokenizer's EOS alone
        generation = None
    return SimpleNamespace(config=config, generation_config=generation), load_tokenizer(
        path, trust_remote_code
    )


def _eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    """Every token that ends an answer: the tokenizer's EOS and the generation config's (chat models often list
    several, e.g. `<|im_end|>` and `<|endoftext|>`)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update([extra] if isinstance(extra, int) else extra or [])
    return ids


class HFGenerate:
    """One batched pass with transformers' generate (`rollout.sample_hf`), every row ending on its own. A pass
    where some request asked for log-probs reads them with a `StepLogprobs`; the others run without it."""

    logprobs = True  # token log-probs can be asked for

    def __init__(self, pool: ModelPool) -> None:
        self.pool = pool

    def __call__(self, batch: list[Job]) -> None:

        first = batch[0]
        prompts = [job.prompt_of(row) for job in batch for row in job.rows]
        limit = max(row.max_tokens for job in batch for row in job.rows)
        with self.pool.active(first.model) as model:
            if first.seed is not None:
                torch.manual_seed(first.seed)
            asked = [job.top_logprobs for job in batch if job.top_logprobs is not None]
            scores = StepLogprobs(max(asked)) if asked else None
            on_step = on_step_for(batch, self.pool.eos, scores)
            sample_hf(
                model,
                self.pool.tokenizer,
                prompts,
                1,
                limit,
                first.temperature,
                first.top_p,
                stopping_criteria=[RowsDone(on_step)],
                logits_processors=[scores] if scores is not None else None,
            )


class VLLMGenerate:
    """The same pass over vLLM's engine (GPU): answers come whole, then run through the same row logic.
    Token log-probs are not served here (a 400): the engine keeps only the sampled token's, after sampling."""

    logprobs = False

    def __init__(self, pool_path: str, tokenizer: Any, eos: set[int]) -> None:

        self.engine = VLLMEngine(pool_path, tokenizer, gpu_memory_utilization=0.85)
        self.eos = eos

    def __call__(self, batch: list[Job]) -> None:
        first = batch[0]
        prompts = [job.prompt_of(row) for job in batch for row in job.rows]
        limit = max(row.max_tokens for job in batch for row in job.rows)
        if first.seed is not None:
            torch.manual_seed(first.seed)
        samples = self.engine.sample(prompts, 1, limit, first.temperature, first.top_p, 0, None)
        on_step = on_step_for(batch, self.eos)
        longest = max((len(c) for c in samples.completion_ids), default=0)
        for t in range(longest):
            on_step([c[t] if t < len(c) else next(iter(self.eos), 0) for c in samples.completion_ids])


def vllm_available() -> None:
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        raise UserError(
            "--backend vllm needs vLLM, which is not installed: pip install 'alignkit[vllm]' (a CUDA GPU); "
            "or leave --backend at hf"
        ) from exc
