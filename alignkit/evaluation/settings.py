"""The keys of `alignkit eval` (`EvalConfig`): a plain dataclass that imports nothing of the evaluation package,
so every part of it can read the type. Validation and loading are `alignkit.evaluation.config`'s."""

from __future__ import annotations

from dataclasses import dataclass


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
    metrics: list[str] | None = None  # default: every metric whose inputs exist (evaluation.registry's)
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
    judge_max_unparsable: float = 0.5  # share of a metric's verdicts that may fail to parse (left out)
    judge_mode: str = "verdict"  # verdict ([[A]], Rating: [[5]]) | logprobs (one token's log-probs)
    lm_eval_tasks: list[str] | None = None  # e.g. [mmlu, ceval-valid]: pip install "alignkit[eval]"
    lm_eval_include_path: str | None = None  # a folder of the user's own lm-eval task YAMLs
    lm_eval_limit: int | None = None
    lm_eval_num_fewshot: int | None = None
