"""Rewards for the online stages: verifiable functions, a reward model, or the user's own function.

A reward function takes `(prompts, completions, **columns)` — prompts and completions as text, plus every
extra column of the rows (e.g. GSM8K's `answer`) as lists — and returns one float per completion. Built-ins
are looked up by name; `module:function` imports a user's. Several combine with `reward_weights`.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch

from alignkit.data.batches import full_ids, pad
from alignkit.errors import UserError, did_you_mean
from alignkit.modeling.load import load_spec, load_tokenizer
from alignkit.modeling.resolve import ADAPTER_CONFIG, adapter_task_type, is_adapter, resolve_model

RewardFn = Callable[..., list[float]]

_GSM8K_ANSWER = re.compile(r"####\s*(.+?)\s*$", re.S)


def _gold(answer: Any) -> str:
    """GSM8K keeps its final answer after `####`; other data sets give it alone."""
    text = str(answer)
    m = _GSM8K_ANSWER.search(text)
    return m.group(1).replace(",", "") if m else text


def math_accuracy(
    prompts: Sequence[str], completions: Sequence[str], answer: Sequence[Any], **_: Any
) -> list[float]:
    """1.0 when the completion's final answer equals the row's `answer` mathematically (math-verify: 0.5, 1/2
    and \\frac{1}{2} agree), else 0.0."""
    try:
        from math_verify import parse, verify
    except ImportError as exc:  # pragma: no cover - a runtime dependency
        raise UserError("reward `math_accuracy` needs math-verify: pip install math-verify") from exc
    out = []
    for completion, gold in zip(completions, answer):
        target = parse(_gold(gold))
        out.append(1.0 if target and verify(target, parse(completion)) else 0.0)
    return out


def _normalise(text: str) -> str:
    return text.strip().rstrip(".").strip().replace(",", "")


def _as_number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def exact_match(
    prompts: Sequence[str], completions: Sequence[str], answer: Sequence[Any], **_: Any
) -> list[float]:
    """1.0 when the completion is the answer (whitespace, a final period and thousands commas aside; numbers
    compare by value, so `85` == `85.0`), else 0.0."""
    out = []
    for completion, gold in zip(completions, answer):
        a, b = _normalise(completion), _normalise(_gold(gold))
        na, nb = _as_number(a), _as_number(b)
        out.append(1.0 if a == b or (na is not None and na == nb) else 0.0)
    return out


def make_format_reward(pattern: str) -> RewardFn:
    """1.0 when the whole completion matches the regex `pattern` (e.g. `<think>.*</think>.*`)."""
    regex = re.compile(pattern, re.S)

    def format_reward(prompts: Sequence[str], completions: Sequence[str], **_: Any) -> list[float]:
        return [1.0 if regex.fullmatch(c.strip()) else 0.0 for c in completions]

    return format_reward


def make_length_reward(target: int) -> RewardFn:
    """A penalty for characters past `target`: -(excess / target), 0 within it."""

    def length(prompts: Sequence[str], completions: Sequence[str], **_: Any) -> list[float]:
        return [-max(0, len(c) - target) / max(target, 1) for c in completions]

    return length


def load_user_function(spec: str, what: str = "reward function") -> RewardFn:
    """`module:function` -> the function (a reward function, a tool, an environment factory), with a clear
    error naming `what`."""
    module_name, _, func_name = spec.partition(":")
    if not func_name:
        raise UserError(f"{what} `{spec}`: give it as module:function (e.g. my_module:{what.split()[0]})")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"{what} `{spec}`: cannot import module `{module_name}` ({exc})") from exc
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise UserError(f"{what} `{spec}`: module `{module_name}` has no function `{func_name}`")
    return fn


# The built-in reward functions by name, each made from (format_pattern, length_target).
BUILTIN_REWARDS: dict[str, Callable[[str, int], RewardFn]] = {
    "math_accuracy": lambda pattern, target: math_accuracy,
    "exact_match": lambda pattern, target: exact_match,
    "format": lambda pattern, target: make_format_reward(pattern),
    "length": lambda pattern, target: make_length_reward(target),
}
BUILTIN = tuple(BUILTIN_REWARDS)


def reward_name(fn: RewardFn) -> str:
    """The name a reward function handed over as a Python callable is recorded under in the run's config:
    `module:function` when it can be imported so, else its own name."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if module and qualname and "<" not in qualname and "." not in qualname:
        return f"{module}:{qualname}"
    return getattr(fn, "__name__", type(fn).__name__)


def build_reward_funcs(
    names: Sequence[str],
    format_pattern: str,
    length_target: int,
    given: dict[str, RewardFn] | None = None,
) -> dict[str, RewardFn]:
    """name -> function: `given` ones (callables handed to the library), built-ins, then `module:function`."""
    funcs: dict[str, RewardFn] = {}
    for name in names:
        if given and name in given:
            funcs[name] = given[name]
        elif name in BUILTIN_REWARDS:
            funcs[name] = BUILTIN_REWARDS[name](format_pattern, length_target)
        elif ":" in name:
            funcs[name] = load_user_function(name)
        else:
            raise UserError(
                f"reward function `{name}` is not built in{did_you_mean(name, BUILTIN)}; built-ins: "
                f"{', '.join(BUILTIN)}, or give your own as module:function"
            )
    return funcs


def required_columns(fn: RewardFn) -> list[str]:
    """Keyword parameters a reward function needs that have no default (beyond prompts and completions)."""
    params = list(inspect.signature(fn).parameters.values())[2:]
    return [
        p.name
        for p in params
        if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]


def check_columns(funcs: dict[str, RewardFn], columns: set[str], where: str) -> None:
    for name, fn in funcs.items():
        missing = [c for c in required_columns(fn) if c not in columns]
        if missing:
            raise UserError(
                f"{where}: reward function `{name}` needs the column `{missing[0]}`, which the data "
                f"does not have (columns: {', '.join(sorted(columns)) or 'none'})"
            )


def score(
    funcs: dict[str, RewardFn],
    prompts: list[str],
    completions: list[str],
    columns: dict[str, list[Any]],
    wheres: list[str],
) -> dict[str, torch.Tensor]:
    """Each function's rewards (N,). A function that raises or returns the wrong count stops the run, naming it."""
    out = {}
    for name, fn in funcs.items():
        try:
            values = fn(prompts, completions, **columns)
        except Exception as exc:  # noqa: BLE001 - a user's function: report which one and where
            row = _first_failing_row(fn, prompts, completions, columns, wheres)
            raise UserError(f"reward function `{name}` raised {type(exc).__name__}: {exc} ({row})") from exc
        if len(values) != len(completions):
            raise UserError(
                f"reward function `{name}` returned {len(values)} values for {len(completions)} completions"
            )
        out[name] = torch.tensor(
            [float("nan") if v is None else float(v) for v in values], dtype=torch.float32
        )
    return out


def _first_failing_row(
    fn: RewardFn, prompts: list[str], completions: list[str], columns: dict[str, list[Any]], wheres: list[str]
) -> str:
    for i in range(len(completions)):
        try:
            fn(prompts[i : i + 1], completions[i : i + 1], **{k: v[i : i + 1] for k, v in columns.items()})
        except Exception:  # noqa: BLE001
            return f"first failing row: {wheres[i]}"
    return "it failed on the whole batch only"


class RewardModelScorer:
    """A sequence-classification reward model, fed text re-tokenised with its *own* tokenizer and template.

    `path` is a full model folder (or hub id), or the LoRA adapter folder a `stage: rm` run saved: its base is
    loaded as a sequence classifier, the adapter (with the `score` head it saved in full) merged in. The
    tokenizer is the adapter folder's when it has one, else the base's. `model_type` (`reward_model_type`):
    auto reads the folder; full / lora must agree with it."""

    def __init__(
        self,
        path: str,
        dtype: torch.dtype | str = torch.float32,
        trust_remote_code: bool = False,
        model_type: str = "auto",
    ) -> None:
        from transformers import AutoModelForSequenceClassification

        spec = self.spec(path, model_type)
        self.tokenizer = load_tokenizer(path, trust_remote_code)
        self.model = (
            load_spec(
                AutoModelForSequenceClassification,
                spec,
                dtype=dtype,
                num_labels=1,
                trust_remote_code=trust_remote_code,
            )
            .eval()
            .requires_grad_(False)
        )
        self.model.config.pad_token_id = self.tokenizer.pad_token_id

    @staticmethod
    def spec(path: str, model_type: str = "auto") -> Any:
        """The reward model's weights (a `ModelSpec`, every adapter merged), `reward_model_type` checked."""

        if model_type not in ("auto", "full", "lora"):
            raise UserError(
                f"`reward_model_type: {model_type}` is not supported (a reward server, LLaMA-Factory's `api`, "
                "is not); use auto, full or lora, or score with `reward_funcs`"
            )
        adapter = is_adapter(path)
        if model_type == "full" and adapter:
            raise UserError(
                f"`reward_model_type: full` but reward_model {path} is a LoRA adapter folder ({ADAPTER_CONFIG} "
                "in it); set `reward_model_type: lora` (or auto)"
            )
        if model_type == "lora" and not adapter:
            raise UserError(
                f"`reward_model_type: lora` but reward_model {path} is not a LoRA adapter folder (no "
                f"{ADAPTER_CONFIG}); give the adapter folder a LoRA `stage: rm` run saved, or set "
                "`reward_model_type: full` (or auto)"
            )
        if adapter and adapter_task_type(path) not in (None, "SEQ_CLS"):
            raise UserError(
                f"reward_model {path} is a LoRA adapter of task_type {adapter_task_type(path)}, not a reward "
                "model (SEQ_CLS, with a score head); give the adapter a `stage: rm` run saved"
            )
        return resolve_model(path, key="reward_model")

    @torch.no_grad()
    def __call__(
        self, prompts: list[Any], completions: list[str], device: torch.device, batch_size: int = 64
    ) -> torch.Tensor:

        if next(self.model.parameters()).device != device:
            self.model.to(device)
        seqs = []
        for prompt, completion in zip(prompts, completions):
            body: Any = (
                [{"role": "assistant", "content": completion}] if isinstance(prompt, list) else completion
            )
            seqs.append(full_ids(self.tokenizer, prompt, body))
        scores = []
        for i in range(0, len(seqs), batch_size):
            chunk = seqs[i : i + batch_size]
            ids = pad(chunk, self.tokenizer.pad_token_id).to(device)
            mask = pad([[1] * len(s) for s in chunk], 0).to(device)
            scores.append(self.model(input_ids=ids, attention_mask=mask).logits.squeeze(-1).float().cpu())
        return torch.cat(scores)
