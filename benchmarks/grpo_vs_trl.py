"""GRPO step time and peak memory, alignkit vs TRL 1.16, same model, prompts, reward and settings (CPU or GPU).

    python benchmarks/grpo_vs_trl.py [--steps 5] [--prompts 8] [--generations 4] [--max-new-tokens 64]

Each side runs in its own process (peak RSS / peak CUDA memory are per process). The model is the tiny
Llama with its vocabulary grown to `--vocab` (as in dpo_vs_trl.py). Prompts: GSM8K questions
(../shared/data/gsm8k/train.jsonl, in file order), read unchanged by alignkit and given to TRL as
conversational prompts. Reward: alignkit's `math_accuracy` for both (TRL gets it as a callable). Each
optimizer step samples `--generations` completions for each of `--prompts` prompts (TRL's batch counts
completions, alignkit's counts prompts: the same 32 completions per step by default), with temperature 1,
no reference model (beta 0), loss_type grpo, one update per rollout, fp32, no gradient checkpointing. A
random model rarely emits EOS, so both sides sample `--max-new-tokens` tokens per completion.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from harness import SHARED, compare, parser, peak_mb, train_alignkit

DATA = SHARED / "gsm8k" / "train.jsonl"


def run_alignkit(model_dir: str, args: argparse.Namespace, out: str) -> dict:
    keys = {
        "stage": "grpo",
        "model_name_or_path": model_dir,
        "dataset": str(DATA),
        "reward_funcs": ["math_accuracy"],
        "num_generations": args.generations,
        "per_device_train_batch_size": args.prompts,
        "max_new_tokens": args.max_new_tokens,
        "max_length": 1024,  # no GSM8K prompt is dropped (TRL does not truncate prompts)
        "loss_type": "grpo",
        "learning_rate": 1e-6,
    }
    record = train_alignkit(keys, args.steps, out)
    return {
        "train_s": record["train_runtime"],
        "peak_mb": peak_mb(),
        "completion_length": record["completion_length"],
    }


def run_trl(model_dir: str, args: argparse.Namespace, out: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from alignkit.rewards import math_accuracy

    def reward(prompts: list, completions: list, answer: list, **_: object) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return math_accuracy(prompts, texts, answer)

    rows = [json.loads(line) for line in DATA.open()][: args.prompts * args.steps]
    data = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": r["question"]}], "answer": r["answer"]} for r in rows]
    )
    cfg = GRPOConfig(
        output_dir=out,
        max_steps=args.steps,
        logging_steps=args.steps,
        report_to="none",
        per_device_train_batch_size=args.prompts * args.generations,
        num_generations=args.generations,
        max_completion_length=args.max_new_tokens,
        loss_type="grpo",
        beta=0.0,
        learning_rate=1e-6,
        bf16=False,
        use_cpu=not torch.cuda.is_available(),
        shuffle_dataset=False,
        save_strategy="no",
        gradient_checkpointing=False,
        disable_tqdm=True,
    )
    tok = AutoTokenizer.from_pretrained(model_dir)
    trainer = GRPOTrainer(
        model=model_dir, reward_funcs=reward, args=cfg, processing_class=tok, train_dataset=data
    )
    t = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t
    logged = trainer.state.log_history[0]
    return {
        "train_s": train_s,
        "peak_mb": peak_mb(),
        "completion_length": logged.get("completions/mean_length", float("nan")),
    }


def main() -> None:
    p = parser(steps=5)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    args = p.parse_args()
    results = compare(__file__, sys.argv[1:], args, {"alignkit": run_alignkit, "trl": run_trl})
    print(
        f"GRPO, {args.steps} steps of {args.prompts} prompts x {args.generations} completions, "
        f"max_new_tokens {args.max_new_tokens}, vocab {args.vocab}, hidden {args.hidden}, {args.layers} layers"
    )
    print(f"{'':10} {'train s':>9} {'s/step':>9} {'peak MB':>9} {'mean len':>9}")
    for side in ("alignkit", "trl"):
        r = results[side]
        print(
            f"{side:10} {r['train_s']:9.2f} {r['train_s'] / args.steps:9.2f} {r['peak_mb']:9.0f} "
            f"{r['completion_length']:9.1f}"
        )
    ratio = results["ratio"]
    print(f"alignkit / TRL: time {ratio['time']:.2f}x, peak memory {ratio['peak_memory']:.2f}x")


if __name__ == "__main__":
    main()
