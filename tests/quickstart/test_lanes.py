"""The quickstart's rows side by side (alignkit/quickstart/lanes.py), with stand-in rows that log when they ran:
the reward model is trained once, before any row that scores with it starts; distillation starts after GRPO
finished; never more than `jobs` rows at once; results in the order asked; each row's training seconds are
counted, the reward model's going to the first row that uses it."""

from __future__ import annotations

import json
import time
from pathlib import Path

from alignkit.quickstart.lanes import run_rows
from alignkit.quickstart.recipes import Context
from alignkit.quickstart.task import split_problems


def _log(ctx: Context, name: str, seconds: float) -> str:
    start = time.time()
    time.sleep(seconds)
    with open(Path(ctx.output_dir) / "log.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"name": name, "start": start, "end": time.time()}) + "\n")
    ctx.train_wall_s += seconds
    return f"{ctx.output_dir}/{name}"


def fake_reward_model(ctx: Context) -> str:
    return _log(ctx, "rm", 1.0)


def fake_row(ctx: Context, name: str) -> str:
    assert ctx.reward_model or name not in ("ppo", "online_dpo_rm"), name  # the RM rows see its folder
    return _log(ctx, name, 0.3)


def measure(ctx: Context, name: str, runner: object) -> dict:
    before = ctx.train_wall_s
    return {"model_dir": fake_row(ctx, name), "wall_s": round(ctx.train_wall_s - before, 1)}


def test_rows_run_side_by_side_in_dependency_order(tmp_path: Path) -> None:
    ctx = Context(str(tmp_path), 0, split_problems(0), base_model="unused", sft_model="sft")
    rows = {name: fake_row for name in ("dpo", "ppo", "grpo", "distill", "online_dpo_rm", "orpo")}
    results = run_rows(ctx, rows, measure, jobs=2, reward_model=fake_reward_model)
    assert list(results) == list(rows)
    log = {r["name"]: r for r in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines())}
    assert set(log) == {*rows, "rm"}
    assert log["ppo"]["start"] >= log["rm"]["end"] and log["online_dpo_rm"]["start"] >= log["rm"]["end"]
    assert log["distill"]["start"] >= log["grpo"]["end"]
    events = sorted([(r["start"], 1) for r in log.values()] + [(r["end"], -1) for r in log.values()])
    running = [sum(step for _, step in events[: i + 1]) for i in range(len(events))]
    assert max(running) == 2  # two at once, never three
    assert results["ppo"]["wall_s"] == 1.3 and results["online_dpo_rm"]["wall_s"] == 0.3
    assert abs(ctx.train_wall_s - 2.8) < 1e-9 and ctx.reward_model == f"{tmp_path}/rm"
