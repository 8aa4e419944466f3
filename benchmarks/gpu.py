"""One short GPU run, prepared before a GPU is at hand: `bash benchmarks/gpu.sh [--dry-run] [--out DIR]`.

Planned for under 8 minutes on one H100 (the steps' time limits add up to 7.6); each step runs in its own
process with its own limit, so a failure is a row of the table, not the end of the run:

1. gpu_tests: the GPU-only tests (QLoRA steps, fp16), which the suite skips without a GPU
2. matmul_peak: the card's measured bf16 matmul rate (8192^3), the denominator of the utilisation below
3. benchmark_*: `benchmarks/run.py` at Qwen2.5-0.5B's real shape in bf16, each stage, alignkit vs TRL
4. dpo_mfu: alignkit's DPO rows' model FLOPs utilisation, from the benchmark's tokens and seconds: per real
   token, 6 N for the policy's forward and backward plus 2 N for the reference's forward (N: the parameters
   each token meets, the output layer included, the embedding lookup not), attention's quadratic term left out
5. qlora: QLoRA SFT's peak memory and step time at that shape
6. rollouts: GRPO's generation alone, vLLM against transformers' generate (tokens/s); vLLM where installed
7. fsdp2: FSDP2 on the GPU (one process), 2 SFT steps and a folder that loads: a smoke test

Writes `gpu.json` and `gpu.md` into `--out` (default `benchmarks/gpu-results`). `--dry-run` runs every step on
CPU at a tiny size (the GPU tests are collected, not run; the benchmark for DPO and GRPO only, the offline and
the online path; QLoRA as plain LoRA; no vLLM): the suite runs it, so the first GPU minute is not spent on a
typo.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
GPU_TESTS = ["tests/training/test_integrations.py"]  # the files holding the @GPU tests
WORKLOADS = ("sft", "rm", "dpo", "kto", "grpo")
DRY_WORKLOADS = ("dpo", "grpo")  # a dry run checks the offline and the online benchmark path
# seconds per step on the GPU (7.6 minutes in all); each benchmark workload is its own step, so one that runs
# over loses its own rows only
LIMITS = {"gpu_tests": 45, "matmul_peak": 20, "benchmark_sft": 45, "benchmark_rm": 45, "benchmark_dpo": 60,
          "benchmark_kto": 45, "benchmark_grpo": 75, "qlora": 40, "rollouts": 40, "fsdp2": 40}  # fmt: skip


def commands(dry: bool) -> dict[str, list[str]]:
    py = sys.executable
    tests = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0", *GPU_TESTS]
    bench = [py, str(HERE / "run.py"), "--json"]
    step = [py, str(HERE / "gpu_steps.py")]
    flag = ["--dry-run"] if dry else []
    if dry:  # the offline path (DPO) and the online one (GRPO), spawned per setting as on the GPU
        tests += ["--collect-only"]
        bench += ["--shape", "tiny", "--defaults-only", "--steps", "1"]
        bench += ["--max-new-tokens", "8", "--generations", "2"]
        workloads = DRY_WORKLOADS
    else:
        tests += ["-k", "gpu"]
        bench += ["--shape", "qwen2.5-0.5b", "--steps", "8"]
        bench += ["--settings", "padding_free,prefix_sharing,precompute_ref_log_probs"]  # the planned rows
        workloads = WORKLOADS
    cmds = {"gpu_tests": tests, **{f"benchmark_{w}": [*bench, "--workloads", w] for w in workloads}}
    for name in ("matmul_peak", "qlora", "rollouts", "fsdp2"):
        cmds[name] = [*step, name, *flag]
    return {name: cmds[name] for name in LIMITS if name in cmds}


def run_step(name: str, cmd: list[str], dry: bool) -> dict:
    env = {
        **os.environ,
        "PYTHONPATH": f"{REPO}{os.pathsep}{HERE}",
        "TQDM_DISABLE": "1",
        "HF_HUB_OFFLINE": "1",
    }
    if dry:
        env["CUDA_VISIBLE_DEVICES"] = ""  # a dry run is the CPU run, on any machine
    else:
        env.setdefault("CUDA_VISIBLE_DEVICES", "0")  # the suite's conftest hides GPUs unless this is set
    t = time.perf_counter()
    try:
        limit = 600 if dry else LIMITS[name]  # the limits are the GPU's; a CPU dry run is only bounded
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=limit)
    except subprocess.TimeoutExpired:
        return {"ok": False, "s": limit, "error": f"over its {limit} s limit"}
    out: dict = {"ok": proc.returncode == 0, "s": round(time.perf_counter() - t, 1)}
    if name.startswith("benchmark") and proc.returncode == 0:
        out["rows"] = json.loads(_json_array(proc.stdout))
        failed = [f"{r['tool']} {r['setting']}: {r['error']}" for r in out["rows"] if "error" in r]
        if failed:
            return {**out, "ok": False, "error": "; ".join(failed)}
    elif name == "gpu_tests":
        out["summary"] = (proc.stdout.strip().splitlines() or [""])[-1]
    else:
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if lines:
            out.update(json.loads(lines[-1][7:]))
    if not out["ok"] or (not name.startswith(("benchmark", "gpu_tests")) and len(out) == 2):
        out["ok"] = False
        out["error"] = (
            proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines() or ["no output"]
        )[-1]
    return out


def _json_array(stdout: str) -> str:
    """run.py's `--json` table: from its first line `[` on (a library may print a line before it, e.g.
    DeepSpeed's accelerator warning on import)."""
    lines = stdout.splitlines()
    return "\n".join(lines[lines.index("[") :]) if "[" in lines else stdout


def dpo_mfu(results: dict, model_params: int) -> dict:
    """Model FLOPs utilisation of alignkit's DPO rows against the measured matmul peak."""
    peak = results.get("matmul_peak", {}).get("tflops")
    rows = [
        r
        for r in results.get("benchmark_dpo", {}).get("rows", [])
        if r["tool"] == "alignkit" and "error" not in r
    ]
    out = {}
    for r in rows:
        per_token = 6 * model_params + (0 if "precompute" in r["setting"] else 2 * model_params)
        achieved = per_token * r["tokens"] / r["loop_s"] / 1e12
        out[r["setting"]] = {"tflops": achieved, "mfu": achieved / peak if peak else None}
    return out


def model_params(shape: str) -> int:
    """Parameters a token meets in the benchmark's Qwen2 of `shape` (tied output layer counted once, as the
    output matmul; the embedding lookup costs no FLOPs)."""
    sys.path.insert(0, str(HERE))
    from harness import SHAPE_VOCAB, SHAPES, VOCAB

    s = SHAPES[shape]
    h, inter, layers = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"]
    kv = h // s["num_attention_heads"] * s["num_key_value_heads"]
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * inter  # q, o; k, v; gate, up, down
    return layers * per_layer + SHAPE_VOCAB.get(shape, VOCAB) * h


def markdown(results: dict, dry: bool) -> str:
    lines = [
        f"# benchmarks/gpu.sh{' --dry-run' if dry else ''}",
        "",
        "| step | ok | s | figures |",
        "|---|---|---|---|",
    ]
    for name, r in results.items():
        if name.startswith("benchmark") and "rows" in r:
            figures = "; ".join(
                f"{x['workload']} {x['tool']} {x['setting']}: "
                + (
                    f"{x['tokens'] / x['loop_s']:.0f} tok/s, {x['peak_mb']:.0f} MB"
                    if "error" not in x
                    else x["error"]
                )
                for x in r["rows"]
            )
        else:
            figures = ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("ok", "s", "rows"))
        lines.append(f"| {name} | {'yes' if r.get('ok', True) else 'NO'} | {r.get('s', '')} | {figures} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="every step on CPU at a tiny size")
    p.add_argument("--out", default=str(HERE / "gpu-results"))
    args = p.parse_args()
    results: dict = {}
    for name, cmd in commands(args.dry_run).items():
        results[name] = run_step(name, cmd, args.dry_run)
        print(f"{name}: {'ok' if results[name]['ok'] else 'FAILED'} in {results[name]['s']} s", flush=True)
    results["dpo_mfu"] = dpo_mfu(results, model_params("tiny" if args.dry_run else "qwen2.5-0.5b"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(results, indent=1))
    (out / "gpu.md").write_text(markdown(results, args.dry_run))
    print(f"wrote {out / 'gpu.json'} and {out / 'gpu.md'}")
    return 0 if all(r.get("ok", True) for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
