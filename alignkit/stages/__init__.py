"""Stage registry: `stage:` in the config -> the class that builds and steps it."""

from __future__ import annotations

import importlib

from alignkit.stages.base import Stage

_STAGES = {
    "sft": "alignkit.stages.sft:SFTStage",
    "pt": "alignkit.stages.sft:SFTStage",
    "rm": "alignkit.stages.rm:RewardStage",
    "dpo": "alignkit.stages.preference:PreferenceStage",
    "kto": "alignkit.stages.kto:KTOStage",
    "grpo": "alignkit.stages.grpo:GRPOStage",
    "ppo": "alignkit.stages.ppo:PPOStage",
}


def get_stage(name: str) -> type[Stage]:
    from alignkit.errors import UserError

    if name not in _STAGES:
        raise UserError(f"stage `{name}` is not available yet; available: {', '.join(_STAGES)}")
    module, cls = _STAGES[name].split(":")
    return getattr(importlib.import_module(module), cls)
