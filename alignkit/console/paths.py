"""Which keys of a form are paths, and each checked against the workspace before a job sees it: a local
path must lie inside the workspace or an allowed folder; a hub id or a name of `dataset_info.json` passes as
the name it is."""

from __future__ import annotations

import os
from typing import Any

from alignkit.config.coerce import flatten
from alignkit.console.workspace import Workspace
from alignkit.data.files import looks_like_hub_id as looks_like_dataset_id
from alignkit.data.registry import read_dataset_info

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
    out = flatten(dict(keys))
    if training:
        out["dataset_dir"] = str(ws.path(str(out.get("dataset_dir") or "data"), "dataset_dir"))
    where = out.get("dataset_dir") or dataset_dir
    info, _ = read_dataset_info(where) if where else (None, "")
    for key, value in list(out.items()):
        if value in (None, "", []) or key == "dataset_dir":
            continue
        if key in DATASET_KEYS:
            out[key] = _datasets(ws, key, value, info or {}, where or "")
        elif _is_model_key(key):
            out[key] = (
                [ws.model_or_hub(v, key) for v in value]
                if isinstance(value, list)
                else (ws.model_or_hub(str(value), key))
            )
        elif _is_path_key(key) and isinstance(value, str):
            out[key] = str(ws.path(value, key))
    return out


def _datasets(ws: Workspace, key: str, value: Any, info: dict, dataset_dir: str) -> Any:
    names = value if isinstance(value, list) else [v.strip() for v in str(value).split(",")]
    out = []
    for name in names:
        if name in info:  # its file must be inside too
            entry = info[name]
            if isinstance(entry, dict) and isinstance(entry.get("file_name"), str):
                ws.path(os.path.join(dataset_dir, entry["file_name"]), f"{key} {name}: file_name")
            out.append(name)
        elif looks_like_dataset_id(name) and not (ws.root / name).exists():
            out.append(name)
        else:
            out.append(str(ws.path(name, key)))
    return out if isinstance(value, list) or len(out) > 1 else out[0]


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
