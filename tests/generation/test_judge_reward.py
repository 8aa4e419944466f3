"""The LLM judge as a reward: grades mapped to [0, 1], pairwise win shares within a group, unparsable verdicts
left without a judge reward and counted, and a GRPO run rewarded by a stub judge on 127.0.0.1."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from alignkit.generation.judge_reward import JudgeReward
from tests.conftest import run_stage, write_jsonl
from tests.generation.test_judge import chat, make_judge
from tests.generation.test_judge import stub as stub  # noqa: F401 - the stub judge server fixture
from tests.generation.test_online import PROMPTS


def _answer(text: str, which: str) -> str:
    return re.search(rf"\[The Start of {which}'s Answer\]\n(.*?)\n\[The End", text, re.S).group(1)


def grade_by_length(body: dict, n: int) -> tuple[int, dict]:
    """Rating = the answer's length in characters (an answer with "?" in it gets a reply that does not parse)."""
    answer = _answer(body["messages"][-1]["content"], "Assistant")
    return chat("I cannot tell." if "?" in answer else f"Rating: [[{min(len(answer), 10)}]]")


def longer_wins(body: dict, n: int) -> tuple[int, dict]:
    text = body["messages"][-1]["content"]
    a, b = _answer(text, "Assistant A"), _answer(text, "Assistant B")
    if "?" in a or "?" in b:
        return chat("no idea")
    return chat("[[A]]" if len(a) > len(b) else "[[B]]" if len(b) > len(a) else "[[C]]")


def test_grades_become_rewards_in_zero_one_and_unparsable_ones_are_left_out(stub, tmp_path: Path) -> None:  # noqa: ANN001, F811
    stub.respond = grade_by_length
    reward = JudgeReward(make_judge(stub, tmp_path), "grade")
    prompts = [[{"role": "user", "content": "q"}]] * 4
    values = reward(prompts, ["a", "abcd", "abcdefghijkl", "what?"], group=2)
    assert values[:3].tolist() == pytest.approx([0.0, 3 / 9, 1.0]) and math.isnan(values[3])
    assert reward.unparsable == 1 and len(stub.requests) == 4  # the unparsable reply was not retried


def test_pairwise_rewards_are_win_shares_within_each_group(stub, tmp_path: Path) -> None:  # noqa: ANN001, F811
    stub.respond = longer_wins
    reward = JudgeReward(make_judge(stub, tmp_path), "pairwise")
    prompts = [[{"role": "user", "content": "q"}]] * 6
    # group 1: lengths 1, 3, 3 -> "a" loses both, the two others beat it and tie each other
    # group 2: "x?" cannot be judged against anyone: its reward is NaN, the others judge each other only
    values = reward(prompts, ["a", "bbb", "ccc", "dd", "x?", "eeee"], group=3)
    assert values[[0, 1, 2, 3, 5]].tolist() == pytest.approx([0.0, 0.75, 0.75, 0.0, 1.0])
    assert math.isnan(values[4]) and reward.unparsable == 1
    assert len(stub.requests) == 2 * 6  # 3 pairs per group, both orders


def test_grpo_rewarded_by_a_stub_judge(stub, tiny_model: str, tmp_path: Path) -> None:  # noqa: ANN001, F811
    """Every sample's judge reward is its grade mapped to [0, 1]; the logged judge mean is theirs."""
    stub.respond = lambda body, n: chat(f"Rating: [[{1 + n % 10}]]")
    data = write_jsonl(tmp_path / "p.jsonl", PROMPTS[:2])
    record, out = run_stage(
        tmp_path,
        {
            "stage": "grpo",
            "model_name_or_path": tiny_model,
            "dataset": data,
            "judge_reward": "grade",
            "judge_base_url": stub.url,
            "judge_model": "judge",
            "judge_api_key_env": None,
            "num_generations": 2,
            "per_device_train_batch_size": 2,
            "max_new_tokens": 3,
            "max_steps": 1,
            "torch_dtype": "float32",
        },
    )
    grades = [1 + n % 10 for n in range(1, 5)]  # requests 1-4, whatever order they were answered in
    assert record["rewards/judge/mean"] == pytest.approx(sum((g - 1) / 9 for g in grades) / 4)
    assert record["rewards/judge/unparsable"] == 0.0 and len(stub.requests) == 4
    assert (Path(out) / "judge_cache.sqlite").is_file()


def test_judge_reward_config_errors(tiny_model: str, tmp_path: Path) -> None:
    from alignkit.config import build_config
    from alignkit.errors import UserError

    base = {
        "stage": "grpo",
        "model_name_or_path": tiny_model,
        "dataset": "d.jsonl",
        "output_dir": str(tmp_path),
    }
    with pytest.raises(UserError, match="`judge_reward: grade` needs `judge_base_url`"):
        build_config({**base, "judge_reward": "grade"})
    with pytest.raises(UserError, match="judge_reward"):
        build_config({**base, "judge_reward": "rank", "judge_base_url": "http://x/v1", "judge_model": "m"})


def test_api_key_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from alignkit.errors import UserError
    from alignkit.generation.judge import api_key_from_env
    from alignkit.generation.judge_reward import judge_api_key

    assert api_key_from_env(None) is None
    monkeypatch.setenv("ALIGNKIT_TEST_JUDGE_KEY", "sk-123")
    assert api_key_from_env("ALIGNKIT_TEST_JUDGE_KEY") == "sk-123"
    monkeypatch.delenv("ALIGNKIT_TEST_JUDGE_KEY")
    with pytest.raises(UserError, match="ALIGNKIT_TEST_JUDGE_KEY.*not set"):
        api_key_from_env("ALIGNKIT_TEST_JUDGE_KEY")
    with pytest.raises(UserError, match="ALIGNKIT_TEST_JUDGE_KEY.*not set"):
        judge_api_key("ALIGNKIT_TEST_JUDGE_KEY")  # a variable the user named must be set
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert judge_api_key("OPENAI_API_KEY") is None  # the default may be unset: a local judge without a key
