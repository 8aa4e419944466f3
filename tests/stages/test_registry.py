"""The stage registry: one runner per configurable stage, with the facts the rest of alignkit reads from it."""

from __future__ import annotations

import pytest

from alignkit.comparison.runs import budget
from alignkit.config import CONFIG_CLASSES, build_config
from alignkit.errors import UserError
from alignkit.stages import RUNNERS, get_stage
from alignkit.stages.preference import PreferenceStage
from alignkit.stages.sft import PTStage, SFTStage

REQUIRED = {"model_name_or_path": "m", "dataset": "d.jsonl", "max_steps": 12}


def test_every_config_stage_has_its_runner_and_back() -> None:
    assert list(RUNNERS) == list(CONFIG_CLASSES)
    for name, runner in RUNNERS.items():
        assert runner.name == name and runner.config_class is CONFIG_CLASSES[name]
        assert get_stage(name) is runner
    assert get_stage("dpo") is PreferenceStage and issubclass(PTStage, SFTStage)
    with pytest.raises(
        UserError, match=r"`stage: dpx` is not a stage \(did you mean `dpo`\?\); valid: sft, pt"
    ):
        get_stage("dpx")


@pytest.mark.parametrize(
    ("stage", "keys", "unit", "rollout"),
    [
        ("sft", {}, "examples", None),
        ("rm", {}, "pairs", None),
        ("dpo", {}, "pairs", None),
        ("kto", {}, "unpaired rows (a pair gives two)", None),
        # 12 steps, 2 updates per rollout -> 6 rollouts of 4 prompts, 3 completions each
        ("grpo", {"num_generations": 3, "num_iterations": 2}, "prompts", (2, 24, 72)),
        # ppo_epochs x num_mini_batches = 4 updates per rollout -> 3 rollouts of 4 prompts, one completion each
        ("ppo", {"ppo_epochs": 2, "num_mini_batches": 2}, "prompts", (4, 12, 12)),
    ],
)
def test_budget_reads_the_stage_facts(stage: str, keys: dict, unit: str, rollout: tuple | None) -> None:
    online = {"reward_funcs": ["exact_match"]} if rollout else {}
    cfg = build_config({"stage": stage, **REQUIRED, **online, **keys, "per_device_train_batch_size": 4})
    out = budget(cfg)
    assert out["unit"] == unit and out["steps_x_batch"] == 48 and get_stage(stage).online == bool(rollout)
    if rollout:
        assert (out["updates_per_rollout"], out["prompts_sampled"], out["completions_sampled"]) == rollout
    else:
        assert "updates_per_rollout" not in out
