"""The LLM judge as a reward for the online stages: one more scorer beside reward functions and reward models.

- `judge_reward: grade`: each completion graded 1-10 in its conversation, the reward (grade - 1) / 9 in [0, 1];
- `judge_reward: pairwise`: within each group of samples of one prompt, every pair judged in both orders; a
  sample's reward is its share of wins (a tie half) against the others of its group, in [0, 1].

A verdict that does not parse gives that sample no judge reward (NaN: the stage's weighted sum leaves it out)
and is counted (`rewards/judge/unparsable`); training never stops on them. Verdicts are cached in
`output_dir/judge_cache.sqlite` and asked concurrently (`judge_max_concurrency`); any OpenAI-compatible
endpoint works, an `alignkit serve` of another model included (`judge_mode: logprobs` for a small one).
"""

from __future__ import annotations

import itertools
import math
import os
from typing import Any

import torch

from alignkit.generation.judge import Judge, api_key_from_env

DEFAULT_KEY_ENV = "OPENAI_API_KEY"


def judge_api_key(env_name: str | None) -> str | None:
    """The key from `env_name`; the default variable may be unset (a local endpoint without a key), a variable
    the user named must be set."""
    if env_name == DEFAULT_KEY_ENV and not os.environ.get(env_name):
        return None
    return api_key_from_env(env_name)


def _conversation(prompt: Any, completion: str) -> list[dict]:
    messages = list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
    return [*messages, {"role": "assistant", "content": completion}]


class JudgeReward:
    """Rewards (N,) for N = prompts x group completions from an LLM judge; `unparsable` counts the last call's
    samples left without a judge reward."""

    def __init__(self, judge: Judge, kind: str) -> None:
        self.judge, self.kind, self.unparsable = judge, kind, 0

    def __call__(self, prompts: list[Any], completions: list[str], group: int) -> torch.Tensor:
        conversations = [_conversation(p, c) for p, c in zip(prompts, completions)]
        if self.kind == "grade":
            grades = self.judge.grade(conversations, max_unparsable=1.0)
            values = [math.nan if g is None else (g - 1.0) / 9.0 for g in grades]
        else:
            values = self._pairwise(conversations, group)
        self.unparsable = sum(math.isnan(v) for v in values)
        return torch.tensor(values, dtype=torch.float32)

    def _pairwise(self, conversations: list[list[dict]], group: int) -> list[float]:
        pairs = [
            (start + i, start + j)
            for start in range(0, len(conversations), group)
            for i, j in itertools.combinations(range(group), 2)
        ]
        if not pairs:  # a group of one has nobody to be compared with
            return [math.nan] * len(conversations)
        verdicts = self.judge.pairwise(
            [conversations[i] for i, _ in pairs], [conversations[j] for _, j in pairs], max_unparsable=1.0
        )
        wins: list[list[float]] = [[] for _ in conversations]
        for (i, j), v in zip(pairs, verdicts):
            if v["verdict"] is None:
                continue
            share = {"a": 1.0, "tie": 0.5, "b": 0.0}[v["verdict"]]
            wins[i].append(share)
            wins[j].append(1.0 - share)
        return [sum(w) / len(w) if w else math.nan for w in wins]


def build_judge_reward(cfg: Any) -> JudgeReward | None:
    """The judge reward a config asks for (`judge_reward`), or None."""
    if not cfg.judge_reward:
        return None
    judge = Judge(
        cfg.judge_base_url or "",
        cfg.judge_model or "",
        judge_api_key(cfg.judge_api_key_env),
        cache_path=os.path.join(cfg.output_dir, "judge_cache.sqlite"),
        max_concurrency=cfg.judge_max_concurrency,
        api_key_env=cfg.judge_api_key_env,
        mode=cfg.judge_mode,
    )
    return JudgeReward(judge, cfg.judge_reward)
