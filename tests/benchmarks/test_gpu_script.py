"""`benchmarks/gpu.sh --dry-run`: every step of the GPU run on CPU at a tiny size, so the first GPU minute is not
spent on a typo. Each step must succeed and report its figures; the benchmark rows are alignkit's and TRL's
defaults of DPO and GRPO (the offline and the online path) with their first losses; the DPO utilisation is computed from them."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_gpu_script_dry_run_passes_every_step(tmp_path: Path) -> None:
    done = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu.sh"), "--dry-run", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    results = json.loads((tmp_path / "gpu.json").read_text())
    failed = {k: v.get("error") for k, v in results.items() if not v.get("ok", True)}
    assert done.returncode == 0 and not failed, (failed, done.stdout[-2000:], done.stderr[-2000:])
    assert (
        "2 tests collected" in results["gpu_tests"]["summary"]
        or "collected" in results["gpu_tests"]["summary"]
    )
    assert results["matmul_peak"]["tflops"] > 0
    for workload in ("dpo", "grpo"):
        rows = results[f"benchmark_{workload}"]["rows"]
        assert {(r["tool"], r["setting"]) for r in rows} == {("alignkit", "default"), ("trl", "default")}
        assert all(r["tokens"] > 0 and r["first_loss"] == r["first_loss"] for r in rows), rows
    for r in results["benchmark_grpo"]["rows"]:  # GRPO's phases, timed apart, for both tools
        assert r["generate_tokens_per_s"] > 0 and 0 < r["generate_s"] <= r["rollout_s"] < r["loop_s"], r
        assert r["update_s"] == pytest.approx(r["loop_s"] - r["rollout_s"], abs=0.01)
    assert results["qlora"]["finetuning_type"] == "lora" and results["qlora"]["peak_mb"] > 0
    assert results["rollouts"]["hf"]["tokens_per_s"] > 0 and "skipped" in results["rollouts"]["vllm"]
    assert results["fsdp2"]["processes"] == 2 and len(results["fsdp2"]["losses"]) == 2
    assert 0 < results["dpo_mfu"]["default"]["mfu"] < 1
    table = (tmp_path / "gpu.md").read_text()
    assert table.startswith("# benchmarks/gpu.sh --dry-run") and "| benchmark_grpo | yes |" in table
