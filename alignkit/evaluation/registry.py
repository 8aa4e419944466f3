"""One table of the metrics `alignkit eval` knows, in report order: each metric's facts in one `MetricSpec`.

Config validation (`metrics:`), the plan (what runs, why the rest does not), the run (when each function is
called), the report's order and compare's tables and plots all read this table; none of them branches on a
metric's name. Adding a metric is one spec (`register`), one function (`(ctx, side) -> None`, see
`alignkit.evaluation.measures`), one test.
"""

from __future__ import annotations

from alignkit.evaluation import measures as F
from alignkit.evaluation.spec import MetricSpec, Need, Phase

_RATE = "Wilson (one 0/1 score per item), else percentile bootstrap over prompts"
_WINS = "percentile bootstrap over prompts (a tie is half a win)"

BUILTIN = (
    MetricSpec(
        "accuracy",
        (Need.ANSWERS, Need.TASK_REWARD),
        Phase.ANSWERS,
        F.accuracy,
        rows=("accuracy", "pass@", "maj@", "consistency"),
        direction="higher",
        interval=_RATE,
        frontier_y=0,
        headline=("accuracy",),
    ),
    MetricSpec(
        "reward_model_score",
        (Need.REWARD_MODEL, Need.ANSWERS),
        Phase.REWARD_MODEL,
        F.reward_model_score,
        direction="higher",
        frontier_y=2,
        headline=("reward_model_score",),
    ),
    MetricSpec(
        "reward_model_win_rate",
        (Need.REWARD_MODEL, Need.BASELINE, Need.ANSWERS),
        Phase.REWARD_MODEL,
        F.reward_model_win_rate,
        direction="higher",
        interval=_WINS,
        each_side=False,
        compare="win_rate",
    ),
    MetricSpec(
        "judge_score",
        (Need.JUDGE, Need.ANSWERS),
        Phase.JUDGE,
        F.judge_score,
        direction="higher",
        interval="percentile bootstrap over graded turns",
        frontier_y=1,
        headline=("judge_score",),
    ),
    MetricSpec(
        "judge_win_rate",
        (Need.JUDGE, Need.BASELINE, Need.ANSWERS),
        Phase.JUDGE,
        F.judge_win_rate,
        direction="higher",
        interval=_WINS,
        each_side=False,
        compare="win_rate",
    ),
    MetricSpec(
        "preference_accuracy",
        (Need.PAIRS, Need.REFERENCE),
        Phase.REFERENCE,
        F.preference_accuracy,
        direction="higher",
        interval="Wilson over pairs",
    ),
    MetricSpec(
        "reward_model_preference_accuracy",
        (Need.PAIRS, Need.REWARD_MODEL),
        Phase.REWARD_MODEL,
        F.reward_model_preference_accuracy,
        direction="higher",
        interval="Wilson over pairs",
        each_side=False,  # a property of the reward model: shown once
    ),
    MetricSpec(
        "kl",
        (Need.PROMPTS, Need.REFERENCE),
        Phase.REFERENCE,
        F.kl,
        interval="t over prompts, clipped at 0",
        frontier_x=True,
        headline=("kl",),
        label="KL(method || starting model), nats per answer",
    ),
    MetricSpec(
        "length",
        (Need.ANSWERS,),
        Phase.ANSWERS,
        F.length,
        rows=("length", "length_ratio"),
        interval="percentile bootstrap over prompts (the ratio: paired)",
        headline=("length_ratio",),
    ),
    MetricSpec(
        "refusal_rate",
        (Need.ANSWERS,),
        Phase.ANSWERS,
        F.refusal_rate,
        rows=("refusal_rate", "refusal_rate_should_refuse", "over_refusal_rate"),
        interval=_RATE,
    ),
    MetricSpec(
        "perplexity",
        (Need.SFT_ROWS,),
        Phase.MODEL,
        F.perplexity,
        interval="percentile bootstrap over rows",
    ),
    MetricSpec(
        "lm_eval",
        (Need.LM_EVAL_TASKS,),
        Phase.EXTERNAL,
        F.lm_eval,
        rows=("lm_eval:",),
        direction="higher",
        interval="Wilson from lm-eval's per-document scores, else its stderr",
        check=F.lm_eval_installed,
    ),
)

REGISTRY: dict[str, MetricSpec] = {}


def register(spec: MetricSpec) -> MetricSpec:
    """Add a metric (after the others in report order)."""
    if spec.name in REGISTRY:
        raise ValueError(f"metric `{spec.name}` is registered already")
    REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    REGISTRY.pop(name, None)


for _spec in BUILTIN:
    register(_spec)


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def specs() -> list[MetricSpec]:
    return list(REGISTRY.values())


def spec_of_row(row: str) -> MetricSpec | None:
    """The metric a report row (or per-prompt score) belongs to."""
    return next((s for s in REGISTRY.values() if s.row_index(row) is not None), None)


def row_rank(row: str) -> tuple[int, int, str]:
    """Report order: the metric's place in the registry, then the row's place among its rows."""
    for i, spec in enumerate(REGISTRY.values()):
        j = spec.row_index(row)
        if j is not None:
            return (i, j, row)
    return (len(REGISTRY), 0, row)


def is_win_rate(row: str) -> bool:
    spec = spec_of_row(row)
    return spec is not None and spec.compare == "win_rate"


def higher_is_better(row: str) -> bool:
    spec = spec_of_row(row)
    return spec is not None and spec.direction == "higher"


def frontier_x() -> MetricSpec | None:
    """The x axis of compare's frontier plot."""
    return next((s for s in REGISTRY.values() if s.frontier_x), None)


def frontier_y() -> list[str]:
    """The candidate y axes of compare's frontier, first choice first."""
    ranked = sorted(
        (s for s in REGISTRY.values() if s.frontier_y is not None), key=lambda s: s.frontier_y or 0
    )
    return [s.name for s in ranked]


def headline_rows() -> list[str]:
    """The rows of compare's one-line-per-method summary, in report order."""
    return [row for s in REGISTRY.values() for row in s.headline]
