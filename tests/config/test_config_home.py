"""The config's layout: one schema module that the checks import (no circle), fields built in their final type,
validation that only reads, one table of stages; and the hyperparameters the stages hand the losses: a
misspelled keyword is an error, never dropped."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
from pathlib import Path
from typing import Any

import pytest
import torch

import alignkit
from alignkit.config import build_config, config_to_dict, load_config, save_config
from alignkit.config.schema import BaseConfig, build_dataclass
from alignkit.config.stages import CONFIG_CLASSES, STAGES, DPOConfig, KTOConfig, OnlineConfig
from alignkit.errors import UserError
from alignkit.losses import registry as losses
from alignkit.losses import rl as rl_losses
from alignkit.losses.preference import DPO_LOSSES, PairLogps
from alignkit.losses.unpaired import KTO_LOSSES

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
    schema, stages, load = _imports("config/schema"), _imports("config/stages"), _imports("config/load")
    assert not {"alignkit.config", "alignkit.config.stages", "alignkit.config.load"} & schema
    assert "alignkit.config.schema" in stages and not {"alignkit.config", "alignkit.config.load"} & stages
    assert {"alignkit.config.schema", "alignkit.config.stages"} <= load
    assert not {"alignkit.config", "alignkit.config.stages", "alignkit.config.schema"} & _imports(
        "config/compat"
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
    keys = {**REQUIRED, **(ONLINE if issubclass(CONFIG_CLASSES[stage], OnlineConfig) else {})}
    if stage == "dpo":
        keys["loss_type"] = "sigmoid,sft"
    if stage == "kto":
        keys["desirable_weight"] = "auto"
    if stage == "distill":
        keys["teacher_model_name_or_path"] = "t"
    cfg = _guarded(CONFIG_CLASSES[stage], keys)
    before = dataclasses.asdict(cfg)
    cfg.check("t")  # raises on any write
    assert dataclasses.asdict(cfg) == before


def test_stage_name_is_checked_with_a_suggestion() -> None:
    assert STAGES == ("sft", "pt", "rm", "dpo", "kto", "ppo", "grpo", "online_dpo", "distill")
    for name, cls in CONFIG_CLASSES.items():
        assert cls().stage == name  # each class's own `stage` default is its key
    with pytest.raises(UserError, match=r"not a stage \(did you mean `dpo`\?\); valid stages: sft, pt, rm"):
        build_config({"stage": "dpx", **REQUIRED})


def test_padding_free_is_a_key_of_the_offline_stages_only() -> None:
    for stage in ("sft", "pt", "rm", "dpo", "kto"):
        assert build_config({"stage": stage, **REQUIRED, "padding_free": True}).padding_free is True
    with pytest.raises(
        UserError, match=r"unknown key `padding_free` for stage `grpo` \(use nothing: padding_free"
    ):
        build_config({"stage": "grpo", **REQUIRED, **ONLINE, "padding_free": True})


def test_kto_weights_resolve_without_writing_the_config() -> None:
    cfg = build_config({"stage": "kto", **REQUIRED, "desirable_weight": "auto", "undesirable_weight": 2})
    assert isinstance(cfg, KTOConfig) and cfg.auto_weights
    assert cfg.resolved_weights(1.3333, 1.0) == (1.3333, 2.0)
    assert cfg.desirable_weight == "auto" and cfg.undesirable_weight == 2.0
    fixed = build_config({"stage": "kto", **REQUIRED, "desirable_weight": 1.5})
    assert not fixed.auto_weights and fixed.resolved_weights(9.0, 9.0) == (1.5, 1.0)


def test_saved_config_records_the_stage_resolved_values(tmp_path: Path) -> None:
    cfg = build_config({"stage": "kto", **REQUIRED, "desirable_weight": "auto", "undesirable_weight": "auto"})
    resolved = dict(zip(("desirable_weight", "undesirable_weight"), cfg.resolved_weights(4.0, 1.0)))
    save_config(cfg, str(tmp_path / "config.yaml"), resolved)
    text = (tmp_path / "config.yaml").read_text(encoding="utf-8")
    assert "desirable_weight: 4.0\nundesirable_weight: 1.0\n" in text
    assert cfg.desirable_weight == "auto"  # the record changed, the config did not
    again = load_config(str(tmp_path / "config.yaml"))  # the file reproduces the run
    assert isinstance(again, KTOConfig) and not again.auto_weights
    assert again.resolved_weights(0.0, 0.0) == (4.0, 1.0)
    assert config_to_dict(cfg)["desirable_weight"] == "auto"
    with pytest.raises(ValueError, match="stage kto does not have: desirable_weigth"):
        config_to_dict(cfg, {"desirable_weigth": 4.0})


# ---------------------------------------------------------------------------------------- loss keywords
# what PreferenceStage.step hands every DPO-family loss, from the config's keys
DPO_HYPER = {
    "beta": 0.5,
    "label_smoothing": 0.2,
    "f_divergence_type": "reverse_kl",
    "f_alpha": 0.5,
    "discopop_tau": 0.05,
    "simpo_gamma": 0.5,
    "cpo_alpha": 1.0,
    "orpo_beta": 0.1,
}
KTO_HYPER = {"beta": 0.5, "desirable_weight": 2.0, "undesirable_weight": 1.0}


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _pair() -> PairLogps:
    return PairLogps(
        chosen=torch.tensor([-5.0, -7.0]),
        rejected=torch.tensor([-6.0, -6.5]),
        ref_chosen=torch.tensor([-5.5, -6.0]),
        ref_rejected=torch.tensor([-5.0, -7.0]),
        chosen_len=torch.tensor([2.0, 4.0]),
        rejected_len=torch.tensor([3.0, 2.0]),
        chosen_nll_tokens=torch.tensor([5.0, 7.0]),
        batch_chosen_tokens=torch.tensor(6.0),
    )


def test_each_loss_reads_its_own_keywords_and_the_registry_knows_the_stage_keys() -> None:
    assert DPO_LOSSES["sigmoid"].known == set(DPO_HYPER)
    assert KTO_LOSSES["kto"].known == set(KTO_HYPER)
    assert losses.reads(DPO_LOSSES["orpo"].loss) == {"orpo_beta"}
    assert losses.reads(DPO_LOSSES["sft"].loss) == set()
    assert losses.reads(DPO_LOSSES["simpo"].loss) == {"beta", "simpo_gamma", "label_smoothing"}


def test_registry_call_gives_the_loss_its_keywords_and_the_same_numbers() -> None:
    p = _pair()
    # cDPO by hand: h = [1.5, -1.5], -(1-e) log s(beta h) - e log s(-beta h)
    expected = [
        -0.8 * math.log(1 / (1 + math.exp(-0.5 * h))) - 0.2 * math.log(1 / (1 + math.exp(0.5 * h)))
        for h in (1.5, -1.5)
    ]
    assert DPO_LOSSES["sigmoid"].fn(p, **DPO_HYPER).tolist() == pytest.approx(expected, abs=1e-6)
    # ORPO reads only orpo_beta; the SFT term none: their numbers are those of the bare function
    for name, spec in DPO_LOSSES.items():
        own = {k: v for k, v in DPO_HYPER.items() if k in losses.reads(spec.loss)}
        assert torch.equal(spec.fn(p, **DPO_HYPER), spec.loss(p, **own)), name
    assert DPO_LOSSES["sft"].fn(p, **DPO_HYPER).tolist() == pytest.approx([5.0 * 2 / 6, 7.0 * 2 / 6])
    r, lab = torch.tensor([0.3, -0.2]), torch.tensor([True, False])
    kto = KTO_LOSSES["kto"].fn(r, lab, torch.tensor(0.25), **KTO_HYPER)
    assert kto.tolist() == pytest.approx(
        [2.0 * (1 - _sigmoid(0.5 * 0.05)), 1.0 * (1 - _sigmoid(0.5 * 0.45))], abs=1e-6
    )


@pytest.mark.parametrize("registry", [DPO_LOSSES, KTO_LOSSES])
def test_a_misspelled_loss_keyword_is_an_error(registry: dict) -> None:
    p = _pair()
    inputs = (
        (p,) if registry is DPO_LOSSES else (torch.tensor([0.3]), torch.tensor([True]), torch.tensor(0.0))
    )
    hyper = DPO_HYPER if registry is DPO_LOSSES else KTO_HYPER
    for spec in registry.values():
        with pytest.raises(TypeError, match=r"unknown loss keyword `betta` \(did you mean `beta`\?\)"):
            spec.fn(*inputs, **{**hyper, "betta": 0.1})
        with pytest.raises(TypeError):  # the bare function takes no catch-all either
            spec.loss(*inputs, **{k: v for k, v in hyper.items() if k in losses.reads(spec.loss)}, bogus=1)


@pytest.mark.parametrize("module", [losses, rl_losses])
def test_no_loss_drops_keywords(module: object) -> None:
    for name, fn in inspect.getmembers(module, inspect.isfunction):
        if fn.__module__ == module.__name__:  # type: ignore[attr-defined]
            kinds = [p.kind for p in inspect.signature(fn).parameters.values()]
            assert inspect.Parameter.VAR_KEYWORD not in kinds, name


def test_rl_loss_rejects_a_misspelled_keyword() -> None:
    logps = torch.tensor([-1.0, -2.0, -1.5])
    keys = dict(
        rows=torch.tensor([0, 0, 1]), spec=rl_losses.GRPO_LOSSES["dapo"], epsilon_low=0.2, max_new_tokens=4
    )
    loss, _, _ = rl_losses.grpo_policy_loss(logps, logps, torch.tensor([1.0, -1.0]), epsilon_high=0.2, **keys)
    assert loss.item() == pytest.approx(-1.0 - 1.0 + 1.0)  # ratio 1: -A per token, summed
    with pytest.raises(TypeError, match="epsilon_hgh"):
        rl_losses.grpo_policy_loss(logps, logps, torch.tensor([1.0, -1.0]), epsilon_hgh=0.2, **keys)
