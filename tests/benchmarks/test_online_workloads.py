"""`benchmarks/run.py`'s online DPO and distillation workloads, alignkit against TRL 1.16's `OnlineDPOTrainer`
and `GKDTrainer` at a tiny size: both tools run, each reports its generation apart, and the first losses agree
where they can (online DPO starts at the reference: ln 2 for both; distillation on the data's completions
feeds both the same tokens)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_online_dpo_and_distillation_run_beside_trl() -> None:
    argv = ["--shape", "tiny", "--workloads", "online_dpo,distill_kd", "--steps", "1", "--defaults-only"]
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "run.py"), *argv, "--max-new-tokens", "8", "--json"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()  # a library may print a line before the JSON
    rows = json.loads("\n".join(lines[next(i for i, ln in enumerate(lines) if ln == "[") :]))
    got = {(r["workload"], r["tool"]): r for r in rows}
    assert set(got) == {(w, t) for w in ("online_dpo", "distill_kd") for t in ("alignkit", "trl")}, rows
    for tool in ("alignkit", "trl"):
        dpo, kd = got["online_dpo", tool], got["distill_kd", tool]
        assert dpo["first_loss"] == pytest.approx(math.log(2), abs=1e-4), dpo
        assert 0 < dpo["generated_tokens"] <= 4 * 2 * 8 and dpo["generate_s"] <= dpo["rollout_s"], dpo
        assert dpo["update_s"] == pytest.approx(dpo["loop_s"] - dpo["rollout_s"], abs=0.01)
        assert kd["generated_tokens"] == 0 and kd["tokens"] == got["distill_kd", "trl"]["tokens"] > 0, kd
    ours, theirs = got["distill_kd", "alignkit"]["first_loss"], got["distill_kd", "trl"]["first_loss"]
    assert ours == pytest.approx(theirs, rel=1e-4), (ours, theirs)
