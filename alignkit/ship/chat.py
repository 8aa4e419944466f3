"""`alignkit chat`: a terminal chat with streamed tokens, the model's chat template and the history kept.

The model comes from `--model` (a folder, a LoRA adapter folder or a hub id) with an optional `--adapter`, or
from a LLaMA-Factory inference YAML (`model_name_or_path`, `adapter_name_or_path`, `template`,
`infer_backend`, its generating keys); flags win over the YAML. Sampling goes through the one rollout engine
(`rollout.complete`) with a `StepStreamer`, so the chat samples exactly as `eval` and `serve` do.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from alignkit.config import build_dataclass, load_yaml_mapping
from alignkit.errors import UserError, did_you_mean
from alignkit.generation.rollout import VLLMEngine, complete
from alignkit.generation.streaming import StepStreamer, TextStream
from alignkit.modeling.load import load_causal_lm, load_tokenizer
from alignkit.modeling.resolve import adapter_base

log = logging.getLogger("alignkit")

COMMANDS = "/reset clears the history, /system TEXT sets the system prompt, /exit (or Ctrl-D) leaves"
Messages = list[dict[str, str]]


@dataclass
class InferenceConfig:
    """The keys of a LLaMA-Factory inference YAML that mean something here."""

    model_name_or_path: str = ""
    adapter_name_or_path: str | None = None
    template: str | None = None  # LLaMA-Factory template name: not mapped yet, the tokenizer's own is used
    infer_backend: str = "huggingface"  # huggingface (hf) | vllm (GPU)
    infer_dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    trust_remote_code: bool = False
    finetuning_type: str = "lora"  # lora | qlora | oft | full | freeze: an adapter needs lora, qlora or oft
    default_system: str | None = None
    do_sample: bool = True  # false: greedy (temperature 0)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_new_tokens: int | None = None


# LLaMA-Factory keys a chat config may carry that have no meaning in alignkit chat: named as such, not guessed at
_LLAMA_FACTORY_ONLY = (
    "repetition_penalty",
    "num_beams",
    "length_penalty",
    "max_length",
    "skip_special_tokens",
    "enable_thinking",
    "quantization_bit",
    "quantization_method",
    "vllm_maxlen",
    "vllm_gpu_util",
    "vllm_enforce_eager",
)
_BACKENDS = {"huggingface": "hf", "hf": "hf", "vllm": "vllm"}
DTYPES = ("auto", "float32", "bfloat16", "float16")
# cli.py's defaults of the sampling flags: argparse cannot tell `--temperature 0.7` from no flag, so a flag
# still at its default leaves the YAML's value in place (a flag defaulting to None needs no such rule)
DEFAULTS = {"max_new_tokens": 512, "temperature": 0.7, "top_p": 0.9}


@dataclass
class ChatSettings:
    """Everything `chat` needs, flags and YAML merged."""

    model: str
    adapter: str | None = None
    system: str | None = None
    template: str | None = None
    backend: str = "hf"
    dtype: str = "auto"
    trust_remote_code: bool = False
    max_new_tokens: int = 512
    temperature: float = 0.7  # 0 is greedy
    top_p: float = 0.9
    top_k: int = 0


@dataclass
class Conversation:
    """The chat's state: the system prompt and the exchanges so far (user, assistant, user, ...)."""

    system: str | None = None
    history: Messages = field(default_factory=list)

    def messages(self, user_text: str) -> Messages:
        """The prompt of the next answer: system prompt, history, then the new user message."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history + [{"role": "user", "content": user_text}]

    def add(self, user_text: str, answer: str) -> None:
        self.history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": answer}]

    def reset(self) -> None:
        """Drop the history; the system prompt stays (it is a setting, not part of the exchange)."""
        self.history = []


def read_inference_config(path: str) -> InferenceConfig:
    """A LLaMA-Factory inference YAML; every unknown key is named in one UserError, each with a suggestion."""

    raw = load_yaml_mapping(path)
    names = [f.name for f in dataclasses.fields(InferenceConfig)]
    unknown = [str(k) for k in raw if k not in names]
    if unknown:
        described = []
        for key in unknown:
            if key in _LLAMA_FACTORY_ONLY:
                described.append(f"`{key}` (a LLaMA-Factory key alignkit chat does not use; remove it)")
            else:
                described.append(f"`{key}`{did_you_mean(key, names)}")
        noun = "key" if len(unknown) == 1 else "keys"
        raise UserError(
            f"{path}: unknown {noun} {', '.join(described)}; alignkit chat reads: {', '.join(names)}"
        )
    return build_dataclass(InferenceConfig, raw, path)


GIVEN = ("model", "adapter", "system", "max_new_tokens", "temperature", "top_p")


def chat_settings(source: str | None = None, **given: Any) -> ChatSettings:
    """The settings given (flags or keyword arguments; None: not given) and the YAML (if any) merged into one
    `ChatSettings`: given settings win, then the YAML, then the defaults."""
    unknown = [key for key in given if key not in GIVEN]
    if unknown:
        raise UserError(f"chat: unknown setting `{unknown[0]}`{did_you_mean(unknown[0], GIVEN)}")
    cfg = read_inference_config(source) if source else InferenceConfig()
    model = given.get("model") or cfg.model_name_or_path
    if not model:
        where = f"`model_name_or_path:` in {source}" if source else "a LLaMA-Factory inference YAML"
        raise UserError(f"no model to chat with: give --model DIR or {where}")
    backend = _BACKENDS.get(cfg.infer_backend.lower())
    if backend is None:
        if cfg.infer_backend.lower() in ("sglang", "ktransformers"):
            raise UserError(
                f"{source}: `infer_backend: {cfg.infer_backend}` is not supported by alignkit chat; "
                "use huggingface (any machine) or vllm (a CUDA GPU)"
            )
        raise UserError(
            f"{source}: `infer_backend: {cfg.infer_backend}` is not a backend"
            f"{did_you_mean(cfg.infer_backend, _BACKENDS)}; choose huggingface or vllm"
        )
    if cfg.infer_dtype not in DTYPES:
        raise UserError(f"{source}: `infer_dtype: {cfg.infer_dtype}`: choose one of {', '.join(DTYPES)}")
    adapter = given.get("adapter") or cfg.adapter_name_or_path
    if adapter and "," in adapter:
        raise UserError(f"{source or '--adapter'}: one adapter at a time (got {adapter})")
    if adapter and cfg.finetuning_type in ("full", "freeze"):
        raise UserError(
            f"{source}: `finetuning_type: {cfg.finetuning_type}` has no adapter, but `adapter_name_or_path` "
            "(or --adapter) is set; use finetuning_type: lora, or drop the adapter"
        )
    system = given["system"] if given.get("system") is not None else cfg.default_system
    greedy = 0.0 if not cfg.do_sample else None
    settings = ChatSettings(
        model=model,
        adapter=adapter,
        system=system or None,
        template=cfg.template,
        backend=backend,
        dtype=cfg.infer_dtype,
        trust_remote_code=cfg.trust_remote_code,
        max_new_tokens=_first(given.get("max_new_tokens"), cfg.max_new_tokens, DEFAULTS["max_new_tokens"]),
        temperature=_first(given.get("temperature"), greedy, cfg.temperature, DEFAULTS["temperature"]),
        top_p=_first(given.get("top_p"), cfg.top_p, DEFAULTS["top_p"]),
        top_k=_first(cfg.top_k, 0),
    )
    _check_sampling(settings)
    return settings


def _first(*values: Any) -> Any:
    return next(v for v in values if v is not None)


def _check_sampling(s: ChatSettings) -> None:
    if s.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens / max_new_tokens must be at least 1 (got {s.max_new_tokens})")
    if s.temperature < 0:
        raise UserError(f"--temperature / temperature must be 0 (greedy) or more (got {s.temperature})")
    if not 0 < s.top_p <= 1:
        raise UserError(f"--top-p / top_p must be in (0, 1] (got {s.top_p})")
    if s.top_k < 0:
        raise UserError(f"top_k must be 0 (off) or more (got {s.top_k})")


def load_chat_model(settings: ChatSettings) -> tuple[Any, Any]:
    """(model on the GPU when there is one, else the CPU; tokenizer) for the HF backend."""
    import torch

    model, tokenizer = load_causal_lm(settings.model, settings.dtype, settings.trust_remote_code)
    if settings.adapter:
        model, tokenizer = _with_adapter(model, tokenizer, settings)
    return model.to("cuda" if torch.cuda.is_available() else "cpu").eval(), tokenizer


def _with_adapter(model: Any, tokenizer: Any, settings: ChatSettings) -> tuple[Any, Any]:
    """`--adapter` on the base `--model` (load_causal_lm takes one path: a base, or an adapter on its base)."""
    from peft import PeftModel

    adapter = settings.adapter or ""
    if isinstance(model, PeftModel):
        raise UserError(
            f"--model {settings.model} is itself a LoRA adapter and --adapter {adapter} would add a second; "
            "give the base model as --model, or merge the first adapter with `alignkit export`"
        )
    if os.path.exists(adapter) or adapter.startswith((".", "/", "~")):
        if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
            raise UserError(
                f"adapter {adapter}: not a LoRA adapter folder (no adapter_config.json in it); "
                "give the folder a LoRA training run saved"
            )
    try:
        model = PeftModel.from_pretrained(model, adapter)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"could not load adapter {adapter} on {settings.model}: {exc}".split("\n")[0]
        ) from exc
    # alignkit saves the tokenizer beside the adapter: it may carry the chat template the training used
    if any(os.path.isfile(os.path.join(adapter, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        tokenizer = load_tokenizer(adapter, settings.trust_remote_code)
    return model.requires_grad_(False), tokenizer


def check_chat_template(tokenizer: Any, settings: ChatSettings, source: str | None) -> None:
    if not getattr(tokenizer, "chat_template", None):
        where = f"`template: {settings.template}` in {source}" if settings.template else "`template`"
        raise UserError(
            f"--model {settings.model}: its tokenizer has no chat template, and alignkit chat needs one to "
            f"build the prompt; use a chat (instruct) model, or add `chat_template` to its "
            f"tokenizer_config.json ({where}: LLaMA-Factory template names are not mapped yet)"
        )
    if settings.template:
        log.info("template: %s: the tokenizer's own chat template is used", settings.template)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def stream_answer(
    model: Any, tokenizer: Any, messages: Messages, settings: ChatSettings, write: Callable[[str], None]
) -> Any:
    """Sample one answer through `rollout.complete`, writing its text as the tokens are drawn; the Samples.
    Whatever the incremental decoding held back (a character cut between tokens) is written at the end."""

    stream = TextStream(tokenizer)
    shown: list[str] = []

    def on_step(ids: list[int]) -> None:
        text = stream.push(ids)
        if text:
            shown.append(text)
            write(text)

    samples = complete(
        model,
        tokenizer,
        [messages],
        num_samples=1,
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=settings.top_k,
        streamer=StepStreamer(on_step),
    )
    done, text = "".join(shown), samples.texts[0]
    if text.startswith(done) and len(text) > len(done):
        write(text[len(done) :])
    return samples


def run_chat(
    conversation: Conversation,
    reply: Callable[[Messages], str],
    read: Callable[[str], str] = input,
    write: Callable[[str], None] = _write,
) -> int:
    """The read-answer loop: `reply(messages)` writes the answer as it comes and returns its text, which joins
    the history. Returns the exit code (0 on /exit and at the end of input)."""
    while True:
        try:
            line = read("User: ")
        except EOFError:
            write("\n")
            return 0
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            if handle_command(conversation, text, write):
                return 0
            continue
        write("Assistant: ")
        try:
            answer = reply(conversation.messages(text))
        except KeyboardInterrupt:  # Ctrl-C stops this answer (not kept), the chat goes on
            write("\n[stopped]\n")
            continue
        write("\n")
        conversation.add(text, answer)


def handle_command(conversation: Conversation, text: str, write: Callable[[str], None]) -> bool:
    """Apply a /command; True when the chat should end."""
    name, _, rest = text.partition(" ")
    if name in ("/exit", "/quit"):
        return True
    if name == "/reset":
        conversation.reset()
        write("(history cleared)\n")
    elif name == "/system":
        if not rest.strip():
            write("(/system needs the prompt's text, e.g. /system You are a helpful assistant.)\n")
        else:
            conversation.system = rest.strip()
            write("(system prompt set)\n")
    else:
        write(f"(unknown command {name}; {COMMANDS})\n")
    return False


def _hf_reply(settings: ChatSettings, source: str | None) -> tuple[Callable[[Messages], str], str]:
    model, tokenizer = load_chat_model(settings)
    check_chat_template(tokenizer, settings, source)

    def reply(messages: Messages) -> str:
        samples = stream_answer(model, tokenizer, messages, settings, _write)
        if samples.truncated[0]:
            log.info("(the answer stopped at max_new_tokens = %d)", settings.max_new_tokens)
        return samples.texts[0]

    return reply, str(next(model.parameters()).device)


def _vllm_reply(settings: ChatSettings, source: str | None) -> tuple[Callable[[Messages], str], str]:
    """vLLM answers come whole (no token streaming). Untested here: no GPU on the machines the tests run on."""

    if settings.adapter or (os.path.isdir(settings.model) and adapter_base(settings.model)):
        raise UserError(
            f"{source or 'chat'}: infer_backend: vllm takes a full model here; merge the adapter into its base "
            "with `alignkit export`, or use infer_backend: huggingface"
        )
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        raise UserError(
            f"{source or 'chat'}: infer_backend: vllm needs vLLM, which is not installed: "
            "pip install 'alignkit[vllm]' (it needs a CUDA GPU); or use infer_backend: huggingface"
        ) from exc
    tokenizer = load_tokenizer(settings.model, settings.trust_remote_code)
    check_chat_template(tokenizer, settings, source)
    engine = VLLMEngine(settings.model, tokenizer, gpu_memory_utilization=0.8)

    def reply(messages: Messages) -> str:
        samples = complete(
            None,  # type: ignore[arg-type]  # the engine samples; no HF model is loaded
            tokenizer,
            [messages],
            max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature,
            top_p=settings.top_p,
            top_k=settings.top_k,
            engine=engine,
        )
        _write(samples.texts[0])
        return samples.texts[0]

    return reply, "vllm"


def answer_once(settings: ChatSettings, messages: Messages, source: str | None = None) -> tuple[str, bool]:
    """(the answer to `messages`, whether it stopped at max_new_tokens): one turn, nothing printed."""

    if settings.backend == "vllm":
        raise UserError(
            "chat: one-turn answers run on the transformers backend; use infer_backend: huggingface"
        )
    model, tokenizer = load_chat_model(settings)
    check_chat_template(tokenizer, settings, source)
    system = [{"role": "system", "content": settings.system}] if settings.system else []
    samples = complete(
        model,
        tokenizer,
        [system + list(messages)],
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=settings.top_k,
    )
    return samples.texts[0], bool(samples.truncated[0])


def run_terminal_chat(source: str | None = None, **given: Any) -> int:
    """`alignkit chat`: a conversation on standard input and output until /exit or end of input."""
    settings = chat_settings(source, **given)
    make_reply = _vllm_reply if settings.backend == "vllm" else _hf_reply
    log.info("loading %s%s", settings.model, f" with adapter {settings.adapter}" if settings.adapter else "")
    reply, where = make_reply(settings, source)
    on = f"{settings.model} + adapter {settings.adapter}" if settings.adapter else settings.model
    greedy = (
        "greedy"
        if settings.temperature == 0
        else f"temperature {settings.temperature}, top_p {settings.top_p}"
    )
    _write(f"alignkit chat: {on} on {where} ({greedy}); {COMMANDS}\n")
    return run_chat(Conversation(system=settings.system), reply)
