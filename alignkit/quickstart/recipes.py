"""The quickstart's recipes: each method's data and training keys, one runner per row of its table.

Every runner takes the run's `Context` and returns the trained model's folder; each method after SFT starts
from the SFT model. Runs go through `alignkit compare`'s resumable training, so a re-run in the same folder
reuses every run whose resolved config and input files are unchanged.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from alignkit.comparison.runs import train_method
from alignkit.generation.best_of_n import SampleSettings, sample_best_of_n
from alignkit.losses.unpaired import kto_weights
from alignkit.quickstart.task import (
    ADD_TOOL,
    Split,
    preference_rows,
    prompt_rows,
    sft_rows,
    tool_sft_rows,
    unpaired_rows,
)

log = logging.getLogger("alignkit")


@dataclass
class Context:
    output_dir: str
    seed: int
    split: Split
    base_model: str
    sft_model: str = ""
    reward_model: str = ""
    data: dict[str, str] = field(default_factory=dict)  # data files written by this run, by name
    train_wall_s: float = 0.0  # training seconds of every run so far (a reused run's from when it trained)


def _write_jsonl(path: str, rows: list[dict]) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def _train(ctx: Context, name: str, keys: dict[str, Any]) -> str:
    """Train through compare's resumable path: a re-run in the same folder reuses every run whose resolved
    config and input files (data, starting model) are unchanged."""
    out = os.path.join(ctx.output_dir, name)
    common = {
        "disable_tqdm": not sys.stderr.isatty(),  # progress bars in an interactive terminal only
        "output_dir": out,
        "seed": ctx.seed,
        "logging_steps": 20,
        "max_length": 64,
        "plot_loss": True,
        "torch_dtype": "float32",
        # the loop-per-tensor AdamW the 8-seed study (README) was made with; the fused default computes the
        # same update to float rounding, which over these runs is enough to move single-seed results
        "optim": "adamw_torch",
        "overwrite_output_dir": True,  # the quickstart owns its folder and re-runs in place
    }
    result = train_method({**common, **keys}, source=f"quickstart {name}")
    ctx.train_wall_s += result.wall_s
    return result.run_dir


def run_sft(ctx: Context) -> str:
    data = _write_jsonl(
        os.path.join(ctx.output_dir, "data", "sft.jsonl"),
        sft_rows(ctx.split.train, n=6000, carry_error_rate=0.6, seed=ctx.seed),
    )
    ctx.sft_model = _train(
        ctx,
        "sft",
        {
            "stage": "sft",
            "model_name_or_path": ctx.base_model,
            "dataset": data,
            "learning_rate": 1e-3,
            "per_device_train_batch_size": 64,
            "num_train_epochs": 8,
            "warmup_ratio": 0.05,
            "lr_scheduler_type": "cosine",
            "weight_decay": 0.0,
        },
    )
    return ctx.sft_model


def from_sft(ctx: Context, name: str, data: str, keys: dict[str, Any]) -> str:
    if not ctx.sft_model:
        run_sft(ctx)
    common = {
        "model_name_or_path": ctx.sft_model,
        "dataset": data,
        "per_device_train_batch_size": 32,
        "max_steps": 100,
        "learning_rate": 3e-5,
        "lr_scheduler_type": "constant_with_warmup",
        "warmup_steps": 5,
    }
    return _train(ctx, name, {**common, **keys})


def monitored(ctx: Context, keys: dict[str, Any]) -> dict[str, Any]:
    """An online recipe with its held-out evaluation: the validation prompts, scored by the exact answer every
    fifth of the run, so the reward-hacking monitor compares the training reward with held-out accuracy."""
    data = data_file(
        ctx, "validation_prompts", lambda: prompt_rows(ctx.split.validation, n=300, seed=ctx.seed + 4)
    )
    return {
        **keys,
        "eval_dataset": data,
        "eval_steps": max(keys["max_steps"] // 5, 1),
        "eval_reward_funcs": ["exact_match"],
        "per_device_eval_batch_size": 150,
    }


def data_file(ctx: Context, name: str, make: Callable[[], list[dict]]) -> str:
    """A data file of this run, written once per run (a re-run in the same folder, with another seed, rewrites
    it rather than reusing the last run's)."""
    if name not in ctx.data:
        ctx.data[name] = _write_jsonl(os.path.join(ctx.output_dir, "data", f"{name}.jsonl"), make())
    return ctx.data[name]


def pairs_file(ctx: Context) -> str:
    return data_file(ctx, "pairs", lambda: preference_rows(ctx.split.train, n=3200, seed=ctx.seed + 1))


def run_dpo(ctx: Context) -> str:
    """DPO with the NLL of the chosen answer added (RPO, Pang et al. 2024); pure DPO is a control below."""
    return from_sft(
        ctx,
        "dpo",
        pairs_file(ctx),
        {"stage": "dpo", "loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 1.0], "beta": 0.1},
    )


def run_kto(ctx: Context) -> str:
    """KTO on an imbalanced unpaired set (1 desirable : 4 undesirable), weighted to the top of the paper's range."""
    rows = unpaired_rows(ctx.split.train, n=3200, desirable_share=0.2, seed=ctx.seed + 2)
    data = _write_jsonl(os.path.join(ctx.output_dir, "data", "kto.jsonl"), rows)
    n_d = sum(r["label"] for r in rows)
    w_d, w_u, why = kto_weights(n_d, len(rows) - n_d, target=4 / 3)
    log.info("quickstart kto: %s", why)
    return from_sft(
        ctx, "kto", data, {"stage": "kto", "beta": 2.0, "desirable_weight": w_d, "undesirable_weight": w_u}
    )


def run_simpo(ctx: Context) -> str:
    """SimPO plus the chosen NLL (as CPO-SimPO); reference-free."""
    return from_sft(
        ctx,
        "simpo",
        pairs_file(ctx),
        {
            "stage": "dpo",
            "loss_type": ["simpo", "sft"],
            "loss_weights": [1.0, 1.0],
            "beta": 2.0,
            "simpo_gamma": 0.5,
        },
    )


def run_orpo(ctx: Context) -> str:
    return from_sft(ctx, "orpo", pairs_file(ctx), {"stage": "dpo", "loss_type": "orpo", "orpo_beta": 0.5})


def run_grpo(ctx: Context) -> str:
    """GRPO with the exact-answer reward: 8 samples per prompt, group-relative advantages, no reference."""
    return from_sft(
        ctx,
        "grpo",
        prompts_file(ctx),
        monitored(
            ctx,
            {
                "stage": "grpo",
                "reward_funcs": ["exact_match"],
                "num_generations": 8,
                "per_device_train_batch_size": 16,
                "max_new_tokens": 5,
                "max_steps": 60,
                "learning_rate": 2e-5,
                "logging_steps": 10,
            },
        ),
    )


def prompts_file(ctx: Context) -> str:
    return data_file(ctx, "prompts", lambda: prompt_rows(ctx.split.train, n=4000, seed=ctx.seed + 3))


PPO_KEYS = {
    "stage": "ppo",
    "per_device_train_batch_size": 64,
    "max_new_tokens": 5,
    "max_steps": 160,
    "ppo_epochs": 4,
    "num_mini_batches": 2,
    "whiten_rewards": True,  # the reward model's scale (margins of 5-10) would otherwise swamp the KL term
    "init_kl_coef": 0.5,
    "learning_rate": 2e-5,
    "logging_steps": 16,
}


def train_reward_model(ctx: Context) -> str:
    """A reward model (`stage: rm`) on the task's pairs, once per run (PPO and its control share it)."""
    if not ctx.reward_model:
        if not ctx.sft_model:
            run_sft(ctx)
        keys = {
            "stage": "rm",
            "model_name_or_path": ctx.sft_model,
            "dataset": pairs_file(ctx),
            "per_device_train_batch_size": 32,
            # 12 passes over the pairs: at 400 steps the reward model was still on its plateau on some seeds
            # (fitting 59-70% of its pairs), and PPO against it lifted by as little as +0.03 (validation)
            "max_steps": 1200,
            "learning_rate": 3e-4,
            "lr_scheduler_type": "constant_with_warmup",
            "warmup_steps": 5,
            "logging_steps": 50,
        }
        ctx.reward_model = _train(ctx, "rm", keys)
    return ctx.reward_model


def run_ppo(ctx: Context) -> str:
    """Classic RLHF: a reward model trained on the task's pairs (`stage: rm`), then PPO against it, the critic
    starting from the reward model, a KL penalty to the SFT model."""
    keys = {**PPO_KEYS, "reward_model": train_reward_model(ctx)}
    return from_sft(ctx, "ppo", prompts_file(ctx), monitored(ctx, keys))


def run_ppo_weak_kl(ctx: Context) -> str:
    """Control: the same PPO with a tenth of the KL penalty."""
    keys = {**PPO_KEYS, "reward_model": train_reward_model(ctx), "init_kl_coef": 0.05}
    return from_sft(ctx, "ppo_weak_kl", prompts_file(ctx), monitored(ctx, keys))


def run_ppo_verifiable(ctx: Context) -> str:
    """The same PPO with the exact-answer reward in place of the reward model."""
    keys = {**PPO_KEYS, "reward_funcs": ["exact_match"]}
    return from_sft(ctx, "ppo_verifiable", prompts_file(ctx), monitored(ctx, keys))


def run_online_dpo(ctx: Context) -> str:
    """Online DPO with the exact-answer reward: 4 samples per prompt, the best vs the worst as the pair."""
    keys = {**ONLINE_DPO_KEYS, "reward_funcs": ["exact_match"]}
    return from_sft(ctx, "online_dpo", prompts_file(ctx), monitored(ctx, keys))


def run_online_dpo_rm(ctx: Context) -> str:
    """Control: online DPO ranked by the reward model PPO uses. Unlike PPO it has no KL penalty in its reward,
    only DPO's implicit one, and it follows the reward model's blind spot fast: the hacking monitor's case."""
    keys = {**ONLINE_DPO_KEYS, "reward_model": train_reward_model(ctx)}
    return from_sft(ctx, "online_dpo_rm", prompts_file(ctx), monitored(ctx, keys))


def run_best_of_n(ctx: Context) -> str:
    """Rejection-sampling fine-tuning: 4 samples per prompt from the SFT model, the exactly right ones kept
    (`alignkit data sample --keep best --threshold 1`), then SFT on them."""
    if not ctx.sft_model:
        run_sft(ctx)
    out = os.path.join(ctx.output_dir, "data", "best_of_n.jsonl")
    settings = SampleSettings(
        ctx.sft_model, prompts_file(ctx), out, n=4, keep="best", threshold=1.0, reward_funcs=["exact_match"],
        max_new_tokens=5, batch_size=250, seed=ctx.seed + 5, max_samples=2000,
    )  # fmt: skip
    report = sample_best_of_n(settings)
    log.info("quickstart best_of_n: %d rows, %d prompts without a right answer", report["rows"],
             report["prompts_without_acceptable_sample"])  # fmt: skip
    return from_sft(ctx, "best_of_n", out, {"stage": "sft", "max_steps": 60})


def run_distill(ctx: Context) -> str:
    """On-policy distillation (GKD, reverse KL) of the GRPO model into the SFT model, on the student's samples."""
    teacher = run_grpo(ctx)  # a finished run is reused
    keys = {
        "stage": "distill",
        "teacher_model_name_or_path": teacher,
        "lmbda": 1.0,
        "beta": 1.0,
        "temperature": 1.0,
        "max_new_tokens": 5,
        "max_steps": 60,
        "learning_rate": 1e-4,
    }
    return from_sft(ctx, "distill", prompts_file(ctx), keys)


def run_sft_tools(ctx: Context) -> str:
    """The tool row's start: the SFT model fine-tuned on transcripts where the annotator calls `add(a, b)` on half
    of the problems and answers the rest by hand (forgetting carries as before). Chosen on seed 0's validation
    split: after 200 steps at 3e-4 on a quarter of calls it called on 5% of problems, and GRPO dropped the tool
    (its sampled calls were often malformed or their results miscopied); 800 steps at 5e-4 on half call on 95%."""
    data = data_file(
        ctx,
        "tool_sft",
        lambda: tool_sft_rows(
            ctx.split.train, n=3200, carry_error_rate=0.6, call_share=0.5, seed=ctx.seed + 6
        ),
    )
    keys = {"stage": "sft", "max_steps": 800, "learning_rate": 5e-4, "max_length": 128}
    return from_sft(ctx, "sft_tools", data, keys)


def run_grpo_tools(ctx: Context) -> str:
    """GRPO with the `add` tool from `sft_tools`: episodes of up to two model turns (a call, then the answer), the
    exact final answer rewarded. A call whose result is copied is right, carrying by hand often is not: the
    reward favours calling (and copying the result)."""
    keys = {
        "stage": "grpo",
        "model_name_or_path": run_sft_tools(ctx),
        "tools": [ADD_TOOL],
        "max_turns": 2,
        "reward_funcs": ["exact_match"],
        "num_generations": 8,
        "per_device_train_batch_size": 16,
        "max_new_tokens": 36,  # a call is 33 tokens of the tiny tokenizer
        "temperature": 0.7,  # at 1.0 more sampled calls came out malformed (seed 0, validation)
        "max_length": 128,
        "max_steps": 60,
        "learning_rate": 2e-5,
        "logging_steps": 10,
    }
    return from_sft(ctx, "grpo_tools", prompts_file(ctx), monitored(ctx, keys))


TOOL_ROWS = ("sft_tools", "grpo_tools")  # measured in episodes with the tool (report.tool_accuracy)


ONLINE_DPO_KEYS = {
    "stage": "online_dpo",
    "num_generations": 4,
    "per_device_train_batch_size": 16,
    "max_new_tokens": 5,
    "max_steps": 60,
    "learning_rate": 2e-5,
    "beta": 0.1,
    "logging_steps": 10,
}


def run_sft_on_chosen(ctx: Context) -> str:
    """Control: only the NLL of the chosen answers, same data, steps and rate. What do the preferences add?"""
    return from_sft(ctx, "sft_on_chosen", pairs_file(ctx), {"stage": "dpo", "loss_type": "sft"})


def run_dpo_without_nll(ctx: Context) -> str:
    """Control: plain DPO (sigmoid only)."""
    return from_sft(
        ctx, "dpo_without_nll", pairs_file(ctx), {"stage": "dpo", "loss_type": "sigmoid", "beta": 0.1}
    )


# name -> runner; every method after SFT starts from the SFT model
METHODS: dict[str, Callable[[Context], str]] = {
    "sft": run_sft,
    "dpo": run_dpo,
    "kto": run_kto,
    "grpo": run_grpo,
    "ppo": run_ppo,
    "ppo_verifiable": run_ppo_verifiable,
    "simpo": run_simpo,
    "orpo": run_orpo,
    "online_dpo": run_online_dpo,
    "best_of_n": run_best_of_n,
    "distill": run_distill,
    "sft_tools": run_sft_tools,
    "grpo_tools": run_grpo_tools,
}
# what `alignkit quickstart` runs unless --methods says otherwise: the tool rows take as long as the rest of
# the table (multi-turn rollouts of 36-token calls on 2 CPU cores), so they run when asked for
DEFAULT_METHODS = tuple(name for name in METHODS if name not in TOOL_ROWS)
CONTROLS: dict[str, Callable[[Context], str]] = {
    "sft_on_chosen": run_sft_on_chosen,
    "dpo_without_nll": run_dpo_without_nll,
    "ppo_weak_kl": run_ppo_weak_kl,
    "online_dpo_rm": run_online_dpo_rm,
}
