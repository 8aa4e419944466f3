"""`alignkit compare` config: shared training keys at the top, a `methods:` section (one mapping of training
keys per method) and an `eval:` section (EvalConfig keys, the same for every method).

Unlike `alignkit train`, the top level is not flattened: `methods` and `eval` are sections, and `eval:` must
not turn into the training key `eval_dataset`. Every method's keys are checked by `build_config` and the eval
keys by `build_dataclass(EvalConfig)` before anything trains, so a typo in the last method fails in seconds.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any

from alignkit.comparison.fingerprint import EVAL_INPUTS, TRAIN_INPUTS
from alignkit.config import CONFIG_CLASSES, BaseConfig, build_config, build_dataclass, load_yaml_mapping
from alignkit.config.coerce import flatten, parse_overrides
from alignkit.errors import UserError, did_you_mean
from alignkit.evaluation.config import EvalConfig, validate

SECTIONS = ("methods", "eval")
COMPARE_KEYS = ("allow_unequal_budget",)  # keys of compare itself, not of training
# compare sets these for every method: the run's folder, and the one starting model all methods share
SET_BY_COMPARE = ("output_dir", "model_name_or_path", "overwrite_output_dir", "resume_from_checkpoint")
EVAL_SET_BY_COMPARE = ("model", "output_dir")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class Method:
    name: str
    raw: dict[str, Any]  # the flat keys handed to build_config
    cfg: BaseConfig


@dataclass
class CompareConfig:
    source: str
    output_dir: str
    model_name_or_path: str
    methods: list[Method]
    eval_raw: dict[str, Any]  # EvalConfig keys without `model` / `output_dir` (set per method)
    allow_unequal_budget: bool = False
    shared: dict[str, Any] = field(default_factory=dict)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`key=value` for a shared key, `eval.key=value` for an eval key, `methods.NAME.key=value` for one
    method's key (parse_overrides would read the dots as flat-key separators, so sections are split here)."""
    raw = copy.deepcopy(raw)
    for pair in overrides:
        key, sep, value = pair.partition("=")
        parts = key.strip().split(".")
        if sep and parts[0] == "eval" and len(parts) > 1:
            section, rest = raw.setdefault("eval", {}), parts[1:]
        elif sep and parts[0] == "methods" and len(parts) > 2:
            methods = raw.setdefault("methods", {})
            if not isinstance(methods.get(parts[1]), dict):
                raise UserError(f"override `{pair}`: there is no method `{parts[1]}` in `methods:`")
            section, rest = methods[parts[1]], parts[2:]
        else:
            section, rest = raw, parts
        section.update(parse_overrides([f"{'.'.join(rest)}={value}" if sep else pair]))
    return raw


def _all_training_keys() -> list[str]:
    return sorted({f.name for cls in CONFIG_CLASSES.values() for f in dataclasses.fields(cls)})


def _check_top_level(raw: dict[str, Any], source: str) -> None:
    known = set(_all_training_keys())
    for key, value in raw.items():
        if key in SECTIONS or key in COMPARE_KEYS:
            continue
        # a YAML section (`lora: {r: 16}`) spells flat keys (`lora_r`); a misspelt `method:` lands here too
        flat = [f"{key}_{sub}" for sub in value] if isinstance(value, dict) else [key]
        if any(name not in known for name in flat):
            choices = [*SECTIONS, *COMPARE_KEYS, *known]
            shown = key if isinstance(value, dict) else next(n for n in flat if n not in known)
            raise UserError(
                f"{source}: unknown key `{shown}`{did_you_mean(str(shown), choices)}; the top level holds "
                "the training keys every method shares, `methods:`, `eval:` and `allow_unequal_budget`"
            )
    if "stage" in raw:
        raise UserError(f"{source}: `stage` belongs in each method (methods: {{dpo: {{stage: dpo}}}})")


def _method_raw(name: str, keys: Any, shared: dict[str, Any], output_dir: str, source: str) -> dict:
    where = f"{source}: methods.{name}"
    if not _NAME.match(str(name)):
        raise UserError(f"{where}: a method name is a folder name: letters, digits, `_`, `.`, `-`")
    if not isinstance(keys, dict):
        raise UserError(f"{where}: expected a mapping of training keys (e.g. {{stage: dpo, beta: 0.1}})")
    if "stage" not in keys:
        raise UserError(f"{where}: no `stage`; say which method this is (e.g. `stage: dpo`)")
    stage = keys["stage"]
    if stage not in CONFIG_CLASSES:
        raise UserError(
            f"{where}: `stage: {stage}` is not a stage{did_you_mean(str(stage), CONFIG_CLASSES)}; "
            f"valid stages: {', '.join(CONFIG_CLASSES)}"
        )
    for key in SET_BY_COMPARE:
        if key in keys:
            why = (
                "every method starts from the shared model"
                if key == "model_name_or_path"
                else "compare sets it"
            )
            raise UserError(f"{where}: `{key}` cannot be set per method ({why}); set it at the top level")
    # a shared key reaches the stages that have it (`beta` is no SFT key, `max_new_tokens` only online)
    own = {f.name for f in dataclasses.fields(CONFIG_CLASSES[stage])}
    merged = {k: v for k, v in shared.items() if k in own}
    merged.update(flatten(keys))
    merged.update(output_dir=os.path.join(output_dir, name), overwrite_output_dir=True)
    return merged


def load_compare_config(path: str, overrides: list[str] | None = None) -> CompareConfig:
    """A compare YAML with the command line's `key=value` overrides (see `apply_overrides`)."""
    return build_compare_config(apply_overrides(load_yaml_mapping(path), list(overrides or [])), path)


def compare_config(config: Any, keys: dict[str, Any] | None = None) -> CompareConfig:
    """A compare config from a YAML path or a mapping, with `keys` on top: a shared key replaces the file's, a
    section (`methods`, `eval`) given as a mapping is merged into the file's key by key."""
    if isinstance(config, CompareConfig):
        return config
    if isinstance(config, (str, os.PathLike)):
        raw, source = load_yaml_mapping(os.fspath(config)), os.fspath(config)
    elif isinstance(config, dict):
        raw, source = copy.deepcopy(config), "compare config"
    else:
        raise UserError(f"compare: give a YAML path or a mapping (got {type(config).__name__})")
    for key, value in (keys or {}).items():
        if key in SECTIONS and isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **copy.deepcopy(value)}
        else:
            raw[key] = copy.deepcopy(value)
    return build_compare_config(raw, source)


def build_compare_config(raw: dict[str, Any], path: str) -> CompareConfig:
    """Check and resolve a compare config: every method's training config and the eval keys."""
    shared = flatten({k: v for k, v in raw.items() if k not in SECTIONS and k not in COMPARE_KEYS})
    _check_top_level(raw, path)
    methods_raw = raw.get("methods")
    if not isinstance(methods_raw, dict) or len(methods_raw) < 2:
        found = len(methods_raw) if isinstance(methods_raw, dict) else 0
        raise UserError(
            f"{path}: `methods:` needs at least 2 methods to compare (found {found}), e.g.\n"
            "methods:\n  dpo: {stage: dpo, beta: 0.1}\n  kto: {stage: kto}"
        )
    output_dir = str(shared.pop("output_dir", "compare"))
    for key in ("overwrite_output_dir", "resume_from_checkpoint"):
        if key in shared:
            raise UserError(
                f"{path}: `{key}` is not a compare key: compare owns output_dir/<method>, skips a method "
                "already trained with the same config and resumes one it started"
            )
    if not shared.get("model_name_or_path"):
        raise UserError(f"{path}: `model_name_or_path` is not set: the model every method starts from")
    methods = []
    for name, keys in methods_raw.items():
        flat = _method_raw(str(name), keys, shared, output_dir, path)
        methods.append(Method(str(name), flat, build_config(flat, f"{path}: methods.{name}")))
    allow = raw.get("allow_unequal_budget", False)
    if not isinstance(allow, bool):
        raise UserError(f"{path}: `allow_unequal_budget` must be true or false, got {allow!r}")
    eval_raw = raw.get("eval") or {}
    if not isinstance(eval_raw, dict):
        raise UserError(f"{path}: `eval:` must be a mapping of eval keys (dataset, max_new_tokens, ...)")
    for key in EVAL_SET_BY_COMPARE:
        if key in eval_raw:
            raise UserError(f"{path}: eval.{key} is set by compare (each method's folder); leave it out")
    if not eval_raw.get("dataset") and not eval_raw.get("lm_eval_tasks"):
        raise UserError(f"{path}: `eval:` needs `dataset:`, the prompts every method answers")
    eval_raw = {"baseline": shared["model_name_or_path"], **eval_raw}
    cfg = CompareConfig(path, output_dir, str(shared["model_name_or_path"]), methods, eval_raw, allow, shared)
    ecfg = eval_config(cfg, methods[0].name, methods[0].cfg.output_dir)  # the eval keys are checked once, now
    _check_local_paths(cfg, ecfg)
    return cfg


DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt")


def _looks_local(value: str) -> bool:
    """A path the user means on this machine (a bare `org/name` may be a hub id, so it is not judged here)."""
    return value.startswith((".", "/", "~")) or value.endswith(DATA_SUFFIXES)


def _check_local_paths(cfg: CompareConfig, ecfg: EvalConfig) -> None:
    """A missing file fails now, not after the methods before it have trained."""

    checks = [(f"methods.{m.name}", k, getattr(m.cfg, k, None)) for m in cfg.methods for k in TRAIN_INPUTS]
    checks += [("eval", k, getattr(ecfg, k)) for k in EVAL_INPUTS if k != "model"]
    for where, key, value in checks:
        for path in value if isinstance(value, list) else [value]:
            if (
                isinstance(path, str)
                and path
                and _looks_local(path)
                and not os.path.exists(os.path.expanduser(path))
            ):
                raise UserError(f"{cfg.source}: {where}: `{key}` {path} does not exist")


def eval_config(cfg: CompareConfig, name: str, run_dir: str) -> EvalConfig:
    """The eval of one method: the shared eval keys, its model, its folder."""
    raw = {**cfg.eval_raw, "model": run_dir, "output_dir": os.path.join(run_dir, "eval")}
    source = f"{cfg.source}: eval"
    ecfg = build_dataclass(EvalConfig, raw, source, "for `eval:`")
    validate(ecfg, source)
    return ecfg
