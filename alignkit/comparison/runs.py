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
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any

from alignkit.comparison.fingerprint import (
    FINGERPRINT_FILE,
    PENDING_FILE,
    changed,
    eval_fingerprint,
    train_fingerprint,
)
from alignkit.config import BaseConfig, build_config
from alignkit.errors import UserError
from alignkit.evaluation.config import EvalConfig
from alignkit.evaluation.run import run_eval
from alignkit.stages import get_stage
from alignkit.training.checkpoint import list_checkpoints
from alignkit.training.loop import train

log = logging.getLogger("alignkit")

MODEL_FILES = ("model.safetensors", "adapter_model.safetensors", "model.safetensors.index.json")


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
    rollout samples a global batch of prompts (`samples_per_prompt` times each) and `updates_per_batch`
    optimizer steps reuse it, so fresh prompts are steps / updates_per_batch x batch."""
    stage = get_stage(cfg.stage)(cfg)  # its facts only: nothing is built
    batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * processes
    steps = cfg.max_steps if cfg.max_steps > 0 else None
    out: dict[str, Any] = {
        "stage": cfg.stage,
        "optimizer_steps": steps,
        "global_batch": batch,
        "unit": stage.batch_unit,
        "steps_x_batch": steps * batch if steps else None,
    }
    if steps is None:
        out["num_train_epochs"] = cfg.num_train_epochs
    if stage.online and steps:
        rollouts = math.ceil(steps / stage.updates_per_batch)
        out.update(
            updates_per_rollout=stage.updates_per_batch,
            prompts_sampled=rollouts * batch,
            completions_sampled=rollouts * batch * stage.samples_per_prompt,
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
