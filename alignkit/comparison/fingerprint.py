"""What makes two runs the same: the resolved config (less cosmetic keys), a fingerprint of every file the run
reads (starting model, data, reference / reward / value models, a user's reward-function module) and of the
alignkit code it imports, with the versions of the libraries the numbers depend on."""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import json
import os
from typing import Any

import alignkit
from alignkit.config import BaseConfig, config_to_dict
from alignkit.evaluation.config import EvalConfig

FINGERPRINT_FILE = "compare_fingerprint.json"
PENDING_FILE = ".compare_pending.json"  # written before training: a later run may resume its checkpoints
# keys that change what a run prints or where it lives, not what it learns
COSMETIC = (
    "output_dir",
    "overwrite_output_dir",
    "resume_from_checkpoint",
    "disable_tqdm",
    "report_to",
    "run_name",
)
TRAIN_INPUTS = (
    "model_name_or_path",
    "dataset",
    "eval_dataset",
    "ref_model_name_or_path",
    "reward_model",
    "value_model_name_or_path",
)
EVAL_INPUTS = (
    "model",
    "baseline",
    "dataset",
    "reward_model",
    "ref_model_name_or_path",
    "preference_dataset",
    "perplexity_dataset",
    "lm_eval_include_path",
)
HASH_LIMIT = 64 << 20  # files up to this size are hashed; larger ones (weights) by size and mtime
# what a run writes beside its model: not part of the model a later run starts from
SKIP_FILES = ("metrics.jsonl", "loss.png", "config.yaml", FINGERPRINT_FILE, PENDING_FILE)
SKIP_DIRS = ("eval", "runs", "wandb", "ref_logps", "merged", "__pycache__", ".git")
SKIP_DIR_PREFIXES = ("checkpoint-", ".tmp-checkpoint-", "failed-")


def _file_fingerprint(path: str) -> list[Any]:
    size = os.path.getsize(path)
    if size > HASH_LIMIT:
        return [size, os.stat(path).st_mtime_ns]
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return [size, h.hexdigest()]


def _files(root: str) -> list[str]:
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith(SKIP_DIR_PREFIXES))
        found += [os.path.join(folder, f) for f in sorted(files) if f not in SKIP_FILES]
    return found


def path_fingerprint(path: Any) -> Any:
    """A file's sha256 (size and mtime past 64 MB); a folder's, file by file (run artefacts left out); a hub
    id's name (offline, the name is all there is to know)."""
    if isinstance(path, (list, tuple)):
        return [path_fingerprint(p) for p in path]
    if not path:
        return None
    if os.path.isfile(path):
        return _file_fingerprint(path)
    if os.path.isdir(path):
        return {os.path.relpath(f, path): _file_fingerprint(f) for f in _files(path)}
    return {"not_local": str(path)}


def _reward_modules(names: list[str] | None) -> dict[str, Any]:
    """A user's `module:function` reward is code the run depends on: its source file counts as an input."""
    import importlib.util

    out: dict[str, Any] = {}
    for name in names or []:
        if ":" not in name:
            continue
        try:
            spec = importlib.util.find_spec(name.split(":")[0])
        except (ImportError, ValueError):
            spec = None
        origin = getattr(spec, "origin", None)
        out[name] = path_fingerprint(origin) if origin and os.path.isfile(origin) else None
    return out


# alignkit's own code counts as an input: a run made by other code is not reused. What counts is what the run
# imports: the modules reachable by imports (inside functions too) from where training / evaluation starts, so
# editing the server, the CLI or compare itself leaves finished runs valid.
TRAINING_ENTRY = ("alignkit.training.loop", "alignkit.stages")
EVAL_ENTRY = ("alignkit.evaluation.run",)
LIBRARIES = ("torch", "transformers", "accelerate", "peft")


def _module_file(name: str) -> str | None:
    """The source file of an alignkit module (a package's __init__.py), or None when there is none."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(alignkit.__file__)))
    base = os.path.join(root, *name.split("."))
    for path in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.isfile(path):
            return path
    return None


def _imports(name: str, path: str) -> set[str]:
    """The alignkit modules `name` imports, at its top and inside functions (`from a import b`: a.b when that
    is a module, else a)."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found: set[str] = set()
    with open(path, encoding="utf-8") as fh:
        tree = ast.parse(fh.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if m.startswith("alignkit") and _module_file(m)}


def imported_modules(entries: tuple[str, ...]) -> list[str]:
    """Every alignkit module reachable by imports from `entries` (with the packages that hold them), sorted."""
    seen: set[str] = set()
    todo = list(entries)
    while todo:
        name = todo.pop()
        path = _module_file(name)
        if name in seen or path is None:
            continue
        seen.add(name)
        parents = [name.rsplit(".", i)[0] for i in range(1, name.count("."))]
        todo += [*_imports(name, path), *parents]
    return sorted(seen)


@functools.lru_cache(maxsize=4)
def code_fingerprint(entries: tuple[str, ...]) -> dict[str, Any]:
    """sha256 of the source of every alignkit module a run imports (from `entries`), and the versions of the
    libraries the numbers depend on. Computed once per process: the code does not change under a compare."""
    import importlib.metadata

    h = hashlib.sha256()
    for name in imported_modules(entries):
        path = _module_file(name) or ""
        h.update(name.encode() + b"\0")
        with open(path, "rb") as fh:
            h.update(fh.read())
    versions: dict[str, Any] = {}
    for lib in LIBRARIES:
        try:
            versions[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            versions[lib] = None
    return {"alignkit_source": h.hexdigest(), **versions}


def _plain(value: Any) -> Any:
    """As it reads back from JSON, so a stored fingerprint compares equal to a fresh one."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def train_fingerprint(cfg: BaseConfig) -> dict[str, Any]:
    config = {k: v for k, v in config_to_dict(cfg).items() if k not in COSMETIC}
    inputs = {k: path_fingerprint(getattr(cfg, k, None)) for k in TRAIN_INPUTS}
    inputs["reward_funcs"] = _reward_modules(getattr(cfg, "reward_funcs", None))
    return _plain({"config": config, "inputs": inputs, "code": code_fingerprint(TRAINING_ENTRY)})


def eval_fingerprint(cfg: EvalConfig) -> dict[str, Any]:
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "output_dir"}
    inputs = {k: path_fingerprint(getattr(cfg, k)) for k in EVAL_INPUTS}
    inputs["reward_funcs"] = _reward_modules(cfg.reward_funcs)
    return _plain({"config": config, "inputs": inputs, "code": code_fingerprint(EVAL_ENTRY)})


def changed(old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    """What differs between two fingerprints, for the log line that says why a method runs again."""
    if not old or "fingerprint" not in old:
        return ["no finished run"]
    before = old["fingerprint"]
    out = []
    for part, label in (("config", "key"), ("inputs", "input"), ("code", "code")):
        a, b = before.get(part, {}), new.get(part, {})
        out += [f"{label} `{k}` changed" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return out or ["fingerprint format"]
