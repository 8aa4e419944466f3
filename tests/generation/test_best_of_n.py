"""`alignkit data sample`: which rows best / above / pairs keep (exact), the command on the tiny model with a
scoring function whose values the test recomputes, the written files training unchanged, and the errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from alignkit import api
from alignkit.data.formats import Example
from alignkit.errors import UserError
from alignkit.generation.best_of_n import SampleSettings, _rows
from tests.conftest import run_stage, write_jsonl
from tests.generation.test_judge import stub as stub  # noqa: F401 - the stub judge server fixture
from tests.generation.test_online import PROMPTS

CHAT = Example(prompt=[{"role": "user", "content": "2+2?"}], extra={"answer": "4"})


def _s(keep: str, threshold: float | None = None) -> SampleSettings:
    return SampleSettings("m", "d", "o", n=4, keep=keep, threshold=threshold, reward_funcs=["exact_match"])


def test_rows_kept_by_best_above_and_pairs() -> None:
    texts, scores = ["a", "b", "c", "d"], [0.5, 2.0, 2.0, -1.0]
    [best] = _rows(CHAT, texts, scores, _s("best"))
    assert best == {
        "prompt": CHAT.prompt,
        "completion": [{"role": "assistant", "content": "b"}],  # the first of the two best
        "score": 2.0,
        "answer": "4",
    }
    assert _rows(CHAT, texts, scores, _s("best", threshold=2.5)) == []  # no acceptable sample
    above = _rows(CHAT, texts, scores, _s("above", threshold=0.5))
    assert [(r["completion"][0]["content"], r["score"]) for r in above] == [
        ("b", 2.0),
        ("c", 2.0),
        ("a", 0.5),
    ]
    [pair] = _rows(CHAT, texts, scores, _s("pairs"))
    assert pair["chosen"][0]["content"] == "b" and pair["rejected"][0]["content"] == "d"
    assert _rows(CHAT, texts, [1.0] * 4, _s("pairs")) == []  # all equal: no pair
    text = Example(prompt="2+2=", extra={})
    assert (
        _rows(text, texts, scores, _s("best"))[0]["completion"] == "b"
    )  # text prompts keep text completions


@pytest.fixture()
def short_reward(tmp_path: Path):  # noqa: ANN201
    (tmp_path / "bon_reward.py").write_text(
        "def short(prompts, completions, **kw):\n    return [-len(c) / 10 for c in completions]\n"
    )
    sys.path.insert(0, str(tmp_path))
    yield "bon_reward:short"
    sys.path.remove(str(tmp_path))


def test_sample_best_and_pairs_on_the_tiny_model_train_unchanged(
    tiny_model: str, tmp_path: Path, short_reward: str
) -> None:
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    common = {"n": 4, "reward_funcs": [short_reward], "max_new_tokens": 6, "batch_size": 3}
    report = api.sample(tiny_model, prompts, str(tmp_path / "bon.jsonl"), keep="best", **common)
    rows = [json.loads(line) for line in open(tmp_path / "bon.jsonl")]
    assert report["prompts"] == report["rows"] == len(rows) == 8 and report["samples"] == 32
    assert report["prompts_without_acceptable_sample"] == 0
    for row, source in zip(rows, PROMPTS):
        assert row["prompt"] == source["prompt"] and row["answer"] == source["answer"]
        assert row["score"] == pytest.approx(-len(row["completion"][0]["content"]) / 10)
    assert report["mean_kept_score"] == pytest.approx(sum(r["score"] for r in rows) / 8)
    assert report["mean_kept_score"] > report["mean_score"]  # the best of 4 beats the average sample

    report = api.sample(tiny_model, prompts, str(tmp_path / "pairs.jsonl"), keep="pairs", **common)
    pairs = [json.loads(line) for line in open(tmp_path / "pairs.jsonl")]
    assert report["rows"] == len(pairs) == 8 - report["prompts_without_acceptable_sample"] > 0
    for p in pairs:
        assert len(p["chosen"][0]["content"]) < len(p["rejected"][0]["content"])

    for stage, data in (("sft", "bon.jsonl"), ("dpo", "pairs.jsonl")):
        record, _ = run_stage(
            tmp_path / stage,
            {
                "stage": stage,
                "model_name_or_path": tiny_model,
                "dataset": str(tmp_path / data),
                "max_steps": 1,
            },
        )
        assert record["step"] == 1 and record["loss"] > 0


def test_sample_errors(
    tiny_model: str, tmp_path: Path, short_reward: str, capsys: pytest.CaptureFixture
) -> None:
    from alignkit.cli.main import main

    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS[:2])
    out = tmp_path / "rs.jsonl"
    out.write_text("kept\n")
    argv = ["data", "sample", prompts, "--model", tiny_model, "--output", str(out), "--n", "2"]
    with pytest.raises(SystemExit) as done:  # every score is <= 0: nothing acceptable, nothing written
        main(
            [
                *argv,
                "--reward-funcs",
                short_reward,
                "--keep",
                "above",
                "--threshold",
                "1",
                "--max-new-tokens",
                "3",
            ]
        )
    assert done.value.code == 2 and out.read_text() == "kept\n"
    assert "no prompt of 2 had an acceptable sample" in capsys.readouterr().err
    for settings, message in (
        ({"keep": "above"}, "--keep above keeps every completion scoring at least --threshold"),
        ({"keep": "bestest"}, "--keep bestest: choose one of best, above, pairs"),
        ({"reward_funcs": []}, "give --reward-funcs"),
        ({"n_samples": 3}, r"unknown setting `n_samples`"),
    ):
        with pytest.raises(UserError, match=message):
            api.sample(tiny_model, prompts, str(out), **{"reward_funcs": ["exact_match"], **settings})


def test_sample_scored_by_a_stub_judge_on_localhost(
    stub,  # noqa: ANN001, F811 - the stub judge server (tests/generation/test_judge.py)
    tiny_model: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    """`alignkit data sample --judge-reward grade` against a judge on 127.0.0.1 that rates an answer by its
    length and cannot rate an answer of odd length: each kept row is its prompt's best-rated sample, scored
    (rating - 1) / 9; unrated samples are never kept, and the report counts them."""
    from alignkit.cli.main import main
    from tests.generation.test_judge import chat
    from tests.generation.test_judge_reward import _answer

    seen: dict[tuple[str, str], int | None] = {}

    def rate(body: dict, n: int) -> tuple[int, dict]:
        text = body["messages"][-1]["content"]
        question = text.split("[Question]\n", 1)[1].split("\n", 1)[0]
        answer = _answer(text, "Assistant")
        seen[(question, answer)] = None if len(answer) % 2 else min(len(answer), 10)
        return chat("I cannot rate this." if len(answer) % 2 else f"Rating: [[{min(len(answer), 10)}]]")

    stub.respond = rate
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    out = tmp_path / "judged.jsonl"
    argv = ["data", "sample", prompts, "--model", tiny_model, "--output", str(out), "--n", "4"]
    argv += [
        "--judge-reward",
        "grade",
        "--judge-base-url",
        stub.url,
        "--judge-model",
        "stub",
        "--max-new-tokens",
        "6",
    ]
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 0
    rows = [json.loads(line) for line in open(out)]
    assert rows and len(seen) > 0
    for row in rows:
        question, answer = row["prompt"][0]["content"], row["completion"][0]["content"]
        rated = [r for (q, _), r in seen.items() if q == question and r is not None]
        assert seen[(question, answer)] == max(rated)  # the best-rated sample of its prompt
        assert row["score"] == pytest.approx((max(rated) - 1) / 9)
    printed = capsys.readouterr().out
    unrated = sum(r is None for r in seen.values())
    assert unrated > 0 and "samples no scorer could score (left out)" in printed
    assert (tmp_path / "judge_cache.sqlite").is_file()  # verdicts cached beside the output
