"""`alignkit quickstart`: every method at work on a task it builds itself, in a few minutes on a CPU.

It writes a tiny model, generates two-digit addition data whose SFT answers carry a sloppy annotator's
systematic error (a forgotten carry), trains each method through the same `alignkit train` path a user
runs, and reports held-out exact-match accuracy before and after. Nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from alignkit.config import build_config
from alignkit.generation import generate
from alignkit.loop import train
from alignkit.stages import get_stage
from alignkit.task import Problem, parse_answer, sft_rows, split_problems
from alignkit.tiny import build_tiny

log = logging.getLogger("alignkit")

TINY = {"vocab_size": 512, "hidden_size": 128, "layers": 3}


@dataclass
class Context:
    output_dir: str
    seed: int
    train_problems: list[Problem]
    eval_problems: list[Problem]
    base_model: str
    sft_model: str = ""


def accuracy(model_dir: str, problems: list[Problem]) -> dict[str, float]:
    """Greedy exact-match accuracy on held-out problems, overall and split by carry."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    outs = generate(model, tok, [p.messages() for p in problems], max_new_tokens=5, batch_size=150)
    right = [parse_answer(o) == p.answer for o, p in zip(outs, problems)]

    def share(sel: list[bool]) -> float:
        picked = [r for r, s in zip(right, sel) if s]
        return round(sum(picked) / max(len(picked), 1), 4)

    return {
        "accuracy": share([True] * len(problems)),
        "carry_accuracy": share([p.carry for p in problems]),
        "no_carry_accuracy": share([not p.carry for p in problems]),
    }


def _write_jsonl(path: str, rows: list[dict]) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def _train(ctx: Context, name: str, keys: dict[str, Any]) -> str:
    out = os.path.join(ctx.output_dir, name)
    common = {
        "output_dir": out,
        "seed": ctx.seed,
        "logging_steps": 20,
        "max_length": 64,
        "plot_loss": True,
        "torch_dtype": "float32",
        "overwrite_output_dir": True,  # the quickstart owns its folder and re-runs in place
    }
    cfg = build_config({**common, **keys}, source=f"quickstart {name}")
    train(cfg, get_stage(cfg.stage)(cfg))
    return out


def run_sft(ctx: Context) -> str:
    data = _write_jsonl(
        os.path.join(ctx.output_dir, "data", "sft.jsonl"),
        sft_rows(ctx.train_problems, n=6000, carry_error_rate=0.6, seed=ctx.seed),
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


# name -> (runner, what it starts from); later methods start from the SFT model
METHODS: dict[str, Callable[[Context], str]] = {"sft": run_sft}


def run_quickstart(
    output_dir: str = "./alignkit-quickstart", seed: int = 0, methods: tuple[str, ...] | None = None
) -> dict[str, Any]:
    t0 = time.perf_counter()
    os.makedirs(output_dir, exist_ok=True)
    train_problems, eval_problems = split_problems(seed)
    base = build_tiny(os.path.join(output_dir, "base"), seed=seed, **TINY)
    ctx = Context(output_dir, seed, train_problems, eval_problems, base)
    report: dict[str, Any] = {
        "task": "two-digit addition; SFT data forgets 60% of carries",
        "eval_problems": len(eval_problems),
    }
    base_acc = accuracy(base, eval_problems)
    report["base_accuracy"] = base_acc["accuracy"]
    report["methods"] = {}
    for name in methods or tuple(METHODS):
        t = time.perf_counter()
        model_dir = METHODS[name](ctx)
        result = {
            **accuracy(model_dir, eval_problems),
            "wall_s": round(time.perf_counter() - t, 1),
            "model_dir": model_dir,
        }
        report["methods"][name] = result
        log.info("%s: held-out accuracy %.3f (%.1f s)", name, result["accuracy"], result["wall_s"])
    report["total_wall_s"] = round(time.perf_counter() - t0, 1)
    with open(os.path.join(output_dir, "report.json"), "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2)
    table = render_table(report)
    with open(os.path.join(output_dir, "report.md"), "w", encoding="utf-8") as fh:
        fh.write(
            "# alignkit quickstart\n\n" + f"Task: {report['task']}; {len(eval_problems)} held-out problems, "
            "greedy decoding, exact match.\n\n" + table + "\n"
        )
    print(table)
    return report


def render_table(report: dict[str, Any]) -> str:
    lines = [
        "| model | accuracy | carry | no carry | wall s |",
        "|---|---|---|---|---|",
        f"| base (random init) | {report['base_accuracy']:.3f} | | | |",
    ]
    for name, r in report["methods"].items():
        lines.append(
            f"| {name} | {r['accuracy']:.3f} | {r['carry_accuracy']:.3f} | {r['no_carry_accuracy']:.3f} "
            f"| {r['wall_s']:.1f} |"
        )
    return "\n".join(lines)
