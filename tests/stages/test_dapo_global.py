"""DAPO's dynamic sampling decides over the global batch: how many informative groups are kept, and how many
refill rounds run, is the same on every process."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import free_port, run_stage, write_jsonl
from tests.generation.test_online import PROMPTS
from tests.training.test_loop import _launch_two


def test_share_groups_by_hand() -> None:
    """Each process keeps up to its own target first; the others' shortfall comes from the surplus, in rank
    order; together never more than the global target, nor more than was found."""
    from alignkit.stages.grpo import share_groups

    assert share_groups([3], [5]) == [3]
    assert share_groups([3], [1]) == [1]
    assert share_groups([2, 2], [4, 0]) == [4, 0]
    assert share_groups([2, 2], [1, 5]) == [1, 3]
    assert share_groups([2, 2, 2], [0, 3, 3]) == [0, 3, 3]
    assert share_groups([2, 0], [3, 0]) == [2, 0]  # a filler rollout (target 0) counts nothing
    assert share_groups([2, 2], [0, 0]) == [0, 0]


# rank 1 gets one reward for every completion (each of its groups uninformative), rank 0 a reward that
# differs between completions; RANK is set by the launcher and unset in a single process
REWARDS = """import os

def rank_flat(prompts, completions, **kw):
    if os.environ.get("RANK", "0") == "1":
        return [1.0] * len(completions)
    return [float(sum(map(ord, c)) % 7) for c in completions]
"""

# `alignkit train` with GRPOStage wrapped to note, per process and rollout, how many informative groups it
# kept for training (none on a filler) and how many sampling calls it made
ENTRY = """import json, os, sys
from alignkit.stages.grpo import GRPOStage

_rollout, _sample = GRPOStage.rollout, GRPOStage.sample
calls = []


def sample(self, model, rows, n):
    calls.append(len(rows))
    return _sample(self, model, rows, n)


def rollout(self, model, rows, device):
    calls.clear()
    buffer = _rollout(self, model, rows, device)
    g = self.cfg.num_generations
    groups = [buffer[i : i + g] for i in range(0, len(buffer), g)]
    kept = 0 if self.filler_rollout else sum(len({s["reward"] for s in grp}) > 1 for grp in groups)
    path = os.path.join(os.path.dirname(self.cfg.output_dir), f"kept-{os.environ.get('RANK', '0')}.jsonl")
    with open(path, "a") as fh:
        fh.write(json.dumps({"kept": kept, "prompts": len(rows), "sample_calls": len(calls)}) + "\\n")
    return buffer


GRPOStage.rollout, GRPOStage.sample = rollout, sample
from alignkit.cli import main

main(sys.argv[1:])
"""


@pytest.mark.slow
def test_two_processes_refill_to_the_global_target(tiny_model: str, tmp_path: Path) -> None:
    """2 processes x 2 prompts, every group of rank 1 uninformative: the refill rounds run until the processes
    together hold 4 informative groups (rank 0 keeps all 4, rank 1 trains a filler), the run finishes, the
    zero-std share is that of the global batch as sampled (half), and the metrics have the keys of one
    process on the same global batch."""
    (tmp_path / "rank_rewards.py").write_text(REWARDS)
    (tmp_path / "entry.py").write_text(ENTRY)
    keys = {
        "stage": "grpo",
        "model_name_or_path": tiny_model,
        "dataset": write_jsonl(tmp_path / "p.jsonl", PROMPTS),
        "loss_type": "dapo",
        "reward_funcs": ["rank_rewards:rank_flat"],
        "num_generations": 4,
        "max_new_tokens": 4,
        "max_refill_rounds": 4,
        "max_steps": 2,
        "logging_steps": 1,
        "learning_rate": 1e-3,
        "torch_dtype": "float32",
    }
    two = _launch_two(
        {**keys, "per_device_train_batch_size": 2},
        tmp_path / "two",
        free_port(),
        entry=[str(tmp_path / "entry.py")],
        paths=(str(tmp_path),),
    )
    kept = {
        rank: [json.loads(line) for line in open(tmp_path / "two" / f"kept-{rank}.jsonl")] for rank in (0, 1)
    }
    assert [r["prompts"] for r in kept[0]] == [r["prompts"] for r in kept[1]] == [2, 2]
    assert [a["kept"] + b["kept"] for a, b in zip(kept[0], kept[1])] == [4, 4]  # the global target
    assert [r["kept"] for r in kept[1]] == [0, 0]
    # every process sampled in every round: the batch, then as many refill rounds as the other
    assert [r["sample_calls"] for r in kept[0]] == [r["sample_calls"] for r in kept[1]]
    assert all(r["sample_calls"] >= 3 for r in kept[0])  # 2 groups short: at least 2 rounds of 1 prompt each
    assert [r["step"] for r in two] == [1, 2]
    assert [r["frac_reward_zero_std"] for r in two] == [0.5, 0.5]

    sys.path.insert(0, str(tmp_path))
    try:
        run_stage(tmp_path / "one", {**keys, "per_device_train_batch_size": 4})
    finally:
        sys.path.remove(str(tmp_path))
    one = [json.loads(line) for line in open(tmp_path / "one" / "out" / "metrics.jsonl")]
    assert [sorted(r) for r in two] == [sorted(r) for r in one]
    assert all(r["loss"] == r["loss"] and r["reward/std"] > 0 for r in two)  # trained on informative groups


def test_no_refill_rounds_keeps_what_was_found(tiny_model: str, tmp_path: Path) -> None:
    """`max_refill_rounds: 0` keeps the informative groups of the batch as sampled and drops the rest."""
    from alignkit.config import build_config
    from alignkit.stages import get_stage

    (tmp_path / "flat_rewards.py").write_text(
        "def flat_for_12(prompts, completions, **kw):\n"
        "    return [1.0 if '12 + 7' in p else float(len(c) + sum(map(ord, c)) % 5) "
        "for p, c in zip(prompts, completions)]\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        cfg = build_config(
            {
                "stage": "grpo",
                "model_name_or_path": tiny_model,
                "dataset": write_jsonl(tmp_path / "p.jsonl", PROMPTS),
                "output_dir": str(tmp_path / "out"),
                "loss_type": "dapo",
                "reward_funcs": ["flat_rewards:flat_for_12"],
                "num_generations": 4,
                "max_new_tokens": 4,
                "max_refill_rounds": 0,
                "torch_dtype": "float32",
            }
        )
        stage = get_stage("grpo")(cfg)
        stage.build()
        torch.manual_seed(0)
        buffer = stage.rollout(stage.model, stage.train_rows[:3], torch.device("cpu"))
    finally:
        sys.path.remove(str(tmp_path))
    twelve = stage.train_rows[0]["prompt_ids"]
    assert len(buffer) == 2 * 4 and all(s["prompt_ids"] != twelve for s in buffer)
    assert stage.frac_zero_std == pytest.approx(1 / 3) and not stage.filler_rollout
