"""Every stage, alignkit vs TRL 1.16, on a Qwen2-architecture model with the real 151,936-entry vocabulary.

    python benchmarks/run.py [--workloads sft,rm,dpo,kto,grpo,online_dpo,distill,distill_kd] [--steps 8]
                             [--shape cpu] [--json]

Each (workload, tool, setting) runs in its own process, so peak memory (RSS on CPU, CUDA's max allocated on a
GPU) is its own. The model is built in place (random weights, nothing downloaded): hidden 256, 4 layers on
CPU (`--shape cpu`), Qwen2.5-0.5B's shape with `--shape qwen2.5-0.5b` (for a GPU, bf16 there). Data:
LLaMA-Factory's demo files in ../shared/data (alpaca for SFT and distillation, dpo pairs for RM and DPO, kto
for KTO) and GSM8K questions for GRPO and online DPO; batch 4 rows (pairs for RM/DPO, prompts for the online
stages), max_length 512, fp32 on CPU. Distillation's teacher is a second model of the same shape (seed 1).

Columns: real (non-padding) tokens the training loop fed the policy, as each tool counts its own batches
(the sum of its attention masks); the loop's seconds (each tool's own `train_runtime`: model loading,
tokenisation and a precomputed reference pass are outside it for both); tokens/s; peak memory; the first
logged loss (step 1, before any update: equal losses show both computed the same thing). `x TRL` compares
with TRL's default row of the same workload. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import REPO, build_qwen2, build_reward_model
from workloads import WORKLOADS, run


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma list of " + ", ".join(WORKLOADS))
    p.add_argument(
        "--settings", default="", help="only settings whose name contains one of these (comma list)"
    )
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--shape", default="cpu", choices=["tiny", "cpu", "qwen2.5-0.5b"])
    p.add_argument("--defaults-only", action="store_true", help="each tool's default setting only")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--child", nargs=2, metavar=("WORKLOAD", "INDEX"), help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args()
    import torch

    args.gpu = torch.cuda.is_available()
    return args


def child(args: argparse.Namespace) -> None:
    workload, index = args.child[0], int(args.child[1])
    result = run(workload, WORKLOADS[workload].settings[index], args.model, args, tempfile.mkdtemp())
    print("RESULT " + json.dumps(result))


def spawn(workload: str, index: int, model_dir: str) -> dict:
    argv = [a for a in sys.argv[1:] if a != "--json"]
    cmd = [sys.executable, __file__, *argv, "--child", workload, str(index), "--model", model_dir]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]}
    return json.loads(line[0][7:])


def table(rows: list[dict]) -> str:
    head = "| workload | tool | setting | tokens | loop s | tokens/s | x TRL | peak MB | x TRL | first loss |"
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['workload']} | {r['tool']} | {r['setting']} | failed: {r['error']} |||||||")
            continue
        speed, mem = r.get("speed_x"), r.get("memory_x")
        lines.append(
            f"| {r['workload']} | {r['tool']} | {r['setting']} | {r['tokens']} | {r['loop_s']:.1f} | "
            f"{r['tokens_per_s']:.0f} | {_x(speed)} | {r['peak_mb']:.0f} | {_x(mem)} | {r['first_loss']:.6f} |"
        )
    return "\n".join(lines)


def phase_table(rows: list[dict]) -> str:
    """The online stages' steps split: transformers' generate alone (its tokens/s), the rest of the rollout
    method (what each tool does there differs: rewards, scoring, the reference), and the update (loop seconds
    minus rollout seconds)."""
    timed = [r for r in rows if "update_s" in r and "error" not in r]
    if not timed:
        return ""
    base = {r["workload"]: r for r in timed if r["tool"] == "trl" and r["setting"] == "default"}
    lines = [
        "| workload | tool | setting | generate s | generated tokens/s | rest of rollout s | update s | update x TRL |",
        "|" + "---|" * 8,
    ]
    for r in timed:
        b = base.get(r["workload"])
        speed = b["update_s"] / r["update_s"] if b and r["update_s"] else None
        per_s = r["generate_tokens_per_s"]
        lines.append(
            f"| {r['workload']} | {r['tool']} | {r['setting']} | {r['generate_s']:.1f} | "
            f"{'' if per_s is None else f'{per_s:.0f}'} | {r['rollout_s'] - r['generate_s']:.1f} | "
            f"{r['update_s']:.1f} | {_x(speed)} |"
        )
    caption = "Online stages, phase by phase (update x TRL: TRL's default update seconds / these)"
    return f"\n\n{caption}\n" + "\n".join(lines)


def _x(v: float | None) -> str:
    return "" if v is None else f"{v:.2f}x"


def main() -> None:
    args = parse()
    if args.child:
        return child(args)
    names = [w for w in args.workloads.split(",") if w]
    unknown = [w for w in names if w not in WORKLOADS]
    if unknown:
        sys.exit(f"unknown workload(s) {unknown}; choose from {', '.join(WORKLOADS)}")
    wanted = [s for s in args.settings.split(",") if s]
    root = Path(tempfile.mkdtemp())
    build_qwen2(str(root / "model"), args.shape)
    if "rm" in names:
        build_reward_model(str(root / "model"), str(root / "rm"))
    if any(WORKLOADS[n].teacher for n in names):
        build_qwen2(str(root / "teacher"), args.shape, seed=1)
    rows = []
    for name in names:
        w = WORKLOADS[name]
        model_dir = str(root / ("rm" if w.rm else "model"))
        for i, s in enumerate(w.settings):
            if s.name != "default" and (
                args.defaults_only
                or (wanted and s.tool == "alignkit" and not any(x in s.name for x in wanted))
            ):
                continue
            r = {"workload": name, "tool": s.tool, "setting": s.name, **spawn(name, i, model_dir)}
            if "error" not in r:
                r["tokens_per_s"] = r["tokens"] / r["loop_s"]
            rows.append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
    _ratios(rows)
    print(json.dumps(rows, indent=1) if args.json else table(rows) + phase_table(rows))


def _ratios(rows: list[dict]) -> None:
    """Each row against TRL's default row of its workload."""
    base = {
        r["workload"]: r
        for r in rows
        if r["tool"] == "trl" and r["setting"] == "default" and "error" not in r
    }
    for r in rows:
        b = base.get(r["workload"])
        if b and "error" not in r:
            r["speed_x"] = r["tokens_per_s"] / b["tokens_per_s"]
            r["memory_x"] = r["peak_mb"] / b["peak_mb"]


if __name__ == "__main__":
    main()
