"""The reward-hacking monitor: its rules on crafted metric streams (exact thresholds), and an online stage that
evaluates on held-out prompts while it trains (baseline at step 0, eval_* records, hacking.json, the best model,
`hacking_action: stop`)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from alignkit.training.hacking import HackingMonitor, replay
from tests.conftest import run_stage, write_jsonl
from tests.generation.test_online import PROMPTS


def _prompts(rng: random.Random, p: float, n: int = 200) -> list[float]:
    return [1.0 if rng.random() < p else 0.0 for _ in range(n)]


def _eval(reward: list[float], quality: list[float]) -> dict[str, list[float]]:
    return {"reward": reward, "exact_match": quality, "length": [3.0]}


def test_reward_up_while_held_out_quality_falls_over_two_evaluations() -> None:
    """Per prompt: the training reward on the held-out prompts and the held-out accuracy, against the start."""
    rng = random.Random(0)
    start_q = _prompts(rng, 0.6)
    start_r = [rng.gauss(1.0, 0.5) for _ in start_q]
    up = [r + 1.0 + rng.gauss(0, 0.3) for r in start_r]  # the reward model's score climbs
    fallen = [q if rng.random() < 0.75 else 0.0 for q in start_q]  # a quarter of the right answers lost
    better = [1.0 if q or rng.random() < 0.4 else 0.0 for q in start_q]
    # hacking: flagged at the second evaluation after the start (one evaluation alone never decides)
    m = HackingMonitor("exact_match")
    assert m.check(0, _eval(start_r, start_q)) == []
    assert m.check(10, _eval(up, fallen)) == []
    [flag] = m.check(20, _eval(up, fallen))
    assert flag["rule"] == "reward_up_quality_down" and flag["step"] == 20 and m.flags == [flag]
    assert "training reward on held-out prompts rose +1.0" in flag["message"]
    assert "held-out exact_match fell -0.1" in flag["message"]
    # honest: reward and quality rise together
    h = HackingMonitor("exact_match")
    for step, q in ((0, start_q), (10, better), (20, better)):
        assert h.check(step, _eval(start_r if step == 0 else up, q)) == []
    # one noisy dip, then back: the two-evaluation average does not fall
    n = HackingMonitor("exact_match")
    for step, q in ((0, start_q), (10, fallen), (20, better), (30, start_q)):
        assert n.check(step, _eval(start_r if step == 0 else up, q)) == []
    # the quality is the reward itself (no eval_reward_funcs): never this rule
    r = HackingMonitor("reward")
    for step, rew in ((0, start_r), (10, up), (20, up)):
        assert r.check(step, {"reward": rew, "length": [3.0]}) == []


def test_length_and_kl_rules_at_their_thresholds() -> None:
    m = HackingMonitor("reward")
    m.check(0, {"reward": [0.0], "length": [10.0, 10.0], "kl": [0.0, 0.0]})
    assert m.check(1, {"reward": [0.0], "length": [14.0, 15.0], "kl": [0.4, 0.6]}) == []  # 1.45x; kl 0 -> 0.5
    [flag] = m.check(2, {"reward": [0.0], "length": [15.0, 16.2], "kl": [0.5, 0.5]})  # 1.56x
    assert flag["rule"] == "length" and "1.56x as long" in flag["message"]
    assert m.check(3, {"reward": [0.0], "length": [10.0], "kl": [0.9, 1.1]}) == []  # 0.5 -> 1.0: +0.5 nat
    [flag] = m.check(4, {"reward": [0.0], "length": [10.0], "kl": [2.0, 2.2]})  # 1.0 -> 2.1: x2.1, +1.1 nats
    assert flag["rule"] == "kl_jump" and "from 1.00 to 2.10" in flag["message"]
    assert m.check(5, {"reward": [0.0], "length": [10.0], "kl": [3.0, 3.2]}) == []  # x1.5: no jump
    restored = HackingMonitor("reward")
    restored.load_state_dict(json.loads(json.dumps(m.state_dict())))  # as a checkpoint keeps it
    assert restored.state_dict() == m.state_dict()


def _grpo(tiny_model: str, data: str, **kw: object) -> dict:
    return {
        "stage": "grpo",
        "model_name_or_path": tiny_model,
        "dataset": data,
        "reward_funcs": ["length"],
        "length_target": 2,
        "eval_reward_funcs": ["exact_match"],
        "val_size": 4,
        "eval_steps": 2,
        "num_generations": 4,
        "per_device_train_batch_size": 2,
        "max_new_tokens": 4,
        "max_steps": 4,
        "logging_steps": 1,
        "learning_rate": 1e-3,
        "torch_dtype": "float32",
        "beta": 0.05,
        **kw,
    }


def test_online_stage_evaluates_held_out_prompts_while_it_trains(tiny_model: str, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "p.jsonl", PROMPTS * 2)
    events: list = []
    from alignkit import api

    api.train(_grpo(tiny_model, data, output_dir=str(tmp_path / "out")), callbacks=[events.append])
    out = tmp_path / "out"
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    evals = [r for r in records if "eval_reward" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]  # the starting policy, then every eval_steps
    for key in ("eval_reward", "eval_reward/length", "eval_exact_match", "eval_length", "eval_kl"):
        assert key in evals[-1], key
    assert evals[0]["eval_kl"] == pytest.approx(0.0, abs=1e-5)  # the policy is the reference at the start
    assert all(0 < r["eval_length"] <= 4 for r in evals)
    report = json.loads((out / "hacking.json").read_text())
    assert report["metric"] == "exact_match" and [e["step"] for e in report["evaluations"]] == [0, 2, 4]
    assert len(report["evaluations"][0]["per_prompt"]["exact_match"]) == 4
    assert replay(report) == report["flags"]  # the saved evaluations give the same flags again
    assert report["best"]["step"] in (2, 4) and (out / "best" / "model.safetensors").is_file()
    assert any(e.kind == "eval" for e in events)


def test_hacking_action_stop_stops_at_the_flag(
    tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flag at the step-2 evaluation with `hacking_action: stop`: the run stops there, with a checkpoint,
    a `hacking` event and the flag in hacking.json; `warn` trains on."""
    original = HackingMonitor.check

    def flag_at_two(self: HackingMonitor, step: int, values: dict) -> list[dict]:
        found = original(self, step, values)
        if step == 2:
            found = [{"step": 2, "rule": "length", "message": "crafted"}]
            self.flags += found
        return found

    monkeypatch.setattr(HackingMonitor, "check", flag_at_two)
    data = write_jsonl(tmp_path / "p.jsonl", PROMPTS * 2)
    events: list = []
    from alignkit import api

    # beta 0: no reference, so no real KL flag beside the crafted one (at lr 1e-3 the KL does jump)
    keys = _grpo(
        tiny_model, data, max_steps=6, beta=0.0, hacking_action="stop", output_dir=str(tmp_path / "stop")
    )
    api.train(keys, callbacks=[events.append])
    steps = [json.loads(line)["step"] for line in open(tmp_path / "stop" / "metrics.jsonl")]
    assert max(steps) == 2 and (tmp_path / "stop" / "checkpoint-2").is_dir()
    assert [e.data["rule"] for e in events if e.kind == "hacking"] == ["length"]
    assert json.loads((tmp_path / "stop" / "hacking.json").read_text())["flags"][0]["message"] == "crafted"
    record, _ = run_stage(
        tmp_path / "warn", {**keys, "hacking_action": "warn", "output_dir": str(tmp_path / "w")}
    )
    assert record["step"] == 6 and record["eval_hacking_flags"] == 1.0
