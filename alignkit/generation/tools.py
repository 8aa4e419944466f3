"""Multi-turn, tool-using rollouts: the model writes, its tool calls run, their results come back as tool turns,
up to `max_turns` model turns; then the whole conversation is one training sequence whose loss falls on the
model's own tokens only (the assistant spans of the chat template; tool results and headers are masked).

- Tools are Python functions: their JSON schemas come from the signature and the Google-style docstring
  (transformers' `get_json_schema`), and the chat template renders them in its own tool format.
- A call is read from the model's text in any of the formats alignkit's templates write (`parse_tool_calls`):
  Qwen / Hermes `<tool_call>{json}</tool_call>`, Mistral `[TOOL_CALLS][...]`, LLaMA-Factory's default
  `Action: name` / `Action Input: {json}`, and Llama 3's bare `{"name": ..., "parameters": ...}`.
- A malformed call, an unknown tool, a tool that raises or one that runs past `tool_timeout` becomes an error
  observation the model reads on its next turn; the run goes on.
- Any task that is not a set of tools is an `Environment`: `reset(row) -> messages` and
  `step(messages) -> (observation messages, reward or None, done)`; tools are one such environment.

The conversation is re-tokenised with the chat template for training (as verl and TRL do), so the trained
tokens are the template's rendering of the model's text: where a tokenizer would split the same text another
way, the trained tokens differ slightly from the sampled ones (the trainer recomputes its own log-probs).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Protocol

from alignkit.data.batches import encode_sft, tokenize_chat
from alignkit.data.formats import Example
from alignkit.errors import UserError
from alignkit.generation.rewards import load_user_function
from alignkit.generation.rollout import Samples

Messages = list[dict[str, Any]]


class Environment(Protocol):
    def reset(self, row: dict[str, Any]) -> Messages: ...

    def step(self, messages: Messages) -> tuple[Messages, float | None, bool]: ...


class ToolCallError(ValueError):
    """The model's text holds a tool call that cannot be read."""


_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
_ACTION = re.compile(r"Action:\s*([^\n]+?)\s*\nAction Input:\s*(.*?)(?=\nAction:|$)", re.S)


def _call(obj: Any) -> dict[str, Any]:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        raise ToolCallError(f"a tool call needs a name: {json.dumps(obj)[:120]}")
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError as exc:
            raise ToolCallError(f"arguments of `{obj['name']}` are not JSON: {args[:120]!r}") from exc
    if not isinstance(args, dict):
        raise ToolCallError(
            f"arguments of `{obj['name']}` must be a JSON object, got {json.dumps(args)[:120]}"
        )
    return {"name": obj["name"], "arguments": args}


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ToolCallError(f"the tool call is not valid JSON: {text[:120]!r}") from exc


def parse_tool_calls(text: str) -> list[dict[str, Any]]:
    """The tool calls in a model's text ([] when it calls none): each {"name", "arguments": dict}.
    A call that is there but cannot be read raises ToolCallError."""
    if "<tool_call>" in text:
        return [_call(_json(body)) for body in _TAGGED.findall(text)]
    if "[TOOL_CALLS]" in text:
        calls = _json(text.split("[TOOL_CALLS]", 1)[1].strip())
        return [_call(c) for c in (calls if isinstance(calls, list) else [calls])]
    if "Action:" in text and "Action Input:" in text:
        return [_call({"name": n.strip(), "arguments": a.strip()}) for n, a in _ACTION.findall(text)]
    stripped = text.strip()
    if stripped.startswith(("{", "[")) and '"name"' in stripped:  # Llama 3: a bare JSON call (or a list)
        calls = _json(stripped)
        return [_call(c) for c in (calls if isinstance(calls, list) else [calls])]
    return []


def tool_schema(fn: Callable[..., Any]) -> dict[str, Any]:
    """The JSON schema of a Python function ({"type": "function", "function": {...}}), from its type hints and
    its Google-style docstring (transformers' `get_json_schema`); a clear error where they are missing."""
    from transformers.utils import get_json_schema

    try:
        return get_json_schema(fn)
    except Exception as exc:  # noqa: BLE001 - transformers raises its own error types for bad docstrings
        name = getattr(fn, "__name__", repr(fn))
        raise UserError(
            f"tool `{name}`: cannot make its JSON schema ({exc}); give every argument a type hint and a "
            "Google-style docstring with an `Args:` line for each"
        ) from exc


@dataclass
class ToolEnvironment:
    """Tools as an environment: the row's prompt, then one tool turn per model turn that calls tools."""

    tools: dict[str, Callable[..., Any]]
    timeout: float = 10.0
    errors: int = 0  # error observations given (malformed calls, unknown tools, raising or slow tools)

    def reset(self, row: dict[str, Any]) -> Messages:
        prompt = row["prompt"]
        return list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]

    def step(self, messages: Messages) -> tuple[Messages, float | None, bool]:
        try:
            calls = parse_tool_calls(messages[-1]["content"])
        except ToolCallError as exc:
            self.errors += 1
            return [{"role": "tool", "content": f"error: {exc}"}], None, False
        if not calls:
            return [], None, True  # an answer, not a call: the episode ends
        return [{"role": "tool", "name": c["name"], "content": self._run(c)} for c in calls], None, False

    def _run(self, call: dict[str, Any]) -> str:
        fn = self.tools.get(call["name"])
        if fn is None:
            self.errors += 1
            return f"error: there is no tool `{call['name']}`; tools: {', '.join(self.tools)}"
        pool = ThreadPoolExecutor(1, thread_name_prefix=f"tool-{call['name']}")
        try:
            result = pool.submit(fn, **call["arguments"]).result(timeout=self.timeout)
        except FutureTimeout:
            self.errors += 1
            return f"error: tool `{call['name']}` did not answer within {self.timeout:g} s"
        except Exception as exc:  # noqa: BLE001 - the tool is the user's: its failure is an observation
            self.errors += 1
            return f"error: tool `{call['name']}` raised {type(exc).__name__}: {exc}"
        finally:
            pool.shutdown(wait=False)  # a tool past its timeout keeps its thread; the rollout goes on
        return result if isinstance(result, str) else json.dumps(result)


@dataclass
class Episode:
    """One conversation: the first `n_prompt` messages are the prompt, the rest the model's turns and the
    observations; `reward` sums the environment's rewards (None when it gave none)."""

    messages: Messages
    n_prompt: int
    reward: float | None = None
    done: bool = False
    truncated: bool = False  # a model turn hit max_new_tokens, or the turns ran out before an answer
    turns: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def answer(self) -> str:
        """The model's last message: what the reward functions score."""
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "assistant"), "")


def run_episodes(
    sample: Callable[[list[list[int]]], Any],
    tokenizer: Any,
    rows: list[dict[str, Any]],
    make_env: Callable[[], Environment],
    max_turns: int,
    schemas: list[dict] | None,
) -> list[Episode]:
    """Play every row's episode to its end or to `max_turns` model turns. `sample(contexts)` draws one
    completion per context (token ids of the conversation so far, with the generation prompt) and returns
    the rollout engine's `Samples`; all episodes still going take one turn together."""
    envs = [make_env() for _ in rows]
    episodes = []
    for env, row in zip(envs, rows):
        messages = env.reset(row)
        episodes.append(Episode(messages, len(messages)))
    for turn in range(max_turns):
        live = [i for i, e in enumerate(episodes) if not e.done]
        if not live:
            break
        contexts = [tokenize_chat(tokenizer, episodes[i].messages, True, schemas) for i in live]
        drawn = sample(contexts)
        for j, i in enumerate(live):
            ep = episodes[i]
            ep.messages.append({"role": "assistant", "content": drawn.texts[j]})
            ep.turns += 1
            if drawn.truncated[j]:
                ep.done = ep.truncated = True
                continue
            observation, reward, done = envs[i].step(ep.messages)
            if reward is not None:
                ep.reward = (ep.reward or 0.0) + reward
            ep.messages.extend(observation)
            ep.done = done or not observation
            ep.truncated = not ep.done and turn == max_turns - 1  # the turns ran out mid-task
    for env, ep in zip(envs, episodes):
        ep.extra["tool_errors"] = getattr(env, "errors", 0)
    return episodes


def episode_tokens(
    ep: Episode, tokenizer: Any, schemas: list[dict] | None, max_length: int
) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, completion ids, completion mask): the conversation through the chat template, cut where the
    model's first turn starts; the mask is 1 on the model's own tokens, 0 on observations; at most max_length."""
    prompt, rest = ep.messages[: ep.n_prompt], ep.messages[ep.n_prompt :]
    encoded = encode_sft(Example(prompt=prompt, completion=rest, tools=schemas), tokenizer)
    ids, mask = encoded["input_ids"][:max_length], encoded["completion_mask"][:max_length]
    first = mask.index(1) if 1 in mask else len(ids)
    return ids[:first], ids[first:], mask[first:]


def build_environment(
    tools: list[str] | None, environment: str | None, timeout: float
) -> tuple[Callable[[], Environment], list[dict] | None]:
    """(a factory of one environment per episode, the tool schemas the chat template is given)."""
    if environment:
        factory = load_user_function(environment, "environment")
        probe = factory()
        if not (callable(getattr(probe, "reset", None)) and callable(getattr(probe, "step", None))):
            raise UserError(
                f"environment `{environment}`: {environment}() must return an object with reset(row) -> messages "
                "and step(messages) -> (observation messages, reward or None, done)"
            )
        return factory, getattr(probe, "tool_schemas", None)
    funcs = {
        getattr(fn, "__name__", spec): fn for spec in tools or [] for fn in [load_user_function(spec, "tool")]
    }
    schemas = [tool_schema(fn) for fn in funcs.values()]
    return (lambda: ToolEnvironment(funcs, timeout)), schemas


@dataclass
class EpisodeSamples(Samples):
    """Samples made of whole episodes: the completion holds the model's turns and the observations between
    them, `completion_masks` marks the model's tokens; `texts` are the last answers (what rewards score)."""

    completion_masks: list[list[int]] | None = None
    env_rewards: list[float | None] | None = None
    turns: list[int] | None = None
    tool_errors: list[int] | None = None

    @staticmethod
    def from_episodes(
        episodes: list[Episode], tokenizer: Any, schemas: list[dict] | None, max_length: int
    ) -> EpisodeSamples:
        tokens = [episode_tokens(ep, tokenizer, schemas, max_length) for ep in episodes]
        return EpisodeSamples(
            prompt_ids=[t[0] for t in tokens],
            completion_ids=[t[1] for t in tokens],
            truncated=[ep.truncated for ep in episodes],
            texts=[ep.answer for ep in episodes],
            logprobs=None,  # several sampling passes with observations between: none to compare with
            completion_masks=[t[2] for t in tokens],
            env_rewards=[ep.reward for ep in episodes],
            turns=[ep.turns for ep in episodes],
            tool_errors=[ep.extra["tool_errors"] for ep in episodes],
        )

    def select(self, index: list[int]) -> EpisodeSamples:
        return EpisodeSamples(*(None if v is None else [v[i] for i in index] for v in self._lists()))

    @staticmethod
    def concat(parts: list[Samples]) -> EpisodeSamples:
        lists = [p._lists() for p in parts]
        return EpisodeSamples(
            *(None if any(x is None for x in col) else [v for x in col for v in x] for col in zip(*lists))
        )

    def _lists(self) -> list[list | None]:
        return [getattr(self, f.name) for f in dataclasses.fields(self)]
