"""Turning YAML and `key=value` text into typed config values (used by `alignkit.config`)."""

from __future__ import annotations

import os
import types
import typing
from typing import Any, Union

import yaml

from alignkit.errors import UserError


def type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert `value` to the annotated type `tp`, or raise a UserError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(key, value, arg)
            except UserError:
                continue
        raise UserError(f"config key `{key}`: expected {type_name(tp)}, got {value!r}")
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, str) and "," in value:
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise UserError(f"config key `{key}`: expected a list, got {value!r}")
        return [coerce(key, v, inner) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"config key `{key}`: expected a mapping, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise UserError(f"config key `{key}`: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise UserError(f"config key `{key}`: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise UserError(f"config key `{key}`: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise UserError(f"config key `{key}`: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads `1e-4` as a string
            except ValueError:
                pass
        raise UserError(f"config key `{key}`: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"config key `{key}`: expected a string, got {value!r}")
    return value


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`["learning_rate=1e-4", "lora.r=16"]` -> dict. Values are parsed as YAML scalars.

    A dotted key (`lora.r`) addresses the flat key `lora_r`; the config stays flat.
    """
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"override `{pair}` is not of the form key=value (e.g. learning_rate=1e-4)")
        key, raw = pair.split("=", 1)
        key = key.strip().replace(".", "_").replace("-", "_")
        try:
            out[key] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            out[key] = raw
    return out


def flatten(raw: dict[str, Any]) -> dict[str, Any]:
    """Allow YAML sections (`lora: {r: 16}`) as a spelling of flat keys (`lora_r: 16`)."""
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict) and key not in ("reward_weights",):
            for sub, v in value.items():
                flat[f"{key}_{sub}"] = v
        else:
            flat[str(key)] = value
    return flat


def split_sources(sources: str | list[str]) -> list[str]:
    """Data sources one by one: a list as given, a string split on commas ("identity,alpaca_en_demo", as
    LLaMA-Factory's `dataset` key) unless the whole string names an existing file or folder."""
    out: list[str] = []
    for source in [sources] if isinstance(sources, str) else sources:
        if "," in source and not os.path.exists(source):
            out += [part.strip() for part in source.split(",") if part.strip()]
        else:
            out.append(source)
    return out
