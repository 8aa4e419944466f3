"""The measurements of `benchmarks/gpu.sh` that are not `benchmarks/run.py`: each is `python gpu_steps.py STEP
[--dry-run]` in its own process (its own peak memory, its own failure) and prints one `RESULT {json}` line.

- matmul_peak: the card's measured matmul rate, bf16 (fp32 on CPU), 8192^3 (512^3 dry), median of 10
- qlora: QLoRA SFT (4-bit base, LoRA r 16) at Qwen2.5-0.5B's shape, 4 steps: peak memory, seconds per step
  (dry: plain LoRA at tiny size on CPU; bitsandbytes' 4-bit layers need CUDA)
- rollouts: GRPO's generation alone, 16 GSM8K prompts x 4 samples x 64 new tokens: tokens/s of transformers'
  generate (alignkit's HF backend) and of vLLM (alignkit's VLLMEngine) where vLLM is installed
- fsdp2: FSDP2 on the visible devices through `accelerate launch`, 2 SFT steps (a smoke test: it trains and
  saves a folder that loads)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import REPO, SHARED, build_qwen2, peak_mb, train_alignkit

SHAPE = {True: "tiny", False: "qwen2.5-0.5b"}  # by dry-run


def matmul_peak(dry: bool) -> dict:
    import torch

    gpu = torch.cuda.is_available() and not dry
    n, dtype = (8192, torch.bfloat16) if gpu else (512, torch.float32)
    device = "cuda" if gpu else "cpu"
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    times = []
    for _ in range(12):
        if gpu:
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    median = statistics.median(times[2:])  # the first two warm up
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "tflops": 2 * n**3 / median / 1e12}


def _model(dry: bool, root: Path) -> str:
    build_qwen2(str(root / "model"), SHAPE[dry])
    return str(root / "model")


def qlora(dry: bool) -> dict:
    import torch

    root = Path(tempfile.mkdtemp())
    gpu = torch.cuda.is_available() and not dry
    keys = {
        "stage": "sft",
        "model_name_or_path": _model(dry, root),
        "dataset": str(SHARED / "llamafactory" / "alpaca_en_demo.json"),
        "finetuning_type": "qlora" if gpu else "lora",
        "lora_r": 16,
        "per_device_train_batch_size": 4,
        "max_length": 512,
        **({"bf16": True} if gpu else {"torch_dtype": "float32"}),
    }
    steps = 1 if dry else 4
    records = train_alignkit(keys, steps, str(root / "out"))
    return {
        "finetuning_type": keys["finetuning_type"],
        "peak_mb": peak_mb(),
        "s_per_step": records[-1]["train_runtime"] / steps,
        "first_loss": records[0]["loss"],
    }


def rollouts(dry: bool) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.generation.rollout import VLLMEngine, complete

    root = Path(tempfile.mkdtemp())
    path = _model(dry, root)
    gpu = torch.cuda.is_available() and not dry
    tok = AutoTokenizer.from_pretrained(path)
    rows = [json.loads(line) for line in (SHARED / "gsm8k" / "train.jsonl").open()][:16]
    prompts = [[{"role": "user", "content": r["question"]}] for r in rows]
    settings = {"num_samples": 4, "max_new_tokens": 8 if dry else 64, "temperature": 1.0}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if gpu else torch.float32)
    model = model.to("cuda" if gpu else "cpu").eval()
    out: dict = {}
    for name in ("hf", "vllm"):
        engine = None
        if name == "vllm":
            try:
                engine = VLLMEngine(path, tok)
            except Exception as exc:  # noqa: BLE001 - the row says why (not installed, no GPU)
                out["vllm"] = {"skipped": str(exc).splitlines()[0][:200]}
                continue
        t = time.perf_counter()
        samples = complete(model, tok, prompts, **settings, batch_size=64, engine=engine)
        seconds = time.perf_counter() - t
        tokens = sum(len(c) for c in samples.completion_ids)
        out[name] = {"tokens": tokens, "s": seconds, "tokens_per_s": tokens / seconds}
    return out


def fsdp2(dry: bool) -> dict:
    import torch

    root = Path(tempfile.mkdtemp())
    rows = [{"prompt": [{"role": "user", "content": f"What is {i} + 1?"}],
             "completion": [{"role": "assistant", "content": str(i + 1)}]} for i in range(16)]  # fmt: skip
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"stage": "sft", "model_name_or_path": _model(True, root), "dataset": str(root / "sft.jsonl"),
              "max_steps": 2, "per_device_train_batch_size": 2, "output_dir": str(root / "out"),
              "logging_steps": 1, "disable_tqdm": True, "plot_loss": False, "torch_dtype": "float32"}  # fmt: skip
    (root / "sft.yaml").write_text(json.dumps(config))
    # one process per GPU; on CPU (the dry run) two, as tests/training/test_fsdp.py runs FSDP2 there
    processes = str(torch.cuda.device_count() if torch.cuda.is_available() and not dry else 2)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs" / "accelerate"
           / "fsdp2.yaml"), "--num_processes", processes, "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    cmd += ["-m", "alignkit", "train", str(root / "sft.yaml")]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode != 0:
        raise RuntimeError((proc.stderr.strip().splitlines() or ["no output"])[-1][:300])
    losses = [
        json.loads(line)["loss"] for line in (root / "out" / "metrics.jsonl").open() if '"loss"' in line
    ]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(root / "out")  # the saved folder loads
    return {"processes": int(processes), "losses": losses, "s": round(time.perf_counter() - t, 1)}


STEPS = {"matmul_peak": matmul_peak, "qlora": qlora, "rollouts": rollouts, "fsdp2": fsdp2}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("step", choices=list(STEPS))
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args()
    print("RESULT " + json.dumps(STEPS[args.step](args.dry_run)), flush=True)


if __name__ == "__main__":
    main()
