"""Iterative DPO (`stage: online_dpo` with `rounds: N`): rounds of sample -> label -> offline DPO, the reference
refreshed to the last round's policy (Xiong et al. 2024, "Iterative preference learning from human feedback";
Snorkel's and Meta's self-rewarding recipes).

Round r (1..N), in `output_dir/round-r/`:
1. `pairs.jsonl`: `num_generations` completions per prompt of `dataset` from the current policy (the rollout
   engine, `temperature` / `top_p` / `max_new_tokens`), scored by the config's rewards, best vs worst kept as
   a pair (`alignkit data sample --keep pairs`; prompts whose samples all score alike give none);
2. `model/`: `stage: dpo` on those pairs, starting from the current policy with it as the frozen reference, for
   the config's `max_steps` / `num_train_epochs` and every DPO key (`loss_type`, `beta`, ...);
3. `round.json` marks the round done (pairs, prompts without a pair, mean scores); the next round starts from
   `round-r/model`.

A rerun resumes by round: a done round is skipped, a round whose pairs exist trains on them (from its newest
checkpoint), a round without them samples again with its own seed (`seed + r`). `output_dir/rounds.json`
sums the rounds up; the last round's model is the result.
"""

from __future__ import annotations

import json
import os
from typing import Any

from alignkit.config import build_config, config_to_dict
from alignkit.data.files import write_json_atomic
from alignkit.generation.best_of_n import SampleSettings, sample_best_of_n
from alignkit.training.checkpoint import list_checkpoints

# keys of the online DPO config that a round's offline DPO does not take
_SAMPLING_KEYS = (
    "rounds", "num_generations", "max_new_tokens", "temperature", "top_p", "top_k", "stop_strings",
    "rollout_backend", "reward_funcs", "reward_weights", "reward_model", "reward_model_type", "format_pattern",
    "length_target", "missing_eos_penalty", "eval_reward_funcs", "metric_for_best_model", "hacking_action",
    "tools", "environment", "max_turns", "tool_timeout", "judge_reward", "judge_base_url", "judge_model",
    "judge_api_key_env", "judge_mode", "judge_max_concurrency", "per_device_eval_batch_size",
)  # fmt: skip


def _sample_round(cfg: Any, policy: str, pairs: str, r: int) -> dict[str, Any]:
    settings = SampleSettings(
        policy,
        cfg.dataset if isinstance(cfg.dataset, str) else ",".join(cfg.dataset),
        pairs,
        n=cfg.num_generations,
        keep="pairs",
        reward_funcs=list(cfg.reward_funcs or []),
        reward_weights=cfg.reward_weights,
        reward_model=cfg.reward_model,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        seed=cfg.seed + r,
        max_samples=cfg.max_samples,
        dataset_dir=cfg.dataset_dir,
    )
    return sample_best_of_n(settings)


def _round_config(cfg: Any, policy: str, pairs: str, out: str) -> Any:
    keys = {k: v for k, v in config_to_dict(cfg).items() if k not in _SAMPLING_KEYS}
    resumable = bool(list_checkpoints(out))
    keys.update(
        stage="dpo",
        model_name_or_path=policy,
        ref_model_name_or_path=policy,  # the reference refreshed to the last round's policy
        dataset=pairs,
        output_dir=out,
        max_samples=None,
        resume_from_checkpoint="auto" if resumable else None,
        overwrite_output_dir=not resumable,  # a round cut short before its first checkpoint restarts
    )
    return build_config(keys, f"round of {cfg.output_dir}")


def train_rounds(cfg: Any, train_one: Any) -> dict[str, Any]:
    """Run (or resume) every round; `train_one(dpo_cfg)` trains one round's DPO and returns (its last record,
    whether it finished); a round stopped midway ends the call there (resume it by running again)."""
    policy, summary, record = cfg.model_name_or_path, [], {}
    for r in range(1, cfg.rounds + 1):
        folder = os.path.join(cfg.output_dir, f"round-{r}")
        done_file = os.path.join(folder, "round.json")
        if os.path.exists(done_file):
            with open(done_file, encoding="utf-8") as fh:
                summary.append(json.load(fh))
            policy = os.path.join(folder, "model")
            continue
        os.makedirs(folder, exist_ok=True)
        pairs = os.path.join(folder, "pairs.jsonl")
        sampled = {} if os.path.exists(pairs) else _sample_round(cfg, policy, pairs, r)
        round_cfg = _round_config(cfg, policy, pairs, os.path.join(folder, "model"))
        record, finished = train_one(round_cfg)
        if not finished:
            return {**record, "model": policy, "stopped_in_round": r}
        done = {"round": r, "policy": policy, **{k: v for k, v in sampled.items() if k != "output"}}
        write_json_atomic(done_file, done)
        summary.append(done)
        policy = round_cfg.output_dir
    write_json_atomic(os.path.join(cfg.output_dir, "rounds.json"), {"rounds": summary, "model": policy})
    return {**record, "model": policy}
