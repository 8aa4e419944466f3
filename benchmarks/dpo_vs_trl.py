"""DPO step time and peak memory, alignkit vs TRL 1.16, same model, data, batch and settings (CPU or GPU).

    python benchmarks/dpo_vs_trl.py [--steps 10] [--vocab 32000] [--hidden 256] [--layers 4]

Each side runs in its own process (peak RSS / peak CUDA memory are per process). The model is the tiny
Llama with its vocabulary grown to `--vocab`, so that the output layer weighs as it does in real models.
Data: LLaMA-Factory's ShareGPT preference demo (../shared/data), converted for TRL, read unchanged by
alignkit; max_length 256; batch 4 pairs; fp32; no gradient checkpointing; the reference is the starting
policy, loaded from disk by both.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from harness import SHARED, compare, parser, peak_mb, train_alignkit

DATA = SHARED / "llamafactory" / "dpo_en_demo.json"


def run_alignkit(model_dir: str, args: argparse.Namespace, out: str) -> dict:
    keys = {
        "stage": "dpo",
        "model_name_or_path": model_dir,
        "dataset": str(DATA),
        "max_length": 256,
        "per_device_train_batch_size": 4,
    }
    record = train_alignkit(keys, args.steps, out)
    return {"train_s": record["train_runtime"], "peak_mb": peak_mb(), "loss": record["loss"]}


def run_trl(model_dir: str, args: argparse.Namespace, out: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    raw = json.loads(DATA.read_text())
    rows = [
        {
            "prompt": [{"role": roles[t["from"]], "content": t["value"]} for t in r["conversations"]],
            "chosen": [{"role": "assistant", "content": r["chosen"]["value"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]["value"]}],
        }
        for r in raw
    ]
    cfg = DPOConfig(
        output_dir=out,
        max_steps=args.steps,
        logging_steps=args.steps,
        report_to="none",
        per_device_train_batch_size=4,
        bf16=False,
        use_cpu=not torch.cuda.is_available(),
        train_sampling_strategy="sequential",
        save_strategy="no",
        max_length=256,
        gradient_checkpointing=False,
        disable_tqdm=True,
    )
    tok = AutoTokenizer.from_pretrained(model_dir)
    trainer = DPOTrainer(
        model=model_dir, args=cfg, processing_class=tok, train_dataset=Dataset.from_list(rows)
    )
    t = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t
    return {"train_s": train_s, "peak_mb": peak_mb(), "loss": trainer.state.log_history[0]["loss"]}


def main() -> None:
    args = parser(steps=10).parse_args()
    results = compare(__file__, sys.argv[1:], args, {"alignkit": run_alignkit, "trl": run_trl})
    print(
        f"DPO, {args.steps} steps of 4 pairs, max_length 256, vocab {args.vocab}, hidden {args.hidden}, "
        f"{args.layers} layers"
    )
    print(f"{'':10} {'train s':>9} {'peak MB':>9} {'loss':>9}")
    for side in ("alignkit", "trl"):
        r = results[side]
        print(f"{side:10} {r['train_s']:9.2f} {r['peak_mb']:9.0f} {r['loss']:9.4f}")
    ratio = results["ratio"]
    print(f"alignkit / TRL: time {ratio['time']:.2f}x, peak memory {ratio['peak_memory']:.2f}x")


if __name__ == "__main__":
    main()
