"""`alignkit eval` keys: the same rules as `train` (flat YAML, key=value overrides, unknown keys refused)."""

from __future__ import annotations

from typing import Any

from alignkit.config import build_dataclass
from alignkit.errors import UserError, did_you_mean
from alignkit.evaluation.registry import names
from alignkit.evaluation.settings import EvalConfig

__all__ = ["EvalConfig", "build_eval_config", "validate"]


def validate(cfg: EvalConfig, source: str) -> None:
    if not cfg.model:
        raise UserError(f"{source}: `model` is not set; give --model DIR or `model:` in the config")
    if not cfg.dataset and not cfg.lm_eval_tasks:
        raise UserError(f"{source}: `dataset` is not set; give --dataset FILE or `dataset:` in the config")
    for key in ("num_samples", "max_new_tokens", "batch_size", "judge_max_concurrency"):
        if getattr(cfg, key) < 1:
            raise UserError(f"{source}: `{key}` must be at least 1 (got {getattr(cfg, key)})")
    if cfg.max_samples is not None and cfg.max_samples < 1:
        raise UserError(f"{source}: `max_samples` must be at least 1 (got {cfg.max_samples})")
    if cfg.rollout_backend not in ("hf", "vllm"):
        raise UserError(f"{source}: `rollout_backend` is hf or vllm, got {cfg.rollout_backend!r}")
    if cfg.temperature < 0:
        raise UserError(f"{source}: `temperature` must be >= 0 (0 is greedy), got {cfg.temperature}")
    if cfg.num_samples > 1 and cfg.temperature == 0:
        raise UserError(
            f"{source}: num_samples: {cfg.num_samples} with temperature 0 samples the same greedy answer "
            "k times; set a temperature (e.g. 0.7) for pass@k, maj@k and consistency"
        )
    if not 0 <= cfg.judge_max_unparsable <= 1:
        raise UserError(
            f"{source}: `judge_max_unparsable` is a share of the verdicts, from 0 (stop at the first reply "
            f"that does not parse) to 1 (never stop), got {cfg.judge_max_unparsable}"
        )
    if cfg.judge_mode not in ("verdict", "logprobs"):
        raise UserError(
            f"{source}: `judge_mode` is verdict (the judge writes [[A]] or Rating: [[5]]) or logprobs (read "
            f"from its first token's log-probabilities), got {cfg.judge_mode!r}"
        )
    if cfg.judge_base_url and not cfg.judge_model:
        raise UserError(f"{source}: `judge_base_url` is set but `judge_model` is not; name the judge model")
    known = names()
    for name in cfg.metrics or []:
        if name not in known:
            raise UserError(
                f"{source}: `metrics` names `{name}`, not a metric{did_you_mean(name, known)}; "
                f"known: {', '.join(known)}"
            )


def build_eval_config(raw: dict[str, Any], source: str) -> EvalConfig:
    """An EvalConfig from flat keys (a YAML file's, flags, overrides), checked: unknown keys and impossible
    values are UserErrors naming them."""
    cfg = build_dataclass(EvalConfig, raw, source, "for `alignkit eval`")
    validate(cfg, source)
    return cfg
