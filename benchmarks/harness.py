"""What the `*_vs_trl.py` benchmarks share: the model, peak memory, and running each side in its own process."""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
Runner = Callable[[str, argparse.Namespace, str], dict]


def build(model_dir: str, vocab: int, hidden: int, layers: int) -> None:
    """The tiny Llama with its vocabulary grown to `vocab`, so the output layer weighs as in real models."""
    from transformers import AutoModelForCausalLM

    from alignkit.tiny import build_tiny

    build_tiny(model_dir, hidden_size=hidden, layers=layers)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.resize_token_embeddings(vocab)
    model.save_pretrained(model_dir)


def peak_mb() -> float:
    """Peak CUDA memory allocated on a GPU, else this process's peak RSS."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train_alignkit(keys: dict, steps: int, out: str) -> dict:
    """One alignkit run through the public path (config -> stage -> loop), fp32, data in file order, `steps`
    steps logged once; returns the last metrics record."""
    from alignkit.config import build_config
    from alignkit.loop import train
    from alignkit.stages import get_stage

    common = {
        "max_steps": steps,
        "logging_steps": steps,
        "output_dir": out,
        "disable_tqdm": True,
        "plot_loss": False,
        "torch_dtype": "float32",
        "shuffle": False,
        "overwrite_output_dir": True,
    }
    cfg = build_config({**common, **keys})
    return train(cfg, get_stage(cfg.stage)(cfg))


def parser(steps: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--run", choices=["alignkit", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    return p


def compare(
    script: str, argv: list[str], args: argparse.Namespace, sides: dict[str, Runner]
) -> dict[str, dict]:
    """In a child (`--run SIDE`): run that side and print its result. In the parent: build the model, run
    each side in a fresh process (so peak memory is its own) and return {side: result}."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.run:
        print("RESULT " + json.dumps(sides[args.run](args.model, args, tempfile.mkdtemp())))
        sys.exit(0)
    model_dir = tempfile.mkdtemp() + "/model"
    build(model_dir, args.vocab, args.hidden, args.layers)
    results = {}
    for side in sides:
        env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
        cmd = [sys.executable, script, *argv, "--run", side, "--model", model_dir]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            sys.exit(f"{side} failed:\n{proc.stderr[-3000:]}")
        results[side] = json.loads(line[0][7:])
    a, t = results["alignkit"], results["trl"]
    results["ratio"] = {"time": a["train_s"] / t["train_s"], "peak_memory": a["peak_mb"] / t["peak_mb"]}
    return results
