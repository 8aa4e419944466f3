"""Stage registry: `stage:` in the config -> the class that builds and steps it.

The stage names live in one table, `alignkit.config.schema.CONFIG_CLASSES`; here each config class names the
class that runs it (imported only when asked for).
"""

from __future__ import annotations

import importlib

from alignkit.config.schema import (
    CONFIG_CLASSES,
    STAGES,
    BaseConfig,
    DPOConfig,
    GRPOConfig,
    KTOConfig,
    PPOConfig,
    PTConfig,
    RMConfig,
    SFTConfig,
)
from alignkit.errors import UserError
from alignkit.stages.base import Stage

RUNNERS: dict[type[BaseConfig], str] = {
    SFTConfig: "alignkit.stages.sft:SFTStage",
    PTConfig: "alignkit.stages.sft:SFTStage",
    RMConfig: "alignkit.stages.rm:RewardStage",
    DPOConfig: "alignkit.stages.preference:PreferenceStage",
    KTOConfig: "alignkit.stages.kto:KTOStage",
    GRPOConfig: "alignkit.stages.grpo:GRPOStage",
    PPOConfig: "alignkit.stages.ppo:PPOStage",
}


def get_stage(name: str) -> type[Stage]:
    """The class that runs `stage: name`."""
    if name not in CONFIG_CLASSES:
        raise UserError(f"stage `{name}` is not available yet; available: {', '.join(STAGES)}")
    module, cls = RUNNERS[CONFIG_CLASSES[name]].split(":")
    return getattr(importlib.import_module(module), cls)
