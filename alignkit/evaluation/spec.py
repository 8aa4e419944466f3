"""What the metric registry knows about a metric (`MetricSpec`), and the inputs (`Need`) and phases (`Phase`)
it is described by. The table itself is `alignkit.evaluation.registry`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal


class Need(Enum):
    """An input a metric cannot run without (the plan says which one is missing, and why)."""

    PROMPTS = "prompts"  # rows with a prompt (KL samples its own answers to them)
    ANSWERS = "answers"  # the models' answers to the prompts (generated once, shared by every metric)
    BASELINE = "baseline"
    REFERENCE = "reference"  # ref_model_name_or_path, or the baseline
    REWARD_MODEL = "reward_model"
    JUDGE = "judge"  # an OpenAI-compatible endpoint
    PAIRS = "pairs"  # held-out preference pairs
    SFT_ROWS = "sft_rows"  # held-out SFT (or text) rows
    TASK_REWARD = "task_reward"  # a reward function that scores the task's answers
    LM_EVAL_TASKS = "lm_eval_tasks"


class Phase(Enum):
    """When a metric runs, in this order: the first two while each model is loaded, one model at a time."""

    MODEL = "with the model loaded"
    REFERENCE = "with the model and the reference loaded"
    ANSWERS = "from the answers"
    REWARD_MODEL = "with the reward model loaded"
    JUDGE = "with the judge"
    EXTERNAL = "external (loads the model itself)"


Direction = Literal["higher", "lower", "baseline"]  # baseline: read against the starting model's value


@dataclass(frozen=True)
class MetricSpec:
    name: str  # what `metrics:` names
    needs: tuple[Need, ...]  # in the order a missing one is reported
    phase: Phase
    compute: Callable[[Any, Any], None]  # (EvalContext, Side) -> None
    rows: tuple[str, ...] = ()  # the report rows it writes, in report order (default: its name); a row ending
    # in ":" or "@" names a family (lm_eval:<task>, pass@<k>), and "<row>:<scorer>" belongs to <row>
    direction: Direction = "baseline"
    interval: str = "percentile bootstrap over prompts"  # how its 95% interval is made (eval.md says it)
    each_side: bool = True  # False: measured on the model only (a win rate against the baseline)
    compare: Literal["paired", "win_rate"] = "paired"  # win_rate: per-prompt wins, compared with 0.5
    frontier_y: int | None = None  # y axis of compare's frontier: the measured one with the lowest number
    frontier_x: bool = False  # the x axis of compare's frontier (a distance from the starting model)
    headline: tuple[str, ...] = ()  # rows in compare's one-line-per-method summary
    label: str = ""  # a longer name (plot axes)
    check: Callable[[Any], None] | None = None  # (EvalConfig) -> None: a UserError before any model loads

    @property
    def row_names(self) -> tuple[str, ...]:
        return self.rows or (self.name,)

    @property
    def reads_answers(self) -> bool:
        return Need.ANSWERS in self.needs

    @property
    def loads_model(self) -> bool:
        """Whether eval loads the model for it (lm-eval loads its own; a reward model's accuracy needs none)."""
        return self.phase in (Phase.MODEL, Phase.REFERENCE) or self.reads_answers

    def why_not(self, missing: Mapping[Need, str]) -> str:
        """Why it cannot run: the reason of its first missing input ('' when it can)."""
        return next((missing[need] for need in self.needs if missing.get(need)), "")

    def row_index(self, row: str) -> int | None:
        """Which of its rows `row` is (None: not one of its rows)."""
        for i, pattern in enumerate(self.row_names):
            family = pattern.endswith((":", "@")) and row.startswith(pattern)
            if row == pattern or family or row.startswith(pattern + ":"):
                return i
        return None
