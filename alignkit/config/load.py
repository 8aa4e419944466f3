"""Run configuration: one flat dataclass per stage, read from YAML plus `key=value` overrides.

Keys use the names users of Hugging Face tools already know (TRL, LLaMA-Factory). Everything is
validated at load time: an unknown key, a wrong type or an impossible value is a `UserError` that
names the key and, where one is close, suggests the valid one. Once `build_config` returns, the config
is what the run reads and nothing writes to it.

Layout (no import circle): `schema` holds the shared keys and how a field's value is built, `stages` one
class per stage (each checks its own values), and this module loads, builds and saves.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import yaml

from alignkit.config.coerce import flatten, parse_overrides
from alignkit.config.compat import suggest, translate
from alignkit.config.schema import (
    BaseConfig,
    build_dataclass,
)
from alignkit.config.stages import (
    CONFIG_CLASSES,
    STAGES,
)
from alignkit.errors import UserError, did_you_mean


def build_config(raw: dict[str, Any], source: str = "config") -> BaseConfig:
    """Validate a flat mapping of keys (other tools' names translated first) and build the stage's config."""
    raw = translate(flatten(raw), source)
    stage = raw.get("stage", "sft")
    if stage not in CONFIG_CLASSES:
        raise UserError(
            f"{source}: `stage: {stage}` is not a stage{did_you_mean(str(stage), STAGES)}; "
            f"valid stages: {', '.join(STAGES)}"
        )
    cfg = build_dataclass(CONFIG_CLASSES[stage], raw, source, f"for stage `{stage}`", suggest)
    cfg.check(source)
    return cfg


def load_yaml_mapping(path: str) -> dict[str, Any]:
    """A YAML file's top-level mapping as written (sections not flattened); a clear error for a missing file,
    bad YAML (with its line) or a top level that is not a mapping."""
    if not os.path.isfile(path):
        raise UserError(f"config file {path} does not exist")
    with open(path, encoding="utf-8") as fh:
        try:
            loaded = yaml.safe_load(fh)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise UserError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise UserError(f"{path}: expected a mapping of keys to values at the top level")
    return loaded


def read_yaml(path: str | None, overrides: list[str] | None = None) -> dict[str, Any]:
    """A YAML file's flat keys (if a file is given) with `key=value` overrides applied; they win."""
    raw: dict[str, Any] = flatten(load_yaml_mapping(path)) if path is not None else {}
    raw.update(parse_overrides(overrides or []))
    return raw


def load_config(path: str | None, overrides: list[str] | None = None) -> BaseConfig:
    """Read YAML (if given), apply `key=value` overrides (they win), validate."""
    return build_config(read_yaml(path, overrides), path or "command line")


def config_to_dict(cfg: BaseConfig, resolved: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The config's keys and values. `resolved`: values a stage derived at build time for keys the user left
    to it (KTO's `auto` weights); they replace those keys in the returned copy, never in `cfg`."""
    record = dataclasses.asdict(cfg)
    unknown = sorted(set(resolved or {}) - set(record))
    if unknown:
        raise ValueError(f"resolved values for keys stage {cfg.stage} does not have: {', '.join(unknown)}")
    record.update(resolved or {})
    return record


def save_config(cfg: BaseConfig, path: str, resolved: Mapping[str, Any] | None = None) -> None:
    """The run's config.yaml: the config as built, with the stage's `resolved` values (see `config_to_dict`),
    so that loading the file reproduces the run."""
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(config_to_dict(cfg, resolved), fh, sort_keys=False)
