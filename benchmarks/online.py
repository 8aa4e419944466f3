"""The benchmark's online workloads, which sample from the policy every step: GRPO, online DPO, distillation.

Each runs once through alignkit and once through TRL 1.16 (`GRPOTrainer`; `trl.experimental`'s
`OnlineDPOTrainer` and `GKDTrainer`) on the same prompts, with the same number of samples per prompt and the
same `max_new_tokens`. The models are random, so they almost never sample EOS: both tools generate every
completion to its full length and do the same work. Sampling draws differ between the tools, so only the
first loss of a run that starts at the reference is comparable (online DPO: ln 2 for both; distillation on
the data's completions, `lmbda: 0`: the same tokens, so the same loss).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from harness import SHARED, PhaseTimer, count_through, peak_mb, train_alignkit

GSM8K = SHARED / "gsm8k" / "train.jsonl"


def _dtype(args: Any) -> dict:
    return {"bf16": True} if args.gpu else {"torch_dtype": "float32"}


def _alignkit(keys: dict, owner: type, args: Any, out: str) -> dict:
    """One alignkit online run, its rollout method timed apart."""
    timer = PhaseTimer(owner, "rollout")
    records = train_alignkit({**keys, **_dtype(args)}, args.steps, out)
    loop_s = records[-1]["train_runtime"]
    return {
        "tokens": records[-1]["num_tokens"],
        "loop_s": loop_s,
        "peak_mb": peak_mb(),
        "first_loss": records[0]["loss"],
        **timer.split(loop_s),
    }


def _trl_config(cls: type, args: Any, out: str, **keys: Any) -> Any:
    return cls(
        output_dir=out,
        max_steps=args.steps,
        logging_steps=1,
        report_to="none",
        bf16=args.gpu,
        use_cpu=not args.gpu,
        save_strategy="no",
        disable_tqdm=True,
        **keys,
    )


def _trl(trainer: Any, timer: PhaseTimer, tokens: list[int] | None = None) -> dict:
    t = time.perf_counter()
    result = trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    loop_s = result.metrics.get("train_runtime", time.perf_counter() - t)
    return {
        "tokens": tokens[0] if tokens else int(logs[-1].get("num_tokens", 0)),
        "loop_s": loop_s,
        "peak_mb": peak_mb(),
        "first_loss": logs[0]["loss"],
        **timer.split(loop_s),
    }


def gsm8k(n: int) -> list[dict]:
    rows = [json.loads(line) for line in GSM8K.open()][:n]
    return [{"prompt": [{"role": "user", "content": r["question"]}], "answer": r["answer"]} for r in rows]


def math_reward(prompts: list, completions: list, answer: list, **_: object) -> list[float]:
    """alignkit's `math_accuracy` on TRL's completions (messages or text)."""
    from alignkit.generation.rewards import math_accuracy

    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return math_accuracy(prompts, texts, answer)


def grpo_alignkit(model_dir: str, s: Any, args: Any, out: str) -> dict:
    from alignkit.stages.grpo import GRPOStage

    keys = {
        "stage": "grpo",
        "model_name_or_path": model_dir,
        "dataset": str(GSM8K),
        "reward_funcs": ["math_accuracy"],
        "num_generations": args.generations,
        "per_device_train_batch_size": args.batch,
        "max_new_tokens": args.max_new_tokens,
        "max_length": 1024,  # no GSM8K prompt is dropped (TRL does not truncate prompts)
        "loss_type": "grpo",
        "learning_rate": 1e-6,
        **s.keys,
    }
    return _alignkit(keys, GRPOStage, args, out)


def grpo_trl(model_dir: str, s: Any, args: Any, out: str) -> dict:
    from trl import GRPOConfig, GRPOTrainer

    cfg = _trl_config(
        GRPOConfig,
        args,
        out,
        per_device_train_batch_size=args.batch * args.generations,  # TRL's batch counts completions
        num_generations=args.generations,
        max_completion_length=args.max_new_tokens,
        loss_type="grpo",
        beta=0.0,
        learning_rate=1e-6,
        shuffle_dataset=False,
        **s.keys,
    )
    trainer = _math_trainer(GRPOTrainer, model_dir, cfg, args)
    return _trl(trainer, PhaseTimer(GRPOTrainer, "_generate_and_score_completions"))


def _math_trainer(trainer_cls: Any, model_dir: str, cfg: Any, args: Any) -> Any:
    """A TRL online trainer on the workload's GSM8K prompts, rewarded by the math check."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    return trainer_cls(
        model=model_dir,
        reward_funcs=math_reward,
        args=cfg,
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        train_dataset=Dataset.from_list(gsm8k(args.batch * args.steps)),
    )


def online_dpo_alignkit(model_dir: str, s: Any, args: Any, out: str) -> dict:
    from alignkit.stages.online_dpo import OnlineDPOStage

    keys = {
        "stage": "online_dpo",
        "model_name_or_path": model_dir,
        "dataset": str(GSM8K),
        "max_samples": args.batch * args.steps,
        "reward_funcs": ["math_accuracy"],
        "num_generations": 2,  # TRL's online DPO samples two per prompt
        "per_device_train_batch_size": args.batch,
        "max_new_tokens": args.max_new_tokens,
        "max_length": 1024,
        "temperature": 0.9,  # TRL's default
        "learning_rate": 1e-6,
        **s.keys,
    }
    return _alignkit(keys, OnlineDPOStage, args, out)


def online_dpo_trl(model_dir: str, s: Any, args: Any, out: str) -> dict:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    cfg = _trl_config(
        OnlineDPOConfig,
        args,
        out,
        per_device_train_batch_size=args.batch,
        max_new_tokens=args.max_new_tokens,
        max_length=1024,
        learning_rate=1e-6,
        train_sampling_strategy="sequential",
        **s.keys,
    )
    trainer = _math_trainer(OnlineDPOTrainer, model_dir, cfg, args)

    def policy_tokens(
        model: Any, prompt_ids: Any, prompt_mask: Any, completion_ids: Any, mask: Any, *_: Any
    ) -> int:
        import torch

        # the policy's pass; the reference's runs under no_grad
        return int(prompt_mask.sum()) + int(mask.sum()) if torch.is_grad_enabled() else 0

    tokens = count_through(trainer, "_forward", policy_tokens)
    return _trl(trainer, PhaseTimer(OnlineDPOTrainer, "_generate"), tokens)


def _distill_keys(args: Any, s: Any) -> dict:
    """TRL's GKD defaults where both have them (beta 0.5, temperature 0.9); `lmbda` is the workload's."""
    return {"max_new_tokens": args.max_new_tokens, "learning_rate": 1e-6, **s.keys}


def distill_alignkit(model_dir: str, s: Any, args: Any, out: str, data: str, teacher: str) -> dict:
    from alignkit.stages.distill import DistillStage

    keys = {
        "stage": "distill",
        "model_name_or_path": model_dir,
        "teacher_model_name_or_path": teacher,
        "dataset": data,
        "max_samples": args.batch * args.steps,
        "per_device_train_batch_size": args.batch,
        "max_length": args.max_length,
        **_distill_keys(args, s),
    }
    return _alignkit(keys, DistillStage, args, out)


def distill_trl(model_dir: str, s: Any, args: Any, out: str, rows: list[dict], teacher: str) -> dict:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    cfg = _trl_config(
        GKDConfig,
        args,
        out,
        per_device_train_batch_size=args.batch,
        max_length=args.max_length,
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        **_distill_keys(args, s),
    )
    trainer = GKDTrainer(
        model=model_dir,
        teacher_model=teacher,
        args=cfg,
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        train_dataset=Dataset.from_list([{"messages": r["prompt"] + r["completion"]} for r in rows]),
    )
    tokens = count_through(
        trainer, "compute_loss", lambda model, inputs, *_, **__: int(inputs["attention_mask"].sum())
    )
    return _trl(trainer, PhaseTimer(GKDTrainer, "generate_on_policy_outputs"), tokens)
