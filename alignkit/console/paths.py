"""Which keys of a form are paths, and each checked against the workspace before a job sees it: a local
path must lie inside the workspace or an allowed folder; a hub id or a name of `dataset_info.json` passes as
the name it is."""

from __future__ import annotations

import os
from typing import Any

from alignkit.config.coerce import flatten
from alignkit.console.workspace import PathRefused, Workspace
from alignkit.data.registry import read_dataset_info
from alignkit.errors import UserError

MODEL_KEYS = ("model", "baseline", "adapter", "reward_model")
DATASET_KEYS = ("dataset", "eval_dataset", "preference_dataset", "perplexity_dataset")
FILE_KEYS = ("deepspeed",)


def _is_model_key(key: str) -> bool:
    return key in MODEL_KEYS or key.endswith("_name_or_path")


def _is_path_key(key: str) -> bool:
    return key in FILE_KEYS or key.endswith(("_dir", "_path"))


def checked_keys(
    ws: Workspace, keys: dict[str, Any], training: bool = True, dataset_dir: str | None = None
) -> dict[str, Any]:
    """`keys` with every path resolved inside the workspace (a PathRefused otherwise). A training config's
    `dataset_dir` defaults to the workspace's `data/` (the command line's default is `./data`); `dataset_dir`
    given here: the names of its dataset_info.json are data set names in `keys` (a compare's methods)."""
    if not isinstance(keys, dict):
        raise UserError(f"config: a mapping of keys to values (got {type(keys).__name__})")
    out = flatten(dict(keys))
    if training or out.get("dataset_dir"):
        out["dataset_dir"] = str(ws.path(str(out.get("dataset_dir") or "data"), "dataset_dir"))
    where = out.get("dataset_dir") or dataset_dir
    info, _ = read_dataset_info(where) if where else (None, "")
    for key, value in list(out.items()):
        if value in (None, "", []) or key == "dataset_dir":
            continue
        if key in DATASET_KEYS:
            out[key] = _datasets(ws, key, value, info or {}, where or "")
        elif _is_model_key(key):
            values = value if isinstance(value, list) else [value]
            checked = [ws.model_or_hub(_text(v, key), key) for v in values]
            out[key] = checked if isinstance(value, list) else checked[0]
        elif _is_path_key(key) and isinstance(value, str):
            out[key] = str(ws.path(value, key))
    return out


def _text(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"`{key}`: a path or a name (got {value!r})")
    return value


def _datasets(ws: Workspace, key: str, value: Any, info: dict, dataset_dir: str) -> Any:
    names = value if isinstance(value, list) else [v.strip() for v in _text(value, key).split(",")]
    out = []
    for name in (_text(n, key) for n in names):
        if name in info:  # where its rows are (LLaMA-Factory's file, script or hub key) must be inside too
            _check_entry(ws, key, name, info[name], dataset_dir)
            out.append(name)
        elif ws.is_hub_id(name):
            out.append(name)
        else:
            out.append(str(ws.path(name, key)))
    return out if isinstance(value, list) or len(out) > 1 else out[0]


def _check_entry(ws: Workspace, key: str, name: str, entry: Any, dataset_dir: str) -> None:
    """Every place a dataset_info.json entry may read from: its file and script (beside the json file), and a
    `hf_hub_url` that names a local path (the datasets library would read it)."""
    if not isinstance(entry, dict):
        return  # the library's reader says what is wrong with it
    for field in ("file_name", "script_url"):
        if isinstance(entry.get(field), str) and entry[field]:
            ws.path(os.path.join(dataset_dir, entry[field]), f"{key} {name}: {field}")
    hub = entry.get("hf_hub_url")
    if isinstance(hub, str) and hub and not ws.is_hub_id(hub):
        if not os.path.isabs(os.path.expanduser(hub)):  # read as given, from wherever the process runs
            raise PathRefused(f"{key} {name}: hf_hub_url {hub} is a relative path; give a hub id", key)
        ws.path(hub, f"{key} {name}: hf_hub_url")


def checked_compare(ws: Workspace, raw: dict[str, Any]) -> dict[str, Any]:
    """A compare config's paths checked: the shared keys, each method's and the eval's."""
    sections = {"methods", "eval"}
    shared = checked_keys(ws, {k: v for k, v in raw.items() if k not in sections})
    methods = raw.get("methods")
    out: dict[str, Any] = dict(shared)
    if isinstance(methods, dict):
        out["methods"] = {
            name: checked_keys(ws, keys, False, shared["dataset_dir"]) if isinstance(keys, dict) else keys
            for name, keys in methods.items()
        }
    if isinstance(raw.get("eval"), dict):
        out["eval"] = checked_keys(ws, raw["eval"], training=False)
    return out
