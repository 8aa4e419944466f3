"""`alignkit eval` keys: the same rules as `train` (flat YAML, key=value overrides, unknown keys refused)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from alignkit.config import build_dataclass, read_yaml
from alignkit.errors import UserError

# every metric `eval` knows, in report order; `metrics: [...]` asks for some by name (then a missing input is
# an error rather than a skip)
METRICS = (
    "accuracy",
    "reward_model_score",
    "reward_model_win_rate",
    "judge_win_rate",
    "judge_score",
    "preference_accuracy",
    "reward_model_preference_accuracy",
    "kl",
    "length",
    "refusal_rate",
    "perplexity",
    "lm_eval",
)


@dataclass
class EvalConfig:
    model: str = ""  # model folder, LoRA adapter folder or hub id
    baseline: str | None = None  # compared against: win rates, length ratio; the KL reference by default
    dataset: str | list[str] = ""  # prompts in any format `train` reads (or MT-Bench's question file)
    dataset_format: str = "auto"
    dataset_split: str = "train"
    max_samples: int | None = None  # the first N rows
    output_dir: str = "eval"
    seed: int = 0
    torch_dtype: str = "auto"
    trust_remote_code: bool = False
    batch_size: int = 32
    max_length: int = 2048  # longest sequence scored (preference pairs, perplexity rows)
    # sampling (through the rollout engine); temperature 0 is greedy
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    num_samples: int = 1  # k samples per prompt: pass@k, maj@k, consistency
    stop_strings: list[str] | None = None
    rollout_backend: str = "hf"  # hf | vllm (GPU; pip install "alignkit[vllm]")
    vllm_gpu_memory_utilization: float = 0.8
    # metrics
    metrics: list[str] | None = None  # default: every metric whose inputs exist
    reward_funcs: list[str] | None = None  # task accuracy; default math_accuracy when rows carry `answer`
    reward_model: str | None = None  # score, win rate against the baseline, preference accuracy
    ref_model_name_or_path: str | None = None  # KL and implicit-reward reference; default: the baseline
    beta: float = 0.1  # of the implicit reward beta * log(pi / pi_ref)
    preference_dataset: str | None = None  # held-out pairs; default: `dataset` when its rows are pairs
    perplexity_dataset: str | None = None  # held-out SFT rows; default: `dataset` when its rows are SFT
    refusal_phrases: list[str] | None = None  # default: English and Chinese lists
    judge_base_url: str | None = None  # an OpenAI-compatible endpoint, e.g. https://api.openai.com/v1
    judge_model: str | None = None
    judge_api_key_env: str | None = "OPENAI_API_KEY"
    judge_max_concurrency: int = 8
    judge_max_retries: int = 4  # after the first try, with exponential back-off (1, 2, 4, 8 s)
    lm_eval_tasks: list[str] | None = None  # e.g. [mmlu, ceval-valid]: pip install "alignkit[eval]"
    lm_eval_include_path: str | None = None  # a folder of the user's own lm-eval task YAMLs
    lm_eval_limit: int | None = None
    lm_eval_num_fewshot: int | None = None


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
    if cfg.judge_base_url and not cfg.judge_model:
        raise UserError(f"{source}: `judge_base_url` is set but `judge_model` is not; name the judge model")
    from alignkit.errors import did_you_mean

    for name in cfg.metrics or []:
        if name not in METRICS:
            raise UserError(
                f"{source}: `metrics` names `{name}`, not a metric{did_you_mean(name, METRICS)}; "
                f"known: {', '.join(METRICS)}"
            )


def eval_config(args: argparse.Namespace) -> EvalConfig:
    """The config file (if any), then the flags, then key=value overrides: later wins."""
    config, overrides = args.config, list(args.overrides or [])
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        config, overrides = None, [config, *overrides]  # `alignkit eval key=value ...`
    raw = read_yaml(config)
    flags = {
        "model": args.model,
        "baseline": args.baseline,
        "dataset": args.dataset,
        "max_samples": args.max_samples,
        "output_dir": args.output_dir,
    }
    raw.update({k: v for k, v in flags.items() if v is not None})
    raw.update(read_yaml(None, overrides))
    source = config or "command line"
    cfg = build_dataclass(EvalConfig, raw, source, "for `alignkit eval`")
    validate(cfg, source)
    return cfg
