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
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "llamafactory" / "dpo_en_demo.json"


def build(model_dir: str, vocab: int, hidden: int, layers: int) -> None:
    from transformers import AutoModelForCausalLM

    from alignkit.tiny import build_tiny

    build_tiny(model_dir, hidden_size=hidden, layers=layers)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.resize_token_embeddings(vocab)
    model.save_pretrained(model_dir)


def _peak_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_alignkit(model_dir: str, steps: int, out: str) -> dict:
    from alignkit.config import build_config
    from alignkit.loop import train
    from alignkit.stages import get_stage

    cfg = build_config(
        {
            "stage": "dpo",
            "model_name_or_path": model_dir,
            "dataset": str(DATA),
            "max_length": 256,
            "per_device_train_batch_size": 4,
            "max_steps": steps,
            "logging_steps": steps,
            "output_dir": out,
            "disable_tqdm": True,
            "plot_loss": False,
            "torch_dtype": "float32",
            "shuffle": False,
            "overwrite_output_dir": True,
        }
    )
    record = train(cfg, get_stage("dpo")(cfg))
    return {"train_s": record["train_runtime"], "peak_mb": _peak_mb(), "loss": record["loss"]}


def run_trl(model_dir: str, steps: int, out: str) -> dict:
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
    args = DPOConfig(
        output_dir=out,
        max_steps=steps,
        logging_steps=steps,
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
        model=model_dir, args=args, processing_class=tok, train_dataset=Dataset.from_list(rows)
    )
    t = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t
    return {"train_s": train_s, "peak_mb": _peak_mb(), "loss": trainer.state.log_history[0]["loss"]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--run", choices=["alignkit", "trl"])
    p.add_argument("--model")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.run:
        out = tempfile.mkdtemp()
        result = (run_alignkit if args.run == "alignkit" else run_trl)(args.model, args.steps, out)
        print("RESULT " + json.dumps(result))
        return
    model_dir = tempfile.mkdtemp() + "/model"
    build(model_dir, args.vocab, args.hidden, args.layers)
    results = {}
    for side in ("alignkit", "trl"):
        env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
        proc = subprocess.run(
            [sys.executable, __file__, "--run", side, "--model", model_dir, "--steps", str(args.steps)],
            capture_output=True,
            text=True,
            env=env,
        )
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            sys.exit(f"{side} failed:\n{proc.stderr[-3000:]}")
        results[side] = json.loads(line[0][7:])
    a, t = results["alignkit"], results["trl"]
    print(
        f"DPO, {args.steps} steps of 4 pairs, max_length 256, vocab {args.vocab}, hidden {args.hidden}, "
        f"{args.layers} layers"
    )
    print(f"{'':10} {'train s':>9} {'peak MB':>9} {'loss':>9}")
    for side, r in results.items():
        print(f"{side:10} {r['train_s']:9.2f} {r['peak_mb']:9.0f} {r['loss']:9.4f}")
    print(
        f"alignkit / TRL: time {a['train_s'] / t['train_s']:.2f}x, peak memory {a['peak_mb'] / t['peak_mb']:.2f}x"
    )


if __name__ == "__main__":
    main()
