"""The config's layout: one schema module that the checks import (no circle), fields built in their final type,
validation that only reads, one table of stages."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path
from typing import Any

import pytest

import alignkit
from alignkit.config import build_config
from alignkit.config_checks import validate
from alignkit.config_schema import (
    CONFIG_CLASSES,
    STAGES,
    BaseConfig,
    DPOConfig,
    KTOConfig,
    build_dataclass,
)
from alignkit.errors import UserError

PACKAGE = Path(alignkit.__file__).parent
REQUIRED = {"model_name_or_path": "m", "dataset": "d.jsonl"}
ONLINE = {"reward_funcs": ["exact_match"]}


def _imports(module: str) -> set[str]:
    """The alignkit modules a module imports, at the top or inside functions."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("alignkit")}


def test_config_modules_import_in_one_direction() -> None:
    schema, checks, config = _imports("config_schema"), _imports("config_checks"), _imports("config")
    assert not {"alignkit.config", "alignkit.config_checks"} & schema
    assert "alignkit.config_schema" in checks and "alignkit.config" not in checks
    assert {"alignkit.config_schema", "alignkit.config_checks"} <= config
    assert not {"alignkit.config", "alignkit.config_checks", "alignkit.config_schema"} & _imports(
        "config_compat"
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [("sigmoid", ["sigmoid"]), ("sigmoid,sft", ["sigmoid", "sft"]), (["ipo", "sft"], ["ipo", "sft"])],
)
def test_dpo_loss_type_is_built_as_a_list(value: Any, expected: list[str]) -> None:
    cfg = build_config({"stage": "dpo", **REQUIRED, "loss_type": value})
    assert cfg.loss_type == expected
    built = build_dataclass(DPOConfig, {"loss_type": value}, "t")  # before any check
    assert built.loss_type == expected
    assert DPOConfig().loss_type == ["sigmoid"]


def test_bad_dpo_loss_type_is_still_named() -> None:
    with pytest.raises(UserError, match=r"`loss_type: sigmod` does not exist \(did you mean `sigmoid`\?\)"):
        build_config({"stage": "dpo", **REQUIRED, "loss_type": "sigmod"})
    with pytest.raises(UserError, match=r"`loss_weights` has 1 values for 2 loss types"):
        build_config({"stage": "dpo", **REQUIRED, "loss_type": "sigmoid,sft", "loss_weights": [1.0]})


def _guarded(cls: type[BaseConfig], keys: dict[str, Any]) -> BaseConfig:
    """An instance of `cls` (built from `keys`) on which any attribute write fails."""

    class Guarded(cls):  # type: ignore[valid-type, misc]
        def __setattr__(self, key: str, value: Any) -> None:
            if getattr(self, "_sealed", False):
                raise AssertionError(f"a check wrote `{key}`")
            super().__setattr__(key, value)

    cfg = build_dataclass(cls, keys, "t")
    guarded = Guarded(**dataclasses.asdict(cfg))
    object.__setattr__(guarded, "_sealed", True)
    return guarded


@pytest.mark.parametrize("stage", list(CONFIG_CLASSES))
def test_validation_only_reads(stage: str) -> None:
    keys = {**REQUIRED, **(ONLINE if stage in ("ppo", "grpo") else {})}
    if stage == "dpo":
        keys["loss_type"] = "sigmoid,sft"
    if stage == "kto":
        keys["desirable_weight"] = "auto"
    cfg = _guarded(CONFIG_CLASSES[stage], keys)
    before = dataclasses.asdict(cfg)
    validate(cfg, "t")  # raises on any write
    assert dataclasses.asdict(cfg) == before


def test_one_table_of_stages() -> None:
    from alignkit.stages import RUNNERS, get_stage
    from alignkit.stages.preference import PreferenceStage
    from alignkit.stages.sft import SFTStage

    assert STAGES == ("sft", "pt", "rm", "dpo", "kto", "ppo", "grpo")
    assert set(RUNNERS) == set(CONFIG_CLASSES.values())
    for name, cls in CONFIG_CLASSES.items():
        assert cls().stage == name  # each class's own `stage` default is its key
    assert get_stage("pt") is SFTStage and get_stage("dpo") is PreferenceStage
    with pytest.raises(UserError, match=r"available: sft, pt, rm, dpo, kto, ppo, grpo"):
        get_stage("dpx")
    with pytest.raises(UserError, match=r"not a stage \(did you mean `dpo`\?\); valid stages: sft, pt, rm"):
        build_config({"stage": "dpx", **REQUIRED})


def test_kto_weights_resolve_without_writing_the_config() -> None:
    cfg = build_config({"stage": "kto", **REQUIRED, "desirable_weight": "auto", "undesirable_weight": 2})
    assert isinstance(cfg, KTOConfig) and cfg.auto_weights
    assert cfg.resolved_weights(1.3333, 1.0) == (1.3333, 2.0)
    assert cfg.desirable_weight == "auto" and cfg.undesirable_weight == 2.0
    fixed = build_config({"stage": "kto", **REQUIRED, "desirable_weight": 1.5})
    assert not fixed.auto_weights and fixed.resolved_weights(9.0, 9.0) == (1.5, 1.0)
