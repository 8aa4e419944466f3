"""What a metric's function reads (`EvalContext`) and writes (`Side`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from alignkit.modeling.load import default_device

if TYPE_CHECKING:
    from alignkit.data.formats import Example
    from alignkit.evaluation.settings import EvalConfig


@dataclass
class Side:
    """What one evaluated model produced: its answers and its scores."""

    name: str  # "model" or "baseline"
    path: str
    texts: list[list[str]] = field(default_factory=list)  # (prompts, num_samples) first-turn answers
    conversations: list[list[dict]] = field(default_factory=list)  # sample 0's whole conversation
    lengths: list[list[int]] = field(default_factory=list)  # (prompts, num_samples) answer tokens
    tokenizer: Any = None  # kept after the model is freed: the prompts as the model saw them
    metrics: dict[str, dict] = field(default_factory=dict)  # report rows
    per_prompt: dict[str, list[float]] = field(default_factory=dict)  # for paired comparisons


@dataclass
class EvalContext:
    """The config, the plan, the prompts and every side, with the models of the phase that is running: the
    side's model, tokenizer and vLLM engine (phases MODEL and REFERENCE), the reference (REFERENCE), the reward
    model's scorer (REWARD_MODEL), the judge (JUDGE)."""

    cfg: EvalConfig
    plan: Any  # evaluation.plan.Plan (which sits above the metrics' functions: not imported here)
    examples: list[Example]
    sides: list[Side] = field(default_factory=list)
    model: Any = None
    tokenizer: Any = None
    engine: Any = None
    reference: Any = None
    scorer: Any = None
    judge: Any = None


def device() -> str:
    return default_device()
