"""The stages: `stage:` in the config -> the class that builds and steps it, with its facts (config class,
batch unit, online or not) on the class. Adding a stage is its config class (`alignkit.config.stages`), its
runner here, and a test that the two tables agree (tests/stages/test_registry.py)."""

from __future__ import annotations

from alignkit.config import CONFIG_CLASSES, STAGES
from alignkit.errors import UserError, did_you_mean
from alignkit.stages.base import Stage
from alignkit.stages.distill import DistillStage
from alignkit.stages.grpo import GRPOStage
from alignkit.stages.kto import KTOStage
from alignkit.stages.online_dpo import OnlineDPOStage
from alignkit.stages.ppo import PPOStage
from alignkit.stages.preference import PreferenceStage
from alignkit.stages.rm import RewardStage
from alignkit.stages.sft import PTStage, SFTStage

RUNNERS: dict[str, type[Stage]] = {
    cls.name: cls
    for cls in (
        SFTStage,
        PTStage,
        RewardStage,
        PreferenceStage,
        KTOStage,
        PPOStage,
        GRPOStage,
        OnlineDPOStage,
        DistillStage,
    )
}


def get_stage(name: str) -> type[Stage]:
    """The class that runs `stage: name`."""
    if name not in RUNNERS:
        raise UserError(
            f"`stage: {name}` is not a stage{did_you_mean(name, STAGES)}; valid: {', '.join(STAGES)}"
        )
    return RUNNERS[name]


__all__ = ["CONFIG_CLASSES", "RUNNERS", "Stage", "get_stage"]
