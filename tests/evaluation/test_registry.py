"""The metric registry: a metric added as one spec and one function reaches `metrics:`, the plan, eval.json, the
report table, samples.jsonl and compare's tables and plots, with nothing else edited."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from alignkit.evaluation import registry
from alignkit.evaluation.spec import MetricSpec, Need, Phase
from tests.conftest import write_jsonl
from tests.evaluation.test_eval import QUESTIONS, _eval, _samples

TOY = "char_win_rate"


def _char_win_rate(ctx, side) -> None:  # noqa: ANN001 - a metric's function: (EvalContext, Side)
    """Per prompt 1 when the model's first answer has more characters than the baseline's, 0.5 equal, else 0."""
    from alignkit.evaluation import metrics as M

    mine, theirs = ([len(ts[0]) for ts in s.texts] for s in ctx.sides[:2])
    side.metrics[TOY], side.per_prompt[TOY] = M.win_rate(mine, theirs)


@pytest.fixture
def toy_metric() -> Iterator[MetricSpec]:
    """A win rate registered for one test: the model only, compared with an even split, compare's headline and
    its first choice of frontier y axis."""
    spec = registry.register(
        MetricSpec(
            TOY,
            (Need.ANSWERS, Need.BASELINE),
            Phase.ANSWERS,
            _char_win_rate,
            direction="higher",
            interval="percentile bootstrap over prompts",
            each_side=False,
            compare="win_rate",
            frontier_y=-1,
            headline=(TOY,),
        )
    )
    yield spec
    registry.unregister(TOY)


def _compare_report(evals: dict[str, Path]) -> dict:
    from alignkit.comparison.report import build_report

    budget = {"stage": "dpo", "steps_x_batch": 8}
    runs = {
        name: {
            "run_dir": str(folder),
            "eval_dir": str(folder),
            "eval": json.loads((folder / "eval.json").read_text()),
            "train_wall_s": 1.0,
            "trained": True,
            "evaluated": True,
        }
        for name, folder in evals.items()
    }
    return build_report({name: budget for name in evals}, runs)


def test_a_registered_metric_reaches_the_report_and_compare(
    tmp_path: Path, tiny_model: str, tiny_ref: str, toy_metric: MetricSpec
) -> None:
    from alignkit.comparison.plots import frontier_axes, panel_metrics
    from alignkit.comparison.report import metric_tables, summary_table

    data = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    keys = dict(dataset=data, baseline=tiny_ref, metrics=[TOY, "length", "kl"], max_new_tokens=8)
    greedy = _eval(tmp_path / "a", model=tiny_model, **keys)
    sampled = _eval(tmp_path / "b", model=tiny_model, **keys, temperature=1.0, seed=3)
    rows = _samples(tmp_path / "a")
    per_prompt = [
        1.0 if len(m) > len(b) else 0.5 if len(m) == len(b) else 0.0
        for m, b in ((r["model"]["completions"][0], r["baseline"]["completions"][0]) for r in rows)
    ]
    assert [r["model"]["scores"][TOY] for r in rows] == per_prompt
    row = greedy["metrics"][TOY]
    assert row["value"] == pytest.approx(sum(per_prompt) / 5) and row["n"] == 5
    assert TOY not in greedy["baseline_metrics"]  # each_side False: measured on the model only
    lines = greedy["table"].splitlines()[2:]
    table = [line.split(" | ")[0].strip("| ") for line in lines if line.startswith("| ")]
    assert table == ["kl", "length", "length_ratio", TOY]  # registered last: reported last
    assert "char_win_rate: percentile bootstrap" in (tmp_path / "a" / "eval" / "eval.md").read_text()

    report = _compare_report({"greedy": tmp_path / "a" / "eval", "sampled": tmp_path / "b" / "eval"})
    vs = report["methods"]["greedy"]["vs_baseline"][TOY]
    assert vs["diff"] == pytest.approx(sum(per_prompt) / 5 - 0.5)  # a win rate: against an even split
    assert report["differences"][TOY]["greedy_vs_sampled"]["n"] == 5
    assert f"### {TOY}" in metric_tables(report) and "vs start: even split 0.5" in metric_tables(report)
    assert summary_table(report).splitlines()[0].split(" | ")[1:-1] == ["kl", "length_ratio", TOY]
    assert frontier_axes(report) == ("kl", TOY) and TOY in panel_metrics(report)
    assert sampled["metrics"][TOY]["n"] == 5


def test_a_registered_metric_is_named_in_metrics_and_planned_from_its_needs(
    tmp_path: Path, tiny_model: str, toy_metric: MetricSpec
) -> None:
    from alignkit.errors import UserError

    data = write_jsonl(tmp_path / "q.jsonl", QUESTIONS[:2])
    report = _eval(tmp_path, model=tiny_model, dataset=data, metrics=None)
    assert report["skipped"][TOY] == "no `baseline` to compare with"  # the message of its missing need
    with pytest.raises(UserError, match=f"metrics: `{TOY}` was asked for, but no `baseline`"):
        _eval(tmp_path, model=tiny_model, dataset=data, metrics=[TOY])
    registry.unregister(TOY)
    with pytest.raises(UserError, match=f"`metrics` names `{TOY}`, not a metric"):
        _eval(tmp_path, model=tiny_model, dataset=data, metrics=[TOY])


def test_report_rows_belong_to_their_metric() -> None:
    """The report order and compare's facts come from the row -> metric lookup: families (pass@k, lm_eval:task),
    rows under a named scorer (accuracy:name) and a metric's extra rows."""
    assert registry.spec_of_row("pass@4:my_reward").name == "accuracy"
    assert registry.spec_of_row("lm_eval:mmlu").name == "lm_eval"
    assert registry.spec_of_row("over_refusal_rate").name == "refusal_rate"
    assert registry.spec_of_row("length_ratio").name == "length"
    assert registry.spec_of_row("kl_something") is None
    rows = ["lm_eval:mmlu", "length_ratio", "kl", "consistency", "accuracy:f", "pass@2", "accuracy", "other"]
    assert sorted(rows, key=registry.row_rank) == [
        "accuracy",
        "accuracy:f",
        "pass@2",
        "consistency",
        "kl",
        "length_ratio",
        "lm_eval:mmlu",
        "other",
    ]
    assert [
        r for r in ("judge_win_rate", "reward_model_win_rate", "accuracy") if registry.is_win_rate(r)
    ] == [
        "judge_win_rate",
        "reward_model_win_rate",
    ]
    assert registry.frontier_y()[:3] == ["accuracy", "judge_score", "reward_model_score"]
    assert registry.frontier_x().name == "kl"
