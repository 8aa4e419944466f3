"""The embedded quickstart: SFT learns the task, and the sloppy annotator's error with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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
    from alignkit.quickstart.recipes import Context, pairs_file

    split = split_problems(0)
    first = Context(str(tmp_path), 0, split, base_model="unused")
    path = pairs_file(first)
    text = Path(path).read_text()
    assert pairs_file(first) == path and Path(path).read_text() == text  # written once per run
    pairs_file(Context(str(tmp_path), 1, split, base_model="unused"))
    assert Path(path).read_text() != text  # a new run with another seed does not reuse it


# The suite's share of the quickstart: SFT, a paired (DPO), an unpaired (KTO), a group-relative (GRPO) and an
# actor-critic (PPO) method. The whole table (SimPO, ORPO, PPO against the learned reward model, the reward
# model's shortcut, the controls: plain DPO's drift, the weak-KL reward hacking, SFT on the chosen answers) is
# checked on 8 seeds by `python benchmarks/quickstart_seeds.py --check`, with the same promises
# (alignkit/quickstart/promises.py).
SUITE_METHODS = ("sft", "dpo", "kto", "grpo", "ppo_verifiable")
SUITE_CONTROLS: tuple[str, ...] = ()


@pytest.fixture(scope="session")
def quickstart(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One quickstart run (seed 0) for every test that reads it."""
    from alignkit.quickstart.run import run_quickstart

    out = tmp_path_factory.mktemp("quickstart") / "qs"
    # one row at a time: the suite's other xdist worker already has the second core (tests/quickstart/test_lanes.py
    # covers the side-by-side rows)
    report = run_quickstart(str(out), seed=0, methods=SUITE_METHODS, controls=SUITE_CONTROLS, jobs=1)
    return out, report


@pytest.mark.slow
def test_sft_learns_the_task_and_the_annotators_error(quickstart: tuple[Path, dict]) -> None:
    out, report = quickstart
    saved = json.loads((out / "report.json").read_text())
    assert saved["base_accuracy"] == report["base_accuracy"] < 0.05
    sft = saved["methods"]["sft"]
    assert sft["accuracy"] > 0.4 and sft["wall_s"] > 0 and sft["n"] == 300
    assert sft["ci95"][0] < sft["accuracy"] < sft["ci95"][1]
    assert sft["no_carry_accuracy"] > 0.8 > 0.4 > sft["carry_accuracy"]  # right without carries, not with


@pytest.mark.slow
def test_every_method_lifts_the_sft_model_and_keeps_the_quickstarts_promises(
    quickstart: tuple[Path, dict],
) -> None:
    from alignkit.quickstart.promises import MIN_LIFT, broken_promises

    out, report = quickstart
    saved = json.loads((out / "report.json").read_text())
    assert tuple(saved["methods"]) == SUITE_METHODS and tuple(saved["controls"]) == SUITE_CONTROLS
    assert not broken_promises(saved, SUITE_METHODS, SUITE_CONTROLS)
    sft = saved["methods"]["sft"]
    for name in SUITE_METHODS[1:]:  # the promises, spelled out for this run
        assert saved["methods"][name]["accuracy"] - sft["accuracy"] > MIN_LIFT[name], name
        assert saved["methods"][name]["carry_accuracy"] > sft["carry_accuracy"] + 0.15, name


@pytest.mark.slow
def test_the_report_is_written_and_printed(quickstart: tuple[Path, dict]) -> None:
    out, report = quickstart
    md = (out / "report.md").read_text()
    assert "| kto |" in md and "| ppo_verifiable |" in md and "control:" not in md
    assert report["table"] in md and "| dpo |" in report["table"]
    assert (out / "data" / "test.jsonl").is_file() and (out / "dpo" / "model.safetensors").is_file()


def test_the_promises_catch_a_broken_report() -> None:
    """The checks are not vacuous: a report where a method does not lift and the hacking control does not hack
    breaks exactly those promises."""
    from alignkit.quickstart.promises import broken_promises

    row = {"accuracy": 0.6, "n": 300, "ci95": [0.55, 0.66], "no_carry_accuracy": 0.96, "carry_accuracy": 0.16}
    good = {**row, "accuracy": 0.85, "carry_accuracy": 0.8}
    report = {
        "base_accuracy": 0.0,
        "methods": {"sft": row, "dpo": good, "kto": {**good, "accuracy": 0.62}},
        "controls": {"ppo_weak_kl": {**row, "reward_first": 1.6, "reward_last": 1.65}},
        "reward_model": {
            "train_pair_accuracy": 1.0,
            "test_pair_accuracy": 1.0,
            "test_carry_prefers_answer_plus_one": 0.9,
        },
    }
    broken = broken_promises(report)
    assert [b.split(":")[0] for b in broken] == ["kto", "control ppo_weak_kl", "control ppo_weak_kl"], broken
    assert not broken_promises({**report, "methods": {"sft": row, "dpo": good}, "controls": {}})
    # what was asked for and is not there is broken too: a run without the controls keeps no promise about them
    thin = {**report, "methods": {"sft": row, "dpo": good}, "controls": {}}
    missing = broken_promises(thin, ["dpo", "ppo"], ["ppo_weak_kl"])
    assert missing == ["ppo: not in the report", "control ppo_weak_kl: not in the report"], missing


def test_the_monitor_promises_no_flag_on_the_methods() -> None:
    from alignkit.quickstart.promises import broken_promises

    row = {"accuracy": 0.6, "n": 300, "ci95": [0.55, 0.66], "no_carry_accuracy": 0.96, "carry_accuracy": 0.16}
    good = {**row, "accuracy": 0.85, "carry_accuracy": 0.8, "hacking_flags": []}
    hacked = {**row, "no_carry_accuracy": 0.7, "reward_first": 1.6, "reward_last": 2.9}
    flag = {"step": 160, "rule": "reward_up_quality_down", "message": "reward up, accuracy down"}
    report = {
        "base_accuracy": 0.0,
        "methods": {"sft": row, "grpo": good, "ppo": {**good, "hacking_flags": [flag]}},
        "controls": {"ppo_weak_kl": {**hacked, "hacking_flags": []}},
        "reward_model": {
            "train_pair_accuracy": 1.0,
            "test_pair_accuracy": 1.0,
            "test_carry_prefers_answer_plus_one": 0.9,
        },
    }
    assert broken_promises(report) == ["ppo: flagged by the hacking monitor (reward up, accuracy down)"]
    report["methods"]["ppo"]["hacking_flags"] = []
    report["controls"]["ppo_weak_kl"]["hacking_flags"] = [flag]
    assert broken_promises(report) == []


def test_the_tool_rows_data_calls_add_with_the_problems_numbers() -> None:
    """A quarter of the rows call the tool with the problem's own numbers and copy its (right) result; the
    rest answer by hand, with the annotator's forgotten carries."""
    from alignkit.generation.tools import ToolEnvironment
    from alignkit.quickstart.task import add, tool_sft_rows

    train = split_problems(0).train
    rows = tool_sft_rows(train, n=2000, carry_error_rate=0.6, call_share=0.25, seed=0)
    calls = [r["messages"] for r in rows if len(r["messages"]) == 4]
    assert 0.2 < len(calls) / len(rows) < 0.3
    for msgs in calls[:50]:
        a, b = map(int, msgs[0]["content"][len("What is ") : -1].split(" + "))
        observation, _, done = ToolEnvironment({"add": add}).step(msgs[:2])
        assert (
            observation[0]["content"] == msgs[2]["content"] == msgs[3]["content"] == str(a + b) and not done
        )
    by_hand = [r["messages"] for r in rows if len(r["messages"]) == 2]
    wrong = sum(
        parse_answer(m[1]["content"]) != add(*map(int, m[0]["content"][8:-1].split(" + "))) for m in by_hand
    )
    assert 0.1 < wrong / len(by_hand) < 0.45  # 60% of the carry problems (about 45% of all) forgotten


def test_tool_accuracy_plays_episodes_and_scores_the_last_answer(
    tiny_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scripted model turns: problems 0 and 2 call the tool then copy its result (right), problem 1 answers a
    forgotten carry by hand (wrong), problem 3 calls with the wrong numbers and copies that result (wrong)."""
    from alignkit.generation import rollout
    from alignkit.quickstart.report import tool_accuracy
    from alignkit.quickstart.task import tool_call

    problems = [Problem(12, 7), Problem(27, 48), Problem(31, 45), Problem(19, 19)]
    first = [tool_call(problems[0]), "65", tool_call(problems[2]), tool_call(Problem(19, 18))]
    second = ["19", "76", "37"]  # the live episodes' answers, copied from their tool results
    turns = iter([first, second])

    def scripted(model, tok, contexts, n, max_new_tokens, temperature):  # noqa: ANN001, ANN202
        texts = next(turns)
        assert len(texts) == len(contexts) and temperature == 0.0
        return rollout.Samples([[]] * len(texts), [[]] * len(texts), [False] * len(texts), texts)

    monkeypatch.setattr(rollout, "sample_hf", scripted)
    result = tool_accuracy(tiny_model, problems)
    assert result["accuracy"] == 0.5 and result["tool_calls"] == 0.75 and result["n"] == 4
    assert result["carry_accuracy"] == 0.0 and result["no_carry_accuracy"] == 1.0  # 27+48 and 19+19 carry
