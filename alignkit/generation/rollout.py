"""The rollout engine shared by the online stages: batched sampling with the KV cache.

`transformers` generation by default; `rollout_backend: vllm` is optional (GPU machines) and its absence is
a clear message when asked for, never an import error at start-up.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import StoppingCriteriaList, StopStringCriteria

from alignkit.data.batches import pad, tokenize_chat, tokenize_text
from alignkit.errors import UserError
from alignkit.modeling.gguf import local_model
from alignkit.modeling.resolve import is_peft


@dataclass
class Samples:
    """N = prompts x num_generations completions, grouped: rows [i*G, (i+1)*G) share prompt i."""

    prompt_ids: list[list[int]]  # (N,) the prompt of each completion
    completion_ids: list[list[int]]  # (N,) sampled tokens, ending with EOS unless truncated
    truncated: list[bool]  # no EOS (nor stop string) within max_new_tokens
    texts: list[str]  # decoded completions, special tokens removed
    logprobs: list[list[float]] | None = None  # (N,) per completion token, under the sampling distribution

    def select(self, index: list[int]) -> Samples:
        def pick(xs: list | None) -> list | None:
            return None if xs is None else [xs[i] for i in index]

        return Samples(*(pick(getattr(self, f)) for f in _FIELDS))

    @staticmethod
    def concat(parts: list[Samples]) -> Samples:
        def join(field: str) -> list | None:
            lists = [getattr(p, field) for p in parts]
            return None if any(x is None for x in lists) else [x for xs in lists for x in xs]

        return Samples(*(join(f) for f in _FIELDS))


_FIELDS = ("prompt_ids", "completion_ids", "truncated", "texts", "logprobs")


class SampledLogprobs:
    """A logits processor, last in the chain, that records the log-prob of each sampled token under the
    distribution it was drawn from (after temperature, top-k and top-p). It keeps one step's log-softmax and
    reads the sampled token from `input_ids` at the next call; `finish` reads the last one."""

    def __init__(self) -> None:
        self.previous: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.previous is not None:
            self.steps.append(self.previous.gather(1, input_ids[:, -1:]).squeeze(1))
        self.previous = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, last_tokens: torch.Tensor) -> list[list[float]]:
        """(N, T) log-probs of the T generated tokens, as lists."""
        if self.previous is not None:
            self.steps.append(self.previous.gather(1, last_tokens[:, None]).squeeze(1))
        self.previous = None
        return torch.stack(self.steps, dim=1).tolist() if self.steps else []


def warpers(temperature: float, top_p: float, top_k: int) -> Any:
    """transformers' warpers for these settings, in its own order (none at temperature 0: greedy)."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    greedy = temperature == 0
    processors = LogitsProcessorList()
    if temperature not in (0.0, 1.0):
        processors.append(TemperatureLogitsWarper(temperature))
    if top_k and not greedy:
        processors.append(TopKLogitsWarper(top_k))
    if top_p < 1.0 and not greedy:
        processors.append(TopPLogitsWarper(top_p))
    return processors


def _processors(temperature: float, top_p: float, top_k: int, recorder: SampledLogprobs) -> Any:
    """The warpers, then the recorder (generate's built-in ones are switched off). Temperature 0 is greedy
    decoding (evaluation): the recorded log-probs are then the model's own."""
    processors = warpers(temperature, top_p, top_k)
    processors.append(recorder)
    return processors


def _generation_config(greedy: bool, max_new_tokens: int, num_generations: int, tokenizer: Any) -> Any:
    """Every setting that shapes the distribution is given: generate fills the ones left unset (None) from the
    model's own generation_config (repetition_penalty, no_repeat_ngram_size, ...), which would sample from
    another distribution than the policy's."""
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=not greedy,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        min_p=0.0,
        typical_p=1.0,
        epsilon_cutoff=0.0,
        eta_cutoff=0.0,
        repetition_penalty=1.0,
        encoder_repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        max_new_tokens=max_new_tokens,
        num_return_sequences=num_generations,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


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
    streamer: Any = None,
    stopping_criteria: list[Any] | None = None,
    logits_processors: list[Any] | None = None,  # run first, on the model's own scores (serve's log-probs)
) -> Samples:
    """`streamer` (a transformers `BaseStreamer`, e.g. `StepStreamer`) sees each decoding step's tokens as they
    are drawn; `stopping_criteria` may end rows early (a per-row boolean each step, as `RowsDone` gives)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    ids = pad(prompt_ids, tokenizer.pad_token_id, side="left").to(device)
    mask = pad([[1] * len(p) for p in prompt_ids], 0, side="left").to(device)
    recorder = SampledLogprobs()
    kwargs: dict[str, Any] = {
        "generation_config": _generation_config(temperature == 0, max_new_tokens, num_generations, tokenizer),
        "logits_processor": _processors(temperature, top_p, top_k, recorder),
    }
    kwargs["logits_processor"][:0] = logits_processors or []
    if streamer is not None:
        kwargs["streamer"] = streamer
    criteria = list(stopping_criteria or [])
    if stop_strings:
        criteria.append(StopStringCriteria(tokenizer, stop_strings))
    stopped = StoppedRows(criteria, ids.shape[1])
    kwargs["stopping_criteria"] = StoppingCriteriaList([stopped])
    try:
        out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    finally:
        model.train(was_training)
    generated = out[:, ids.shape[1] :]
    step_logprobs = recorder.finish(generated[:, -1]) if generated.shape[1] else [[] for _ in generated]
    completions, truncated, logprobs = [], [], []
    for i, (seq, lp) in enumerate(zip(generated.tolist(), step_logprobs)):
        seq, cut_short = cut_completion(seq[: stopped.length(i)], tokenizer, stop_strings)
        completions.append(seq)
        truncated.append(cut_short)
        logprobs.append(lp[: len(seq)])
    prompts = [p for p in prompt_ids for _ in range(num_generations)]
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    return Samples(prompts, completions, truncated, texts, logprobs)


class StoppedRows:
    """One stopping criterion over `criteria` that remembers the step at which each row was first done, so that
    the padding transformers puts after a stopped row is cut off and nothing the row sampled is (a sampled pad
    token, when it is another token than EOS, stays part of the answer)."""

    def __init__(self, criteria: list[Any], prompt_length: int) -> None:
        self.criteria, self.prompt_length = criteria, prompt_length
        self.done_at: dict[int, int] = {}  # row -> generated tokens when it was first done

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for criterion in self.criteria:
            done |= criterion(input_ids, scores, **kwargs)
        for row in done.nonzero().flatten().tolist():
            self.done_at.setdefault(row, input_ids.shape[1] - self.prompt_length)
        return done

    def length(self, row: int) -> int | None:
        """The row's generated tokens up to where it was stopped (None: it was never stopped by a criterion)."""
        return self.done_at.get(row)


class RowsDone:
    """A stopping criterion fed every row's newest token at each decoding step: `on_step(tokens)` returns which
    rows are done (their own token limit reached, a stop string seen, their client gone). Rows that are done
    get the pad token from then on; generation ends when every row is done or has drawn EOS."""

    def __init__(self, on_step: Callable[[list[int]], list[bool]]) -> None:
        self.on_step = on_step

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        flags = self.on_step(input_ids[:, -1].tolist())
        return torch.tensor(flags, dtype=torch.bool, device=input_ids.device)


def encode_prompts(tokenizer: Any, prompts: list[Any]) -> list[list[int]]:
    """Token ids of each prompt: messages through the chat template with the generation prompt, text as is."""

    return [
        tokenize_chat(tokenizer, p, add_generation_prompt=True)
        if isinstance(p, list)
        else tokenize_text(tokenizer, p)
        for p in prompts
    ]


def complete(
    model: nn.Module,
    tokenizer: Any,
    prompts: list[Any],
    num_samples: int = 1,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop_strings: list[str] | None = None,
    batch_size: int = 32,
    engine: VLLMEngine | None = None,
    streamer: Any = None,
) -> Samples:
    """Completions of chat (messages) or text prompts, `num_samples` each, grouped as `Samples` are; greedy at
    temperature 0. Evaluation, the quickstart, the side-by-side page and the server sample through here: with
    the HF backend in batches of at most `batch_size` sequences, or all at once through a vLLM `engine`.
    A `streamer` (see `StepStreamer`) sees the tokens as they are drawn: one prompt, one sample, HF backend."""
    ids = encode_prompts(tokenizer, prompts)
    settings = (max_new_tokens, temperature, top_p, top_k, stop_strings)
    if streamer is not None:
        if engine is not None or len(ids) != 1 or num_samples != 1:
            raise ValueError("streaming needs one prompt, one sample and the HF backend")
        return sample_hf(model, tokenizer, ids, 1, *settings, streamer=streamer)
    if engine is not None:
        return engine.sample(ids, num_samples, *settings)
    parts = []
    if num_samples <= batch_size:
        per_batch = max(batch_size // num_samples, 1)
        for i in range(0, len(ids), per_batch):
            parts.append(sample_hf(model, tokenizer, ids[i : i + per_batch], num_samples, *settings))
    else:  # more samples than a batch holds: one prompt at a time, its samples in rounds
        for prompt in ids:
            for done in range(0, num_samples, batch_size):
                n = min(batch_size, num_samples - done)
                parts.append(sample_hf(model, tokenizer, [prompt], n, *settings))
    return Samples.concat(parts) if parts else Samples([], [], [], [], [])


def cut_completion(seq: list[int], tokenizer: Any, stop_strings: list[str] | None) -> tuple[list[int], bool]:
    """A generated row cut where sampling stopped, and whether it was truncated (neither EOS nor a stop string
    ended it). The first stop string wins over a later EOS: a row stopped by a string is padded, and the pad
    token is often the EOS token, which the model never sampled there. The string may end inside the last
    token, as transformers' stop criterion allows."""
    eos = tokenizer.eos_token_id
    end = seq.index(eos) if eos in seq else len(seq)
    if stop_strings:
        for t in range(1, end + 1):
            if any(s in tokenizer.decode(seq[:t]) for s in stop_strings):
                return seq[:t], False
    if eos in seq:
        return seq[: end + 1], False
    return seq, True


# the first vLLM whose `processed_logprobs` are taken after every logits processor, top-k and top-p included
# (vllm-project/vllm#22387); earlier ones return them before top-k and top-p
MIN_VLLM = "0.10.2"


class VLLMEngine:
    """vLLM sampling with the policy's weights pushed in after each update (GPU machines)."""

    def __init__(self, model_path: str, tokenizer: Any, gpu_memory_utilization: float = 0.3) -> None:
        try:
            import vllm
        except ImportError as exc:
            raise UserError(
                "rollout_backend: vllm needs vLLM, which is not installed (pip install vllm; it needs "
                "a CUDA GPU); or use rollout_backend: hf"
            ) from exc
        _check_vllm_version(getattr(vllm, "__version__", MIN_VLLM))
        self.tokenizer = tokenizer
        self.llm = vllm.LLM(
            model=local_model(model_path),  # a GGUF file: the folder alignkit converted it into
            gpu_memory_utilization=gpu_memory_utilization,
            enable_prefix_caching=True,
            # each sampled token's log-prob under the distribution it was drawn from (after temperature, top-k,
            # top-p), as `sample_hf` records it: the default `raw_logprobs` are the unshaped model's, which
            # would bias the first importance ratio whenever those settings shape the distribution
            logprobs_mode="processed_logprobs",
        )

    def push_weights(self, model: nn.Module) -> None:
        state = vllm_weights(model)
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
            logprobs=0,  # the sampled token's own log-prob (processed: see `logprobs_mode` above)
        )
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False)
        completions, truncated, logprobs = [], [], []
        for out in outputs:
            for c in out.outputs:
                completions.append(list(c.token_ids))
                truncated.append(c.finish_reason == "length")
                logprobs.append([step[t].logprob for t, step in zip(c.token_ids, c.logprobs or [])])
        prompts = [p for p in prompt_ids for _ in range(num_generations)]
        return Samples(
            prompts,
            completions,
            truncated,
            self.tokenizer.batch_decode(completions, skip_special_tokens=True),
            logprobs,
        )


def _check_vllm_version(version: str) -> None:
    from packaging.version import InvalidVersion, Version

    try:
        too_old = Version(version) < Version(MIN_VLLM)
    except InvalidVersion:  # a local build with an odd version string: let vLLM itself judge
        return
    if too_old:
        raise UserError(
            f"vLLM {version} is too old for rollout_backend: vllm: it needs {MIN_VLLM} or newer, whose "
            "`logprobs_mode: processed_logprobs` gives the sampling distribution's log-probs (pip install -U "
            "vllm); or use rollout_backend: hf"
        )


@torch.no_grad()
def vllm_weights(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs for vLLM's `load_weights`, which knows only the base model's state-dict names.

    A full model's state dict as it is. Under LoRA, peft names a weight `base_model.model.<name>` (with
    `.base_layer` inside an adapted module, `.modules_to_save.<adapter>` for a module trained in full) and adds
    the adapter's factors: the pairs are the base names with the adapter merged in, W + scaling * B A (peft's
    own `get_delta_weight`), on new tensors, so the training model keeps its adapter and its base weights bit
    for bit (an in-place merge and unmerge would round them in bf16).
    """

    state = model.state_dict()
    if not is_peft(model):
        return list(state.items())
    deltas = _lora_deltas(model)
    pairs = []
    for key, value in state.items():
        # skipped: the adapter's factors, and the frozen copy peft keeps of a module trained in full
        if ".lora_" in key or ".original_module." in key:
            continue
        if key in deltas:
            if not value.is_floating_point():
                raise UserError(
                    "rollout_backend: vllm cannot take 4-bit (qlora) weights; use finetuning_type: lora, "
                    "or rollout_backend: hf"
                )
            value = value + deltas[key].to(value.dtype)
        name = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
        pairs.append((re.sub(r"\.modules_to_save\.[^.]+\.", ".", name), value))
    return pairs


def _lora_deltas(model: nn.Module) -> dict[str, torch.Tensor]:
    """state-dict key of each adapted base weight -> its active adapters' scaling * B A, in the weight's shape."""
    from peft.tuners.lora import LoraLayer

    deltas: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or module.merged or module.disable_adapters:
            continue  # a merged adapter is in the base weight already
        for adapter in module.active_adapters:
            if adapter in module.lora_A or adapter in module.lora_embedding_A:
                key = f"{name}.base_layer.weight"
                delta = module.get_delta_weight(adapter)
                deltas[key] = deltas[key] + delta if key in deltas else delta
    return deltas


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
