"""The embedded quickstart: SFT learns the task, and the sloppy annotator's error with it."""

from __future__ import annotations

import json
from pathlib import Path

from alignkit.quickstart.task import Problem, parse_answer, preference_rows, sft_rows, split_problems


def test_split_keeps_both_orders_of_a_problem_on_one_side() -> None:
    """a + b and b + a are one problem: neither order of a test or validation pair is in training."""
    split = split_problems(0)
    assert len(split.test) == len(split.validation) == 300

    def unordered(problems: list[Problem]) -> set[frozenset[int]]:
        return {frozenset((p.a, p.b)) for p in problems}

    train = unordered(split.train)
    assert not train & unordered(split.test)
    assert not train & unordered(split.validation)
    assert not unordered(split.test) & unordered(split.validation)
    assert len(unordered(split.test)) == 300  # distinct pairs, no a + b and b + a both in test
    assert len(split.train) + sum(2 - (p.a == p.b) for p in split.test + split.validation) == 8100
    assert 0.35 < sum(p.carry for p in split.test) / 300 < 0.55  # carry share as in the whole task
    assert split_problems(0) == split and split_problems(1).test != split.test


def test_task_data_is_systematically_wrong_on_carries() -> None:
    train = split_problems(0).train
    rows = sft_rows(train, n=2000, carry_error_rate=0.6, seed=0)
    carry_wrong = no_carry_wrong = carries = 0
    for row in rows:
        a, b = map(int, row["messages"][0]["content"][8:-1].split(" + "))
        p = Problem(a, b)
        wrong = int(row["messages"][1]["content"]) != p.answer
        carries += p.carry
        carry_wrong += wrong and p.carry
        no_carry_wrong += wrong and not p.carry
    assert no_carry_wrong == 0
    assert 0.55 < carry_wrong / carries < 0.65
    assert Problem(27, 48).wrong() == 65 and Problem(21, 34).wrong() == 65  # forgot / spurious carry
    pair = preference_rows(train, 1, seed=0)[0]
    assert pair["chosen"][0]["content"] != pair["rejected"][0]["content"]
    assert parse_answer(" 75 ") == 75 and parse_answer("none") is None


def test_quickstart_rewrites_its_data_when_rerun_with_another_seed(tmp_path: Path) -> None:
    from alignkit.quickstart.run import Context, _pairs

    split = split_problems(0)
    first = Context(str(tmp_path), 0, split, base_model="unused")
    path = _pairs(first)
    text = Path(path).read_text()
    assert _pairs(first) == path and Path(path).read_text() == text  # written once per run
    _pairs(Context(str(tmp_path), 1, split, base_model="unused"))
    assert Path(path).read_text() != text  # a new run with another seed does not reuse it


def test_quickstart_every_method_lifts_the_sft_model(tmp_path: Path) -> None:
    """The whole quickstart (about 11 minutes on a 2-core CI machine): SFT learns the task and the annotator's error; every
    method started from it lifts test accuracy; the controls show what each ingredient adds.

    The thresholds hold on every one of 8 seeds (`python benchmarks/quickstart_seeds.py --seeds 0 1 2 3 4 5 6
    7`, README) with a margin, so floating-point differences between machines do not flip them: a lift that
    is small on some seed (PPO with the learned reward model: +0.02 on seed 1) is asserted only as far as it
    holds everywhere."""
    from alignkit.quickstart.run import run_quickstart

    report = run_quickstart(str(tmp_path / "qs"), seed=0)
    saved = json.loads((tmp_path / "qs" / "report.json").read_text())
    assert saved["base_accuracy"] == report["base_accuracy"] < 0.05
    sft = saved["methods"]["sft"]
    assert sft["accuracy"] > 0.4 and sft["wall_s"] > 0 and sft["n"] == 300
    assert sft["ci95"][0] < sft["accuracy"] < sft["ci95"][1]
    # it learned the forgotten carry: right without carries, mostly wrong with them
    assert sft["no_carry_accuracy"] > 0.8 > 0.4 > sft["carry_accuracy"]
    lifts = {m: r["accuracy"] - sft["accuracy"] for m, r in saved["methods"].items() if m != "sft"}
    # over 8 seeds on a 16-core machine the smallest test lifts were: dpo +0.28, simpo +0.24, orpo +0.29,
    # grpo +0.24, ppo_verifiable +0.21, kto +0.10, ppo +0.02; seed 0 on a 2-core CI machine: dpo +0.24,
    # simpo +0.21, orpo +0.23, grpo +0.21, ppo_verifiable +0.14, kto +0.14, ppo +0.13
    assert min(lifts[m] for m in ("dpo", "simpo", "orpo", "grpo", "ppo_verifiable")) > 0.10, lifts
    assert lifts["kto"] > 0.05 and lifts["ppo"] > 0, lifts
    for m in lifts:  # the carry error is what gets fixed (smallest over 8 seeds: ppo +0.28)
        assert saved["methods"][m]["carry_accuracy"] > sft["carry_accuracy"] + 0.15, m
    # the reward model fits its pairs and ranks held-out ones, yet prefers an off-by-one answer on carries
    rm = saved["reward_model"]
    assert rm["train_pair_accuracy"] > 0.95 and rm["test_pair_accuracy"] > 0.95, rm
    assert rm["test_carry_prefers_answer_plus_one"] > 0.2, rm  # the shortcut: 0.24-0.95 over 8 seeds
    controls = saved["controls"]
    assert set(controls) == {"sft_on_chosen", "dpo_without_nll", "ppo_weak_kl"}
    assert controls["dpo_without_nll"]["accuracy"] < sft["accuracy"]  # plain DPO drifts (seed 0: -0.47)
    # a tenth of the KL penalty: the reward model's score rises while the problems SFT already solved (no
    # carry) are lost: reward hacking (on every seed: score +0.14 or more, no-carry accuracy -0.07 or more)
    hacked = controls["ppo_weak_kl"]
    assert hacked["reward_last"] > hacked["reward_first"] + 0.1, hacked
    assert hacked["no_carry_accuracy"] < sft["no_carry_accuracy"] - 0.05, hacked
    md = (tmp_path / "qs" / "report.md").read_text()
    assert "| kto |" in md and "control: sft_on_chosen" in md and "Reward model: fits" in md
