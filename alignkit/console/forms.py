"""Each stage's form, read from its config class: every key with its type, default, choices and help (the
comment written beside it), grouped as the class groups them. A key added to a config class appears in the
console's form with no console code written for it.

Validation is `alignkit train`'s own (`build_config`); its message names the key, which the page shows inline.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import io
import re
import textwrap
import tokenize
import types
import typing
from typing import Any

from alignkit.config import CONFIG_CLASSES, BaseConfig, build_config
from alignkit.config.schema import CHOICES, DATASET_FORMATS, TORCH_DTYPES
from alignkit.config.stages import F_DIVERGENCES
from alignkit.errors import UserError
from alignkit.evaluation import registry as metric_registry
from alignkit.evaluation.settings import EvalConfig
from alignkit.losses.preference import DPO_LOSSES
from alignkit.losses.rl import GRPO_LOSS_TYPES
from alignkit.losses.unpaired import KTO_LOSSES
from alignkit.modeling.chat_templates import TEMPLATES

# the choices of keys whose values are names in a registry (the stage's check reads the same registries)
REGISTRY_CHOICES: dict[str, dict[str, tuple[str, ...]]] = {
    "dpo": {"loss_type": tuple(DPO_LOSSES), "f_divergence_type": F_DIVERGENCES},
    "kto": {"loss_type": tuple(KTO_LOSSES)},
    "grpo": {"loss_type": tuple(GRPO_LOSS_TYPES)},
}
# keys the console sets itself: where a run writes is its own folder in the workspace
CONSOLE_KEYS = ("output_dir", "overwrite_output_dir", "resume_from_checkpoint", "disable_tqdm")


def _type_name(hint: Any) -> tuple[str, bool]:
    """('bool' | 'int' | 'float' | 'str' | 'list' | 'number_or_str', optional) of a field's type."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    args = [a for a in typing.get_args(hint) if a is not type(None)] if union else [hint]
    optional = union and type(None) in typing.get_args(hint)
    kinds = {a if isinstance(a, type) else typing.get_origin(a) for a in args}
    if list in kinds:
        return "list", optional
    if kinds == {bool}:
        return "bool", optional
    if kinds <= {int}:
        return "int", optional
    if kinds <= {int, float}:
        return "float", optional
    if kinds == {float, str} or kinds == {int, str}:
        return "number_or_str", optional
    return "str", optional


@functools.cache
def _comments(cls: type) -> tuple[dict[str, str], dict[str, str]]:
    """(help of each field: the comment beside it, section of each field: the comment line above it), read from
    the class's source with `tokenize`."""
    help_: dict[str, str] = {}
    section: dict[str, str] = {}
    current, heading = "", ""
    field_line = re.compile(r"^    (\w+): ")
    lines_with_code: set[int] = set()
    tokens = list(tokenize.generate_tokens(io.StringIO(textwrap.dedent(inspect.getsource(cls))).readline))
    for tok in tokens:
        if tok.type not in (
            tokenize.COMMENT,
            tokenize.NL,
            tokenize.NEWLINE,
            tokenize.INDENT,
            tokenize.DEDENT,
        ):
            lines_with_code.add(tok.start[0])
        m = field_line.match(tok.line) if tok.start[1] == 4 and tok.type == tokenize.NAME else None
        if tok.type == tokenize.NAME and tok.start[1] == 4 and tok.string in ("def", "class"):
            current = ""  # the fields are over: a method's comments are not a key's help
        elif m and m.group(1) == tok.string:
            current = tok.string
            section[current] = heading
        elif tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            if tok.start[0] in lines_with_code and current:
                help_[current] = f"{help_[current]} {text}".strip() if current in help_ else text
            elif tok.start[1] == 4:
                heading = re.split(r"[(;:]", text)[0].strip()
    return help_, section


def _help_and_section(cls: type, name: str) -> tuple[str, str]:
    """The comment of the class in the MRO that declares `name` last (a stage's own note wins), and its
    section: the comment line above it, else the declaring class's own name (`dpo` for DPOConfig's keys)."""
    for klass in cls.__mro__:
        if klass is object or name not in getattr(klass, "__annotations__", {}):
            continue
        help_, section = _comments(klass)
        stage_class = issubclass(klass, BaseConfig) and klass is not BaseConfig
        own = klass.__name__.removesuffix("Config").lower() if stage_class else ""
        return help_.get(name, ""), section.get(name) or own
    return "", ""


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def form_fields(
    cls: type, choices: dict[str, tuple[str, ...]], skip: tuple[str, ...] = (), group: str = "general"
) -> list[dict[str, Any]]:
    """A config dataclass's fields as a form: name, type, optional, default, choices, help, group."""
    hints = typing.get_type_hints(cls)
    fields = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind, optional = _type_name(hints[f.name])
        help_, section = _help_and_section(cls, f.name)
        fields.append(
            {
                "name": f.name,
                "type": kind,
                "optional": optional,
                "default": _default(f),
                "choices": list(choices.get(f.name, ())),
                "help": help_,
                "group": section or group,
            }
        )
    return fields


def stage_form(stage: str) -> list[dict[str, Any]]:
    """The fields of `stage`'s form, the stage's own keys first (grouped under its name), then the shared ones
    as BaseConfig groups them."""
    if stage not in CONFIG_CLASSES:
        raise UserError(f"no stage `{stage}`; stages: {', '.join(CONFIG_CLASSES)}")
    choices = {**CHOICES, "template": tuple(TEMPLATES), **REGISTRY_CHOICES.get(stage, {})}
    fields = form_fields(CONFIG_CLASSES[stage], choices, (*CONSOLE_KEYS, "stage"))
    shared = {f.name for f in dataclasses.fields(BaseConfig)}
    own = [f for f in fields if f["name"] not in shared or f["group"] not in _base_groups()]
    return own + [f for f in fields if f not in own]


@functools.cache
def _base_groups() -> frozenset[str]:
    return frozenset({"general", *_comments(BaseConfig)[1].values()})


def eval_form() -> list[dict[str, Any]]:
    """`alignkit eval`'s keys (the console picks the output folder)."""
    choices = {
        "metrics": metric_registry.names(),
        "torch_dtype": TORCH_DTYPES,
        "dataset_format": DATASET_FORMATS,
    }
    return form_fields(EvalConfig, choices, ("output_dir",))


def check_keys(keys: dict[str, Any]) -> dict[str, Any] | None:
    """None when `alignkit train` would accept `keys`, else {key, message}: the key its error names."""
    try:
        build_config(dict(keys), "form")
    except UserError as exc:
        return {"key": error_key(str(exc), keys), "message": str(exc).removeprefix("form: ")}
    return None


def error_key(message: str, keys: dict[str, Any]) -> str | None:
    """The first key an error message names in backticks (`key` or `key: value`)."""
    stage = keys.get("stage", "sft")
    names = {f.name for f in dataclasses.fields(CONFIG_CLASSES.get(stage, BaseConfig))} | set(keys)
    for quoted in re.findall(r"`([^`]+)`", message):
        name = quoted.split(":")[0].strip()
        if name in names:
            return name
    return None
