"""Best-of-n and rejection sampling (`alignkit data sample`): n completions per prompt through the rollout
engine, scored by the online stages' scorers (reward functions, a reward model, the LLM judge; weighted), kept
as training rows that `stage: sft` or `stage: dpo` read unchanged:

- `keep: best`  the highest-scoring completion per prompt as an SFT row (with `threshold`: only if it reaches it);
- `keep: above` every completion scoring at least `threshold` as an SFT row (rejection sampling);
- `keep: pairs` best vs worst per prompt as a DPO pair (prompts whose samples all score the same give none).

The report says how many prompts had no acceptable sample, and the mean score of the kept rows against the mean
of all samples (the lift best-of-n buys before any training). A sample no scorer could score (the judge's
verdict did not parse and nothing else scores it) is never kept; the report counts them (`unscored`).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from alignkit.config import OnlineConfig
from alignkit.config.stages import JUDGE_REWARDS
from alignkit.data.files import write_jsonl_atomic
from alignkit.data.formats import Example, load_examples
from alignkit.errors import UserError
from alignkit.generation.judge_reward import build_judge_reward
from alignkit.generation.rewards import RewardModelScorer, build_reward_funcs, check_columns, score
from alignkit.generation.rollout import Samples, encode_prompts, sample_hf
from alignkit.modeling.load import default_device as device
from alignkit.modeling.load import load_causal_lm

log = logging.getLogger("alignkit")


KEEP = ("best", "above", "pairs")


@dataclass
class SampleSettings:
    """What `alignkit data sample` takes (the rollout keys and reward keys of the online stages)."""

    model: str
    dataset: str
    output: str
    n: int = 8
    keep: str = "best"
    threshold: float | None = None
    reward_funcs: list[str] = field(default_factory=list)
    reward_weights: list[float] | None = None
    reward_model: str | None = None
    # the LLM judge as a scorer, as the online stages' `judge_reward` (grade | pairwise within a prompt's samples)
    judge_reward: str | None = None
    judge_base_url: str | None = None
    judge_model: str | None = None
    judge_api_key_env: str | None = "OPENAI_API_KEY"
    judge_mode: str = "verdict"  # verdict | logprobs
    judge_max_concurrency: int = 8
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    batch_size: int = 8  # prompts per sampling pass
    seed: int = 0
    max_samples: int | None = None  # the first prompts only
    dataset_dir: str | None = None
    torch_dtype: str = "auto"

    def check(self) -> None:
        if self.keep not in KEEP:
            raise UserError(f"--keep {self.keep}: choose one of {', '.join(KEEP)}")
        if self.keep == "above" and self.threshold is None:
            raise UserError(
                "--keep above keeps every completion scoring at least --threshold: give --threshold"
            )
        if self.n < (2 if self.keep == "pairs" else 1):
            raise UserError(f"--n {self.n}: sample at least {2 if self.keep == 'pairs' else 1} per prompt")
        if not self.reward_funcs and not self.reward_model and not self.judge_reward:
            raise UserError(
                "give --reward-funcs (e.g. exact_match), --reward-model and/or --judge-reward to score the samples"
            )
        self._check_judge()
        n_scores = len(self.reward_funcs) + (1 if self.reward_model else 0) + (1 if self.judge_reward else 0)
        if self.reward_weights is not None and len(self.reward_weights) != n_scores:
            raise UserError(f"--reward-weights has {len(self.reward_weights)} values for {n_scores} scorers")
        if self.temperature <= 0 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise UserError("--temperature must be > 0, --batch-size and --max-new-tokens >= 1")

    def _check_judge(self) -> None:
        if self.judge_reward is None:
            return
        if self.judge_reward not in JUDGE_REWARDS:
            raise UserError(f"--judge-reward {self.judge_reward}: choose one of {', '.join(JUDGE_REWARDS)}")
        if self.judge_mode not in ("verdict", "logprobs"):
            raise UserError(f"--judge-mode {self.judge_mode}: choose verdict or logprobs")
        if not (self.judge_base_url and self.judge_model):
            raise UserError(
                "--judge-reward needs --judge-base-url (an OpenAI-compatible endpoint, e.g. an `alignkit serve` at "
                "http://127.0.0.1:8000/v1) and --judge-model"
            )

    @property
    def output_dir(self) -> str:
        """Where the judge's verdict cache goes (judge_cache.sqlite): beside the output."""
        return os.path.dirname(os.path.abspath(self.output))


def _completion(ex: Example, text: str) -> Any:
    return text if isinstance(ex.prompt, str) else [{"role": "assistant", "content": text}]


def _rows(ex: Example, texts: list[str], scores: list[float], s: SampleSettings) -> list[dict]:
    """The rows one prompt's samples give under `s.keep` (none when no sample is acceptable)."""
    scored = [i for i in range(len(texts)) if not math.isnan(scores[i])]  # unscored samples are never kept
    if not scored:
        return []
    order = sorted(scored, key=lambda i: -scores[i])  # stable: the earliest of equal scores first
    best, worst = order[0], order[-1]
    extra = dict(ex.extra)
    if s.keep == "pairs":
        if scores[best] == scores[worst]:
            return []
        chosen, rejected = _completion(ex, texts[best]), _completion(ex, texts[worst])
        return [{"prompt": ex.prompt, "chosen": chosen, "rejected": rejected, **extra}]
    kept = [best] if s.keep == "best" else order
    if s.threshold is not None:
        kept = [i for i in kept if scores[i] >= s.threshold]
    return [
        {"prompt": ex.prompt, "completion": _completion(ex, texts[i]), "score": scores[i], **extra}
        for i in kept
    ]


def _scorer(s: SampleSettings, columns: set[str]) -> Any:
    # the built-in `format` and `length` rewards take the online stages' defaults
    funcs = build_reward_funcs(s.reward_funcs, OnlineConfig.format_pattern, OnlineConfig.length_target, {})
    check_columns(funcs, columns, f"dataset {s.dataset}")
    rm = RewardModelScorer(s.reward_model) if s.reward_model else None
    judge = build_judge_reward(s)
    weights = torch.tensor(s.reward_weights or [1.0] * (len(funcs) + (1 if rm else 0) + (1 if judge else 0)))

    def total(examples: list[Example], samples: Samples, prompt_texts: list[str]) -> list[float]:
        per = [ex for ex in examples for _ in range(s.n)]
        cols = {k: [ex.extra.get(k) for ex in per] for k in columns}
        parts = score(funcs, prompt_texts, samples.texts, cols, [ex.where for ex in per])
        if rm is not None:
            parts["reward_model"] = rm([ex.prompt for ex in per], samples.texts, torch.device(device())).cpu()
        if judge is not None:  # NaN where the verdict did not parse: the other scorers decide, or none
            parts["judge"] = judge([ex.prompt for ex in per], samples.texts, s.n)
        weighted = torch.stack(list(parts.values()), dim=1) * weights
        total = torch.nansum(weighted, dim=1)
        total[torch.isnan(weighted).all(dim=1)] = math.nan  # nothing scored it
        return total.tolist()

    return total


def sample_best_of_n(s: SampleSettings) -> dict[str, Any]:
    """Sample, score, keep and write `s.output`; return the report."""
    s.check()
    examples = load_examples(s.dataset, dataset_dir=s.dataset_dir)[: s.max_samples]
    if not examples:
        raise UserError(f"{s.dataset}: no rows to sample from")
    model, tok = load_causal_lm(s.model, s.torch_dtype, device=device())
    total = _scorer(s, set(examples[0].extra))
    torch.manual_seed(s.seed)
    rows, empty, all_scores, kept_scores = [], 0, [], []
    for start in range(0, len(examples), s.batch_size):
        batch = examples[start : start + s.batch_size]
        prompt_ids = encode_prompts(tok, [ex.prompt for ex in batch])
        samples = sample_hf(model, tok, prompt_ids, s.n, s.max_new_tokens, s.temperature, s.top_p, s.top_k)
        prompt_texts = [tok.decode(p, skip_special_tokens=True) for p in samples.prompt_ids]
        scores = total(batch, samples, prompt_texts)
        all_scores += scores
        for i, ex in enumerate(batch):
            got = _rows(ex, samples.texts[i * s.n : (i + 1) * s.n], scores[i * s.n : (i + 1) * s.n], s)
            empty += not got
            rows += got
            kept_scores += [r["score"] for r in got if "score" in r]
        log.info("sampled %d of %d prompts", min(start + s.batch_size, len(examples)), len(examples))
    unscored = sum(math.isnan(x) for x in all_scores)
    all_scores = [x for x in all_scores if not math.isnan(x)]
    if not rows:
        raise UserError(
            f"no prompt of {len(examples)} had an acceptable sample (keep: {s.keep}, threshold: {s.threshold}); "
            "nothing written: lower --threshold, raise --n, or check the reward functions"
        )
    write_jsonl_atomic(s.output, rows)
    return {
        "output": s.output,
        "prompts": len(examples),
        "samples": len(all_scores),
        "rows": len(rows),
        "prompts_without_acceptable_sample": empty,
        "unscored": unscored,
        "mean_score": sum(all_scores) / len(all_scores),
        "mean_kept_score": sum(kept_scores) / len(kept_scores) if kept_scores else None,
        "keep": s.keep,
        "format": "pair" if s.keep == "pairs" else "sft",
    }
