"""Resumable runs: a method is trained (and evaluated) only when its folder does not already hold a finished
run of the same resolved config on the same inputs.

The mark, `compare_fingerprint.json`, is written only after the run finished, and holds the resolved config
(every key, defaults included, less the cosmetic ones) plus a fingerprint of every file the run reads: the
starting model, the data, the reference / reward / value models, a user's reward-function module. So an
edited data file, a retrained starting model or a changed key retrains; an interrupted compare, run again,
resumes where it stopped; a method interrupted after a checkpoint continues from it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any

from alignkit.config import BaseConfig, build_config, config_to_dict
from alignkit.errors import UserError
from alignkit.evaluation.config import EvalConfig
from alignkit.training.checkpoint import list_checkpoints

log = logging.getLogger("alignkit")

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
MODEL_FILES = ("model.safetensors", "adapter_model.safetensors", "model.safetensors.index.json")


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


# alignkit's own code counts as an input: a run made by other training (or eval) code is not reused. What
# cannot change a trained model (the eval, compare, the CLI) is left out of the training code, and the
# training loop and stages out of the eval code.
NOT_TRAINING_CODE = (
    "comparison",
    "evaluation",
    "quickstart",
    "cli.py",
)
NOT_EVAL_CODE = (
    "comparison",
    "stages",
    "quickstart",
    "cli.py",
    "training",
)
LIBRARIES = ("torch", "transformers", "accelerate", "peft")


@functools.lru_cache(maxsize=4)
def code_fingerprint(exclude: tuple[str, ...]) -> dict[str, Any]:
    """sha256 of alignkit's source (less `exclude`, top-level names) and the versions of the libraries the
    numbers depend on. Computed once per process: the code does not change under a running compare."""
    import importlib.metadata

    import alignkit

    root = os.path.dirname(os.path.abspath(alignkit.__file__))
    h = hashlib.sha256()
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            rel = os.path.relpath(os.path.join(folder, name), root)
            if name.endswith(".py") and rel.split(os.sep)[0] not in exclude:
                h.update(rel.encode() + b"\0")
                with open(os.path.join(folder, name), "rb") as fh:
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
    return _plain({"config": config, "inputs": inputs, "code": code_fingerprint(NOT_TRAINING_CODE)})


def eval_fingerprint(cfg: EvalConfig) -> dict[str, Any]:
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "output_dir"}
    inputs = {k: path_fingerprint(getattr(cfg, k)) for k in EVAL_INPUTS}
    inputs["reward_funcs"] = _reward_modules(cfg.reward_funcs)
    return _plain({"config": config, "inputs": inputs, "code": code_fingerprint(NOT_EVAL_CODE)})


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):  # none, or torn by a crash: running again is always correct
        return None


def _write_json(path: str, data: dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2)
    os.replace(tmp, path)  # a crash never leaves half a mark


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


@dataclass
class TrainResult:
    run_dir: str
    trained: bool  # False: a finished run with the same fingerprint was reused
    wall_s: float  # of the training that made the model (the earlier run's when reused)


def _has_model(run_dir: str) -> bool:
    return any(os.path.isfile(os.path.join(run_dir, f)) for f in MODEL_FILES)


def train_method(raw: dict[str, Any], source: str) -> TrainResult:
    """Train the run `raw` describes (flat keys, as for build_config) unless its output_dir already holds a
    finished run with the same fingerprint. A run started with the same fingerprint that left checkpoints
    is resumed from the newest; otherwise stale checkpoints go, and the run trains from the start."""
    from alignkit.stages import get_stage
    from alignkit.training.loop import train

    cfg = build_config({**raw, "overwrite_output_dir": True}, source)
    out = cfg.output_dir
    fp = train_fingerprint(cfg)
    done = _read_json(os.path.join(out, FINGERPRINT_FILE))
    if done and done.get("fingerprint") == fp and _has_model(out):
        log.info("%s: finished run with the same config and inputs in %s, not retrained", source, out)
        return TrainResult(out, False, float(done.get("wall_s", 0.0)))
    pending = _read_json(os.path.join(out, PENDING_FILE))
    resume = bool(pending and pending.get("fingerprint") == fp and list_checkpoints(out))
    log.info("%s: %s (%s)", source, "resuming" if resume else "training", ", ".join(changed(done, fp)[:4]))
    if not resume:
        for ckpt in list_checkpoints(out):  # another config's: a later `auto` resume must not pick them up
            shutil.rmtree(ckpt)
    os.makedirs(out, exist_ok=True)
    if os.path.exists(os.path.join(out, FINGERPRINT_FILE)):
        os.remove(os.path.join(out, FINGERPRINT_FILE))
    _write_json(os.path.join(out, PENDING_FILE), {"fingerprint": fp})
    cfg = dataclasses.replace(cfg, resume_from_checkpoint="auto" if resume else None)
    t0 = time.perf_counter()
    train(cfg, get_stage(cfg.stage)(cfg))
    wall = round(time.perf_counter() - t0, 1)
    _write_json(
        os.path.join(out, FINGERPRINT_FILE), {"fingerprint": fp, "wall_s": wall, "finished": time.time()}
    )
    os.remove(os.path.join(out, PENDING_FILE))
    return TrainResult(out, True, wall)


def eval_method(cfg: EvalConfig) -> tuple[dict[str, Any], bool]:
    """(eval.json's dict, whether it ran now). An eval of the same model files with the same keys is reused."""
    from alignkit.evaluation.run import run_eval

    fp = eval_fingerprint(cfg)
    mark = os.path.join(cfg.output_dir, FINGERPRINT_FILE)
    report = _read_json(os.path.join(cfg.output_dir, "eval.json"))
    done = _read_json(mark)
    if report is not None and done and done.get("fingerprint") == fp:
        log.info("eval of %s: done with the same keys and model files, reused", cfg.model)
        return report, False
    if os.path.exists(mark):
        os.remove(mark)
    report = run_eval(cfg)
    report.pop("table", None)
    _write_json(mark, {"fingerprint": fp, "finished": time.time()})
    return report, True


def budget(cfg: BaseConfig, processes: int = 1) -> dict[str, Any]:
    """Optimizer steps x global batch, and what a row of that batch is. Online stages count prompts: one
    rollout samples a global batch of prompts (GRPO `num_generations` times each, PPO once) and
    `updates_per_rollout` optimizer steps reuse it, so fresh prompts are steps / updates_per_rollout x batch."""
    from alignkit.comparison.config import BATCH_UNITS

    batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * processes
    steps = cfg.max_steps if cfg.max_steps > 0 else None
    out: dict[str, Any] = {
        "stage": cfg.stage,
        "optimizer_steps": steps,
        "global_batch": batch,
        "unit": BATCH_UNITS.get(cfg.stage, "rows"),
        "steps_x_batch": steps * batch if steps else None,
    }
    if steps is None:
        out["num_train_epochs"] = cfg.num_train_epochs
    if cfg.stage in ("grpo", "ppo") and steps:
        upr = cfg.num_iterations if cfg.stage == "grpo" else cfg.ppo_epochs * cfg.num_mini_batches
        per_prompt = cfg.num_generations if cfg.stage == "grpo" else 1
        rollouts = math.ceil(steps / upr)
        out.update(
            updates_per_rollout=upr,
            prompts_sampled=rollouts * batch,
            completions_sampled=rollouts * batch * per_prompt,
        )
    return out


def check_budgets(budgets: dict[str, dict[str, Any]], source: str, allow_unequal: bool) -> None:
    """Every method gets the same optimizer steps x global batch, unless `allow_unequal_budget: true`."""
    if allow_unequal:
        return
    for name, b in budgets.items():
        if b["steps_x_batch"] is None:
            raise UserError(
                f"{source}: methods.{name} sets no `max_steps`; compare fixes the budget in optimizer steps "
                "(set max_steps at the top level, or `allow_unequal_budget: true`)"
            )
    (first, a), *rest = budgets.items()
    for name, b in rest:
        if b["steps_x_batch"] != a["steps_x_batch"]:
            raise UserError(
                f"{source}: methods.{name} has a budget of {b['optimizer_steps']} steps x {b['global_batch']} "
                f"{b['unit']} = {b['steps_x_batch']}, methods.{first} {a['optimizer_steps']} x "
                f"{a['global_batch']} {a['unit']} = {a['steps_x_batch']}; every method gets the same optimizer "
                "steps x global batch (per_device_train_batch_size x gradient_accumulation_steps): make them "
                "equal, or set `allow_unequal_budget: true`"
            )
